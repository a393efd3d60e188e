"""Image URLs -> RGB: the conversions a viewer would make, and every refusal with its reason."""

from __future__ import annotations

import base64
import http.server
import io
import re
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.serve.conftest import data_url
from workbench.model.image_processing import load_image
from workbench.serve.images import ImageError, ImageLimits, decode_image, load_image_url


def _png_bytes(image: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", **save)
    return buf.getvalue()


def _palette_with_transparency() -> Image.Image:
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 0, 255])  # index 0 red (transparent), 1 blue
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 0
    return image


def _cmyk_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("CMYK", (8, 8), (255, 0, 0, 0)).save(buf, "JPEG", quality=100)  # pure cyan ink
    return buf.getvalue()


def _exif_rotated() -> bytes:
    image = Image.new("RGB", (20, 10), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 4, 10))  # a red stripe on the left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the camera was turned; a viewer rotates 90 degrees clockwise
    buf = io.BytesIO()
    image.save(buf, "JPEG", exif=exif, quality=100)
    return buf.getvalue()


# (bytes, pixel (x, y), expected RGB, tolerance): what the model is fed (the release's conversion,
# except that 16-bit grey is scaled, EXIF rotation applied and CMYK inks converted).
CONVERSIONS = {
    "16-bit grey is scaled, not clipped": (_png_bytes(Image.fromarray(np.array([[0, 32768, 65535]], np.uint16))),
                                            [(0, 0), (1, 0), (2, 0)], [(0, 0, 0), (127, 127, 127), (255, 255, 255)], 1),
    "palette + transparency: the palette colour": (_png_bytes(_palette_with_transparency()),
                                                   [(0, 0), (1, 0)], [(255, 0, 0), (0, 0, 255)], 0),
    "LA: the grey, alpha dropped": (_png_bytes(Image.fromarray(np.array([[[10, 0], [200, 255]]], np.uint8), "LA")),
                                    [(0, 0), (1, 0)], [(10, 10, 10), (200, 200, 200)], 0),
    "RGBA: alpha dropped": (_png_bytes(Image.new("RGBA", (1, 1), (255, 0, 0, 128))), [(0, 0)], [(255, 0, 0)], 0),
    "CMYK JPEG": (_cmyk_jpeg(), [(4, 4)], [(0, 255, 255)], 8),
    "EXIF orientation applied": (_exif_rotated(), [(5, 1), (5, 18)], [(255, 0, 0), (0, 0, 255)], 40),
    "1-bit": (_png_bytes(Image.new("1", (1, 1), 1)), [(0, 0)], [(255, 255, 255)], 0),
}


@pytest.mark.parametrize("name", CONVERSIONS)
def test_conversion_to_rgb(name, tmp_path):
    data, points, colours, tol = CONVERSIONS[name]
    image = decode_image(data, max_pixels=10_000)
    assert image.mode == "RGB"
    if name == "EXIF orientation applied":
        assert image.size == (10, 20)  # the red left edge is now the top
    for point, colour in zip(points, colours):
        assert np.abs(np.subtract(image.getpixel(point), colour)).max() <= tol, (point, image.getpixel(point))
    # The pixels `workbench chat --image` and training load from the same bytes in a file.
    (tmp_path / "image").write_bytes(data)
    assert np.array_equal(np.asarray(image), np.asarray(load_image(tmp_path / "image")))


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height but holds one empty IDAT: refused on its header alone."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def _b64(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


REFUSALS = {
    "decompression bomb": (_b64(_png_header(40000, 40000)), {}, "40000x40000 is 1,600,000,000 pixels, more than "
                                                                  "the limit of 67,108,864 (a decompression bomb?)"),
    "pixels over a set limit": (data_url(Image.new("RGB", (200, 200))), {"max_pixels": 10_000}, "200x200 is 40,000"),
    "bytes over the limit": (data_url(Image.new("RGB", (200, 200))), {"max_bytes": 100}, "larger than 100 bytes"),
    "not base64": ("data:image/png;base64,@@not base64@@", {}, "not valid base64"),
    "no base64 marker": ("data:image/png,abc", {}, "data:image/png;base64"),
    "not an image": (_b64(b"hello, I am text"), {}, "not an image"),
    "truncated": (_b64(_png_bytes(Image.effect_noise((64, 64), 50))[:300]), {}, "not a readable image"),
    "EPS (Ghostscript) refused": (_b64(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"), {}, "not an image"),
    "remote off": ("http://127.0.0.1:9/cat.png", {}, "remote image URLs are off"),
    "file paths off": ("file:///etc/passwd", {}, "file paths are off"),
    "bare path off": ("cat.png", {}, "file paths are off"),
    "other scheme": ("ftp://example.invalid/cat.png", {}, "unsupported image URL scheme"),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_refusals_say_why(name):
    url, limits, words = REFUSALS[name]
    with pytest.raises(ImageError, match=re.escape(words)):
        load_image_url(url, ImageLimits(**limits))


def test_file_paths_stay_inside_the_image_root(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside.png"
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (4, 4), (1, 2, 3)).save(root / "sub" / "ok.png")
    Image.new("RGB", (4, 4)).save(outside)
    (root / "link.png").symlink_to(outside)
    limits = ImageLimits(root=root)
    for url in ("sub/ok.png", "file:sub/ok.png", f"file://{root}/sub/ok.png", f"file://localhost{root}/sub/ok.png"):
        assert load_image_url(url, limits).getpixel((0, 0)) == (1, 2, 3), url
    for url, words in [("../outside.png", "outside the image root"), (str(outside), "outside the image root"),
                       ("file:///etc/passwd", "outside the image root"), ("link.png", "outside the image root"),
                       ("sub/../../outside.png", "outside the image root"), ("missing.png", "not found"),
                       ("sub", "not found"), ("file://otherhost/sub/ok.png", "with a host")]:
        with pytest.raises(ImageError, match=words):
            load_image_url(url, limits)


def test_remote_images_when_allowed(images_dir):
    """Fetched from a server on 127.0.0.1 only: no traffic leaves the machine."""
    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(images_dir), **kwargs)

        def log_message(self, *args):
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler) as httpd:
        thread = threading.Thread(target=httpd.serve_forever, daemon=True)
        thread.start()
        try:
            url = f"http://127.0.0.1:{httpd.server_address[1]}"
            image = load_image_url(f"{url}/red.png", ImageLimits(allow_remote=True, remote_timeout_s=5))
            assert image.size == (40, 30) and image.getpixel((0, 0)) == (200, 10, 10)
            with pytest.raises(ImageError, match="cannot fetch"):
                load_image_url(f"{url}/missing.png", ImageLimits(allow_remote=True, remote_timeout_s=5))
            with pytest.raises(ImageError, match="larger than 50 bytes"):
                load_image_url(f"{url}/red.png", ImageLimits(allow_remote=True, max_bytes=50))
        finally:
            httpd.shutdown()
    assert Path(images_dir / "red.png").is_file()
