"""Image sources: a folder, an ``s3://`` prefix, or anything fsspec opens, listed into partition keys.

One recursive listing per :meth:`ImageSource.list` (a paginated ``ListObjectsV2`` on S3, 1,000 keys a
page; one directory walk locally) gives every image with its size and change token, and the sidecar
files beside it, with no request per image. Patterns are matched here, case-insensitively, so
``*.png`` also finds ``CAT.PNG``; files and folders whose name starts with ``.`` are skipped
(``.DS_Store``, macOS ``._x.png`` resource forks, temporary uploads).

Per-image settings: sidecars (:mod:`.sidecars`) take precedence over the manifest (:mod:`.manifest`),
which takes precedence over the defaults.

What the source holds is data (:mod:`.untrusted`), and nothing in it is skipped silently:

* The project's own outputs (a poster ``x.poster.jpg`` beside its video ``x.mp4``, a video's
  ``x.mp4.json``, ``gallery.html``, anything under a ``.runway`` journal folder) are never listed;
  seeing any logs one warning per listing, and :attr:`ImageSource.skipped_outputs` names them.
* An image whose name cannot be fetched as it is (an S3 key with an empty, ``.`` or ``..`` segment such
  as ``a//b.png`` or ``odd/../escape.png``, whose presigned URL a client normalises to another object;
  a local name that is not valid UTF-8) is still listed, with :attr:`ImageEntry.problem` saying why, so
  its partition fails before paying with a message naming the key and the fix (rename it).
* Manifest rows are matched after NFC normalisation; a row that differs from a file only in case is
  refused for that file with a message naming both spellings (a guess could apply a row to the wrong
  image), and every row that matches no image is listed by :meth:`ImageSource.unmatched_manifest_rows`.
* A manifest that cannot be read fails every partition with its message (the listing still works).
* Locally, an image or sidecar that is a symbolic link is followed only to a regular file inside the
  source root; a link out of the root, a broken link, a fifo or a device is listed and its partition
  fails with the reason. Linked folders are not walked, and each listing warns about them.
"""

from __future__ import annotations

import builtins
import hashlib
import logging
import os
import re
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import fsspec
from fsspec.utils import glob_translate

from dagster_runway.models import DEFAULT_MODEL, ModelSpec
from dagster_runway.schema import IMAGE_MAX_BYTES

from ._fs import full_url, is_local, url_to_fs
from .errors import ImageValidationError, SettingsError, SourceError, shown_path
from .keys import partition_key_for
from .manifest import Manifest, nfc, read_manifest
from .settings import (
    AUTO_RATIO,
    GenerationSettings,
    ResolvedSettings,
    defaults_for_model,
    derive_seed,
    merge_settings,
    resolve_auto_ratio,
)
from .sidecars import read_sidecar, sidecar_candidates
from .untrusted import SourceBytes, UntrustedFileError, change_token_of, inside, read_source_file, shown_name
from .validation import ImageInfo, content_sha256, validate_image

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_PATTERNS", "ImageEntry", "ImageSource", "change_token_of", "compile_patterns"]

#: Names the pipeline writes into its output folder (see publish.py, probe.poster_uri_for, gallery.py).
_VIDEO_EXTENSIONS = (".mp4", ".mov", ".webm")
_GALLERY = "gallery.html"
_JOURNAL_FOLDER = ".runway"

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
    problem: str = (
        ""  # "<file>: <rule>; <fix>" when it cannot be sent as it is (its partition fails so), or ""
    )


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


def _hidden(relpath: str) -> bool:
    return any(segment.startswith(".") and segment not in (".", "..") for segment in relpath.split("/"))


_GALLERY_INDEX = re.compile(r"index\.js|rows-[0-9a-f]{2}\.js")  # the review page's index, in gallery/


def _own_output(relpath: str, found_relpaths: Mapping[str, object]) -> bool:
    """Whether ``relpath`` is something this project writes: a poster beside its video, a video's JSON
    sidecar, the gallery page and its index, or a file of a journal folder."""
    segments = relpath.split("/")
    if _JOURNAL_FOLDER in segments[:-1] or segments[-1] == _GALLERY:
        return True
    if len(segments) > 1 and segments[-2] == "gallery" and _GALLERY_INDEX.fullmatch(segments[-1]):
        return True
    lower = relpath.lower()
    if lower.endswith(".poster.jpg"):
        stem = relpath[: -len(".poster.jpg")]
        return any(stem + ext in found_relpaths for ext in _VIDEO_EXTENSIONS)
    if lower.endswith(".json"):
        return (
            lower[: -len(".json")].endswith(_VIDEO_EXTENSIONS) and relpath[: -len(".json")] in found_relpaths
        )
    return False


def name_problem(relpath: str) -> tuple[str, str] | None:
    """Why an image at ``relpath`` cannot be sent under its name, as ``(rule, fix)``, or None.

    An empty, ``.`` or ``..`` segment (``a//b.png``, ``odd/../escape.png``, a key starting with ``/``)
    is rewritten by every HTTP client that fetches its presigned URL, so the service would fetch
    another object or none; a name that is not valid UTF-8 cannot be shown, logged or stored."""
    odd = sorted({repr(seg) for seg in relpath.split("/") if seg in ("", ".", "..")})
    if odd:
        return (
            f"the name has {', '.join(odd)} path segments, which the URL the service fetches cannot carry "
            "(clients collapse '//' and resolve '.' and '..', so it would fetch another object or none)",
            "rename the object without empty, '.' or '..' segments",
        )
    try:
        relpath.encode("utf-8")
    except UnicodeEncodeError:
        return "the file name is not valid UTF-8, so it cannot be shown, logged or stored", "rename the file"
    return None


def _matchable(relpath: str) -> str:
    """``relpath`` with empty, ``.`` and ``..`` segments replaced, for matching the patterns (a glob
    never matches an empty segment, which would hide ``a//b.png`` without a word)."""
    return "/".join(seg if seg not in ("", ".", "..") else "_" for seg in relpath.split("/"))


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
        model: ModelSpec = DEFAULT_MODEL,
    ) -> None:
        if isinstance(patterns, str):
            patterns = (patterns,)
        self.url = url
        self.patterns: tuple[str, ...] = tuple(patterns)
        self.storage_options: dict[str, Any] = dict(storage_options or {})
        self.model = model
        self.defaults: GenerationSettings = defaults_for_model(defaults, model)
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
        self._manifest_error: SettingsError | None = None
        #: Manifest paths that matched no image at the last listing (typos, deleted files, case).
        self.manifest_unmatched: list[str] = []
        #: The project's own outputs seen in the source at the last listing (and not listed).
        self.skipped_outputs: list[str] = []
        #: Symbolic links to folders at the last listing: not followed (and so not listed).
        self.linked_folders: list[str] = []
        self._manifest_keys: dict[str, str] = {}  # relpath -> the manifest key of its rows
        self._manifest_refusals: dict[str, str] = {}  # relpath -> why its near-matching rows are refused

    def __repr__(self) -> str:
        return f"ImageSource({shown_path(self.url)!r}, patterns={self.patterns!r})"

    # -- listing ---------------------------------------------------------------------------------

    @property
    def local(self) -> bool:
        """Whether the source is on local disk (where reading a whole image costs no transfer)."""
        return is_local(self.fs)

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
            raise self._list_error(exc) from None
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

    def _list_error(self, exc: Exception) -> SourceError:
        return SourceError(
            f"{self.root_url}: cannot list images ({type(exc).__name__}: {exc}); check the path, the bucket "
            "name, the credentials and endpoint_url in storage_options"
        )

    def list(self) -> list[ImageEntry]:
        """Every image of the source, sorted by partition key. Re-lists (bypassing fsspec's listing
        cache) and re-reads the manifest on each call; one listing, no request per image."""
        found = self._find()
        manifest = self._load_manifest(refresh=True)
        entries, skipped, linked_folders = self._listed(found)
        self.skipped_outputs = sorted(skipped)
        self.linked_folders = sorted(linked_folders)
        self._warn_listed(self.skipped_outputs, self.linked_folders)
        entries = self._match_manifest(entries, manifest)
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
        return list(entries)

    def _listed(
        self, found: Mapping[str, Mapping[str, Any]]
    ) -> tuple[builtins.list[ImageEntry], builtins.list[str], builtins.list[str]]:
        """The images among ``found`` (fs path -> listing info) by the listing's rules, without the
        manifest, and the own outputs and linked folders seen, by relative path. A part of a listing
        (:mod:`.listing`) holds each image with its sidecars and the videos its name may belong to."""
        relpaths = {rel: path for path in found if (rel := self._relpath(path))}
        entries: builtins.list[ImageEntry] = []
        skipped: builtins.list[str] = []
        linked_folders: builtins.list[str] = []
        for path, listed in found.items():
            relpath = self._relpath(path)
            info = self._followed(path, listed)
            if info.get("type", "file") == "directory" or not relpath:
                if info.get("islink") and relpath and not _hidden(relpath):
                    linked_folders.append(relpath)
                continue
            if _own_output(relpath, relpaths):
                skipped.append(relpath)
                continue
            if _hidden(relpath) or not self._matcher.match(_matchable(relpath)):
                continue
            sidecars = tuple(c for c in sidecar_candidates(path) if c in found and c != path)
            entries.append(self._entry(path, relpath, info, sidecars, [found[c] for c in sidecars]))
        return entries, skipped, linked_folders

    def _warn_listed(self, skipped: Sequence[str], linked_folders: Sequence[str]) -> None:
        if linked_folders:
            logger.warning(
                "%s: %d linked folder(s) are not followed, so no image in them is listed, e.g. %s; copy or move "
                "the images into the source",
                shown_name(self.root_url),
                len(linked_folders),
                shown_name(linked_folders[0]),
            )
        if skipped:
            logger.warning(
                "%s: %d file(s) that this project writes (posters, video sidecars, gallery.html, the .runway "
                "journal) are inside the image source and are not listed as images, e.g. %s; keep the output and "
                "the journal outside the source",
                shown_name(self.root_url),
                len(skipped),
                shown_name(skipped[0]),
            )

    def _match_manifest(
        self, entries: builtins.list[ImageEntry], manifest: Manifest | None
    ) -> builtins.list[ImageEntry]:
        """Tie each image to its manifest rows (NFC on both sides; case must match exactly), note the
        refusals, and the rows that match no image."""
        self._manifest_keys, self._manifest_refusals, self.manifest_unmatched = {}, {}, []
        if self._manifest_error is not None:
            token = "error:" + hashlib.sha256(str(self._manifest_error).encode()).hexdigest()[:16]
            return [replace(entry, settings_token=token) for entry in entries]
        if manifest is None:
            return entries
        by_nfc: dict[str, builtins.list[str]] = {}
        for entry in entries:
            by_nfc.setdefault(nfc(entry.relpath), []).append(entry.relpath)
        by_fold: dict[str, builtins.list[str]] = {}
        for row in manifest.rows:
            by_fold.setdefault(row.casefold(), []).append(row)
        matched: set[str] = set()
        for entry in entries:
            key = nfc(entry.relpath)
            if key in manifest.rows:
                matched.add(key)
                self._manifest_keys[entry.relpath] = key
                if len(by_nfc[key]) > 1:
                    others = " and ".join(shown_name(repr(r)) for r in by_nfc[key])
                    self._manifest_refusals[entry.relpath] = (
                        f"the files {others} have the same name once Unicode-normalised (NFC), so the row for "
                        f"{key!r} cannot tell which it is for; rename one of the files"
                    )
                continue
            near = [row for row in by_fold.get(key.casefold(), []) if row not in by_nfc]
            if near:
                spelled = " and ".join(repr(row) for row in near)
                self._manifest_refusals[entry.relpath] = (
                    f"the manifest has a row for {spelled}, which differs from the file {shown_name(repr(entry.relpath))} "
                    "only in upper/lower case; names must match exactly (S3 and most filesystems tell them apart), "
                    "so the row is not applied; spell the row exactly as the file is named"
                )
        self.manifest_unmatched = sorted(row for row in manifest.rows if row not in matched)
        return [replace(entry, settings_token=manifest.settings_token(entry.relpath)) for entry in entries]

    def unmatched_manifest_rows(self) -> builtins.list[str]:
        """The manifest paths that matched no image at the last listing (a typo, a deleted file, a name
        that differs in case): report them, or the image is made with the defaults."""
        return list(self.manifest_unmatched)

    def _entry(
        self,
        path: str,
        relpath: str,
        info: Mapping[str, Any],
        sidecars: tuple[str, ...],
        sidecar_infos: Sequence[Mapping[str, Any]],
    ) -> ImageEntry:
        url = full_url(self.fs, path)
        problem = self._problem(path, relpath, info)
        return ImageEntry(
            path=path,
            url=url,
            relpath=relpath,
            size=int(info.get("size") or 0),
            change_token=change_token_of(info),
            partition_key=partition_key_for(relpath),
            sidecars=sidecars,
            sidecar_token=";".join(change_token_of(i) for i in sidecar_infos),
            problem=f"{shown_name(url)}: {problem[0]}; {problem[1]}" if problem else "",
        )

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
        info = self._followed(path, info)
        if info.get("type", "file") == "directory":
            return None
        sidecars, infos = [], []
        for candidate in sidecar_candidates(path):
            try:
                sidecar_info = self.fs.info(candidate)
            except FileNotFoundError:
                continue
            if sidecar_info.get("type", "file") != "directory":  # read_sidecar refuses what is not a file
                sidecars.append(candidate)
                infos.append(sidecar_info)
        return self._entry(path, relpath, info, tuple(sidecars), infos)

    def _probe(self, relpath: str) -> ImageEntry | None:
        """The image at ``relpath`` as a listing would give it but without its sidecars (one metadata
        request), or None if there is no such image: to match manifest rows against images that one part
        of a listing (:mod:`.listing`) does not hold."""
        if _hidden(relpath) or not self._matcher.match(_matchable(relpath)):
            return None
        path = f"{self.root}/{relpath}" if self.root else relpath
        try:
            info = self._followed(path, self.fs.info(path))
        except (FileNotFoundError, NotADirectoryError):
            return None
        if info.get("type", "file") == "directory":
            return None
        return self._entry(path, relpath, info, (), [])

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
        # Locally, a manifest inside the source must stay inside it; one configured elsewhere, in its folder.
        inside_root = fs is self.fs and (path == self.root or path.startswith(self.root.rstrip("/") + "/"))
        root = self.root if inside_root else path.rsplit("/", 1)[0] or "/"
        self._manifest, self._manifest_error = None, None
        try:
            self._manifest = read_manifest(fs, path, shown, root_prefixes, root=root)
        except SettingsError as exc:
            # The listing goes on: every partition fails with this message instead, and pays nothing.
            self._manifest_error = exc
            logger.warning("%s", exc)
        self._manifest_loaded = True
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
        if self.manifest is not None and self._entries is None:
            self.list()  # which rows match which image is known from a listing only
        manifest = self._load_manifest()
        if self._manifest_error is not None:
            raise self._manifest_error
        if manifest is not None:
            refusal = self._manifest_refusals.get(entry.relpath)
            if refusal is not None:
                raise SettingsError(manifest.url, refusal, field="path")
            if manifest.defaults:
                layers.append((f"{manifest.url} (defaults)", manifest.defaults))
                kinds.append("manifest")
            rows = manifest.rows.get(self._manifest_keys.get(entry.relpath, nfc(entry.relpath)), [])
            if len(rows) > 1:
                raise SettingsError(
                    manifest.url,
                    f"{entry.relpath!r} appears {len(rows)} times ({', '.join(w for w, _ in rows)}); keep one entry",
                    field="path",
                )
            layers.extend(rows)
            kinds.extend("manifest" for _ in rows)
        for sidecar in entry.sidecars:
            layers.append(
                (shown_name(full_url(self.fs, sidecar)), read_sidecar(self.fs, sidecar, root=self.root))
            )
            kinds.append("sidecar")
        merged = merge_settings(self.defaults, layers, self.model)
        prompt_source = "defaults" if self.defaults.prompt_text is not None else "service default"
        for kind, (where, fields) in zip(kinds, layers, strict=True):
            if fields.get("prompt_text") is not None:
                prompt_source = f"{kind} {where}"

        ratio, ratio_auto = merged.ratio, False
        if ratio == AUTO_RATIO:
            if image_size is None:
                info = validate_image(
                    self.fs, entry.path, size=entry.size or None, rules=self.model.image_rules
                )
                image_size = info.displayed_size  # as viewers show it (EXIF orientation)
            ratio, ratio_auto = resolve_auto_ratio(*image_size, ratios=self.model.ratios), True
        seed, seed_derived = merged.seed, False
        if seed is None and self.model.seed_max is not None:
            digest = content_sha256 or self.content_sha256(entry)
            seed, seed_derived = derive_seed(digest, self.model.seed_max), True
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

    def _followed(self, path: str, info: Mapping[str, Any]) -> Mapping[str, Any]:
        """A local symlink's listing info with its target's type, size and mtime (fsspec lists a link as
        "other" with the link's own mtime); any other info as it is."""
        if not (is_local(self.fs) and info.get("islink")):
            return info
        try:
            target = os.stat(path)
        except OSError:
            return {**info, "type": "other"}  # a broken link
        kind = (
            "file"
            if stat.S_ISREG(target.st_mode)
            else "directory"
            if stat.S_ISDIR(target.st_mode)
            else "other"
        )
        return {**info, "type": kind, "size": target.st_size, "mtime": target.st_mtime}

    def _problem(self, path: str, relpath: str, info: Mapping[str, Any]) -> tuple[str, str] | None:
        """Why the image at ``path`` cannot be sent, as ``(rule, fix)``, or None: a name the service's URL
        cannot carry, a link out of the source (one to a file inside is an image like any other), or
        something that is not a regular file."""
        problem = name_problem(relpath)
        if problem is None and is_local(self.fs) and info.get("islink") and not inside(self.root, path):
            problem = (
                f"the image is a symbolic link to {shown_name(os.path.realpath(path))}, outside the source root "
                f"{shown_name(self.root)}, and files of a source are read only inside its root",
                "copy the image into the source instead of linking to it",
            )
        if problem is None and info.get("type", "file") != "file":
            problem = (
                "the image is a broken symbolic link"
                if info.get("islink")
                else "the image is not a regular file",
                "replace it with a regular image file, or remove it",
            )
        return problem

    def check_readable(self, entry: ImageEntry) -> None:
        """Refuse, before a byte is read, an image whose partition cannot be sent (see ``_problem``), as
        it is now. Raises :class:`ImageValidationError` naming the file, the rule and the fix."""
        problem = name_problem(entry.relpath)
        if problem is None and is_local(self.fs):  # an object store has no links or special files
            try:
                info = self._followed(entry.path, self.fs.info(entry.path))
            except FileNotFoundError:
                raise ImageValidationError(
                    shown_name(entry.url),
                    "file does not exist",
                    "check the path, or re-list the source",
                    code="unreadable",
                ) from None
            except Exception as exc:  # noqa: BLE001 - a storage error fails this image only
                raise ImageValidationError(
                    shown_name(entry.url),
                    f"cannot read the file's details ({type(exc).__name__})",
                    "check access to the storage",
                    code="unreadable",
                ) from None
            problem = self._problem(entry.path, entry.relpath, info)
        if problem is None and is_local(self.fs) and not inside(self.root, entry.path):
            problem = (
                f"the image lies outside the source root {shown_name(self.root)} (through a linked folder)",
                "copy the image into the source instead of linking to it",
            )
        if problem is not None:
            code = "name" if name_problem(entry.relpath) else "unreadable"
            raise ImageValidationError(shown_name(entry.url), *problem, code=code)

    def read_image(self, entry: ImageEntry) -> SourceBytes:
        """All of the image's bytes, read once (at most the service's 16 MB limit; a larger file is
        refused), with the version that was read: what is hashed, validated and sent."""
        try:
            return read_source_file(
                self.fs,
                entry.path,
                root=self.root,
                max_bytes=IMAGE_MAX_BYTES,
                what="image",
                fix_size="compress it (JPEG quality ~90) or scale it down",
            )
        except FileNotFoundError:
            raise ImageValidationError(
                shown_name(entry.url),
                "file does not exist",
                "check the path, or re-list the source",
                code="unreadable",
            ) from None
        except UntrustedFileError as exc:
            raise ImageValidationError(exc.path, exc.rule, exc.fix, code=exc.code) from None
        except Exception as exc:  # noqa: BLE001 - a storage error fails this image only, with the file named
            raise ImageValidationError(
                shown_name(entry.url),
                f"cannot read the file ({type(exc).__name__})",
                "check access to the storage",
                code="unreadable",
            ) from None

    def content_sha256(self, entry: ImageEntry) -> str:
        """The sha256 of the image's bytes (streamed)."""
        return content_sha256(self.fs, entry.path)

    def validate(self, entry: ImageEntry, *, deep: bool = False) -> ImageInfo:
        """:func:`validate_image` for ``entry``, using the listed size (no metadata request)."""
        return validate_image(
            self.fs, entry.path, size=entry.size or None, deep=deep, rules=self.model.image_rules
        )
