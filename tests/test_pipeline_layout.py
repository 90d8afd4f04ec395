"""An output, a journal or a review page inside the source would be listed as input and paid for on
every discovery cycle (2, 4, 6 billed for 2 images): such a layout is refused when the pipeline is
defined, naming both places and the fix, on local disks (symlinks resolved) and object stores alike."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from dagster_runway.pipeline import RunwayPipelineConfig, build_runway_pipeline

ENDPOINT = {"endpoint_url": "http://127.0.0.1:5000"}


@pytest.mark.parametrize(
    "source, output, extra, refused",
    [
        ("images", "images/videos", {}, "output"),
        ("images", "images", {}, "output"),
        ("images/", "./images/videos/", {}, "output"),
        ("images/in", "images", {}, "source"),
        ("images", "out", {"journal": "images/.journal"}, "journal"),
        ("s3://bucket/", "s3://bucket/videos", {}, "output"),
        ("s3://bucket", "s3://bucket", {}, "output"),
        ("s3://bucket/in/", "s3a://bucket/in/videos", {}, "output"),
        ("s3://bucket/in", "s3://bucket", {}, "source"),
        ("s3://bucket/in", "s3://bucket/out", {"journal": "s3://bucket/in/journal"}, "journal"),
    ],
)
def test_an_output_or_journal_inside_the_source_is_refused_naming_both_and_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, output: str, extra: dict, refused: str
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValidationError) as raised:
        RunwayPipelineConfig(source=source, output=output, **extra)
    message = str(raised.value)
    assert f"{refused} " in message and "inside" in message
    assert "outside the source" in message, message
    assert "paid" in message or "mixed with its input" in message


@pytest.mark.parametrize(
    "source, output, extra",
    [
        ("images", "videos", {}),
        ("images", "images-videos", {}),  # a sibling whose name starts the same is not inside
        ("s3://bucket/in", "s3://bucket/out", {}),
        ("s3://bucket/in", "s3://bucket/input-videos", {}),
        ("s3://bucket/in", "s3://other/in", {}),
        ("s3://bucket/in", "s3://bucket/in/videos", {"output_storage_options": ENDPOINT}),  # another store
    ],
)
def test_layouts_beside_the_source_are_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, output: str, extra: dict
) -> None:
    monkeypatch.chdir(tmp_path)
    RunwayPipelineConfig(source=source, output=output, **extra)


def test_a_symlinked_output_that_lands_inside_the_source_is_refused(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    os.symlink(tmp_path / "images", tmp_path / "elsewhere")
    with pytest.raises(ValidationError, match="is inside source"):
        build_runway_pipeline(str(tmp_path / "images"), str(tmp_path / "elsewhere" / "videos"))
