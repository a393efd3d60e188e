"""Image loading and preprocessing exactly as the release's `visual.image_transform` (docs/qwen-vl.md §3).

PIL does the resize: bit-exact pixels need PIL's antialiased bicubic, which tensor resizes do
not reproduce. The image is squashed to a square, as in the original. Unlike the original, EXIF
orientation is applied (boxes are drawn on the picture people see) and images are fully decoded
under a pixel limit; this is the one loader of data check, training workers, eval, chat and serve.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from workbench.errors import WorkbenchError

# OpenAI CLIP normalisation, as the release's torchvision Normalize uses.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The largest image accepted (width x height), checked before decoding: 8K x 8K.
MAX_PIXELS = 8192 * 8192
EXIF_ORIENTATION = 0x0112
# PIL's own bomb check warns, then raises at a size of its choosing; the workbench's limit rules.
Image.MAX_IMAGE_PIXELS = None


def load_image(path: str | Path, root: str | Path | None = None, max_pixels: int | None = None) -> Image.Image:
    """Open, fully decode and convert an image file to the model's RGB input (see `to_rgb`).

    Relative paths are taken against `root`, else the cwd. An image larger than `max_pixels`
    (default MAX_PIXELS) is refused before it is decoded, so a decompression bomb costs nothing.
    """
    full = Path(root) / path if root is not None else Path(path)
    try:
        with Image.open(full) as image:
            _check_pixels(image, full, max_pixels)
            image.load()  # full decode: a truncated file fails here, not in a training worker
            return to_rgb(ImageOps.exif_transpose(image))
    except FileNotFoundError:
        where = f" (relative to image root {root})" if root is not None else f" (relative to cwd {Path.cwd()})"
        raise WorkbenchError(f"image not found: {path}{where}") from None
    except WorkbenchError:
        raise
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError) for a broken file
        raise WorkbenchError(f"cannot read image {full}: {err}") from None


def decode_image(data: bytes, what: str, max_pixels: int | None = None,
                 formats: tuple[str, ...] | None = None) -> Image.Image:
    """`load_image` for bytes (an upload, a data URL); `what` names them in errors. `formats` limits
    the decoders PIL may pick (a server refuses EPS, whose decoder runs Ghostscript)."""
    try:
        with Image.open(io.BytesIO(data), formats=formats) as image:
            _check_pixels(image, what, max_pixels)
            image.load()
            return to_rgb(ImageOps.exif_transpose(image))
    except WorkbenchError:
        raise
    except UnidentifiedImageError:
        kinds = f" in a supported format ({', '.join(formats)})" if formats else ""
        raise WorkbenchError(f"{what}: not an image{kinds}") from None
    except Exception as err:
        raise WorkbenchError(f"{what}: not a readable image ({err})") from None


def _check_pixels(image: Image.Image, what: object, max_pixels: int | None) -> None:
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    if image.width * image.height > limit:
        raise WorkbenchError(f"{what}: {image.width}x{image.height} is {image.width * image.height:,} pixels, "
                             f"more than the limit of {limit:,} (a decompression bomb?); resize it first")


def to_rgb(image: Image.Image) -> Image.Image:
    """The release's `convert("RGB")`, except where it would destroy the picture.

    Kept as the release does it (exact on the golden images): alpha dropped without compositing
    (RGBA, LA), a palette's transparent index shown in its palette colour, grey copied to 3 channels.
    Fixed: 16-bit and 32-bit grey, which `convert("RGB")` clips to 0/255 (a ramp would reach the
    model as two values), are scaled to 8 bits first; CMYK goes through PIL's conversion.
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image, dtype=np.int64)
        top = 65535 if image.mode.startswith("I;16") or values.max(initial=0) <= 65535 else int(values.max())
        image = Image.fromarray((values * 255 // max(top, 1)).clip(0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        image = Image.fromarray(np.asarray(image, dtype=np.float32).clip(0, 255).astype(np.uint8), mode="L")
    elif image.mode == "LA":
        image = image.getchannel("L")
    return image.convert("RGB")


def read_image_size(path: str | Path, decode: bool = False, max_pixels: int | None = None) -> tuple[int, int]:
    """(width, height) as the model will see the image (EXIF rotation applied).

    By default from the header, with `verify()` walking the file's chunks; `decode=True` decodes
    every pixel (what `workbench data check` does: a truncated JPEG passes verify()).
    """
    path = Path(path)
    if not path.is_file():
        raise WorkbenchError(f"image not found: {path}")
    if decode:
        return load_image(path, max_pixels=max_pixels).size
    try:
        with Image.open(path) as image:
            image.verify()  # must come first on an opened file
        with Image.open(path) as image:
            _check_pixels(image, path, max_pixels)
            size = image.size
            turned = image.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
        return (size[1], size[0]) if turned else size
    except WorkbenchError:
        raise
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
