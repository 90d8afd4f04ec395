"""Before any money: check one image to the last pixel and settle the exact input it would be sent with.

``prepare`` refuses an image that cannot be sent as named or lies outside the source, checks the header
of a remote image (cheap, bounded reads), then reads the whole file once: those bytes are validated again, decoded to the
last pixel, hashed, and pinned (:class:`~dagster_runway.media.SourcePin`), so what the service gets is
what was hashed (their data URI, or an S3 URL naming the version that was read). It resolves the settings
(sidecars, manifest, defaults) and computes the generation fingerprint, the identity of one paid
generation that the journal, reuse and every message about a possibly billed submit use.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from dagster import DagsterInstance, MetadataValue

from dagster_runway.media import (
    ImageEntry,
    ImageSource,
    SourcePin,
    check_pixels,
    partition_key_for,
    pin_image,
    validate_bytes,
    validate_image,
)
from dagster_runway.media._fs import full_url
from dagster_runway.media.lookup import path_for
from dagster_runway.media.service_url import sends_inline
from dagster_runway.media.untrusted import shown_name
from dagster_runway.models import ModelSpec
from dagster_runway.pipeline import metadata as md
from dagster_runway.pipeline import records as rec
from dagster_runway.pipeline.config import RunwayPipelineConfig
from dagster_runway.version import __version__


def generation_fingerprint(model_id: str, image_sha256: str, fields: dict[str, Any]) -> str:
    """The identity of one paid generation: the model, the image's bytes and every input field.

    This is *the* fingerprint: the journal is keyed by it, reuse matches on it, and every message
    about a possibly billed submit names it. ``fields`` exclude the image's field, whose URL changes.
    """
    canonical = json.dumps(
        {"model": model_id, "image_sha256": image_sha256, "fields": fields},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class Prepared:
    """One partition, checked and ready to submit."""

    key: str
    entry: ImageEntry
    width: int
    height: int
    image_format: str
    sha256: str
    fields: dict[str, Any]
    fingerprint: str
    settings_sources: tuple[str, ...]
    prompt_source: str
    model: ModelSpec
    pin: SourcePin
    pixels: str  # for lineage: stored and displayed size, and any bytes after the image's end
    prompt_warning: str | None = None

    @property
    def source_version(self) -> str:
        """The version of the image that was read (its change token is the listing's format)."""
        return rec.image_version(self.pin.change_token, self.entry.sidecar_token, self.entry.settings_token)

    @property
    def model_id(self) -> str:
        return self.model.model_id

    @property
    def estimate_usd_seconds(self) -> int:
        return self.model.duration_of(self.fields) or self.model.default_duration

    def metadata(self) -> dict[str, Any]:
        """Lineage of the input: what goes to the service, from which file."""
        model = self.model
        prompt = model.prompt_of(self.fields)
        seed = model.seed_of(self.fields)
        return {
            **md.RunwayMetadata(
                fingerprint=self.fingerprint,
                model=self.model_id,
                input=MetadataValue.json(self.fields),
                prompt_text=prompt if prompt is not None else model.default_prompt,
                prompt_source=self.prompt_source,
                prompt_warning=self.prompt_warning,
                ratio=model.ratio_of(self.fields),
                duration_s=model.duration_of(self.fields),
                seed=str(seed) if seed is not None else None,
                settings_from=", ".join(self.settings_sources),
                source_path=MetadataValue.path(self.entry.url),
                source_sha256=self.sha256,
                source_change_token=self.pin.change_token,  # of the bytes hashed and sent
                source_version_id=self.pin.version_id,
                source_version=self.source_version,
                source_size_bytes=self.pin.size,
                source_pixels=self.pixels,
                package_version=__version__,
            )
        }


def prepare(pipeline: RunwayPipelineConfig, source: ImageSource, key: str, entry: ImageEntry) -> Prepared:
    """Check one image against the source's model and settle its input. Raises ``MediaError`` naming
    the file, the rule and the fix."""
    model = source.model
    source.check_readable(entry)  # a name that cannot be sent, a link out of the source: refused unread
    if not source.local:  # remote: the header first, in bounded reads
        validate_image(source.fs, entry.path, size=entry.size, rules=model.image_rules)
    read = source.read_image(entry)  # then the whole file, once: these bytes are checked, hashed and sent
    shown = shown_name(entry.url)
    info = validate_bytes(read.data, shown, model.image_rules)
    pixels = info.pixels_text
    if info.trailing_bytes:  # a motion photo's video, padding: decoders stop at the image's end marker
        if sends_inline(source.fs, pipeline.public_base_url):
            read = dataclasses.replace(read, data=read.data[: info.image_end])
            pixels += f"; {info.trailing_bytes} bytes after its end marker dropped (not sent, not hashed)"
        else:  # the service fetches the stored object, whole
            pixels += f"; {info.trailing_bytes} bytes after its end marker sent as stored (the URL serves the whole file)"
    check_pixels(read.data, shown)
    sha256 = hashlib.sha256(read.data).hexdigest()
    pin = pin_image(source.fs, read, sha256, info.mime_type, public_base_url=pipeline.public_base_url)
    del read  # only the pin (and its data URI, within the data-URI limit) outlives this call
    # ``ratio: auto`` follows the picture as viewers show it (EXIF orientation); the bytes are sent as stored.
    settings = source.settings_for(entry, image_size=info.displayed_size, content_sha256=sha256)
    fields = settings.request_fields(model)
    return Prepared(
        key=key,
        entry=entry,
        width=info.width,
        height=info.height,
        image_format=info.format,
        sha256=sha256,
        fields=fields,
        fingerprint=generation_fingerprint(model.model_id, sha256, fields),
        settings_sources=tuple(settings.sources),
        prompt_source=settings.prompt_source,
        model=model,
        pin=pin,
        pixels=pixels,
    )


_MARKER = "RUNWAYRELPATH"  # stands for the relative path, to find how discovery writes an image's path


def recorded_relpath(pipeline: RunwayPipelineConfig, source: ImageSource, recorded: str) -> str | None:
    """The image's path relative to the source root, from its recorded ``runway/source_path`` (the
    image's URL as ``metadata.uri_value`` shows it), or None if that names no file of this source."""

    def shown(relpath: str) -> str:
        return str(
            md.uri_value(
                full_url(source.fs, path_for(source, relpath)), pipeline.source_storage_options
            ).value
        )

    prefix, _, suffix = shown(_MARKER).partition(_MARKER)
    if len(recorded) <= len(prefix) + len(suffix) or not (
        recorded.startswith(prefix) and recorded.endswith(suffix)
    ):
        return None
    middle = recorded[len(prefix) : len(recorded) - len(suffix)]
    # A link to an object quotes its key; a local path is as it is: keep the reading that gives it back.
    return next((rel for rel in (middle, unquote(middle)) if shown(rel) == recorded), None)


def recorded_relpaths(
    pipeline: RunwayPipelineConfig, source: ImageSource, instance: DagsterInstance, keys: Sequence[str]
) -> dict[str, str]:
    """Each partition's image path relative to the source root, from its latest ``runway/images``
    record (all read at once). A key with no such record and no ``~`` is its own path (the key scheme);
    a hashed key with none is left out: nothing says which image it is."""
    records = rec.latest_images(instance, pipeline.images_key, keys)
    found = {}
    for key in keys:
        record = records.get(key)
        relpath = (
            recorded_relpath(pipeline, source, record.source_path) if record and record.source_path else None
        )
        if relpath is None and "~" not in key:
            relpath = key
        if relpath is not None and partition_key_for(relpath) == key:
            found[key] = relpath
    return found
