"""Layer 3, media: image sources, header-only validation, service URLs, atomic video storage, probing.

Free of Dagster: it imports only fsspec (and s3fs through it), Pillow, PyAV, httpx, pydantic and the
package's ``schema`` and ``_redact`` modules.
"""

from __future__ import annotations

from .errors import (
    DownloadError,
    ImageValidationError,
    MediaError,
    NotAVideoError,
    ServiceUrlError,
    SettingsError,
    SourceError,
    VideoProbeError,
)
from .keys import KEY_MAX_LEN, partition_key_for
from .probe import VideoProbe, extract_poster, poster_uri_for, probe_video
from .publish import guess_content_type, remove_stale_parts, write_bytes_atomic
from .service_url import (
    DATA_URI_MAX_BYTES,
    SourcePin,
    data_uri_length,
    pin_image,
    service_image_url,
    source_matches,
)
from .settings import (
    AUTO_RATIO,
    GenerationSettings,
    ResolvedSettings,
    derive_seed,
    resolve_auto_ratio,
)
from .sources import DEFAULT_PATTERNS, ImageEntry, ImageSource, change_token_of
from .storage import (
    DownloadTimeoutError,
    StoredVideo,
    VideoTooLargeError,
    sha256_of,
    store_video,
    trusted_origins_for,
)
from .untrusted import SourceBytes, UntrustedFileError
from .validation import ImageInfo, check_pixels, content_sha256, validate_bytes, validate_image

__all__ = [
    "AUTO_RATIO",
    "DownloadTimeoutError",
    "VideoTooLargeError",
    "trusted_origins_for",
    "DATA_URI_MAX_BYTES",
    "DEFAULT_PATTERNS",
    "KEY_MAX_LEN",
    "DownloadError",
    "GenerationSettings",
    "ImageEntry",
    "ImageInfo",
    "ImageSource",
    "ImageValidationError",
    "MediaError",
    "NotAVideoError",
    "ResolvedSettings",
    "ServiceUrlError",
    "SettingsError",
    "SourceBytes",
    "SourceError",
    "SourcePin",
    "StoredVideo",
    "UntrustedFileError",
    "VideoProbe",
    "VideoProbeError",
    "change_token_of",
    "check_pixels",
    "content_sha256",
    "data_uri_length",
    "derive_seed",
    "extract_poster",
    "guess_content_type",
    "partition_key_for",
    "pin_image",
    "poster_uri_for",
    "probe_video",
    "remove_stale_parts",
    "resolve_auto_ratio",
    "service_image_url",
    "sha256_of",
    "source_matches",
    "store_video",
    "validate_bytes",
    "validate_image",
    "write_bytes_atomic",
]
