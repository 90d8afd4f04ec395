"""Bytes of event JSON per image: N images through the deferred pipeline on a real Dagster instance, and the
event log broken down by event type and asset, and the largest events by metadata entry.

The instance keeps its event log in one SQLite file (``ConsolidatedSqliteEventLogStorage``: the
``event_logs`` table of PostgreSQL, same ``event`` column), the emulator answers instantly, and
``LocalDaemon`` ticks the sensors and runs what they launch, as ``tests/pipeline_helpers.py`` does.
Bytes are the length of the stored ``event`` text, as ``bench/scale.py`` counts them in PostgreSQL.

Rows are split into per-partition events (they carry a partition: materializations, observations,
check results; their bytes do not depend on batch sizes) and per-run events (run and step events,
engine logs; spread over the partitions of a run, so they shrink with larger batches).

Baseline, measured with this script before issue 18's cuts (2026-12-07, the defaults: 20 images, the
service's default prompt, batches 200/100): 13.15 rows and 32.68 KB per image (31.50 KB of it in
per-partition events: 5 check results 10.55 KB, the video 9.78 KB, the request 6.26 KB, the image's
materialization and observation 1.49 + 1.46 KB, status observations 1.10 KB, Dagster's two
ASSET_MATERIALIZATION_PLANNED 1.62 KB); ``bench/scale.py`` reported about 13 rows and 33 KB on PostgreSQL.
Goal (issue 18, S4): at most 12 KB per image. The "floor" line is what these events would cost with no
metadata at all (about 13 to 15 KB: each check result alone is ~1.45 KB of Dagster's envelope).

    .venv/bin/python bench/event_bytes.py [--images 20] [--submit-batch-size 200]
        [--collect-batch-size 100] [--out event_bytes.txt]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sqlite3
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import command_line, make_images  # noqa: E402

GOAL_KB = 12.0
PROMPT = "A slow dolly shot across the scene; leaves drift in a light wind, warm evening light. " * 20
# Measured with this script before the cuts (the defaults): rows and KB per image.
BASELINE = {"rows": 13.15, "kb": 32.68}

DAGSTER_YAML = """\
telemetry:
  enabled: false
event_log_storage:
  module: dagster._core.storage.event_log
  class: ConsolidatedSqliteEventLogStorage
  config:
    base_dir: {base}
"""


@dataclass
class Breakdown:
    images: int
    videos: int = 0
    rows: int = 0
    bytes: int = 0
    partition_rows: int = 0
    partition_bytes: int = 0
    by_kind: Counter[tuple[str, str]] = field(default_factory=Counter)  # (event type, asset or step) -> bytes
    rows_by_kind: Counter[tuple[str, str]] = field(default_factory=Counter)
    entries: dict[str, Counter[str]] = field(
        default_factory=lambda: defaultdict(Counter)
    )  # kind -> entry -> bytes
    parts: dict[str, Counter[str]] = field(
        default_factory=lambda: defaultdict(Counter)
    )  # kind -> part -> bytes


def _metadata(node: Any) -> dict[str, Any] | None:
    """The metadata inside a serialized event, if any, by key: a check result's ``metadata`` mapping, or a
    materialization's or observation's ``metadata_entries`` (one ``EventMetadataEntry`` each)."""
    if isinstance(node, dict):
        if isinstance(node.get("metadata"), dict) and node["metadata"]:
            return node["metadata"]
        if isinstance(node.get("metadata_entries"), list) and node["metadata_entries"]:
            return {entry["label"]: entry for entry in node["metadata_entries"]}
        for value in node.values():
            if (found := _metadata(value)) is not None:
                return found
    return None


def _size(value: Any) -> int:
    return len(json.dumps(value))


def _event_parts(event: dict[str, Any], metadata: dict[str, Any] | None) -> dict[str, int]:
    """Bytes of an event by part: its metadata, its description, its message, and the rest."""
    dagster_event = event.get("dagster_event") or {}
    parts = {
        "message": _size(dagster_event.get("message")) + _size(event.get("user_message")),
        "metadata": sum(_size({name: value}) - 2 for name, value in (metadata or {}).items()),
        "description": _size(_find(event, "description")),
    }
    parts["rest"] = _size(event) - sum(parts.values())
    return parts


def _find(node: Any, name: str) -> Any:
    if isinstance(node, dict):
        if isinstance(node.get(name), str):
            return node[name]
        for value in node.values():
            if (found := _find(value, name)) is not None:
                return found
    return None


def analyse(database: Path, images: int, videos: int) -> Breakdown:
    result = Breakdown(images=images, videos=videos)
    with sqlite3.connect(database) as connection:
        rows = connection.execute(
            "SELECT dagster_event_type, asset_key, partition, step_key, event FROM event_logs"
        ).fetchall()
    for event_type, asset_key, partition, step_key, text in rows:
        size = len(text.encode())
        event = json.loads(text)
        if event_type is None:
            event_type = "LOG:" + str(event.get("level"))
        where = json.loads(asset_key)[-1] if asset_key else (step_key or "run")
        kind = (event_type, where)
        result.rows += 1
        result.bytes += size
        result.by_kind[kind] += size
        result.rows_by_kind[kind] += 1
        if partition or _find(event, "partition"):
            result.partition_rows += 1
            result.partition_bytes += size
        metadata = _metadata(event)
        label = f"{event_type} {where}"
        for part, part_size in _event_parts(event, metadata).items():
            result.parts[label][part] += part_size
        for name, value in (metadata or {}).items():
            result.entries[label][name] += _size({name: value}) - 2
    return result


def run_pipeline(
    root: Path, images: int, submit_batch: int, collect_batch: int, prompt_chars: int
) -> Breakdown:
    from dagster import AssetKey, DagsterInstance

    from dagster_runway import RunComfyResource
    from dagster_runway.emulator import Emulator, EmulatorConfig
    from dagster_runway.media import GenerationSettings
    from dagster_runway.pipeline import build_runway_pipeline
    from dagster_runway.pipeline.status import summary
    from dagster_runway.testing import LocalDaemon

    folder, home = root / "images", root / "home"
    make_images(folder, images)
    home.mkdir()
    (home / "dagster.yaml").write_text(DAGSTER_YAML.format(base=home / "events"))
    with Emulator(EmulatorConfig(time_scale=0.0, max_concurrency=64)) as emulator:
        resource = RunComfyResource(api_token=emulator.token, base_url=emulator.base_url, poll_interval=0.05)
        defs = build_runway_pipeline(
            str(folder),
            str(root / "videos"),
            resource=resource,
            submit_batch_size=submit_batch,
            collect_batch_size=collect_batch,
            missing_prompt="service_default",
            defaults=GenerationSettings(prompt_text=PROMPT[:prompt_chars] or None, ratio="auto", duration=5),
        )
        with DagsterInstance.from_config(str(home)) as instance:
            daemon = LocalDaemon(defs, instance, log_level="WARNING")
            daemon.tick("runway_discovery_sensor")
            for _ in range(500):
                outcome = daemon.tick("runway_status_sensor")
                counts = summary(outcome.cursor)
                busy = counts.get("rebuilding") or any(
                    counts.get(k) for k in ("in_flight", "submit", "collect", "running")
                )
                if not busy and not outcome.run_ids and not outcome.failed_run_ids:
                    break
                time.sleep(0.05)
            else:
                raise RuntimeError(f"the pipeline did not settle: {counts}")
            videos = len(
                instance.fetch_materializations(AssetKey(["runway", "videos"]), limit=10_000).records
            )
    return analyse(next((home / "events").glob("*.db")), images, videos)


def report(result: Breakdown, command: str, top: int) -> str:
    n = result.images
    kb = result.bytes / n / 1024
    lines = [
        command,
        f"images {n}, videos {result.videos}",
        f"per image: {result.rows / n:.2f} rows, {kb:.2f} KB of event JSON "
        f"(per-partition events {result.partition_rows / n:.2f} rows, {result.partition_bytes / n / 1024:.2f} KB; "
        f"per-run events {(result.rows - result.partition_rows) / n:.2f} rows, "
        f"{(result.bytes - result.partition_bytes) / n / 1024:.2f} KB)",
    ]
    if BASELINE["kb"]:
        lines.append(
            f"against the baseline ({BASELINE['rows']:.2f} rows, {BASELINE['kb']:.2f} KB per image): "
            f"{kb / BASELINE['kb']:.2f}x the bytes, {result.rows / n / BASELINE['rows']:.2f}x the rows"
        )
    lines.append(f"against the goal ({GOAL_KB:.0f} KB per image): {kb / GOAL_KB:.2f}x")
    envelope = sum(parts["rest"] for parts in result.parts.values())
    lines.append(
        f"floor of these events (Dagster's envelope alone: no metadata, description or message): "
        f"{envelope / n / 1024:.2f} KB per image"
    )
    lines += [
        "",
        f"{'event type':<34} {'asset/step':<28} {'rows/img':>8} {'B/img':>8} {'B/row':>7} {'share':>6}",
    ]
    for (event_type, where), size in result.by_kind.most_common():
        count = result.rows_by_kind[(event_type, where)]
        lines.append(
            f"{event_type:<34} {where:<28} {count / n:>8.2f} {size / n:>8.0f} {size / count:>7.0f} "
            f"{size / result.bytes:>6.1%}"
        )
    biggest = sorted(result.parts, key=lambda label: -sum(result.parts[label].values()))[:top]
    for label in biggest:
        parts = result.parts[label]
        lines += [
            "",
            f"{label}: bytes per image by part: "
            + ", ".join(f"{part} {size / n:.0f}" for part, size in parts.most_common()),
        ]
        for name, size in result.entries[label].most_common(12):
            lines.append(f"    {name:<40} {size / n:>8.0f} B/img")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--submit-batch-size", type=int, default=200)
    parser.add_argument("--collect-batch-size", type=int, default=100)
    parser.add_argument(
        "--prompt-chars",
        type=int,
        default=0,
        help="a prompt of this length for every image (0: the service's default)",
    )
    parser.add_argument("--top", type=int, default=6, help="event kinds broken down by metadata entry")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    os.environ["DAGSTER_DISABLE_TELEMETRY"] = "1"
    logging.disable(logging.INFO)
    with tempfile.TemporaryDirectory() as tmp:
        result = run_pipeline(
            Path(tmp), args.images, args.submit_batch_size, args.collect_batch_size, args.prompt_chars
        )
    text = report(result, command_line(), args.top)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
