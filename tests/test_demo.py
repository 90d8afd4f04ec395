"""The demo as a new user meets it: the CLI as a subprocess, the instance's files, the emulator's ledger.

The "real service" here is an emulator on loopback reached through RUNCOMFY_BASE_URL, so the demo takes
the paid path (it asks before spending) while the ledger says what would have been billed.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import dagster as dg
import pytest
from PIL import Image

from dagster_runway import RunComfyResource
from dagster_runway.pipeline import build_runway_pipeline
from dagster_runway.resource import LiteralTokenWarning

from .pipeline_helpers import write_images

SECRET = "rc-live-7f3a9c2e5b1d4f6a8c0e2b4d6f8a1c3e"  # what a real token looks like, nowhere but the env


def _demo(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None, home: str = "home"
) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("RUNCOMFY_", "DAGSTER_HOME"))}
    environment |= {"DAGSTER_DISABLE_TELEMETRY": "1", **(env or {})}
    command = [
        sys.executable, "-m", "dagster_runway.cli", "demo", *args,
        "--output", str(tmp_path / "videos"), "--dagster-home", str(tmp_path / home), "--time-scale", "0",
    ]  # fmt: skip
    return subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)


def _real(emulator) -> dict[str, str]:
    return {"RUNCOMFY_API_TOKEN": SECRET, "RUNCOMFY_BASE_URL": emulator.base_url}


def test_help_names_the_environment_variables(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "dagster_runway.cli", "demo", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0
    for name in ("RUNCOMFY_API_TOKEN", "RUNCOMFY_BASE_URL", "--yes", "--max-spend", "--on-change"):
        assert name in done.stdout, name


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda root: root / "missing", "is not a folder"),
        (lambda root: (root / "empty").mkdir() or root / "empty", "no file in"),
        (lambda root: root, "is inside source"),  # _demo writes --output under tmp_path: inside these images
    ],
    ids=["missing-folder", "nothing-matches", "output-inside-images"],
)
def test_a_bad_images_argument_is_one_line_and_exit_code_2(tmp_path: Path, make, expected: str) -> None:
    folder = make(tmp_path)
    done = _demo(tmp_path, "--images", str(folder))
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and str(folder) in lines[0], done.stderr
    if expected == "no file in":
        assert "**/*.png" in lines[0]  # names the patterns it tried
    assert "Traceback" not in done.stderr


def test_real_credits_are_not_spent_without_yes_or_a_cap(tmp_path: Path, emulator_factory) -> None:
    emulator = emulator_factory(tokens=[SECRET])
    write_images(tmp_path / "images", valid=3, invalid=False)
    for image in (tmp_path / "images").glob("*.png"):
        image.with_suffix(".txt").write_text("slow pan")
    refused = _demo(tmp_path, "--images", str(tmp_path / "images"), env=_real(emulator))
    assert refused.returncode == 2 and "--yes" in refused.stderr and "--max-spend" in refused.stderr
    assert "3 image(s), about 0.75 USD" in refused.stdout  # the estimate comes first
    assert emulator.ledger().billed_submissions == 0

    capped = _demo(tmp_path, "--images", str(tmp_path / "images"), "--max-spend", "0.5", env=_real(emulator))
    assert emulator.ledger().billed_submissions == 2  # 0.25 USD each: the third would pass the cap
    assert capped.returncode == 1 and "raise max_spend_usd" in capped.stdout, capped.stdout[-2000:]


def test_the_estimate_before_spending_uses_the_catalog_price_and_says_when_it_cannot(
    tmp_path: Path, emulator_factory
) -> None:
    from dagster_runway.emulator.faults import FaultRule

    write_images(tmp_path / "images", valid=3, invalid=False)
    dearer = emulator_factory(tokens=[SECRET], price_usd=0.08)
    refused = _demo(tmp_path, "--images", str(tmp_path / "images"), env=_real(dearer))
    assert "3 image(s), about 1.20 USD" in refused.stdout and "the service's catalog" in refused.stdout

    down = emulator_factory(tokens=[SECRET], faults=[FaultRule(kind="server_error", endpoint="models")])
    refused = _demo(tmp_path, "--images", str(tmp_path / "images"), env=_real(down))
    assert (
        "3 image(s), about 0.75 USD" in refused.stdout and "the catalog could not be read" in refused.stdout
    )
    assert dearer.ledger().billed_submissions == down.ledger().billed_submissions == 0


def test_the_token_is_nowhere_at_rest_after_a_run(tmp_path: Path, emulator_factory) -> None:
    emulator = emulator_factory(tokens=[SECRET])
    write_images(tmp_path / "images", valid=2, invalid=False)
    for image in (tmp_path / "images").glob("*.png"):
        image.with_suffix(".txt").write_text("slow pan")
    done = _demo(tmp_path, "--images", str(tmp_path / "images"), "--yes", env=_real(emulator))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert emulator.ledger().billed_submissions == 2
    assert SECRET not in done.stdout + done.stderr
    hits = [
        where
        for where in _scan(tmp_path / "home", SECRET.encode()) + _scan(tmp_path / "videos", SECRET.encode())
    ]
    assert hits == []


def _scan(root: Path, needle: bytes) -> list[str]:
    """Every place under ``root`` that holds ``needle``: raw bytes, SQLite cells, zlib-compressed cells."""
    hits = []
    files = [path for path in root.rglob("*") if path.is_file()]
    assert files, root
    for path in files:
        data = path.read_bytes()
        if needle in data:
            hits.append(str(path))
        if data.startswith(b"SQLite format 3"):
            hits += [f"{path}: {cell}" for cell in _sqlite_cells_with(path, needle)]
    return hits


def _sqlite_cells_with(path: Path, needle: bytes) -> list[str]:
    found = []
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        tables = [row[0] for row in db.execute("select name from sqlite_master where type='table'")]
        for table in tables:
            for row in db.execute(f'select * from "{table}"'):  # noqa: S608 - table names from sqlite_master
                for value in row:
                    raw = (
                        value.encode()
                        if isinstance(value, str)
                        else value
                        if isinstance(value, bytes)
                        else b""
                    )
                    candidates = [raw]
                    with contextlib.suppress(zlib.error):
                        candidates.append(zlib.decompress(raw))
                    if any(needle in candidate for candidate in candidates):
                        found.append(table)
    return found


def test_a_changed_image_shows_stale_and_regenerates_only_when_asked(
    tmp_path: Path, emulator_factory
) -> None:
    emulator = emulator_factory(tokens=[SECRET])
    images = write_images(tmp_path / "images", valid=2, invalid=False)
    for image in images.values():
        image.with_suffix(".txt").write_text("slow pan")
    args = ("--images", str(tmp_path / "images"), "--yes")
    first = _demo(tmp_path, *args, env=_real(emulator))
    assert first.returncode == 0, first.stdout[-2000:]
    assert "This run paid for 2 video(s), 0.50 USD; this output has cost 0.50 USD in all." in first.stdout
    assert all(_row(first.stdout, name)[-2:] == ["this", "run"] for name in images)
    changed = sorted(images)[0]
    Image.new("RGB", (320, 180), (10, 200, 30)).save(images[changed])

    again = _demo(tmp_path, *args, env=_real(emulator))  # the stored cursors: it sees the change
    assert again.returncode == 0, again.stdout[-2000:]
    row = next(line for line in again.stdout.splitlines() if line.startswith(changed))
    assert row.split()[1] == "stale" and "1 video(s) are stale" in again.stdout
    assert "passed (before the change)" in row  # those checks judged the previous image
    assert "This run paid for 0 video(s), 0.00 USD; this output has cost 0.50 USD in all." in again.stdout
    assert emulator.ledger().billed_submissions == 2

    regenerated = _demo(tmp_path, *args, "--on-change", "regenerate", env=_real(emulator))
    assert regenerated.returncode == 0, regenerated.stdout[-2000:]
    row = next(line for line in regenerated.stdout.splitlines() if line.startswith(changed))
    assert row.split()[1] == "ok" and emulator.ledger().billed_submissions == 3
    assert row.endswith("this run") and _row(regenerated.stdout, sorted(images)[1])[-1] != "run"
    assert (
        "This run paid for 1 video(s), 0.25 USD; this output has cost 0.75 USD in all." in regenerated.stdout
    )


def _row(stdout: str, partition: str) -> list[str]:
    return next(line for line in stdout.splitlines() if line.startswith(partition + " ")).split()


def test_an_output_of_another_folder_is_refused_and_a_deleted_image_shows_source_missing(
    tmp_path: Path, emulator_factory
) -> None:
    emulator = emulator_factory(tokens=[SECRET])
    for folder in ("images", "other"):
        for image in write_images(tmp_path / folder, valid=2, invalid=False).values():
            image.with_suffix(".txt").write_text("slow pan")
    assert _demo(tmp_path, "--images", str(tmp_path / "images"), "--yes", env=_real(emulator)).returncode == 0
    assert emulator.ledger().billed_submissions == 2

    mixed = _demo(tmp_path, "--images", str(tmp_path / "other"), "--yes", env=_real(emulator))
    assert mixed.returncode == 2, mixed.stdout[-2000:] + mixed.stderr[-2000:]
    (line,) = mixed.stderr.strip().splitlines()
    assert str(tmp_path / "images") in line and str(tmp_path / "other") in line and "--adopt-output" in line
    assert emulator.ledger().billed_submissions == 2  # nothing was sent

    (tmp_path / "images" / "img01.png").unlink()
    gone = _demo(tmp_path, "--images", str(tmp_path / "images"), "--yes", env=_real(emulator))
    assert gone.returncode == 0, gone.stdout[-2000:]
    assert _row(gone.stdout, "img01.png")[1:3] == ["source", "missing"]
    assert "1 video(s) have no source image any more" in gone.stdout
    assert emulator.ledger().billed_submissions == 2  # a missing image is never paid for

    adopted = _demo(
        tmp_path, "--images", str(tmp_path / "other"), "--yes", "--adopt-output", env=_real(emulator)
    )
    assert adopted.returncode == 0, adopted.stdout[-2000:] + adopted.stderr[-2000:]
    assert f"held videos of {tmp_path / 'images'}" in adopted.stdout


def test_the_demo_works_without_the_checkout_examples_and_prints_a_ui_command_for_any_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dagster_runway import demo

    monkeypatch.setattr(demo, "EXAMPLES", tmp_path / "not-in-a-wheel")
    folder = Path(demo.sample_images(tmp_path / "home"))
    assert sorted(p.suffix for p in folder.iterdir()) == [".png"] * 4 + [".txt"] * 4
    from dagster_runway.pipeline import RunwayPipelineConfig

    entries = RunwayPipelineConfig(source=str(folder), output=str(tmp_path / "v")).image_source().list()
    assert len(entries) == 4

    done = _demo(tmp_path, "--images", str(folder))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    definitions = tmp_path / "home" / "definitions.py"
    assert f"dagster-runway dev --dagster-home {tmp_path / 'home'}" in done.stdout
    loaded = subprocess.run(  # the file loads from another folder, with the same folders, as `dev` runs it
        [sys.executable, "-c", f"import runpy; d = runpy.run_path({str(definitions)!r})['defs']; "
         "print(sorted(s.name for s in d.sensors))"],
        cwd="/", capture_output=True, text=True, timeout=120,
        env={**os.environ, "DAGSTER_RUNWAY_EMULATOR_URL": "http://127.0.0.1:9"},
    )  # fmt: skip
    assert loaded.returncode == 0 and "runway_status_sensor" in loaded.stdout, loaded.stderr[-2000:]
    assert str(folder) in definitions.read_text()


def test_a_literal_token_for_a_remote_service_warns_and_an_env_var_does_not(tmp_path: Path) -> None:
    images = str(tmp_path / "images")
    with pytest.warns(LiteralTokenWarning, match='dg.EnvVar\\("RUNCOMFY_API_TOKEN"\\)'):
        build_runway_pipeline(images, str(tmp_path / "v"), resource=RunComfyResource(api_token=SECRET))
    with warnings.catch_warnings():
        warnings.simplefilter("error", LiteralTokenWarning)
        build_runway_pipeline(
            images, str(tmp_path / "v"), resource=RunComfyResource(api_token=dg.EnvVar("RUNCOMFY_API_TOKEN"))
        )
        local = RunComfyResource(api_token="emulator-token", base_url="http://127.0.0.1:8000")
        build_runway_pipeline(images, str(tmp_path / "v"), resource=local)
