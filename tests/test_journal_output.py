"""An output knows the image source its videos are made from: the journal's output records."""

from __future__ import annotations

from pathlib import Path

import pytest

from dagster_runway.journal import Journal, JournalDamaged, SourceMismatch, location_identity


def _journal(store: str, tmp_path: Path, request: pytest.FixtureRequest) -> tuple[Journal, str]:
    if store == "s3":
        s3 = request.getfixturevalue("s3")
        return Journal(s3.url("shared-journal"), s3.storage_options), s3.url("videos")
    return Journal(str(tmp_path / "shared-journal")), str(tmp_path / "videos")


@pytest.mark.parametrize("store", ["local", "s3"])
def test_an_output_is_bound_to_its_first_source_and_refuses_another_until_adopted(
    store: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    journal, output = _journal(store, tmp_path, request)
    assert journal.bind_output(output, "s3://photos/2024/") is None
    assert journal.bind_output(output + "/", "s3://photos/2024") is None  # the same places, spelled otherwise

    with pytest.raises(SourceMismatch) as refused:
        journal.bind_output(output, "s3://photos/2025")
    message = str(refused.value)
    assert "s3://photos/2024" in message and "s3://photos/2025" in message and "adopt_output" in message
    assert (refused.value.bound, refused.value.given) == ("s3://photos/2024", "s3://photos/2025")

    assert journal.bind_output(output, "s3://photos/2025", adopt=True) == "s3://photos/2024"
    assert journal.bind_output(output, "s3://photos/2025") is None
    # One journal serves several outputs, each with its own source.
    assert journal.bind_output(output + "-other", "s3://photos/2024") is None


def test_a_local_source_is_named_by_its_real_path(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "images")
    journal = Journal(str(tmp_path / "j"))
    assert journal.bind_output(str(tmp_path / "out"), str(tmp_path / "link")) is None
    assert journal.bind_output(str(tmp_path / "out"), str(tmp_path / "images")) is None
    assert "secret" not in location_identity("s3://key:secret@bucket/a/")  # never written to the store


def test_a_damaged_output_record_names_the_file_and_the_fix(tmp_path: Path) -> None:
    journal = Journal(str(tmp_path / "j"))
    journal.bind_output(str(tmp_path / "out"), str(tmp_path / "images"))
    (record,) = (tmp_path / "j" / "outputs").iterdir()
    record.write_text('{"output": ')
    with pytest.raises(JournalDamaged) as damaged:
        journal.bind_output(str(tmp_path / "out"), str(tmp_path / "images"))
    assert str(record) in str(damaged.value) and "bind the output to its own image source" in str(
        damaged.value
    )
