"""Sidecar files: per-image settings beside the image.

For ``dir/cat.png``, lowest precedence first: ``dir/cat.txt`` (the whole text is the prompt),
``dir/cat.json`` (an object of settings), ``dir/cat.png.txt``, ``dir/cat.png.json``. The ``cat.*``
sidecars apply to every image with that stem (``cat.png`` and ``cat.jpg``); the full-name ones to one
image.
"""

from __future__ import annotations

import json
from typing import Any

import fsspec

from ._fs import full_url
from .errors import SettingsError
from .settings import normalise_fields

SIDECAR_MAX_BYTES = 1024 * 1024


def sidecar_candidates(path: str) -> list[str]:
    """The paths a sidecar of the image at ``path`` may have, lowest precedence first."""
    folder, _, name = path.rpartition("/")
    prefix = f"{folder}/" if folder else ""
    stem = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
    return [f"{prefix}{stem}.txt", f"{prefix}{stem}.json", f"{prefix}{name}.txt", f"{prefix}{name}.json"]


def read_sidecar(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any]:
    """The settings in one sidecar, normalised. Raises :class:`SettingsError` naming the file."""
    shown = full_url(fs, path)
    try:
        raw = bytes(fs.cat_file(path, start=0, end=SIDECAR_MAX_BYTES + 1))
    except FileNotFoundError:
        raise SettingsError(shown, "sidecar disappeared while reading; re-run") from None
    if len(raw) > SIDECAR_MAX_BYTES:
        raise SettingsError(shown, "sidecar is larger than 1 MB; keep only the settings in it")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise SettingsError(shown, "sidecar is not UTF-8 text; save it as UTF-8") from None
    if path.endswith(".txt"):
        prompt = text.strip()
        return {"prompt_text": prompt} if prompt else {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SettingsError(shown, f"sidecar is not valid JSON ({exc}); fix the syntax") from None
    if not isinstance(data, dict):
        raise SettingsError(
            shown, 'sidecar JSON must be an object like {"promptText": "...", "ratio": "auto"}'
        )
    return normalise_fields(data, source=shown)
