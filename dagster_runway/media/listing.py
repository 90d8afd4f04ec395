"""A listing of an image source read a bounded part at a time, resumed where the last part stopped.

:meth:`ImageSource.list` reads the whole source at once: 100,000 local files take seconds and hundreds
of MB, and a million files outlast a sensor tick. :class:`Listing` reads the source in key order after
a relative path (``start_after``), at most about ``max_read`` objects, and gives its images in
:class:`Unit` s, each with the relative path to resume after. The same rules apply as in a whole
listing (:meth:`ImageSource._listed`, :meth:`ImageSource._match_manifest`: own outputs, hidden files,
linked folders, name problems, patterns, sidecars, manifest rows), on each part.

Why a key and not a continuation token: a key survives a restart, an expired token and a changed
bucket (S3 continuation tokens are opaque and not meant to outlive a listing), and it orders local and
S3 sources the same way.

* On S3: ``ListObjectsV2`` pages (``StartAfter`` = the last key, ``MaxKeys`` at most 1,000), whose
  entries carry the ETag, size and LastModified that make the change token: no request per object.
* Locally: a directory walk in the same order (a folder ``a`` sorts as ``a/``, so the walk is in
  relative-path order), where a folder wholly before ``start_after`` is not read. A folder is read
  whole (``scandir`` has no start point), so a part reads at most ``max_read`` plus the largest
  folder it enters, with mtime and size from ``scandir`` (the info fsspec's own listing records).
* Anything else fsspec opens: one whole listing, sliced (no bound on the objects read).

A stem group (``cat.png``, ``cat.jpg``, ``cat.txt``, ``cat.json``, ``cat.png.txt``, and a video with
its poster) is never split between units: every member of the group of ``folder/cat`` has a key in
``[folder/cat, folder/cat/)`` (``cat`` itself or ``cat.*``), so after reading up to key ``L`` the
groups that may have members further on are those whose group key is a prefix of ``L`` followed by
nothing or a character below ``/``. Those keys are kept back and read again with the next part.

Manifest rows are matched per part. A row spelled like an image of this part but for another image
(case, Unicode normalisation) would be judged with the whole listing in view, so those few spellings
are looked up (one metadata request each, only for names that have such a row or are not ASCII).
"""

from __future__ import annotations

import os
import time
import unicodedata
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .manifest import Manifest, nfc
from .sources import ImageEntry, ImageSource

__all__ = ["PAGE", "Listing", "Unit", "group_of"]

#: Objects per page (S3's ``MaxKeys`` ceiling; locally, what one part is judged over at most).
PAGE = 1000

_Item = tuple[str, str, Mapping[str, Any]]  # (relative path, fs path, listing info)


def group_of(relpath: str) -> str:
    """The stem group's key of ``relpath``: its folder and its name up to the first dot
    (``a/cat.png.txt`` -> ``a/cat``). An image and all its sidecars share it."""
    name = relpath.rsplit("/", 1)[-1]
    return relpath[: len(relpath) - len(name)] + name.split(".", 1)[0]


def _open_groups(last: str, groups: set[str]) -> set[str]:
    """The groups among ``groups`` that may have members after the key ``last`` (see the module doc)."""
    return {
        last[:p] for p in range(len(last) + 1) if (p == len(last) or last[p] < "/") and last[:p] in groups
    }


@dataclass(frozen=True)
class Unit:
    """Images to judge together (whole stem groups), and where the listing resumes after them."""

    entries: list[ImageEntry]
    end: str  # the relative path of the last object of the unit
    rows: frozenset[str]  # the manifest rows its images matched


class Listing:
    """One bounded part of a listing of ``source``, after the relative path ``start_after`` (None: from
    the start). :meth:`units` reads pages while fewer than ``max_read`` objects were read and the
    monotonic ``deadline`` has not passed (until one unit at least); :attr:`done` says it reached the end."""

    def __init__(
        self, source: ImageSource, start_after: str | None, *, max_read: int, deadline: float | None = None
    ) -> None:
        self.source = source
        self.start_after = start_after
        self.max_read = max_read
        self.deadline = deadline
        self.read = 0  # objects read (listing entries)
        self.parts = 0  # parts of whole groups judged (one at least, whatever the budget)
        self.images = 0  # images given in units (some may be read again by the next part)
        self.done = False  # the listing reached its end and every unit was given
        self.skipped_outputs: list[str] = []
        self.linked_folders: list[str] = []
        self.manifest: Manifest | None = None

    def units(self) -> Iterator[Unit]:
        self.manifest = self.source._load_manifest(refresh=True)
        pages = self._pages()
        held: list[_Item] = []  # read, in groups that may go on in the next page
        end = False
        while not end:
            if self.parts and (
                self.read >= self.max_read or (self.deadline is not None and time.monotonic() > self.deadline)
            ):
                return
            page, end, last = next(pages, ([], True, ""))
            held.extend(page)
            cut = len(held)
            if held and not end:
                opened = _open_groups(last, {group_of(rel) for rel, _, _ in held})
                cut = next((i for i, (rel, _, _) in enumerate(held) if group_of(rel) in opened), cut)
            part, held = held[:cut], held[cut:]
            if part:
                self.parts += 1
                yield from self._units(part)
        self.done = True

    def _units(self, part: list[_Item]) -> Iterator[Unit]:
        """``part`` (whole groups, in key order) as units: cut after a key where no group goes on."""
        source = self.source
        entries, skipped, linked = source._listed({path: info for _, path, info in part})
        self.skipped_outputs += skipped
        self.linked_folders += linked
        mine = {e.relpath for e in entries}
        entries = [
            e
            for e in source._match_manifest([*entries, *self._neighbours(entries)], self.manifest)
            if e.relpath in mine
        ]
        rows = {e.relpath: source._manifest_keys.get(e.relpath) for e in entries}
        source.manifest_unmatched = []  # known from a whole pass only
        by_rel = {e.relpath: e for e in entries}
        self.images += len(entries)
        last = {group_of(rel): i for i, (rel, _, _) in enumerate(part)}
        start, reach = 0, 0
        for i, (rel, _, _) in enumerate(part):
            reach = max(reach, last[group_of(rel)])
            if reach == i:
                unit = [by_rel[r] for r, _, _ in part[start : i + 1] if r in by_rel]
                yield Unit(unit, rel, frozenset(row for e in unit if (row := rows[e.relpath]) is not None))
                start = i + 1

    def _neighbours(self, entries: list[ImageEntry]) -> list[ImageEntry]:
        """The images outside this part that a whole listing would weigh against ``entries``' rows."""
        manifest = self.manifest
        if manifest is None or self.source._manifest_error is not None or not entries:
            return []
        mine = {e.relpath for e in entries}
        folds = {nfc(e.relpath).casefold() for e in entries}
        spellings: set[str] = set()
        for row in manifest.rows:
            if row.casefold() in folds:
                spellings |= {row, unicodedata.normalize("NFD", row)}
        return [e for rel in sorted(spellings - mine) if (e := self.source._probe(rel)) is not None]

    # -- pages in key order ------------------------------------------------------------------------

    def _pages(self) -> Iterator[tuple[list[_Item], bool, str]]:
        """Pages of at most :data:`PAGE` items after ``start_after``, each with whether it is the last, and
        the greatest key read so far (every key not read yet is greater)."""
        source = self.source
        if hasattr(source.fs, "call_s3"):
            yield from self._s3_pages()
        elif source.local and os.path.isdir(source.root):
            yield from self._local_pages()
        else:
            yield from self._whole_pages()

    def _page_size(self) -> int:
        return max(1, min(PAGE, self.max_read - self.read))

    def _whole_pages(self) -> Iterator[tuple[list[_Item], bool, str]]:
        found = self.source._find()
        self.read += len(found)
        after = self.start_after
        items: list[_Item] = sorted(
            (rel, path, info)
            for path, info in found.items()
            if (rel := self.source._relpath(path)) and (after is None or rel > after)
        )
        for i in range(0, max(len(items), 1), PAGE):
            page = items[i : i + PAGE]
            yield page, i + PAGE >= len(items), page[-1][0] if page else ""

    def _s3_pages(self) -> Iterator[tuple[list[_Item], bool, str]]:
        source = self.source
        bucket, _, key = source.root.partition("/")
        prefix = key.strip("/") + "/" if key.strip("/") else ""
        after = prefix + self.start_after if self.start_after is not None else None
        while True:
            kwargs: dict[str, Any] = {
                "Bucket": bucket,
                "Prefix": prefix,
                "MaxKeys": self._page_size(),
                **source.fs.req_kw,
            }
            if after is not None:
                kwargs["StartAfter"] = after
            try:
                out = source.fs.call_s3("list_objects_v2", **kwargs)
            except Exception as exc:  # noqa: BLE001 - a missing bucket or bad credentials: the listing's message
                if after is None:
                    yield from self._whole_pages()
                    return
                raise source._list_error(exc) from None
            contents = out.get("Contents", [])
            if after is None and not contents:  # an empty prefix, or the source is one object
                yield from self._whole_pages()
                return
            self.read += len(contents)
            page: list[_Item] = []
            for listed in contents:
                after = listed["Key"]
                name = f"{bucket}/{listed['Key']}"
                rel = source._relpath(name)
                if rel and not rel.endswith("/"):  # not a folder marker
                    # As s3fs's own listing gives it (``_iterdir``, ``_fill_info``).
                    page.append(
                        (
                            rel,
                            name,
                            {**listed, "type": "file", "size": listed["Size"], "name": name, "Key": name},
                        )
                    )
            more = bool(out.get("IsTruncated"))
            yield page, not more, (after or "")[len(prefix) :]
            if not more:
                return

    def _local_pages(self) -> Iterator[tuple[list[_Item], bool, str]]:
        page: list[_Item] = []
        for item in self._walk(self.source.root, ""):
            if isinstance(item, str):  # a folder about to be read: the folders read so far end a page
                if page and self.read >= self.max_read:
                    yield page, False, item
                    page = []
                continue
            page.append(item)
            if len(page) >= PAGE:
                yield page, False, item[0]
                page = []
        yield page, True, ""

    def _walk(self, folder: str, prefix: str) -> Iterator[_Item | str]:
        """The files under ``folder`` (relative path ``prefix``) after ``start_after``, in key order, and
        before each folder it reads, that folder's key (``a/``)."""
        after = self.start_after
        try:
            with os.scandir(folder) as scan:
                found = list(scan)
        except OSError:  # gone or unreadable: fsspec's walk omits it too
            return
        self.read += len(found)
        keyed = sorted((f"{e.name}/" if e.is_dir(follow_symlinks=False) else e.name, e) for e in found)
        fs = self.source.fs
        for name, entry in keyed:
            rel = prefix + name
            if name.endswith("/"):
                if (
                    after is None or after < rel[:-1] + "0"
                ):  # "0" follows "/": the folder's keys end before it
                    yield rel
                    yield from self._walk(entry.path, rel)
            elif after is None or rel > after:
                try:
                    info = fs.info(entry)  # what fsspec's find records for it
                except FileNotFoundError:
                    continue
                yield rel, info["name"], info
