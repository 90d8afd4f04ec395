"""Sidecar files: per-image settings beside the image.

For ``dir/cat.png``, lowest precedence first: ``dir/cat.txt`` (the whole text is the prompt),
``dir/cat.json`` (an object of settings), ``dir/cat.png.txt``, ``dir/cat.png.json``. The ``cat.*``
sidecars apply to every image with that stem (``cat.png`` and ``cat.jpg``); the full-name ones to one
image.
"""

from __future__ import annotations

from typing import Any

import fsspec

from ._fs import full_url
from .errors import SettingsError
from .settings import normalise_fields
from .untrusted import UntrustedFileError, load_json, read_source_file, shown_name

#: A sidecar holds a prompt and a few settings; anything larger is not a sidecar.
SIDECAR_MAX_BYTES = 64 * 1024
_EXAMPLE = '{"promptText": "...", "ratio": "auto"}'


def sidecar_candidates(path: str) -> list[str]:
    """The paths a sidecar of the image at ``path`` may have, lowest precedence first."""
    folder, _, name = path.rpartition("/")
    prefix = f"{folder}/" if folder else ""
    stem = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
    return [f"{prefix}{stem}.txt", f"{prefix}{stem}.json", f"{prefix}{name}.txt", f"{prefix}{name}.json"]


def read_sidecar(fs: fsspec.AbstractFileSystem, path: str, *, root: str | None = None) -> dict[str, Any]:
    """The settings in one sidecar, normalised. Raises :class:`SettingsError` naming the file and the rule,
    never quoting its contents. Locally the sidecar must be a regular file inside ``root`` (the source
    root; default: the sidecar's folder): a symlink out of it, a fifo or a device is refused, and so is a
    file over 64 KiB."""
    shown = shown_name(full_url(fs, path))
    try:
        raw = read_source_file(
            fs,
            path,
            root=root,
            max_bytes=SIDECAR_MAX_BYTES,
            what="sidecar",
            fix_size="keep only the prompt and settings in it",
        ).data
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise UntrustedFileError(shown, "the sidecar is not UTF-8 text", "save it as UTF-8") from None
        if path.endswith(".txt"):
            prompt = text.strip()
            return {"prompt_text": prompt} if prompt else {}
        data = load_json(text, shown, "sidecar", _EXAMPLE)
    except FileNotFoundError:
        raise SettingsError(shown, "sidecar disappeared while reading; re-run") from None
    except UntrustedFileError as exc:
        raise SettingsError(shown, f"{exc.rule}; {exc.fix}") from None
    except OSError as exc:
        raise SettingsError(
            shown, f"cannot read the sidecar ({type(exc).__name__}); check access to the storage"
        ) from None
    return normalise_fields(data, source=shown)
