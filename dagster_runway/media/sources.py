"""Image sources: a folder, an ``s3://`` prefix, or anything fsspec opens, listed into partition keys.

One recursive listing per :meth:`ImageSource.list` (a paginated ``ListObjectsV2`` on S3, 1,000 keys a
page; one directory walk locally) gives every image with its size and change token, and the sidecar
files beside it, with no request per image. Patterns are matched here, case-insensitively, so
``*.png`` also finds ``CAT.PNG``; files and folders whose name starts with ``.`` are skipped
(``.DS_Store``, macOS ``._x.png`` resource forks, temporary uploads).

Per-image settings: sidecars (:mod:`.sidecars`) take precedence over the manifest (:mod:`.manifest`),
which takes precedence over the defaults.
"""

from __future__ import annotations

import builtins
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import fsspec
from fsspec.utils import glob_translate

from ._fs import full_url, is_local, url_to_fs
from .errors import SettingsError, SourceError, shown_path
from .keys import partition_key_for
from .manifest import Manifest, read_manifest
from .settings import (
    AUTO_RATIO,
    GenerationSettings,
    ResolvedSettings,
    derive_seed,
    merge_settings,
    normalise_fields,
    resolve_auto_ratio,
)
from .sidecars import read_sidecar, sidecar_candidates
from .validation import ImageInfo, content_sha256, validate_image

DEFAULT_PATTERNS: tuple[str, ...] = ("**/*.png", "**/*.jpg", "**/*.jpeg", "**/*.webp")


@dataclass(frozen=True)
class ImageEntry:
    """One image of a source, as the last listing saw it."""

    path: str  # the path as the filesystem knows it ("bucket/prefix/a.png" on S3)
    url: str  # "s3://bucket/prefix/a.png", or "/abs/path/a.png" for local files
    relpath: str  # relative to the source root, "/"-separated
    size: int
    change_token: str  # 'etag:"abc"|size:123' or 'mtime:1700000000.123456|size:123'
    partition_key: str
    sidecars: tuple[str, ...] = ()  # sidecar paths (fs paths), lowest precedence first
    sidecar_token: str = ""  # change tokens of the sidecars, so an edited prompt can be noticed
    settings_token: str = ""  # a hash of the image's manifest entries, so an edited manifest row is noticed


def compile_patterns(patterns: Iterable[str]) -> re.Pattern[str]:
    """One case-insensitive regex for glob ``patterns`` matched against a relative path (fsspec's glob
    translation: ``**/`` matches zero or more folders, ``*`` and ``?`` stay within one path segment,
    ``[...]`` is a character class, ``[!...]`` negated)."""
    alternatives = []
    for pattern in patterns:
        pattern = pattern.strip().lstrip("/")
        alternatives.append(glob_translate(pattern.removeprefix("./")))
    if not alternatives:
        raise ValueError("at least one glob pattern is needed, e.g. '**/*.png'")
    return re.compile("|".join(f"(?:{alt})" for alt in alternatives), re.IGNORECASE)


def change_token_of(info: Mapping[str, Any]) -> str:
    """A token that changes when the object changes: its ETag (object stores), generation or checksum
    (GCS and others) or mtime (local), plus its size."""
    size = info.get("size")
    for key, label in (("ETag", "etag"), ("etag", "etag"), ("generation", "generation"), ("md5Hash", "md5")):
        value = info.get(key)
        if value not in (None, ""):
            return f"{label}:{value}|size:{size}"
    for key in ("mtime", "LastModified", "last_modified", "updated", "modified", "created"):
        value = info.get(key)
        if value in (None, ""):
            continue
        if isinstance(value, int | float):
            return f"mtime:{value:.6f}|size:{size}"
        if hasattr(value, "isoformat"):
            return f"mtime:{value.isoformat()}|size:{size}"
        return f"mtime:{value}|size:{size}"
    return f"size:{size}"


def _hidden(relpath: str) -> bool:
    return any(segment.startswith(".") and segment not in (".", "..") for segment in relpath.split("/"))


class ImageSource:
    """The images under ``url`` that match ``patterns``, with per-image settings.

    ``storage_options`` go straight to fsspec (``endpoint_url``, ``key``/``secret``, ``profile``,
    ``skip_instance_cache``, ...). ``defaults`` are the settings used where no sidecar or manifest says
    otherwise. ``manifest`` is a CSV or JSON file, relative to the root or a full URL.
    """

    def __init__(
        self,
        url: str,
        patterns: Sequence[str] = DEFAULT_PATTERNS,
        storage_options: Mapping[str, Any] | None = None,
        defaults: GenerationSettings | Mapping[str, Any] | None = None,
        manifest: str | None = None,
    ) -> None:
        if isinstance(patterns, str):
            patterns = (patterns,)
        self.url = url
        self.patterns: tuple[str, ...] = tuple(patterns)
        self.storage_options: dict[str, Any] = dict(storage_options or {})
        if defaults is None:
            defaults = GenerationSettings()
        elif not isinstance(defaults, GenerationSettings):
            defaults = merge_settings(
                GenerationSettings(), [("defaults", normalise_fields(defaults, source="defaults"))]
            )
        self.defaults: GenerationSettings = defaults
        self.manifest = manifest
        self._matcher = compile_patterns(self.patterns)
        self.fs: fsspec.AbstractFileSystem
        try:
            self.fs, root = url_to_fs(url, self.storage_options)
        except Exception as exc:
            raise SourceError(
                f"{shown_path(url)}: cannot open the image source ({type(exc).__name__}: {exc}); check the URL "
                "and storage_options"
            ) from None
        self.root: str = root.rstrip("/") if root not in ("/", "") else root
        self._entries: list[ImageEntry] | None = None
        self._by_key: dict[str, ImageEntry] = {}
        self._manifest: Manifest | None = None
        self._manifest_loaded = False
        #: Manifest paths that matched no image at the last listing (typos, deleted files).
        self.manifest_unmatched: list[str] = []

    def __repr__(self) -> str:
        return f"ImageSource({shown_path(self.url)!r}, patterns={self.patterns!r})"

    # -- listing ---------------------------------------------------------------------------------

    @property
    def root_url(self) -> str:
        return full_url(self.fs, self.root)

    def _relpath(self, path: str) -> str | None:
        root = self.root
        if path == root:
            return path.rsplit("/", 1)[-1]
        prefix = root if root.endswith("/") else root + "/"
        if not path.startswith(prefix):
            return None
        return path[len(prefix) :]

    def _find(self) -> dict[str, dict[str, Any]]:
        try:
            # Drop every cached listing (s3fs caches per folder, nested ones included): list what is there now.
            self.fs.invalidate_cache()
            found = self.fs.find(self.root, detail=True)
        except FileNotFoundError:
            found = {}
        except Exception as exc:
            raise SourceError(
                f"{self.root_url}: cannot list images ({type(exc).__name__}: {exc}); check the path, the bucket "
                "name, the credentials and endpoint_url in storage_options"
            ) from None
        if not found:
            container = self.root if is_local(self.fs) else self.root.split("/", 1)[0]
            try:
                exists = self.fs.exists(container)
            except Exception:  # noqa: BLE001 - listing worked, existence is only for a better message
                exists = True
            if not exists:
                what = "folder" if is_local(self.fs) else "bucket"
                raise SourceError(
                    f"{self.root_url}: the {what} {full_url(self.fs, container)} does not exist; check the URL"
                )
        return dict(found)

    def list(self) -> list[ImageEntry]:
        """Every image of the source, sorted by partition key. Re-lists (bypassing fsspec's listing
        cache) and re-reads the manifest on each call; one listing, no request per image."""
        found = self._find()
        manifest = self._load_manifest(refresh=True)
        entries: list[ImageEntry] = []
        for path, info in found.items():
            if info.get("type", "file") != "file":
                continue
            relpath = self._relpath(path)
            if not relpath or _hidden(relpath) or not self._matcher.match(relpath):
                continue
            sidecars = tuple(c for c in sidecar_candidates(path) if c in found and c != path)
            entry = self._entry(path, relpath, info, sidecars, [found[c] for c in sidecars])
            if manifest is not None:
                entry = replace(entry, settings_token=manifest.settings_token(relpath))
            entries.append(entry)
        entries.sort(key=lambda e: e.partition_key)
        by_key: dict[str, ImageEntry] = {}
        for entry in entries:
            other = by_key.get(entry.partition_key)
            if other is not None:  # cannot happen short of a 60-bit hash collision; refuse rather than mix
                raise SourceError(
                    f"{self.root_url}: {other.relpath!r} and {entry.relpath!r} map to the same partition key "
                    f"{entry.partition_key!r}; rename one of them"
                )
            by_key[entry.partition_key] = entry
        self._entries, self._by_key = entries, by_key
        if manifest is not None:
            relpaths = {e.relpath for e in entries}
            self.manifest_unmatched = sorted(p for p in manifest.rows if p not in relpaths)
        return list(entries)

    def _entry(
        self,
        path: str,
        relpath: str,
        info: Mapping[str, Any],
        sidecars: tuple[str, ...],
        sidecar_infos: Sequence[Mapping[str, Any]],
    ) -> ImageEntry:
        return ImageEntry(
            path=path,
            url=full_url(self.fs, path),
            relpath=relpath,
            size=int(info.get("size") or 0),
            change_token=change_token_of(info),
            partition_key=partition_key_for(relpath),
            sidecars=sidecars,
            sidecar_token=";".join(change_token_of(i) for i in sidecar_infos),
        )

    @property
    def entries(self) -> builtins.list[ImageEntry]:  # `list` is the method here
        """The entries of the last listing (lists once if never listed)."""
        if self._entries is None:
            self.list()
        return list(self._entries or [])

    def key_map(self) -> dict[str, str]:
        """Partition key -> relative path, for the last listing."""
        if self._entries is None:
            self.list()
        return {key: entry.relpath for key, entry in self._by_key.items()}

    def entry_for_key(self, key: str, *, refresh: bool = False) -> ImageEntry | None:
        """The image behind a partition key, or None if it is gone.

        A key without ``~`` is the image's relative path itself, so it is looked up with one metadata
        request and no listing; a hashed key needs a listing (done once, then cached)."""
        if not refresh and self._entries is not None:
            found = self._by_key.get(key)
            if found is not None or "~" in key:
                return found
        if "~" not in key and not refresh:
            return self._lookup_relpath(key)
        self.list()
        return self._by_key.get(key)

    def _lookup_relpath(self, relpath: str) -> ImageEntry | None:
        if _hidden(relpath) or not self._matcher.match(relpath) or partition_key_for(relpath) != relpath:
            return None
        path = f"{self.root}/{relpath}" if self.root else relpath
        try:
            info = self.fs.info(path)
        except FileNotFoundError:
            return None
        if info.get("type", "file") != "file":
            return None
        sidecars, infos = [], []
        for candidate in sidecar_candidates(path):
            try:
                sidecar_info = self.fs.info(candidate)
            except FileNotFoundError:
                continue
            if sidecar_info.get("type", "file") == "file":
                sidecars.append(candidate)
                infos.append(sidecar_info)
        return self._entry(path, relpath, info, tuple(sidecars), infos)

    # -- settings --------------------------------------------------------------------------------

    def _manifest_location(self) -> tuple[fsspec.AbstractFileSystem, str, str]:
        assert self.manifest is not None
        manifest = self.manifest
        if "://" in manifest:
            same_protocol = manifest.split("://", 1)[0] == self.url.split("://", 1)[0]
            fs, path = url_to_fs(manifest, self.storage_options if same_protocol else None)
            return fs, path, manifest
        if manifest.startswith("/"):
            fs, path = url_to_fs(manifest)
            return fs, path, manifest
        while manifest.startswith("./"):
            manifest = manifest[2:]
        path = f"{self.root}/{manifest}"
        return self.fs, path, full_url(self.fs, path)

    def _load_manifest(self, *, refresh: bool = False) -> Manifest | None:
        if self.manifest is None:
            return None
        if self._manifest_loaded and not refresh:
            return self._manifest
        fs, path, shown = self._manifest_location()
        root_prefixes = (self.root_url.rstrip("/") + "/", self.root.rstrip("/") + "/")
        self._manifest, self._manifest_loaded = read_manifest(fs, path, shown, root_prefixes), True
        return self._manifest

    def settings_for(
        self,
        entry: ImageEntry,
        image_size: tuple[int, int] | None = None,
        *,
        content_sha256: str | None = None,
    ) -> ResolvedSettings:
        """The settings to submit for ``entry``: sidecars over the manifest over the defaults.

        ``ratio: auto`` is resolved from ``image_size`` (read from the image header when not given).
        A missing seed is derived from ``content_sha256`` (the image's hash, computed by streaming the
        file when not given). Raises :class:`SettingsError` for a bad sidecar or manifest entry, and
        :class:`ImageValidationError` when ``auto`` needs the size of an image that is not valid.
        """
        layers: list[tuple[str, dict[str, Any]]] = []
        kinds: list[str] = []
        manifest = self._load_manifest()
        if manifest is not None:
            if manifest.defaults:
                layers.append((f"{manifest.url} (defaults)", manifest.defaults))
                kinds.append("manifest")
            rows = manifest.rows.get(entry.relpath, [])
            if len(rows) > 1:
                raise SettingsError(
                    manifest.url,
                    f"{entry.relpath!r} appears {len(rows)} times ({', '.join(w for w, _ in rows)}); keep one entry",
                    field="path",
                )
            layers.extend(rows)
            kinds.extend("manifest" for _ in rows)
        for sidecar in entry.sidecars:
            layers.append((full_url(self.fs, sidecar), read_sidecar(self.fs, sidecar)))
            kinds.append("sidecar")
        merged = merge_settings(self.defaults, layers)
        prompt_source = "defaults" if self.defaults.prompt_text is not None else "service default"
        for kind, (where, fields) in zip(kinds, layers, strict=True):
            if fields.get("prompt_text") is not None:
                prompt_source = f"{kind} {where}"

        ratio, ratio_auto = merged.ratio, False
        if ratio == AUTO_RATIO:
            if image_size is None:
                info = validate_image(self.fs, entry.path, size=entry.size or None)
                image_size = (info.width, info.height)
            ratio, ratio_auto = resolve_auto_ratio(*image_size), True
        seed, seed_derived = merged.seed, False
        if seed is None:
            digest = content_sha256 or self.content_sha256(entry)
            seed, seed_derived = derive_seed(digest), True
        return ResolvedSettings(
            prompt_text=merged.prompt_text,
            ratio=ratio,
            duration=merged.duration,
            seed=seed,
            ratio_auto=ratio_auto,
            seed_derived=seed_derived,
            sources=("defaults", *(source for source, fields in layers if fields)),
            prompt_source=prompt_source,
        )

    # -- conveniences ----------------------------------------------------------------------------

    def content_sha256(self, entry: ImageEntry) -> str:
        """The sha256 of the image's bytes (streamed)."""
        return content_sha256(self.fs, entry.path)

    def validate(self, entry: ImageEntry, *, deep: bool = False) -> ImageInfo:
        """:func:`validate_image` for ``entry``, using the listed size (no metadata request)."""
        return validate_image(self.fs, entry.path, size=entry.size or None, deep=deep)
