"""An upload checked before it costs anything, and decoded; or refused with a 4xx naming the problem.

The checks, in order: the request is ``multipart/form-data`` (415), its body fits ``max_upload_bytes``
(413, from ``Content-Length`` before reading and again while reading), it holds one to ``max_images``
``image`` fields (400), each declared as an image (415; ``application/octet-stream``, what curl sends for an
unknown suffix, is let through to the decoder), each in an accepted format (PNG, JPEG, BMP, TIFF, WebP,
GIF; 422 otherwise, so PIL's other decoders never see network input), at most ``max_pixels`` pixels
according to its header (413, before decoding: a decompression bomb is refused unread), and decodable in
full (422 for a truncated or corrupt file).
"""

from __future__ import annotations

import io
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from torch import Tensor

from mtlvision.data.io import decode_rgb
from mtlvision.errors import DataError
from mtlvision.serving.settings import ServeSettings

FIELD = "image"
"""The multipart field that carries an image (repeated for several)."""

FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF")
"""The image formats a service decodes."""


class ServeError(Exception):
    """A request the service refuses: an HTTP status, a short code and a message naming the problem."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}}


@dataclass
class Upload:
    """One uploaded file: its name and its bytes."""

    name: str
    data: bytes


def _mb(size: int) -> str:
    return f"{size / 1024 / 1024:.1f} MB"


async def read_body(headers: dict[str, str], chunks: Callable[[], Any], settings: ServeSettings) -> bytes:
    """The request body, refused (413) above ``max_upload_bytes`` before reading when its length is declared,
    and as soon as the bytes read pass the limit otherwise."""
    limit = settings.max_upload_bytes
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ServeError(
            413,
            "upload_too_large",
            f"the request body is {_mb(int(declared))}, above the limit of {_mb(limit)} (--max-upload-mb)",
        )
    body = bytearray()
    async for chunk in chunks():
        body += chunk
        if len(body) > limit:
            raise ServeError(
                413, "upload_too_large", f"the request body passes the limit of {_mb(limit)} (--max-upload-mb)"
            )
    return bytes(body)


async def _checked(value: Any, index: int) -> Upload:
    if isinstance(value, str):
        raise ServeError(400, "not_a_file", f"the field {FIELD!r} holds text, not a file")
    name = value.filename or f"{FIELD}{index}"
    declared = (value.content_type or "").split(";")[0].strip().lower()
    if declared and not (declared.startswith("image/") or declared == "application/octet-stream"):
        raise ServeError(415, "unsupported_media_type", f"{name!r} is sent as {declared!r}, not as an image (image/*)")
    return Upload(name, await value.read())


def check_content_type(content_type: str) -> None:
    """Refuse (415) a request that is not ``multipart/form-data``."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise ServeError(
            415,
            "unsupported_media_type",
            f"the request's content type is {content_type or 'missing'!r}; send multipart/form-data with the "
            f"image in a field named {FIELD!r} (curl -F {FIELD}=@photo.png URL)",
        )


async def parse_form(form: Callable[[], Awaitable[Any]], settings: ServeSettings) -> list[Upload]:
    """The uploaded images of a multipart form, checked for count and declared type."""
    try:
        fields = await form()
    except Exception as exc:  # starlette's MultiPartException and python-multipart's parse errors
        raise ServeError(400, "bad_multipart", f"the multipart body cannot be parsed: {exc}") from None
    try:
        images = [value for key, value in fields.multi_items() if key == FIELD]
        uploads = [await _checked(value, index) for index, value in enumerate(images)]
    finally:
        await fields.close()
    if len(uploads) > settings.max_images:
        raise ServeError(
            400,
            "too_many_images",
            f"the request holds {len(uploads)} images, above the limit of {settings.max_images} per request "
            "(--max-images)",
        )
    if not uploads:
        raise ServeError(
            400,
            "no_image",
            f"no image in the request; send it in a multipart field named {FIELD!r} (-F {FIELD}=@x.png)",
        )
    return uploads


def decode_upload(upload: Upload, max_pixels: int) -> Tensor:
    """The uploaded image as float32 ``[3, H, W]`` in [0, 1], as ``predict`` reads a file (see
    :func:`mtlvision.data.io.decode_rgb`); a :class:`ServeError` naming the file when it is refused."""
    name = upload.name
    if not upload.data:
        raise ServeError(422, "empty_file", f"{name!r} is empty")
    try:
        # no warnings.catch_warnings here: it is not thread-safe, and uploads are decoded in threads
        with Image.open(io.BytesIO(upload.data), formats=FORMATS) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ServeError(
                    413,
                    "image_too_large",
                    f"{name!r} is {width} x {height} = {width * height:,} pixels, above the limit of "
                    f"{max_pixels:,} (--max-pixels); it was not decoded",
                )
            return decode_rgb(image, Path(name))
    except UnidentifiedImageError:
        raise ServeError(
            422, "not_an_image", f"{name!r} is not an image in an accepted format ({', '.join(FORMATS)})"
        ) from None
    except DataError as exc:  # a bit depth whose scale is unknown (32-bit float or integer images)
        raise ServeError(422, "unsupported_image", str(exc)) from None
    except Image.DecompressionBombError as exc:
        raise ServeError(413, "image_too_large", f"{name!r} is above Pillow's safety limit ({exc})") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ServeError(422, "corrupt_image", f"{name!r} cannot be decoded, truncated or corrupt ({exc})") from None
