"""The frozen-ViT cache (`data.vit_cache`): the visual module's output per distinct image, once.

A recipe that trains neither the ViT nor the resampler sends the same images through the same
frozen `transformer.visual` every epoch. The cache runs it once before training, at the run's
image size and precision, and the dataset then yields `image_features` [K, 256, D] instead of
`pixel_values`, which the model puts into the image spans as it would its own ViT output.

Layout: `<vit_cache_dir>/<fingerprint>/<sha256 of the image file's bytes>.safetensors`, one tensor
`features` [256, D] with the metadata below, checked on every read. The fingerprint (16 hex) covers
every byte of the visual state dict, the image size and the precision, so a changed ViT (another
base, an imported trunk) or another resolution gets a new folder and never a stale entry.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from workbench.atomic import atomic_path, follow_umask
from workbench.errors import DataError
from workbench.model.image_processing import load_image, preprocess
from workbench.user_cache import user_cache

FORMAT = "1"  # bumped when what a file holds changes
BATCH = 8  # images per ViT forward in the pre-pass


def cache_root(vit_cache_dir: str | None) -> Path:
    return Path(vit_cache_dir).expanduser() if vit_cache_dir else user_cache("vit")


def visual_fingerprint(visual: nn.Module, image_size: int, precision: str) -> str:
    """sha256 (16 hex) of the format, image size, precision and every visual tensor's name, dtype, shape, bytes."""
    h = hashlib.sha256(f"workbench-vit-cache {FORMAT} {image_size} {precision}".encode())
    for name, tensor in visual.state_dict().items():
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name} {t.dtype} {tuple(tensor.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def image_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def metadata(fingerprint: str, image_hash: str, image_size: int) -> dict[str, str]:
    return {"format": FORMAT, "fingerprint": fingerprint, "image_sha256": image_hash, "image_size": str(image_size)}


def entry_is_valid(file: Path, expected: dict[str, str]) -> bool:
    """The file exists, is readable safetensors and its metadata is exactly `expected`."""
    if not file.is_file():
        return False
    try:
        with safe_open(str(file), framework="pt") as f:
            return f.metadata() == expected and list(f.keys()) == ["features"]
    except Exception:  # a truncated or foreign file: recompute it
        return False


def read_features(file: Path, expected: dict[str, str]) -> torch.Tensor:
    """[256, D] features of one cached image; an entry changed under the run is an error, not a guess."""
    if not entry_is_valid(file, expected):
        raise DataError(f"ViT cache entry {file} is missing or does not match this run "
                        f"(expected metadata {expected}); it changed after the pre-pass: rerun the training",
                        field="images")
    # A copy, not a view of the mapped file: a later rewrite of the file must not reach this tensor.
    return load_file(str(file))["features"].clone()


@dataclass(frozen=True)
class CacheFill:
    folder: Path
    fingerprint: str
    entries: dict[str, tuple[str, dict[str, str]]]  # image path -> (cache file, its metadata)
    computed: int  # images sent through the ViT now
    reused: int  # valid entries found

    def summary(self) -> str:
        return (f"vit cache:  {self.folder}: {self.computed} images computed, {self.reused} reused "
                f"({len(self.entries)} image paths)")


def fill_cache(visual: nn.Module, image_paths: Iterable[Path], folder: Path, fingerprint: str, image_size: int,
               autocast: Callable[[], AbstractContextManager], progress: bool = True) -> CacheFill:
    """Compute the features of every distinct image (by content) that has no valid entry yet."""
    from tqdm.auto import tqdm

    entries: dict[str, tuple[str, dict[str, str]]] = {}
    missing: dict[str, Path] = {}  # image hash -> one path with those bytes
    reused = set()
    for path in dict.fromkeys(Path(p) for p in image_paths):
        digest = image_sha256(path)
        meta = metadata(fingerprint, digest, image_size)
        file = folder / f"{digest}.safetensors"
        entries[str(path)] = (str(file), meta)
        if digest in missing or digest in reused:
            continue
        if entry_is_valid(file, meta):
            reused.add(digest)
        else:
            missing[digest] = path
    todo = list(missing.items())
    was_training = visual.training
    visual.eval()  # no dropout or batch statistics in the visual module: eval computes what train does
    try:
        with tqdm(total=len(todo), desc="ViT cache", unit="img", disable=not progress or not todo) as bar:
            for start in range(0, len(todo), BATCH):
                chunk = todo[start: start + BATCH]
                pixels = torch.stack([preprocess(load_image(p), image_size) for _, p in chunk]).float()
                with torch.no_grad(), autocast():
                    features = visual(pixels).cpu()
                for (digest, _), feats in zip(chunk, features):
                    _write(folder / f"{digest}.safetensors", feats, metadata(fingerprint, digest, image_size))
                bar.update(len(chunk))
    finally:
        visual.train(was_training)
    return CacheFill(folder, fingerprint, entries, computed=len(todo), reused=len(reused))


def _write(file: Path, features: torch.Tensor, meta: dict[str, str]) -> None:
    with atomic_path(file) as tmp:
        save_file({"features": features.clone().contiguous()}, str(tmp), metadata=meta)
        follow_umask(tmp)
