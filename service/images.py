"""Images a client sends with a question: decoded once at the edge, checked, and capped in size.

Every check happens before any model sees the image and before anything is stored, so a bad image
costs one 4xx and nothing else: the encoded size (IMAGE_MAX_BYTES) before decoding, the format by
its magic bytes (PNG, JPEG, WebP, GIF; a GIF's first frame), the pixel count from the header before
the pixels are decoded (Pillow's decompression-bomb limit, so a 50 KB PNG of 100,000 x 100,000
pixels never allocates its 30 GB), and a full decode (a corrupt or truncated file fails here, not
in the middle of a generation). A valid image larger than IMAGE_MAX_PIXELS is scaled down to it,
which is what bounds the prefill time of a question with a picture.

No network: only bytes the client sent are read (base64, optionally as a `data:` URL); a remote URL
is refused by the caller, never fetched (no server-side request forgery).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
import warnings
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Picture:
    """One checked image: the RGB pixels a model reads (capped) and the bytes as sent (to store)."""

    image: Image.Image
    data: bytes
    mime: str
    original_size: tuple[int, int]  # as sent, before the cap

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


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
    """Check `data` as an image and return it decoded, scaled down to at most `max_pixels`."""
    if len(data) > max_bytes:
        raise InvalidRequest(f"{where}: the image is larger than {max_bytes} bytes", param=where)
    if not data:
        raise InvalidRequest(f"{where}: the image is empty", param=where)
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
    width, height = image.size
    if width * height > BOMB_PIXELS:
        raise InvalidRequest(
            f"{where}: the image has too many pixels ({width}x{height}); at most {BOMB_PIXELS}", param=where
        )
    mime = FORMATS[image.format or ""]
    try:
        image.seek(0)  # a GIF's (or animated WebP's) first frame
        image.load()
        rgb = image.convert("RGB")
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InvalidRequest(f"{where}: the image is corrupt or truncated ({exc})", param=where) from None
    finally:
        image.close()
    if width * height > max_pixels:
        scale = math.sqrt(max_pixels / (width * height))
        target = (max(1, int(width * scale)), max(1, int(height * scale)))
        rgb = rgb.resize(target, Image.Resampling.LANCZOS)
    return Picture(rgb, data, mime, (width, height))
