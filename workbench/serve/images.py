"""An `image_url` of a request -> a decoded RGB image, within bounds.

Sources: `data:` URLs with base64 (always); `file:` URLs or bare paths only when the server has an
image root, and only inside it (symlinks resolved); http(s) only when the server allows remote
images. Bytes are bounded before decoding and pixels before decompressing (read from the header),
so a decompression bomb is refused without being expanded. Only raster formats that Pillow decodes
itself are opened (no EPS: Pillow would run Ghostscript on it).

Decoding and the conversion to RGB are the workbench's one loader (model/image_processing.py), so
the server feeds the model the pixels that training, eval and `workbench chat` feed it: EXIF
rotation applied, 16-bit grey scaled rather than clipped, CMYK through Pillow, alpha and palettes
as the release converts them.
"""

from __future__ import annotations

import base64
import binascii
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from workbench.errors import WorkbenchError
from workbench.model.image_processing import MAX_PIXELS
from workbench.model.image_processing import decode_image as load_bytes

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG includes MPO (phone photos)


class ImageError(WorkbenchError, ValueError):
    """An image the server will not read (bad URL, not an image, too big, outside the image root)."""


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 2**20           # encoded size of one image
    max_pixels: int = MAX_PIXELS          # width x height of one image (8192 x 8192)
    root: Path | None = None              # where file paths may point; None: no file paths
    allow_remote: bool = False            # fetch http(s) URLs (the server can then reach what it can reach)
    remote_timeout_s: float = 10.0


def load_image_url(url: str, limits: ImageLimits) -> Image.Image:
    """The RGB image an `image_url.url` names (see the module docstring for what is allowed)."""
    if url.startswith("data:"):
        return decode_image(_data_url_bytes(url, limits.max_bytes), limits.max_pixels)
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        if not limits.allow_remote:
            raise ImageError("remote image URLs are off on this server (it was not started with "
                             "--allow-remote-images): send the image as a base64 data URL")
        return decode_image(_fetch(url, limits), limits.max_pixels)
    if scheme in ("file", ""):
        return decode_image(_read_file(url, limits), limits.max_pixels)
    raise ImageError(f"unsupported image URL scheme {scheme!r}: use a data:image/...;base64 URL")


def _data_url_bytes(url: str, max_bytes: int) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise ImageError("a data URL must look like data:image/png;base64,<base64 bytes>")
    if len(payload) > (max_bytes + 2) // 3 * 4 + 4:  # the decoded size, before decoding anything
        raise ImageError(f"image is larger than {max_bytes} bytes (--max-image-bytes)")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as err:
        raise ImageError(f"the data URL is not valid base64 ({err})") from None


def _read_file(url: str, limits: ImageLimits) -> bytes:
    if limits.root is None:
        raise ImageError("file paths are off on this server (it was not started with --image-root): "
                         "send the image as a base64 data URL")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme and parts.netloc not in ("", "localhost"):
        raise ImageError(f"file URL with a host ({parts.netloc}) is not a local file")
    raw = urllib.parse.unquote(parts.path) if parts.scheme else url
    root = limits.root.resolve()
    try:
        path = (root / raw).resolve()  # symlinks followed; an absolute `raw` replaces root (checked next)
    except (OSError, RuntimeError, ValueError):
        raise ImageError(f"image path {raw!r} cannot be resolved") from None
    # Checked before looking at the file, so the answer never says whether a path outside exists.
    if not path.is_relative_to(root):
        raise ImageError(f"image path {raw} is outside the image root (--image-root)")
    if not path.is_file():
        raise ImageError(f"image file not found under the image root: {raw}")
    if path.stat().st_size > limits.max_bytes:
        raise ImageError(f"image file is larger than {limits.max_bytes} bytes (--max-image-bytes)")
    return path.read_bytes()


def _fetch(url: str, limits: ImageLimits) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=limits.remote_timeout_s) as response:
            data = response.read(limits.max_bytes + 1)
    except (OSError, ValueError) as err:
        raise ImageError(f"cannot fetch {url}: {err}") from None
    if len(data) > limits.max_bytes:
        raise ImageError(f"image is larger than {limits.max_bytes} bytes (--max-image-bytes)")
    return data


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Bytes -> the model's RGB image, by the workbench's one loader (model/image_processing.py:
    pixels checked on the header, EXIF rotation, 16-bit scaled), with only FORMATS' decoders."""
    try:
        return load_bytes(data, "the image", max_pixels, formats=FORMATS)
    except WorkbenchError as err:
        raise ImageError(str(err)) from None
