"""Image loading and preprocessing exactly as the release's `visual.image_transform` (docs/qwen-vl.md §3).

PIL does the resize: bit-exact pixels need PIL's antialiased bicubic, which tensor resizes do
not reproduce. The image is squashed to a square and EXIF orientation is ignored, as in the
original.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from workbench.errors import WorkbenchError

# OpenAI CLIP normalisation, as the release's torchvision Normalize uses.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def load_image(path: str | Path, root: str | Path | None = None) -> Image.Image:
    """Open `path` (relative paths against `root`, else the cwd) as RGB.

    `convert("RGB")` drops alpha without compositing and maps palette/grayscale to RGB,
    which is what the original does (golden images b, c, d).
    """
    full = Path(root) / path if root is not None else Path(path)
    try:
        with Image.open(full) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        where = f" (relative to image root {root})" if root is not None else f" (relative to cwd {Path.cwd()})"
        raise WorkbenchError(f"image not found: {path}{where}") from None
    except OSError as e:
        raise WorkbenchError(f"cannot read image {full}: {e}") from None


def read_image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from the header; `verify()` walks the file's chunks without decoding pixels."""
    path = Path(path)
    if not path.is_file():
        raise WorkbenchError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            size = image.size
            image.verify()
        return size
    except Exception as err:  # PIL raises many types for a broken file
        raise WorkbenchError(f"cannot read image {path}: {err}") from None


def preprocess(image: Image.Image, image_size: int) -> torch.Tensor:
    """PIL bicubic resize to image_size x image_size, ToTensor, CLIP normalisation -> [3,S,S] float32."""
    image = image.convert("RGB").resize((image_size, image_size), Image.Resampling.BICUBIC)
    # Same float32 ops, in the same order, as torchvision's ToTensor + Normalize.
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div(255)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(CLIP_STD, dtype=torch.float32)[:, None, None]
    return x.sub(mean).div(std)
