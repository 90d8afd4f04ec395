"""The manifest: one CSV or JSON file of per-image settings for a whole source.

CSV: a ``path`` column (or ``image``, ``file``, ``relpath``, ``filename``) plus any of
``promptText``/``prompt``, ``ratio``, ``duration``, ``seed``. JSON: a list of objects with ``path``; an
object mapping paths to settings; or ``{"defaults": {...}, "images": <either>}``. Paths are relative to
the source root (a full URL or path under the root is accepted and made relative), and are compared
with file names after Unicode NFC normalisation (macOS writes names decomposed, NFD; editors write NFC).

The manifest is data from the source: it is read only as a regular file (locally, inside the folder it
is configured in: a symlink out of it is refused) of at most :data:`MANIFEST_MAX_BYTES`, and its JSON
nests at most :data:`~.untrusted.JSON_MAX_DEPTH` levels.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec

from .errors import SettingsError
from .settings import normalise_fields
from .untrusted import UntrustedFileError, load_json, read_source_file

#: 16 MiB: about 100,000 rows with a prompt each.
MANIFEST_MAX_BYTES = 16 * 1024 * 1024
_EXAMPLE = '[{"path": "cat.png", "promptText": "..."}]'

PATH_COLUMNS = ("path", "image", "file", "relpath", "filename")


@dataclass
class Manifest:
    """A parsed manifest: the defaults it sets, and each relative path's rows as ``(where, fields)``,
    keyed by the NFC form of the path (more than one row for a path is an error, reported when that
    image's settings are asked for)."""

    url: str
    defaults: dict[str, Any] = field(default_factory=dict)
    rows: dict[str, list[tuple[str, dict[str, Any]]]] = field(default_factory=dict)

    def settings_token(self, relpath: str) -> str:
        """A short hash of what the manifest says for ``relpath``, so an edited row is noticed."""
        rows = [fields for _, fields in self.rows.get(nfc(relpath), [])]
        if not rows and not self.defaults:
            return ""
        text = json.dumps([self.defaults, rows], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def _add(self, relpath: str, where: str, fields: dict[str, Any]) -> None:
        self.rows.setdefault(relpath, []).append((where, fields))


def nfc(path: str) -> str:
    """``path`` in Unicode NFC, the form manifest rows and file names are compared in."""
    return unicodedata.normalize("NFC", path)


def read_manifest(
    fs: fsspec.AbstractFileSystem,
    path: str,
    shown: str,
    root_prefixes: Sequence[str],
    *,
    root: str | None = None,
) -> Manifest:
    """Read and parse the manifest at ``path`` (bypassing fsspec's cache). ``shown`` names it in errors;
    ``root_prefixes`` are stripped from the paths it lists; locally the file must be inside ``root``.
    Raises :class:`SettingsError`, whose message never quotes the file."""
    try:
        fs.invalidate_cache(path)
        raw = read_source_file(
            fs,
            path,
            root=root,
            max_bytes=MANIFEST_MAX_BYTES,
            what="manifest",
            fix_size="split the source, or keep only the settings in the manifest",
        ).data
    except UntrustedFileError as exc:
        raise SettingsError(shown, f"{exc.rule}; {exc.fix}") from None
    except FileNotFoundError:
        raise SettingsError(
            shown, "manifest file does not exist; fix the manifest path or create it"
        ) from None
    except Exception as exc:  # noqa: BLE001 - any storage error, with the file named
        raise SettingsError(
            shown, f"cannot read the manifest ({type(exc).__name__}); check its path and read access"
        ) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise SettingsError(shown, "manifest is not UTF-8 text; save it as UTF-8") from None
    if path.lower().endswith(".csv"):
        return parse_csv(text, shown, root_prefixes)
    if path.lower().endswith(".json"):
        return parse_json(text, shown, root_prefixes)
    raise SettingsError(
        shown, "manifest must be a .csv or .json file; rename it, or convert it to CSV or JSON"
    )


def _relpath(value: Any, where: str, root_prefixes: Sequence[str]) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SettingsError(
            where, "missing image path; give the path relative to the source root", field="path"
        )
    text = value.strip().replace("\\", "/")
    for prefix in root_prefixes:
        if text.startswith(prefix):
            text = text[len(prefix) :]
    while text.startswith("./"):
        text = text[2:]
    return nfc(text.lstrip("/"))


def parse_csv(text: str, shown: str, root_prefixes: Sequence[str] = ()) -> Manifest:
    manifest = Manifest(url=shown)
    reader = csv.DictReader(io.StringIO(text))
    try:
        columns = [c.strip() for c in reader.fieldnames or []]
    except csv.Error as exc:
        raise SettingsError(shown, f"manifest is not valid CSV ({exc}); fix the first line") from None
    path_column = next((c for c in PATH_COLUMNS if c in columns), None)
    if path_column is None:
        raise SettingsError(
            shown, f"CSV manifest has no 'path' column (columns: {', '.join(columns) or 'none'})"
        )
    rows = iter(reader)
    while True:
        try:
            row = next(rows)
        except StopIteration:
            break
        except csv.Error as exc:
            raise SettingsError(
                f"{shown} (line {reader.line_num})", f"manifest is not valid CSV ({exc}); fix that line"
            ) from None
        where = f"{shown} (line {reader.line_num})"
        cleaned = {(k or "").strip(): v for k, v in row.items()}
        if None in row:
            raise SettingsError(
                where, "row has more cells than the header has columns; quote cells that contain commas"
            )
        relpath = _relpath(cleaned.pop(path_column), where, root_prefixes)
        manifest._add(relpath, where, normalise_fields(cleaned, source=where))
    return manifest


def parse_json(text: str, shown: str, root_prefixes: Sequence[str] = ()) -> Manifest:
    manifest = Manifest(url=shown)
    try:
        data = load_json(text, shown, "manifest", _EXAMPLE, lists=True)
    except UntrustedFileError as exc:
        raise SettingsError(shown, f"{exc.rule}; {exc.fix}") from None
    images: Any = data
    if isinstance(data, dict) and ("images" in data or "defaults" in data):
        extra = set(data) - {"images", "defaults"}
        if extra:
            raise SettingsError(shown, f"unknown top-level keys {sorted(extra)}; use 'defaults' and 'images'")
        defaults = data.get("defaults") or {}
        if not isinstance(defaults, dict):
            raise SettingsError(shown, "'defaults' must be an object", field="defaults")
        manifest.defaults = normalise_fields(defaults, source=f"{shown} (defaults)")
        images = data.get("images") or []
    if isinstance(images, dict):
        for key, value in images.items():
            where = f"{shown} ({key!r})"
            if not isinstance(value, dict):
                raise SettingsError(
                    where,
                    'each image\'s settings must be an object, e.g. {"promptText": "...", "ratio": "auto"}',
                )
            relpath = _relpath(key, where, root_prefixes)
            manifest._add(relpath, where, normalise_fields(value, source=where))
    elif isinstance(images, list):
        for index, item in enumerate(images):
            where = f"{shown} (item {index})"
            if not isinstance(item, dict):
                raise SettingsError(where, "each item must be an object with a 'path'")
            item = dict(item)
            key = next((c for c in PATH_COLUMNS if c in item), None)
            relpath = _relpath(item.pop(key) if key else None, where, root_prefixes)
            manifest._add(relpath, where, normalise_fields(item, source=where))
    else:
        raise SettingsError(
            shown, "manifest must be a list of objects or an object mapping paths to settings"
        )
    return manifest
