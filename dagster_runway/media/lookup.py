"""Images of a source found by their relative paths: one metadata request each, never a listing.

A submit or collect run knows which images it wants (the paths discovery recorded). Listing a source of
100,000 images to find 200 of them costs 100 ``ListObjectsV2`` pages on S3 and seconds locally, on
every run; looking each one up costs one ``info`` per image and per sidecar candidate, whatever the
size of the source.

:func:`lookup` gives the same :class:`~.sources.ImageEntry` as :meth:`ImageSource.list` (change token,
sidecars, settings token, problem), by the source's own rules. Where a rule needs more than the image,
only the few names it depends on are looked at:

* the project's own outputs: for ``x.poster.jpg`` the videos ``x.mp4``/``x.mov``/``x.webm``, for a
  ``.json`` the video it would describe;
* a linked folder (not walked by a listing): the image's folder resolved against the source root;
* the manifest (read once per call): every image whose name differs from a row's only by case or
  Unicode normalisation (its NFC and NFD spellings are looked up), so a refusal reads as a listing's.

Locally, what is looked up is what fsspec's directory walk records (``lstat``: a symbolic link's own
type and mtime, its target's size), so the change tokens match the listing's.
"""

from __future__ import annotations

import os
import stat
import unicodedata
from collections.abc import Iterable, Mapping
from typing import Any

from .manifest import nfc
from .sidecars import sidecar_candidates
from .sources import ImageEntry, ImageSource, _hidden, _matchable, _own_output

__all__ = ["change_tokens", "lookup", "path_for"]

_VIDEO_EXTENSIONS = (".mp4", ".mov", ".webm")


def lookup(source: ImageSource, relpaths: Iterable[str]) -> dict[str, ImageEntry]:
    """The images of ``source`` at ``relpaths`` (relative to its root), as its listing would give them,
    by relative path; a path that is not an image of the source now is left out.

    Re-reads the manifest, and leaves ``source`` knowing these images, so ``settings_for`` needs no
    listing (``entries`` then holds these images only)."""
    wanted = dict.fromkeys(relpaths)
    found = {rel: entry for rel in wanted if (entry := _image(source, rel, sidecars=True)) is not None}
    manifest = source._load_manifest(refresh=True)
    # The rows' near spellings that are images too: a listing refuses a row they make ambiguous.
    neighbours: dict[str, ImageEntry] = {}
    if manifest is not None and source._manifest_error is None:
        by_fold: dict[str, list[str]] = {}
        for row in manifest.rows:
            by_fold.setdefault(row.casefold(), []).append(row)
        for rel in found:
            for row in by_fold.get(nfc(rel).casefold(), []):
                for spelling in {row, unicodedata.normalize("NFD", row)} - found.keys() - neighbours.keys():
                    entry = _image(source, spelling, sidecars=False)
                    if entry is not None:
                        neighbours[spelling] = entry
    entries = source._match_manifest([*found.values(), *neighbours.values()], manifest)
    source.manifest_unmatched = []  # known from a whole listing only
    entries.sort(key=lambda e: e.partition_key)
    source._entries, source._by_key = entries, {entry.partition_key: entry for entry in entries}
    return {entry.relpath: entry for entry in entries if entry.relpath in found}


def change_tokens(source: ImageSource, relpaths: Iterable[str]) -> dict[str, str]:
    """The change token now of each image of ``source`` at ``relpaths``, by relative path (one metadata
    request each); a path that is not an image of the source now is left out."""
    tokens = {}
    for rel in dict.fromkeys(relpaths):
        entry = _image(source, rel, sidecars=False)
        if entry is not None:
            tokens[rel] = entry.change_token
    return tokens


def path_for(source: ImageSource, relpath: str) -> str:
    """The filesystem path of ``relpath`` under the source's root (as its listing names it)."""
    root = source.root
    return f"{root}{relpath}" if root.endswith("/") else f"{root}/{relpath}"


def _info(source: ImageSource, path: str) -> Mapping[str, Any] | None:
    """What a listing records of ``path``, or None if nothing is there."""
    if source.local:
        try:
            found = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        link = stat.S_ISLNK(found.st_mode)
        size = found.st_size
        if link:
            try:
                size = os.stat(path).st_size
            except OSError:
                size = 0  # a broken link, as the walk records it
        kind = (
            "directory" if stat.S_ISDIR(found.st_mode) else "file" if stat.S_ISREG(found.st_mode) else "other"
        )
        return {"name": path, "size": size, "type": kind, "islink": link, "mtime": found.st_mtime}
    source.fs.invalidate_cache(path)  # a cached listing could be stale, or name a missing file a folder
    try:
        info: Mapping[str, Any] = source.fs.info(path)
    except FileNotFoundError:
        return None
    return info


def _listed(source: ImageSource, path: str) -> Mapping[str, Any] | None:
    """``_info`` of a file a listing would return (a listing returns no folders)."""
    info = _info(source, path)
    return info if info is not None and info.get("type", "file") != "directory" else None


def _image(source: ImageSource, relpath: str, *, sidecars: bool) -> ImageEntry | None:
    """The image at ``relpath`` as a listing gives it before the manifest is matched, or None."""
    if not relpath or _hidden(relpath) or not source._matcher.match(_matchable(relpath)):
        return None
    path = path_for(source, relpath)
    listed = _listed(source, path)
    if listed is None or _is_own_output(source, relpath) or _in_linked_folder(source, relpath):
        return None
    info = source._followed(path, listed)
    if info.get("type", "file") == "directory":
        return None  # a linked folder
    found = []
    if sidecars:
        for candidate in sidecar_candidates(path):
            if candidate != path and (sidecar := _listed(source, candidate)) is not None:
                found.append((candidate, sidecar))
    return source._entry(path, relpath, info, tuple(c for c, _ in found), [i for _, i in found])


def _is_own_output(source: ImageSource, relpath: str) -> bool:
    """``_own_output`` of the listing, with the few files it depends on looked up."""
    lower = relpath.lower()
    if lower.endswith(".poster.jpg"):
        stem = relpath[: -len(".poster.jpg")]
        beside = [stem + ext for ext in _VIDEO_EXTENSIONS]
    elif lower.endswith(".json"):
        beside = [relpath[: -len(".json")]]
    else:
        beside = []
    present = {rel: True for rel in beside if _listed(source, path_for(source, rel)) is not None}
    return _own_output(relpath, present)


def _in_linked_folder(source: ImageSource, relpath: str) -> bool:
    """Whether the image lies under a symbolic link to a folder, which a local listing does not walk."""
    folder = relpath.rpartition("/")[0]
    if not source.local or not folder:
        return False
    return os.path.realpath(path_for(source, folder)) != os.path.join(os.path.realpath(source.root), folder)
