"""What comes from an image source is hostile: sidecars and manifests are data, never paths to follow.

Real symlinks, fifos and /proc files on disk; real NFD file names; moto's S3 server for odd keys.
"""

from __future__ import annotations

import io
import logging
import os
import unicodedata
from pathlib import Path

import httpx
import pytest
from PIL import Image

from dagster_runway.media import ImageSource, ImageValidationError, SettingsError, service_image_url
from dagster_runway.media.manifest import MANIFEST_MAX_BYTES
from dagster_runway.media.sidecars import SIDECAR_MAX_BYTES
from dagster_runway.media.untrusted import JSON_MAX_DEPTH, json_depth
from tests.fixtures.s3 import S3Bucket
from tests.test_media_support import png_bytes

SECRET = "RUNWAY_API_TOKEN=sk-live-0123456789abcdef"


def jpeg_bytes(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(out, format="JPEG")
    return out.getvalue()


def _image(folder: Path, name: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(64, 48))
    return path


def _entry(source: ImageSource, relpath: str):
    return next(e for e in source.list() if e.relpath == relpath)


def _secret_file(tmp_path: Path) -> Path:
    outside = tmp_path / "outside" / "secrets.env"
    outside.parent.mkdir()
    outside.write_text(SECRET + "\n")
    return outside


# -- case 8: sidecars and manifests are regular files inside the root --------------------------------


@pytest.mark.parametrize("sidecar", ["cat.txt", "cat.json", "cat.png.txt", "cat.png.json"])
def test_a_sidecar_symlink_out_of_the_source_is_refused_without_quoting_it(
    tmp_path: Path, sidecar: str
) -> None:
    root = tmp_path / "images"
    _image(root, "cat.png")
    _image(root, "dog.png")
    (root / "dog.txt").write_text("a dog runs")
    os.symlink(_secret_file(tmp_path), root / sidecar)
    source = ImageSource(str(root))
    with pytest.raises(SettingsError) as info:
        source.settings_for(_entry(source, "cat.png"))
    message = str(info.value)
    assert (
        sidecar in message
        and "outside the source root" in message
        and "copy the file into the source" in message
    )
    assert "sk-live" not in message and "RUNWAY_API_TOKEN" not in message
    # Only that image fails: its neighbour's sidecar is read as usual.
    assert source.settings_for(_entry(source, "dog.png")).prompt_text == "a dog runs"


def test_a_sidecar_linked_to_proc_environ_never_reaches_the_prompt(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("RUNWAY_TEST_SECRET", SECRET)
    _image(tmp_path, "cat.png")
    os.symlink("/proc/self/environ", tmp_path / "cat.txt")
    source = ImageSource(str(tmp_path))
    with pytest.raises(SettingsError, match="symbolic link to /proc/") as info:
        source.settings_for(_entry(source, "cat.png"))
    assert "sk-live" not in str(info.value)


def test_a_sidecar_symlink_inside_the_source_is_read(tmp_path: Path) -> None:
    _image(tmp_path, "cat.png")
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "shared.txt").write_text("a slow pan")
    os.symlink(tmp_path / "prompts" / "shared.txt", tmp_path / "cat.txt")
    source = ImageSource(str(tmp_path))
    assert source.settings_for(_entry(source, "cat.png")).prompt_text == "a slow pan"


def test_a_linked_folder_is_not_followed_and_the_listing_says_so(tmp_path: Path, caplog) -> None:
    root = tmp_path / "images"
    elsewhere = tmp_path / "elsewhere"
    _image(elsewhere, "cat.png")
    (elsewhere / "cat.txt").write_text(SECRET)
    _image(root, "dog.png")
    os.symlink(elsewhere, root / "linked")
    source = ImageSource(str(root))
    with caplog.at_level(logging.WARNING, logger="dagster_runway.media.sources"):
        assert [e.relpath for e in source.list()] == ["dog.png"]
    assert source.linked_folders == ["linked"]
    assert any("1 linked folder(s) are not followed" in r.getMessage() for r in caplog.records)


def test_a_source_root_that_is_itself_a_link_is_read(tmp_path: Path) -> None:
    _image(tmp_path / "real", "cat.png")
    (tmp_path / "real" / "cat.txt").write_text("a cat")
    os.symlink(tmp_path / "real", tmp_path / "images")
    source = ImageSource(str(tmp_path / "images"))
    entry = _entry(source, "cat.png")
    assert source.settings_for(entry).prompt_text == "a cat"
    source.check_readable(entry)


def test_a_fifo_sidecar_fails_at_once_instead_of_blocking(tmp_path: Path) -> None:
    _image(tmp_path, "cat.png")
    os.mkfifo(tmp_path / "cat.txt")
    os.mkfifo(tmp_path / "dog.png")  # an "image" that is a fifo: listed, and refused without blocking
    source = ImageSource(str(tmp_path))
    for entry in (_entry(source, "cat.png"), source._lookup_relpath("cat.png")):
        assert entry is not None and entry.sidecars
        with pytest.raises(SettingsError, match="not a regular file") as info:
            source.settings_for(entry)
    with pytest.raises(ImageValidationError, match=r"dog\.png: the image is not a regular file"):
        source.check_readable(_entry(source, "dog.png"))
    assert "cat.txt" in str(info.value) and "replace it with a regular file" in str(info.value)


def test_a_device_sidecar_is_refused(tmp_path: Path) -> None:
    _image(tmp_path / "images", "cat.png")
    os.symlink("/dev/zero", tmp_path / "images" / "cat.txt")
    source = ImageSource(str(tmp_path / "images"))
    with pytest.raises(SettingsError, match="symbolic link to /dev/zero"):
        source.settings_for(_entry(source, "cat.png"))


def test_an_oversized_sidecar_is_refused_naming_the_bound(tmp_path: Path) -> None:
    _image(tmp_path, "cat.png")
    (tmp_path / "cat.txt").write_text("x" * (SIDECAR_MAX_BYTES + 1))
    source = ImageSource(str(tmp_path))
    with pytest.raises(
        SettingsError, match=f"more than the limit of {SIDECAR_MAX_BYTES} bytes for one sidecar"
    ) as info:
        source.settings_for(_entry(source, "cat.png"))
    assert "cat.txt" in str(info.value) and "xxxx" not in str(info.value)


def test_a_manifest_symlink_out_of_the_source_fails_every_partition_but_not_the_listing(
    tmp_path: Path,
) -> None:
    root = tmp_path / "images"
    _image(root, "cat.png")
    outside = tmp_path / "outside.csv"
    outside.write_text(f"path,promptText\ncat.png,{SECRET}\n")
    os.symlink(outside, root / "manifest.csv")
    source = ImageSource(str(root), manifest="manifest.csv")
    assert [e.relpath for e in source.list()] == ["cat.png"]
    with pytest.raises(SettingsError, match="manifest is a symbolic link") as info:
        source.settings_for(_entry(source, "cat.png"))
    assert "manifest.csv" in str(info.value) and "sk-live" not in str(info.value)


def test_an_oversized_manifest_is_refused(tmp_path: Path) -> None:
    _image(tmp_path, "cat.png")
    with open(tmp_path / "manifest.csv", "w") as handle:
        handle.write("path,promptText\n")
        handle.truncate(MANIFEST_MAX_BYTES + 10)
    source = ImageSource(str(tmp_path), manifest="manifest.csv")
    with pytest.raises(SettingsError, match="more than the limit of 16777216 bytes for one manifest"):
        source.settings_for(_entry(source, "cat.png"))


def test_an_image_symlink_inside_the_source_is_an_image_and_one_out_of_it_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "images"
    real = _image(root, "originals/cat.png")
    os.symlink(real, root / "cat-link.png")
    secret = tmp_path / "key.png"
    secret.write_bytes(b"\x89PNG\r\n\x1a\n" + SECRET.encode())
    os.symlink(secret, root / "stolen.png")
    source = ImageSource(str(root))
    source.check_readable(_entry(source, "cat-link.png"))
    assert source.read_image(_entry(source, "cat-link.png")).data == real.read_bytes()
    stolen = _entry(source, "stolen.png")  # listed, so its partition fails with the reason: nothing is hidden
    with pytest.raises(
        ImageValidationError, match="symbolic link to .*key.png, outside the source root"
    ) as info:
        source.check_readable(stolen)
    assert "copy the image into the source" in str(info.value) and "sk-live" not in str(info.value)
    with pytest.raises(ImageValidationError, match="outside the source root"):
        source.read_image(stolen)


# -- case 9: JSON depth, parse failures ---------------------------------------------------------------


def test_json_depth_ignores_brackets_inside_strings() -> None:
    assert json_depth('{"a": "[[[[{{{{", "b": [1, {"c": "]]"}]}') == 3
    assert json_depth('"\\"[[["') == 0


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        (
            "[" * 100_000 + "]" * 100_000,
            "the sidecar is 200000 bytes, more than the limit of 65536 bytes for one sidecar; keep only the prompt",
        ),
        ("[" * 30_000 + "]" * 30_000, f"nests 30000 levels deep, more than the limit of {JSON_MAX_DEPTH}"),
        ('{"a": ' * 5_000 + "1" + "}" * 5_000, "nests 5000 levels deep"),
        ("[" * 60_000, "nests 60000 levels deep"),
        ('{"promptText": ', "sidecar is not valid JSON at line 1"),
        ("[1, 2]", "sidecar JSON must be an object, not a list"),
        ('"just a string"', "must be an object, not a str"),
        ("NaN-ish {", "not valid JSON"),
    ],
)
def test_a_bad_json_sidecar_is_a_settings_error_naming_the_file(tmp_path: Path, text: str, rule: str) -> None:
    _image(tmp_path, "cat.png")
    (tmp_path / "cat.json").write_text(text)
    source = ImageSource(str(tmp_path))
    with pytest.raises(SettingsError, match=rule) as info:
        source.settings_for(_entry(source, "cat.png"))
    assert str(tmp_path / "cat.json") in str(info.value)


def test_a_sidecar_that_is_not_utf8_names_the_file(tmp_path: Path) -> None:
    _image(tmp_path, "cat.png")
    (tmp_path / "cat.json").write_bytes(b'{"promptText": "\xff\xfe"}')
    source = ImageSource(str(tmp_path))
    with pytest.raises(SettingsError, match=r"cat\.json: the sidecar is not UTF-8 text; save it as UTF-8"):
        source.settings_for(_entry(source, "cat.png"))


def test_a_deeply_nested_json_manifest_fails_each_partition_naming_the_file(tmp_path: Path) -> None:
    _image(tmp_path, "cat.png")
    (tmp_path / "manifest.json").write_text("[" * 50_000 + "]" * 50_000)
    source = ImageSource(str(tmp_path), manifest="manifest.json")
    assert len(source.list()) == 1
    with pytest.raises(SettingsError, match=r"manifest\.json: manifest JSON nests 50000 levels deep"):
        source.settings_for(_entry(source, "cat.png"))


def test_a_manifest_with_a_huge_csv_cell_names_the_file(tmp_path: Path) -> None:
    _image(tmp_path, "cat.png")
    (tmp_path / "manifest.csv").write_text('path,promptText\ncat.png,"' + "x" * 200_000 + '"\n')
    source = ImageSource(str(tmp_path), manifest="manifest.csv")
    with pytest.raises(SettingsError, match=r"manifest\.csv \(line \d+\): manifest is not valid CSV"):
        source.settings_for(_entry(source, "cat.png"))


# -- case 6: manifest rows are matched after NFC; case must match, never silently ---------------------


def test_an_nfc_manifest_row_matches_an_nfd_file_on_disk(tmp_path: Path) -> None:
    nfd = unicodedata.normalize("NFD", "café.png")
    nfc = unicodedata.normalize("NFC", "café.png")
    assert nfd != nfc
    _image(tmp_path, nfd)
    assert os.listdir(tmp_path) == [nfd]  # Linux keeps the bytes as written, as macOS does with NFD
    (tmp_path / "manifest.csv").write_text(f"path,promptText\n{nfc},a café at dawn\n", encoding="utf-8")
    source = ImageSource(str(tmp_path), manifest="manifest.csv")
    entry = _entry(source, nfd)
    assert source.settings_for(entry).prompt_text == "a café at dawn"
    assert source.unmatched_manifest_rows() == []
    assert entry.settings_token  # the row counts for the image: editing it is noticed


def test_an_nfd_manifest_row_matches_an_nfc_file(tmp_path: Path) -> None:
    nfd = unicodedata.normalize("NFD", "Ünïcödé.png")
    nfc = unicodedata.normalize("NFC", "Ünïcödé.png")
    _image(tmp_path, nfc)
    (tmp_path / "manifest.json").write_text(f'{{"{nfd}": {{"promptText": "decomposed"}}}}', encoding="utf-8")
    source = ImageSource(str(tmp_path), manifest="manifest.json")
    assert source.settings_for(_entry(source, nfc)).prompt_text == "decomposed"


def test_a_row_that_differs_only_in_case_is_refused_naming_both_spellings(tmp_path: Path) -> None:
    _image(tmp_path, "cat.png")
    _image(tmp_path, "dog.png")
    (tmp_path / "manifest.csv").write_text("path,promptText\nCat.png,a cat\ndog.png,a dog\n")
    source = ImageSource(str(tmp_path), manifest="manifest.csv")
    with pytest.raises(SettingsError) as info:
        source.settings_for(_entry(source, "cat.png"))
    message = str(info.value)
    assert "'Cat.png'" in message and "'cat.png'" in message and "only in upper/lower case" in message
    assert "spell the row exactly as the file is named" in message and "manifest.csv" in message
    assert source.settings_for(_entry(source, "dog.png")).prompt_text == "a dog"
    assert source.unmatched_manifest_rows() == ["Cat.png"]


def test_an_exact_case_match_wins_over_a_near_one(tmp_path: Path) -> None:
    _image(tmp_path, "cat.png")
    _image(tmp_path, "Cat.png")
    (tmp_path / "manifest.csv").write_text("path,promptText\nCat.png,upper\n")
    source = ImageSource(str(tmp_path), manifest="manifest.csv")
    assert source.settings_for(_entry(source, "Cat.png")).prompt_text == "upper"
    assert source.settings_for(_entry(source, "cat.png")).prompt_text is None  # the row is Cat.png's
    assert source.unmatched_manifest_rows() == []


def test_rows_matching_no_image_are_listed_at_every_listing(tmp_path: Path) -> None:
    _image(tmp_path, "cat.png")
    (tmp_path / "manifest.csv").write_text("path,promptText\ncat.png,a\ngone.png,b\nsub/typo.png,c\n")
    source = ImageSource(str(tmp_path), manifest="manifest.csv")
    source.list()
    assert source.unmatched_manifest_rows() == ["gone.png", "sub/typo.png"]
    _image(tmp_path, "gone.png")
    source.list()
    assert source.unmatched_manifest_rows() == ["sub/typo.png"]


def test_nfd_names_and_nfc_rows_match_on_s3(s3: S3Bucket) -> None:
    nfd = unicodedata.normalize("NFD", "photos/crème brûlée.png")
    s3.put(nfd, png_bytes(64, 48))
    s3.put("photos/Dog.png", png_bytes(64, 48))
    s3.put(
        "manifest.csv",
        "path,promptText\nphotos/crème brûlée.png,dessert\nphotos/dog.png,a dog\n".encode(),
    )
    source = ImageSource(s3.url(), storage_options=s3.storage_options, manifest="manifest.csv")
    entries = {e.relpath: e for e in source.list()}
    assert set(entries) == {nfd, "photos/Dog.png"}
    assert source.settings_for(entries[nfd]).prompt_text == "dessert"
    with pytest.raises(SettingsError, match="'photos/dog.png'.*'photos/Dog.png'"):
        source.settings_for(entries["photos/Dog.png"])
    assert source.unmatched_manifest_rows() == ["photos/dog.png"]


# -- case 1: the project's own outputs are never listed ------------------------------------------------


def test_own_outputs_inside_the_source_are_not_listed_and_are_reported(tmp_path: Path, caplog) -> None:
    _image(tmp_path, "cat.png")
    _image(
        tmp_path, "art.poster.jpg"
    )  # a user's image that happens to end in .poster.jpg: no video beside it
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "cat.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    (tmp_path / "videos" / "cat.poster.jpg").write_bytes(jpeg_bytes(32, 32))
    (tmp_path / "videos" / "cat.mp4.json").write_text("{}")
    (tmp_path / "videos" / "gallery.html").write_text("<html>")
    _image(tmp_path, "videos/.runway/claims/x.png")
    source = ImageSource(str(tmp_path), patterns=["**/*"])
    with caplog.at_level(logging.WARNING, logger="dagster_runway.media.sources"):
        listed = {e.relpath for e in source.list()}
    assert "videos/cat.poster.jpg" not in listed and "videos/cat.mp4.json" not in listed
    assert "videos/gallery.html" not in listed and not any(".runway" in p for p in listed)
    assert {"cat.png", "art.poster.jpg"} <= listed
    assert source.skipped_outputs == [
        "videos/.runway/claims/x.png",
        "videos/cat.mp4.json",
        "videos/cat.poster.jpg",
        "videos/gallery.html",
    ]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "4 file(s)" in warnings[0] and "keep the output" in warnings[0]


def test_posters_in_a_bucket_source_are_not_listed(s3: S3Bucket) -> None:
    s3.put("in/cat.png", png_bytes(64, 48))
    s3.put("videos/cat.mp4", b"video")
    s3.put("videos/cat.poster.jpg", jpeg_bytes(32, 32))
    source = ImageSource(s3.url(), storage_options=s3.storage_options)
    assert [e.relpath for e in source.list()] == ["in/cat.png"]
    assert source.skipped_outputs == ["videos/cat.poster.jpg"]


# -- case 14: odd keys are listed, and refused before paying ------------------------------------------


@pytest.mark.parametrize("key", ["a//b.png", "odd/../escape.png", "dot/./y.png", "/lead.png"])
def test_an_odd_s3_key_is_listed_and_refused_with_the_fix(s3: S3Bucket, key: str) -> None:
    s3.put(key, png_bytes(64, 48))
    s3.put("escape.png", png_bytes(32, 32))  # what 'odd/../escape.png' would be fetched as
    source = ImageSource(s3.url(), storage_options=s3.storage_options)
    entries = {e.relpath: e for e in source.list()}
    assert key in entries, "an odd key must not be skipped silently"
    entry = entries[key]
    assert "~" in entry.partition_key and entry.problem
    with pytest.raises(ImageValidationError) as info:
        source.check_readable(entry)
    message = str(info.value)
    assert key in message and "rename the object" in message and info.value.code == "name"


def test_what_the_refusal_prevents_a_normalised_presigned_url_fetches_another_object(s3: S3Bucket) -> None:
    s3.put("odd/../escape.png", b"the object asked for")
    s3.put("escape.png", b"another object")
    url = s3.fs.sign(s3.path("odd/../escape.png"), expiration=60)
    assert httpx.get(url).content != b"the object asked for"


def test_keys_with_hash_question_mark_and_percent_are_fetched_exactly(s3: S3Bucket) -> None:
    key = "q/w#h?x%20y & z.png"
    data = png_bytes(64, 48)
    s3.put(key, data)
    source = ImageSource(s3.url(), storage_options=s3.storage_options)
    entry = _entry(source, key)
    assert not entry.problem
    url = service_image_url(source.fs, entry.path, presign_expires_s=60)
    assert httpx.get(url).content == data


# -- local names: the partition key and the data URI survive them; what cannot, is refused -------------


@pytest.mark.parametrize("name", ["a#b.png", "what?.png", "100%.png", "new\nline.png", "tab\t.png"])
def test_odd_local_names_make_safe_keys_and_exact_data_uris(tmp_path: Path, name: str) -> None:
    import base64

    path = _image(tmp_path, name)
    source = ImageSource(str(tmp_path))
    entry = _entry(source, name)
    assert not entry.problem and "~" in entry.partition_key and "\n" not in entry.partition_key
    assert source.entry_for_key(entry.partition_key) == entry
    uri = service_image_url(source.fs, entry.path)
    assert base64.b64decode(uri.split(",", 1)[1]) == path.read_bytes()


def test_a_local_name_that_is_not_utf8_is_listed_and_refused_clearly(tmp_path: Path) -> None:
    raw = os.fsencode(str(tmp_path)) + b"/caf\xe9.png"
    with open(raw, "wb") as handle:
        handle.write(png_bytes(64, 48))
    source = ImageSource(str(tmp_path))
    (entry,) = source.list()
    assert entry.partition_key.isascii() and "~" in entry.partition_key
    assert "not valid UTF-8" in entry.problem and "rename the file" in entry.problem
    with pytest.raises(
        ImageValidationError, match=r"caf\\xe9\.png: the file name is not valid UTF-8"
    ) as info:
        source.check_readable(entry)
    str(info.value).encode("utf-8")  # the message itself is printable and storable
