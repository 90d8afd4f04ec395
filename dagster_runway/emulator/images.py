"""The input image, as the service gets it when a request starts: fetched or decoded, then checked.

The rules are the schema's ``promptImage`` validations: a file under 16 MB, width and height under
8000 pixels, an aspect ratio from 1:2 to 2:1 (bounds included), and an image that decodes.
"""

from __future__ import annotations

import io

import httpx
from PIL import Image, UnidentifiedImageError

from dagster_runway._redact import redact_text, redact_url
from dagster_runway.emulator.inputs import decode_data_uri
from dagster_runway.schema import IMAGE_MAX_ASPECT, IMAGE_MAX_BYTES, IMAGE_MAX_SIDE, IMAGE_MIN_ASPECT

FETCH_FAILED = "ASSET.FETCH_FAILED"
INVALID = "ASSET.INVALID"

_MB = 1024 * 1024


class ImageRejected(Exception):
    """The image cannot be used; the request ends failed with this code and message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


async def load_image(client: httpx.AsyncClient, image: str, timeout: float) -> bytes:
    """The image's bytes: decoded from a data URI, or fetched with one GET, no redirects followed."""
    if image[:5].lower() == "data:":
        return decode_data_uri(image)
    shown = redact_url(image)
    try:
        async with client.stream("GET", image, timeout=timeout, follow_redirects=False) as response:
            if not response.is_success:
                raise ImageRejected(
                    FETCH_FAILED, f"promptImage: fetching {shown} failed with HTTP {response.status_code}"
                )
            data = bytearray()
            async for chunk in response.aiter_bytes():
                data += chunk
                if len(data) >= IMAGE_MAX_BYTES:
                    raise ImageRejected(INVALID, f"promptImage: {_too_big(len(data), at_least=True)}")
            return bytes(data)
    except httpx.TimeoutException as exc:
        raise ImageRejected(
            FETCH_FAILED, f"promptImage: fetching {shown} timed out after {timeout:g} s"
        ) from exc
    except httpx.HTTPError as exc:
        raise ImageRejected(
            FETCH_FAILED,
            f"promptImage: fetching {shown} failed: {type(exc).__name__}: {redact_text(str(exc))}",
        ) from exc


def check_image(data: bytes) -> Image.Image:
    """Decode the image and check the schema's rules; the decoded image is returned for rendering."""
    if len(data) >= IMAGE_MAX_BYTES:
        raise ImageRejected(INVALID, f"promptImage: {_too_big(len(data), at_least=False)}")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageRejected(
            INVALID, f"promptImage: {exc} Width and height must be under {IMAGE_MAX_SIDE} pixels."
        ) from exc
    except (UnidentifiedImageError, OSError) as exc:
        raise ImageRejected(
            INVALID, f"promptImage is not a decodable image ({len(data)} bytes): {exc}"
        ) from exc
    width, height = image.size
    if width >= IMAGE_MAX_SIDE or height >= IMAGE_MAX_SIDE:
        raise ImageRejected(
            INVALID,
            f"promptImage is {width}x{height} pixels; width and height must be under {IMAGE_MAX_SIDE} pixels.",
        )
    aspect = width / height
    if not IMAGE_MIN_ASPECT <= aspect <= IMAGE_MAX_ASPECT:
        raise ImageRejected(
            INVALID,
            f"promptImage aspect ratio {aspect:.3f} ({width}x{height}) is outside "
            f"{IMAGE_MIN_ASPECT}..{IMAGE_MAX_ASPECT}; the aspect ratio range should be 1:2 to 2:1.",
        )
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageRejected(INVALID, f"promptImage could not be decoded ({width}x{height}): {exc}") from exc
    return image


def _too_big(size: int, *, at_least: bool) -> str:
    measured = f"at least {size / _MB:.1f} MB" if at_least else f"{size / _MB:.1f} MB ({size} bytes)"
    return f"file size is {measured}; it must be less than {IMAGE_MAX_BYTES // _MB} MB."
