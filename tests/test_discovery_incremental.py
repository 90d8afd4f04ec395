"""Discovery lists the source a bounded part per tick and resumes where the last tick stopped.

The bound is counted (objects read per tick, ``max_read``), never timed: every deadline here is infinite.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from dagster import DagsterInstance, instance_for_test

from dagster_runway._compat import storage_connections_held
from dagster_runway.media.listing import Listing, group_of
from dagster_runway.media.sources import ImageEntry, ImageSource
from dagster_runway.pipeline import RunwayPipelineConfig
from dagster_runway.pipeline import discovery as disc
from dagster_runway.pipeline.discovery import Discovery, discover
from tests.fixtures.s3 import S3Bucket

from .pipeline_helpers import PARTITIONS, image_records

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 16

#: Stem groups whose keys interleave in key order ("x-1.png" sorts between "x" and "x.png"), sidecars
#: of both kinds, an image with two extensions, a folder named like a stem, own outputs, hidden files.
LAYOUT = [
    "x.png", "x-1.png", "x.txt", "x.png.json", "x.jpg",
    "a/cat.png", "a/cat.jpg", "a/cat.json", "a/cat-2.png", "a/cat.png.txt",
    "b.d/q.png", "b.png", "b.txt", "b-b.png",
    "v/clip.mp4", "v/clip.poster.jpg", "v/clip.mp4.json",
    ".hidden.png", "c.png", "d/e/f.png", "d/e/f.json", "d/g.png",
]  # fmt: skip


@pytest.fixture
def instance() -> Iterator[DagsterInstance]:
    with instance_for_test() as instance:
        yield instance


def _write(root: Path, names: list[str]) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(
            b'{"promptText": "p"}' if name.endswith(".json") else b"prompt" if name.endswith(".txt") else PNG
        )


def _ticks(
    pipeline: RunwayPipelineConfig, instance: DagsterInstance, max_read: int, limit: int = 100
) -> list[Discovery]:
    """Discovery ticks until a pass ends, with the partitions each adds (as the sensor does)."""
    ticks: list[Discovery] = []
    with storage_connections_held(instance):
        while not (ticks and ticks[-1].pass_done):
            assert len(ticks) < limit, "the pass never ends"
            found = discover(pipeline, instance, "memory", deadline=math.inf, max_read=max_read)
            instance.add_dynamic_partitions(PARTITIONS, found.new)
            ticks.append(found)
    return ticks


def _units(source: ImageSource, max_read: int) -> list[list[ImageEntry]]:
    """A whole pass of :class:`Listing` parts: the images of each unit."""
    units: list[list[ImageEntry]] = []
    cursor = None
    for _ in range(1000):
        listing = Listing(source, cursor, max_read=max_read)
        for unit in listing.units():
            units.append(unit.entries)
            cursor = unit.end
        if listing.done:
            return units
    raise AssertionError("the listing never ends")


@pytest.mark.parametrize("max_read", [1, 2, 3, 5, 8, 1000])
def test_parts_of_a_listing_give_what_one_listing_gives_and_never_split_a_stem_group(
    tmp_path: Path, max_read: int
):
    _write(tmp_path, LAYOUT)
    source = ImageSource(str(tmp_path))
    whole = {e.relpath: e for e in source.list()}
    units = _units(source, max_read)
    seen = [e.relpath for unit in units for e in unit]
    assert sorted(seen) == sorted(whole) and len(seen) == len(set(seen)), "every image once"
    # Each image with the sidecars, change token and problem a whole listing gives it...
    assert all(e == whole[e.relpath] for unit in units for e in unit)
    group_units: dict[str, int] = {}
    for i, unit in enumerate(units):  # ... and in one unit with its stem group
        for e in unit:
            assert group_units.setdefault(group_of(e.relpath), i) == i, f"{group_of(e.relpath)} split"
    names = [[e.relpath for e in unit] for unit in units]
    assert ["a/cat.jpg", "a/cat.png"] in names and ["x.jpg", "x.png"] in names


def test_an_s3_listing_resumes_after_the_last_key_and_reads_a_bounded_page(s3: S3Bucket):
    for name in LAYOUT:
        s3.client.put_object(Bucket=s3.bucket, Key=f"in/{name}", Body=PNG)
    s3.client.put_object(Bucket=s3.bucket, Key="in-other/z.png", Body=PNG)  # beside the prefix: not listed
    source = ImageSource(f"s3://{s3.bucket}/in", storage_options=s3.storage_options)
    whole = {e.relpath: e for e in source.list()}
    cursor, reads, got = None, [], {}
    while True:
        listing = Listing(source, cursor, max_read=4)
        for unit in listing.units():
            got.update({e.relpath: e for e in unit.entries})
            cursor = unit.end
        reads.append(listing.read)
        if listing.done:
            break
    assert got == whole  # ETag, size, sidecars and problems as one listing gives them
    assert max(reads) <= 4 + 4, reads  # the bound, plus one-key pages until a stem group closes
    assert sum(reads) < 3 * len(LAYOUT), reads  # what is read again is the open group at a page's end


def test_discovery_records_every_image_over_ticks_reading_a_bounded_part_each(tmp_path: Path, instance):
    source = tmp_path / "in"
    names = [f"f{i}/img{j}.png" for i in range(4) for j in range(3)]
    _write(source, [*names, "f1/img0.txt"])
    pipeline = RunwayPipelineConfig(source=str(source), output=str(tmp_path / "videos"))
    ticks = _ticks(pipeline, instance, max_read=3)
    assert len(ticks) >= 4 and all(not t.pass_done for t in ticks[:-1])
    # A tick reads the bound and the rest of the folder it is in, and the root again (4 folders).
    assert max(t.read for t in ticks) <= 3 + 4 + 4, [t.read for t in ticks]
    assert sum(t.read for t in ticks) < 3 * (4 + len(names) + 1), "what it reads again is bounded"
    assert sorted(p for t in ticks for p in t.new) == sorted(instance.get_dynamic_partitions(PARTITIONS))
    assert len(instance.get_dynamic_partitions(PARTITIONS)) == len(names) == image_records(instance)[0]
    assert ticks[-1].passes == 1 and ticks[-1].seen == len(names)

    again = _ticks(pipeline, instance, max_read=3)  # the next pass: nothing changed, nothing recorded
    assert sum(t.recorded for t in again) == 0 and again[-1].passes == 2 and not again[-1].gone
    assert image_records(instance) == (len(names), len(names))


def test_a_change_to_an_image_a_sidecar_or_a_manifest_row_is_found_in_the_next_pass(tmp_path: Path, instance):
    source = tmp_path / "in"
    _write(source, ["a.png", "b.png", "c.png", "d.png", "e.png", "b.txt"])
    (source / "rows.csv").write_text("path,promptText\nc.png,first\nnobody.png,orphan\n")
    pipeline = RunwayPipelineConfig(source=str(source), output=str(tmp_path / "videos"), manifest="rows.csv")
    first = _ticks(pipeline, instance, max_read=2)
    assert first[-1].unmatched == ["nobody.png"]  # rows that match no image: per completed pass
    keys = {e.relpath: e.partition_key for e in pipeline.image_source().list()}

    (source / "a.png").write_bytes(PNG + b"edited")
    os.utime(source / "a.png", (1_000_000_000, 1_000_000_000))
    (source / "b.txt").write_text("another prompt")
    os.utime(source / "b.txt", (1_000_000_000, 1_000_000_000))
    (source / "rows.csv").write_text("path,promptText\nc.png,second\n")
    (source / "e.png").unlink()
    second = _ticks(pipeline, instance, max_read=2)
    changed = sorted(p for t in second for p in t.changed)
    assert changed == sorted(keys[n] for n in ("a.png", "b.png", "c.png"))
    assert sum(t.recorded for t in second) == 3 and not any(t.new for t in second)
    assert second[-1].gone == [keys["e.png"]], "a deleted image is noticed at the end of the pass"
    assert second[-1].unmatched == []


def test_a_tick_records_at_most_its_batch_and_never_splits_a_stem_group(tmp_path: Path, instance):
    source = tmp_path / "in"
    _write(source, ["cat.png", "cat.jpg", "cat.webp", "cat.txt", "dog.png", "dog.jpg", "eel.png"])
    pipeline = RunwayPipelineConfig(
        source=str(source), output=str(tmp_path / "videos"), discovery_batch_size=2
    )
    ticks = _ticks(pipeline, instance, max_read=1000)
    groups = {e.partition_key: group_of(e.relpath) for e in pipeline.image_source().list()}
    by_tick = [{groups[p] for p in t.versions} for t in ticks]
    assert [sorted(g) for g in by_tick] == [
        ["cat"],
        ["dog"],
        ["eel"],
    ]  # cat's 3 images go together, as the first
    # The first group of a tick goes whole even past the batch; the next waits for a tick with room.
    assert [t.recorded for t in ticks] == [3, 2, 1] and [t.deferred for t in ticks] == [3, 1, 0]


def test_a_tick_that_dies_before_saving_its_memory_records_again_and_pays_nothing(
    tmp_path: Path, instance, monkeypatch: pytest.MonkeyPatch
):
    source = tmp_path / "in"
    _write(source, [f"f{i}/img{j}.png" for i in range(3) for j in range(2)])  # a tick per folder
    pipeline = RunwayPipelineConfig(source=str(source), output=str(tmp_path / "videos"))

    def dies(*args, **kwargs):
        raise RuntimeError("the tick died")

    with storage_connections_held(instance):
        first = discover(pipeline, instance, "memory", deadline=math.inf, max_read=3)  # a part of the pass
        instance.add_dynamic_partitions(PARTITIONS, first.new)
        with monkeypatch.context() as patch:
            patch.setattr(disc, "save_memory", dies)
            with pytest.raises(RuntimeError):
                discover(pipeline, instance, "memory", deadline=math.inf, max_read=3)
    assert image_records(instance)[0] == 4  # f0's, and f1's by the tick that died
    ticks = _ticks(pipeline, instance, max_read=3)
    # The dead tick's images are recorded again, with the same versions: no change for the status sensor.
    assert [sorted(t.new) for t in ticks] == [["f1/img0.png", "f1/img1.png"], ["f2/img0.png", "f2/img1.png"]]
    assert image_records(instance)[0] == 8 and len(instance.get_dynamic_partitions(PARTITIONS)) == 6
    assert ticks[-1].passes == 1
    latest = {
        r.partition_key: r.asset_materialization.tags
        for r in instance.fetch_materializations(pipeline.images_key, limit=100).records
        if r.asset_materialization is not None
    }
    versions = {p: v for t in [first, *ticks] for p, v in t.versions.items()}
    assert {p: tags["dagster/data_version"] for p, tags in latest.items()} == versions
