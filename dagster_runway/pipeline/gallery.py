"""The review page beside the videos: ``<output>/gallery.html`` and its index ``<output>/gallery/``.

The page is static (the same bytes for every pipeline); it loads a small index and draws the cards in
the browser, a page at a time, failures and stale videos first, with filters by state and by name.
The index holds one row per partition (its state and what its card shows), read from the event log
(never from memory and never from a listing of the source): the latest video, image record, failure
and check results of each partition. Rows are kept in ``SHARDS`` files chosen by a hash of the key,
so a write for a few partitions reads and rewrites only their shards; ``gallery/index.js`` names the
shards (with a digest of each, so a served page never shows a cached one) and the header's figures.
Index files are scripts that hand their data to the page (``runwayGallery.rows([...])``), because
browsers refuse ``fetch()`` of a local file: the folder works from ``file://`` and served alike.

``write_gallery(pipeline, instance)`` rebuilds every row; ``write_gallery(..., partitions=[...])``
rewrites only those rows and gives the same bytes as a rebuild would. Two writers on one shard at the
same moment can lose a row; the next write of that partition, or a rebuild, puts it back.

Everything shown is data (names, prompts, reasons): the page sets it as text, never as markup.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any
from urllib.parse import quote

from dagster import AssetCheckKey, DagsterInstance

from dagster_runway._redact import redact_url
from dagster_runway.journal import Journal
from dagster_runway.media import write_bytes_atomic
from dagster_runway.media._fs import is_local, url_to_fs
from dagster_runway.media.untrusted import shown_name
from dagster_runway.pipeline import metadata as md
from dagster_runway.pipeline import records as rec
from dagster_runway.pipeline.checks import CHECK_NAMES
from dagster_runway.pipeline.config import RunwayPipelineConfig

GALLERY_NAME = "gallery.html"
INDEX_FOLDER = "gallery"
INDEX_NAME = "index.js"
FORMAT = 1  # of the index; an index in another format is rebuilt
SHARDS = 256
CHUNK = 1000  # partitions read from the event log at a time

# States, in the order the page shows them first.
STATES = ("failed", "checks failed", "source missing", "stale", "pending", "ok")
# A check's status as one letter in a row (``ck``), in CHECK_NAMES order.
CHECK_CODES = {
    "SUCCEEDED": "S",
    "FAILED": "F",
    "EXECUTION_FAILED": "E",
    "IN_PROGRESS": "P",
    "SKIPPED": "K",
    "MISSING": "M",
}


def gallery_uri(pipeline: RunwayPipelineConfig) -> str:
    return f"{pipeline.output.rstrip('/')}/{GALLERY_NAME}"


@dataclass(frozen=True)
class Card:
    """What one partition's card shows. Its video is ``<key>.mp4`` beside the page, its poster
    ``<key>.poster.jpg`` (the page derives both links from the key)."""

    key: str
    state: str  # one of STATES
    video: bool = False
    poster: bool = False
    source: str = ""  # the image's recorded path or link, fit to show
    source_href: str | None = None  # the image relative to the page, for an <img> (local images only)
    details: Mapping[str, str] = field(default_factory=dict)  # prompt, prompt from, ratio, seed, ...
    cost_usd: float | None = None
    checks: Mapping[str, str] = field(default_factory=dict)  # check name -> SUCCEEDED, FAILED, MISSING, ...
    reason: str = ""

    def row(self) -> dict[str, Any]:
        """The card as an index row: short names, empty fields left out."""
        row: dict[str, Any] = {"k": self.key, "s": self.state}
        if self.video:
            row["v"] = 1
        if self.poster:
            row["po"] = 1
        if self.source:
            row["src"] = self.source
        if self.source_href:
            row["href"] = self.source_href
        for name, value in self.details.items():
            if value:
                row[_DETAIL_FIELDS[name]] = value
        if self.cost_usd is not None:
            row["c"] = round(self.cost_usd, 6)
        if self.checks:
            row["ck"] = "".join(
                CHECK_CODES.get(self.checks.get(name, "MISSING"), "M") for name in CHECK_NAMES
            )
        if self.reason:
            row["w"] = self.reason
        return row


# Detail name -> row field. The page shows them in this order.
_DETAIL_FIELDS = {
    "prompt": "p",
    "prompt from": "pf",
    "ratio": "r",
    "seed": "sd",
    "duration": "d",
    "request": "q",
}


def cards(
    pipeline: RunwayPipelineConfig, instance: DagsterInstance, partitions: Sequence[str] | None = None
) -> list[Card]:
    """The cards of ``partitions`` that are partitions (all, by default), from the event log."""
    if partitions is None:
        keys = list(instance.get_dynamic_partitions(pipeline.dynamic_partitions_name))
    else:
        existing = instance.get_existing_dynamic_partitions(
            pipeline.dynamic_partitions_name, list(partitions)
        )
        keys = [key for key in dict.fromkeys(partitions) if key in existing]
    found: list[Card] = []
    for start in range(0, len(keys), CHUNK):
        found.extend(_cards(pipeline, instance, keys[start : start + CHUNK]))
    return found


def _cards(pipeline: RunwayPipelineConfig, instance: DagsterInstance, keys: Sequence[str]) -> list[Card]:
    videos = rec.latest_videos(instance, pipeline.videos_key, keys)
    images = rec.latest_materializations(instance, pipeline.images_key, keys)
    checks = _check_statuses(instance, pipeline, [key for key in keys if key in videos])
    found = []
    for key in keys:
        image = images.get(key)
        image_meta = (
            md.read_metadata(image.asset_materialization.metadata)
            if image and image.asset_materialization
            else {}
        )
        video = videos.get(key)
        path = str(
            image_meta.get("source_path") or (video.metadata.get("source_path") if video else "") or ""
        )
        missing = _local_file_missing(path)
        shown, image_href = shown_name(path), None if missing else _source_href(pipeline, path)
        if video is None:
            failure = rec.latest_failure(instance, (pipeline.requests_key, pipeline.videos_key), key)
            if failure is not None:
                reason = f"{failure.reason} Next step: {failure.next_step}"
            else:
                reason = (
                    "The image was deleted or moved; nothing is paid for it." if missing else "No video yet."
                )
            state = "source missing" if missing else "failed" if failure else "pending"
            found.append(Card(key, state, source=shown, source_href=image_href, reason=shown_name(reason)))
            continue
        meta = video.metadata
        statuses = checks.get(key, {})
        if missing:
            state = "source missing"
        elif image_meta.get("source_version") and meta.get("source_version") != image_meta["source_version"]:
            state = "stale"
        elif len(statuses) == len(CHECK_NAMES) and all(s == "SUCCEEDED" for s in statuses.values()):
            state = "ok"
        else:
            state = "checks failed"
        cost = meta.get("cost_usd")
        duration = meta.get("video_duration_s")
        details = {
            "prompt": meta.get("prompt_text"),
            "prompt from": meta.get("prompt_source"),
            "ratio": meta.get("ratio"),
            "seed": meta.get("seed"),
            "duration": f"{duration} s" if duration is not None else "",
            "request": meta.get("request_id"),
        }
        found.append(
            Card(
                key,
                state,
                video=True,
                poster=bool(meta.get("poster")),
                source=shown,
                source_href=image_href,
                details={name: shown_name(str(value or "")) for name, value in details.items()},
                cost_usd=float(cost) if isinstance(cost, (int, float)) else None,
                checks=statuses,
            )
        )
    return found


def _check_statuses(
    instance: DagsterInstance, pipeline: RunwayPipelineConfig, keys: Sequence[str]
) -> dict[str, dict[str, str]]:
    """Each partition's check results that judged its latest video (as the UI counts them)."""
    if not keys:
        return {}
    infos = instance.event_log_storage.get_asset_check_partition_info(
        [AssetCheckKey(pipeline.videos_key, name) for name in CHECK_NAMES], partition_keys=list(keys)
    )
    statuses: dict[str, dict[str, str]] = {}
    for info in infos:
        if info.partition_key is None:
            continue
        current = (
            info.latest_materialization_storage_id is not None
            and info.latest_target_materialization_storage_id == info.latest_materialization_storage_id
        )
        statuses.setdefault(info.partition_key, {})[info.check_key.name] = (
            info.latest_execution_status.value if current else "MISSING"
        )
    return statuses


def _local_file_missing(path: str) -> bool:
    """Whether ``path`` is a local file that is gone (a link to an object is not looked up)."""
    return bool(path) and "://" not in path and not os.path.exists(path)


def _source_href(pipeline: RunwayPipelineConfig, path: str) -> str | None:
    """The source image as an <img> src relative to the page (a local image beside a local output)."""
    if not path or "://" in path or "://" in pipeline.output:
        return None
    return quote(os.path.relpath(path, pipeline.output), errors="surrogateescape")


def write_gallery(
    pipeline: RunwayPipelineConfig,
    instance: DagsterInstance,
    partitions: Sequence[str] | None = None,
    *,
    run_spend_usd: float | None = None,
) -> str:
    """Write the review page: every row (``partitions=None``), or only the rows of ``partitions`` (those
    that are no partition any more are dropped). ``run_spend_usd`` is what the caller's run paid, shown
    in the header beside the output's total. Returns the page's URI."""
    index = GalleryIndex(pipeline.output, pipeline.output_storage_options)
    header = {
        "title": shown_name(f"{pipeline.name}: {redact_url(pipeline.source)}"),
        "total_usd": _total_spend(pipeline),
        "run_usd": None if run_spend_usd is None else round(run_spend_usd, 6),
    }
    if partitions is None or not index.current():
        index.write_all((card.row() for card in cards(pipeline, instance)), header)
    else:
        index.update([card.row() for card in cards(pipeline, instance, partitions)], partitions, header)
    return index.page_uri


def _total_spend(pipeline: RunwayPipelineConfig) -> float | None:
    """What the output's journal says was spent in all, or None when it cannot be read."""
    try:
        return Journal(pipeline.journal_url, pipeline.journal_options).spend_summary().total_usd
    except Exception:  # noqa: BLE001 - the header says the total is unknown; the page is still written
        return None


def shard_of(key: str) -> str:
    return f"{zlib.crc32(key.encode('utf-8', 'surrogateescape')) % SHARDS:02x}"


_ROWS_CALL, _INDEX_CALL = "runwayGallery.rows(", "runwayGallery.index("


class GalleryIndex:
    """The page and its index files in ``output`` (any fsspec location)."""

    def __init__(self, output: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.output = output.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.fs, root = url_to_fs(f"{self.output}/{INDEX_FOLDER}", self.storage_options)
        self.root = root.rstrip("/")
        self.page_uri = f"{self.output}/{GALLERY_NAME}"

    # Reading

    def manifest(self) -> dict[str, Any] | None:
        found = self._read(INDEX_NAME, _INDEX_CALL)
        return found if isinstance(found, dict) else None

    def current(self) -> bool:
        """Whether an index in this format is there to update."""
        manifest = self.manifest()
        return manifest is not None and manifest.get("format") == FORMAT

    def shard(self, shard: str) -> dict[str, dict[str, Any]]:
        rows = self._read(f"rows-{shard}.js", _ROWS_CALL) or []
        return {row["k"]: row for row in rows}

    def rows(self) -> dict[str, dict[str, Any]]:
        """Every row, by partition key (for tests and tools)."""
        found: dict[str, dict[str, Any]] = {}
        for shard in (self.manifest() or {}).get("shards", {}):
            found.update(self.shard(shard))
        return found

    def _read(self, name: str, call: str) -> Any:
        try:
            text = self.fs.cat_file(f"{self.root}/{name}").decode("utf-8")
        except FileNotFoundError:
            return None
        body = text.strip().removeprefix(call).removesuffix(";").removesuffix(")")
        try:
            return json.loads(body)
        except ValueError:
            return None  # not ours, or damaged: the next write rebuilds it

    # Writing

    def write_all(self, rows: Iterable[dict[str, Any]], header: Mapping[str, Any]) -> None:
        """Replace the index with ``rows``; remove the shards that are now empty."""
        by_shard: dict[str, dict[str, dict[str, Any]]] = {}
        for row in rows:
            by_shard.setdefault(shard_of(row["k"]), {})[row["k"]] = row
        before = set((self.manifest() or {}).get("shards", {}))
        digests = {shard: self._write_shard(shard, by_shard[shard]) for shard in sorted(by_shard)}
        self._finish(digests, before - set(digests), header)

    def update(self, rows: Sequence[dict[str, Any]], keys: Iterable[str], header: Mapping[str, Any]) -> None:
        """Set ``rows`` and drop the other ``keys`` (no partition any more); only their shards are read."""
        manifest = self.manifest() or {}
        digests: dict[str, str] = dict(manifest.get("shards", {}))
        new = {row["k"]: row for row in rows}
        touched: dict[str, list[str]] = {}
        for key in dict.fromkeys([*keys, *new]):
            touched.setdefault(shard_of(key), []).append(key)
        emptied = set()
        for shard, shard_keys in sorted(touched.items()):
            found = self.shard(shard) if shard in digests else {}
            for key in shard_keys:
                found.pop(key, None)
                if key in new:
                    found[key] = new[key]
            if found:
                digests[shard] = self._write_shard(shard, found)
            elif shard in digests:
                del digests[shard]
                emptied.add(shard)
        self._finish(dict(sorted(digests.items())), emptied, header)

    def _write_shard(self, shard: str, rows: Mapping[str, dict[str, Any]]) -> str:
        lines = ",\n".join(_json(rows[key]) for key in sorted(rows))
        data = f"{_ROWS_CALL}[\n{lines}\n]);\n".encode()
        self._write(f"rows-{shard}.js", data, "text/javascript; charset=utf-8")
        return hashlib.sha256(data).hexdigest()[:12]

    def _finish(self, digests: Mapping[str, str], emptied: Iterable[str], header: Mapping[str, Any]) -> None:
        """Write the manifest (after the shards it names), the page, and remove ``emptied`` shards."""
        manifest = {"format": FORMAT, **header, "checks": list(CHECK_NAMES), "shards": dict(digests)}
        self._write(
            INDEX_NAME, f"{_INDEX_CALL}{_json(manifest)});\n".encode(), "text/javascript; charset=utf-8"
        )
        self._write_page()
        for shard in emptied:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(f"{self.root}/rows-{shard}.js")

    def _write_page(self) -> None:
        page = resources.files("dagster_runway.pipeline").joinpath("gallery_page.html").read_bytes()
        write_bytes_atomic(
            self.page_uri, page, storage_options=self.storage_options, content_type="text/html; charset=utf-8"
        )

    def _write(self, name: str, data: bytes, content_type: str) -> None:
        if is_local(self.fs):
            # Renamed into place, not synced: the index is a view that a rebuild writes again.
            os.makedirs(self.root, exist_ok=True)
            path = f"{self.root}/{name}"
            with open(f"{path}.{os.getpid()}.tmp", "wb") as temporary:
                temporary.write(data)
            os.replace(temporary.name, path)
            return
        write_bytes_atomic(
            f"{self.output}/{INDEX_FOLDER}/{name}",
            data,
            storage_options=self.storage_options,
            content_type=content_type,
        )


def _json(value: Any) -> str:
    """Compact JSON. Text is made valid UTF-8 where it is read (``shown_name``); ``ensure_ascii`` is
    left off so prompts in any script stay one character each."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
