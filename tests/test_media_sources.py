"""Image sources: listing, change tokens and partition keys, on local folders and on moto's S3."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from dagster_runway.media import ImageSource, SourceError, partition_key_for
from dagster_runway.media.keys import KEY_MAX_LEN
from tests.fixtures.s3 import S3Bucket
from tests.test_media_support import png_bytes

ODD_NAMES = [
    "plain.png",
    "sub/dir/nested.png",
    "with space.png",
    "Café Ünïcödé.png",
    "猫/写真.png",
    "a,b,c.png",
    "pipe|name.png",
    "brackets[1].png",
    "dots...png",
    "..hidden-ish.png".lstrip("."),  # "hidden-ish.png": a name that was dotted
    "x" * 240 + ".png",
    "dup/cat.png",
    "dup/cat.jpg",
    "dup/cat.jpeg",
    "UPPER.PNG",
    "emoji 🎬.webp",
    "tab\tname.png",
]

FORBIDDEN = re.compile(r"[,|\[\]\s\x00-\x1f]|\.\.\.")


def _assert_key_is_safe(key: str) -> None:
    assert key, "empty key"
    assert not FORBIDDEN.search(key), key
    assert len(key) <= KEY_MAX_LEN, (len(key), key)
    assert key.isascii(), key


@pytest.mark.parametrize("relpath", ODD_NAMES + ["a/../b.png", "../escape.png", "./dot/./x.png", "a//b.png"])
def test_partition_key_is_safe_and_stable(relpath: str) -> None:
    key = partition_key_for(relpath)
    _assert_key_is_safe(key)
    assert partition_key_for(relpath) == key


def test_safe_paths_are_their_own_key_and_odd_ones_stay_readable() -> None:
    assert partition_key_for("cats/tabby-01.png") == "cats/tabby-01.png"
    assert partition_key_for("with space.png").startswith("with_space.png~")
    assert partition_key_for("Café.png").startswith("Cafe.png~")
    assert partition_key_for("a,b.png").startswith("a_b.png~")
    long_key = partition_key_for("x" * 240 + ".png")
    assert long_key.startswith("xxxx") and ".png~" in long_key


def test_partition_keys_never_collide() -> None:
    # Names that slug to the same text must still get different keys.
    names = ["a b.png", "a_b.png", "a,b.png", "a|b.png", "a[b.png", "á b.png", "a  b.png", "A b.png"]
    names += ["x" * 300 + f"{i}.png" for i in range(50)]  # same long prefix, shortened
    names += ["a/../b.png", "a/_/b.png", "b.png", "./b.png"]
    keys = [partition_key_for(n) for n in names]
    assert len(set(keys)) == len(names)
    # A fixed value pins the scheme: keys must not change between releases (that would orphan partitions).
    assert partition_key_for("with space.png") == "with_space.png~r7tpialhavuc"


def _make_tree(root: Path, names: list[str]) -> None:
    for name in names:
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(png_bytes(8, 8))


def test_local_listing_of_odd_names(tmp_path: Path) -> None:
    _make_tree(tmp_path, ODD_NAMES)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "._plain.png").write_bytes(b"\0")  # macOS resource fork: not an image
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "thumb.png").write_bytes(png_bytes(4, 4))

    source = ImageSource(str(tmp_path))
    entries = source.list()
    relpaths = sorted(e.relpath for e in entries)
    assert relpaths == sorted(ODD_NAMES)
    keys = [e.partition_key for e in entries]
    assert keys == sorted(keys), "entries are sorted by partition key"
    assert len(set(keys)) == len(keys)
    for entry in entries:
        _assert_key_is_safe(entry.partition_key)
        assert entry.url == str(tmp_path / entry.relpath)
        assert entry.path == entry.url
        assert entry.size == (tmp_path / entry.relpath).stat().st_size
        assert re.fullmatch(r"mtime:\d+\.\d{6}\|size:\d+", entry.change_token)
        assert source.entry_for_key(entry.partition_key) == entry
    # The mapping back to paths.
    mapping = {entry.partition_key: entry.relpath for entry in source.list()}
    assert mapping[partition_key_for("with space.png")] == "with space.png"
    assert mapping["dup/cat.png"] == "dup/cat.png" and mapping["dup/cat.jpg"] == "dup/cat.jpg"
    # The same keys on every run, also from a fresh source object.
    assert [e.partition_key for e in ImageSource(str(tmp_path)).list()] == keys


def test_listing_refreshes_and_change_token_moves(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(png_bytes(8, 8))
    source = ImageSource(str(tmp_path), patterns=["*.png"])
    first = source.list()
    assert [e.relpath for e in first] == ["a.png"]
    (tmp_path / "b.png").write_bytes(png_bytes(8, 8))
    time.sleep(0.01)
    (tmp_path / "a.png").write_bytes(png_bytes(9, 9))
    second = {e.relpath: e for e in source.list()}
    assert set(second) == {"a.png", "b.png"}
    assert second["a.png"].change_token != first[0].change_token
    assert second["a.png"].partition_key == first[0].partition_key


def test_patterns_are_case_insensitive_and_scoped(tmp_path: Path) -> None:
    _make_tree(tmp_path, ["top.png", "deep/er/x.PNG", "deep/y.jpg"])
    assert {e.relpath for e in ImageSource(str(tmp_path), patterns=["*.png"]).list()} == {"top.png"}
    assert {e.relpath for e in ImageSource(str(tmp_path), patterns=["**/*.png"]).list()} == {
        "top.png",
        "deep/er/x.PNG",
    }
    assert {e.relpath for e in ImageSource(str(tmp_path), patterns=["deep/*.jpg"]).list()} == {"deep/y.jpg"}


def test_entry_for_key_without_listing(tmp_path: Path) -> None:
    _make_tree(tmp_path, ["cats/a.png", "odd name.png"])
    (tmp_path / "cats" / "a.txt").write_text("a prompt")
    source = ImageSource(str(tmp_path))
    entry = source.entry_for_key("cats/a.png")  # safe key: one stat, no listing
    assert entry is not None and entry.relpath == "cats/a.png"
    assert entry.sidecars == (str(tmp_path / "cats" / "a.txt"),)
    assert source.entry_for_key("cats/missing.png") is None
    assert source.entry_for_key("cats/a.txt") is None, "a key must not reach a file the patterns exclude"
    odd = source.entry_for_key(partition_key_for("odd name.png"))  # hashed key: lists once
    assert odd is not None and odd.relpath == "odd name.png"
    assert source.entry_for_key("nothing~aaaaaaaaaaaa") is None


def test_missing_local_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        ImageSource(str(tmp_path / "nope")).list()


def test_listing_twenty_thousand_files_is_one_walk(tmp_path: Path) -> None:
    root = tmp_path / "many"
    for folder in range(20):
        sub = root / f"f{folder:02d}"
        sub.mkdir(parents=True)
        for index in range(1000):
            (sub / f"img {index:04d}.png").touch()
    source = ImageSource(str(root))
    entries = source.list()
    assert len(entries) == 20_000
    assert len({e.partition_key for e in entries}) == 20_000


def test_s3_listing_odd_names_and_etags(s3: S3Bucket) -> None:
    names = ODD_NAMES + ["a/../b.png"]
    for name in names:
        s3.put(f"in/{name}", png_bytes(8, 8))
    s3.put("in/readme.md", b"# not an image")
    s3.put("other/elsewhere.png", png_bytes(8, 8))

    source = ImageSource(s3.url("in"), storage_options=s3.storage_options)
    entries = source.list()
    assert sorted(e.relpath for e in entries) == sorted(names)
    for entry in entries:
        _assert_key_is_safe(entry.partition_key)
        assert entry.path == f"{s3.bucket}/in/{entry.relpath}"
        assert entry.url == f"s3://{s3.bucket}/in/{entry.relpath}"
        assert re.fullmatch(r'etag:"[0-9a-f]{32}"\|size:\d+', entry.change_token)
        assert source.entry_for_key(entry.partition_key) == entry
    assert len({e.partition_key for e in entries}) == len(names)

    # A new object shows up on the next list() despite s3fs's listing cache.
    s3.client.put_object(Bucket=s3.bucket, Key="in/late.png", Body=png_bytes(8, 8))
    s3.client.put_object(Bucket=s3.bucket, Key="in/sub/dir/later.png", Body=png_bytes(8, 8))
    assert {"late.png", "sub/dir/later.png"} <= {e.relpath for e in source.list()}
    # A changed object gets a new token under the same key.
    before = source.entry_for_key("plain.png")
    s3.client.put_object(Bucket=s3.bucket, Key="in/plain.png", Body=png_bytes(16, 16))
    after = {e.relpath: e for e in source.list()}["plain.png"]
    assert before is not None and after.change_token != before.change_token
    assert after.partition_key == before.partition_key


def test_s3_entry_for_key_uses_one_head(s3: S3Bucket) -> None:
    s3.put("root/x/y.png", png_bytes(8, 8))
    source = ImageSource(s3.url("root"), storage_options=s3.storage_options)
    entry = source.entry_for_key("x/y.png")
    assert entry is not None and entry.url == s3.url("root/x/y.png") and entry.size > 0
    assert source._entries is None, "a safe key is resolved without listing the source"


def test_missing_bucket_is_a_clear_error(s3: S3Bucket) -> None:
    source = ImageSource("s3://no-such-bucket-here/prefix", storage_options=s3.storage_options)
    with pytest.raises(SourceError) as info:
        source.list()
    assert "no-such-bucket-here" in str(info.value)


def test_repr_hides_storage_secrets(s3: S3Bucket) -> None:
    source = ImageSource(s3.url("in"), storage_options={**s3.storage_options, "secret": "s3cr3t-value"})
    assert "s3cr3t-value" not in repr(source)
