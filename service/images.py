"""Images a client sends with a question: decoded once at the edge, checked, and capped in size.

Every check happens before any model sees the image and before anything is stored, so a bad image
costs one 4xx and nothing else: the encoded size (IMAGE_MAX_BYTES) before decoding, the format by
its magic bytes (PNG, JPEG, WebP, GIF; a GIF's first frame), the pixel count from the header before
the pixels are decoded (Pillow's decompression-bomb limit, so a 50 KB PNG of 100,000 x 100,000
pixels never allocates its 30 GB). The pixels themselves are decoded only for a model that sees
images, after the request has been matched to one (a text model refuses it undecoded), and never
more than `DECODING`'s pixels at once in the process; a corrupt or truncated file fails then, still
before anything runs or is stored. A valid image larger than IMAGE_MAX_PIXELS is scaled down to it
(a JPEG decoded at a fraction of its size directly), which is what bounds the prefill time of a
question with a picture.

No network: only bytes the client sent are read (base64, optionally as a `data:` URL); a remote URL
is refused by the caller, never fetched (no server-side request forgery).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from PIL import Image, UnidentifiedImageError

from .errors import InvalidRequest

FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}
# Pillow's own default (about 89 megapixels, a 4-byte-per-pixel image of 358 MB): the decompression
# bomb limit. An image's header is read first and one larger than this is refused undecoded.
BOMB_PIXELS = 89_478_485
_DATA_URL = re.compile(r"data:(image/[a-z0-9.+-]+)?(;[a-z0-9=._-]+)*;base64,", re.IGNORECASE)


@dataclass(frozen=True)
class ImageLimits:
    """The settings that bound images (IMAGE_MAX_PIXELS, MAX_IMAGES, IMAGE_MAX_BYTES); defaults as there."""

    max_pixels: int = 1_048_576
    max_images: int = 4
    max_bytes: int = 5_000_000


class PixelBudget:
    """How many pixels may be decoded at once in this process, over all requests: a decoded image
    holds 3-4 bytes a pixel (a 9459 x 9459 RGBA PNG of 348 KB is 358 MB, 0.6 GB with its RGB copy),
    so four requests with four such images each, decoded together, took a worker from 1.2 to 3.6 GB.
    A decode waits until its pixels fit; one image larger than the whole budget waits for all others."""

    def __init__(self, pixels: int):
        self.pixels = pixels
        self.in_use = 0
        self._changed = threading.Condition()

    @contextmanager
    def held(self, pixels: int) -> Iterator[None]:
        pixels = min(pixels, self.pixels)
        with self._changed:
            self._changed.wait_for(lambda: self.in_use + pixels <= self.pixels)
            self.in_use += pixels
        try:
            yield
        finally:
            with self._changed:
                self.in_use -= pixels
                self._changed.notify_all()


DECODING = PixelBudget(BOMB_PIXELS)  # one largest image, or many small ones, at a time


@dataclass
class Picture:
    """One image as sent, its header checked (format, size): the bytes to store, and the RGB pixels a
    model reads (capped), decoded only when a model that sees images asks for them (`pixels()`)."""

    data: bytes
    mime: str
    original_size: tuple[int, int]  # as sent, before the cap
    max_pixels: int
    where: str = "image"
    _pixels: Image.Image | None = field(default=None, repr=False)

    def pixels(self) -> Image.Image:
        """The RGB image scaled down to at most `max_pixels`, decoded once (within `DECODING`);
        `InvalidRequest` for a corrupt or truncated file."""
        if self._pixels is None:
            width, height = self.original_size
            with DECODING.held(width * height):
                self._pixels = _decode(self.data, self.where, self.max_pixels)
        return self._pixels


def sniffed_mime(data: bytes) -> str | None:
    """The image type `data` is by its own header (PNG, JPEG, WebP, GIF), or None."""
    try:
        with Image.open(io.BytesIO(data), formats=list(FORMATS)) as image:
            return FORMATS.get(image.format or "")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def decode_base64(text: str, *, where: str, max_bytes: int) -> bytes:
    """The bytes of base64 `text`, or of a `data:image/...;base64,` URL; `InvalidRequest` otherwise.
    The length is checked before decoding, so a huge string is refused without allocating it twice."""
    if text.startswith(("http://", "https://")):
        raise InvalidRequest(
            f"{where}: remote image URLs are not fetched by this server (no server-side requests); "
            "send the image itself as a data: URL (data:image/png;base64,...)",
            param=where,
        )
    match = _DATA_URL.match(text)
    if text.startswith("data:") and not match:
        raise InvalidRequest(f"{where}: a data: URL must be data:image/...;base64,<data>", param=where)
    payload = text[match.end() :] if match else text
    if len(payload) > math.ceil(max_bytes / 3) * 4 + 4:
        raise InvalidRequest(f"{where}: the image is larger than {max_bytes} bytes", param=where)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{where}: not valid base64 image data", param=where) from None


def open_picture(data: bytes, *, where: str, max_bytes: int, max_pixels: int) -> Picture:
    """Check `data` as an image from its header alone (size, format, pixel count): no pixel is decoded
    here, so a request a model cannot take costs no memory (see `Picture.pixels`)."""
    if len(data) > max_bytes:
        raise InvalidRequest(f"{where}: the image is larger than {max_bytes} bytes", param=where)
    if not data:
        raise InvalidRequest(f"{where}: the image is empty", param=where)
    with _opened(data, where) as image:
        width, height = image.size
        mime = FORMATS[image.format or ""]
    if width * height > BOMB_PIXELS:
        raise InvalidRequest(
            f"{where}: the image has too many pixels ({width}x{height}); at most {BOMB_PIXELS}", param=where
        )
    return Picture(data, mime, (width, height), max_pixels, where)


@contextmanager
def _opened(data: bytes, where: str) -> Iterator[Image.Image]:
    """Pillow's lazy open (the header only), its refusals as `InvalidRequest`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=list(FORMATS))
    except UnidentifiedImageError:
        raise InvalidRequest(
            f"{where}: not an image in a supported format (PNG, JPEG, WebP or GIF)", param=where
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidRequest(
            f"{where}: the image has too many pixels (a decompression bomb?); at most {BOMB_PIXELS}",
            param=where,
        ) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidRequest(f"{where}: the image cannot be read ({exc})", param=where) from None
    try:
        yield image
    finally:
        image.close()


def _decode(data: bytes, where: str, max_pixels: int) -> Image.Image:
    with _opened(data, where) as image:
        width, height = image.size
        if width * height > max_pixels and image.format == "JPEG":
            # JPEG decodes at 1/2, 1/4 or 1/8 scale directly: never the full-size pixels
            scale = math.sqrt(max_pixels / (width * height))
            image.draft("RGB", (max(1, int(width * scale)), max(1, int(height * scale))))
        try:
            image.seek(0)  # a GIF's (or animated WebP's) first frame
            image.load()
            rgb = image.convert("RGB")
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            raise InvalidRequest(f"{where}: the image is corrupt or truncated ({exc})", param=where) from None
    width, height = rgb.size
    if width * height > max_pixels:
        scale = math.sqrt(max_pixels / (width * height))
        target = (max(1, int(width * scale)), max(1, int(height * scale)))
        rgb = rgb.resize(target, Image.Resampling.LANCZOS)
    return rgb
