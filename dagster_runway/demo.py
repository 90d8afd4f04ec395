"""``dagster-runway demo``: the real pipeline, end to end, on a real Dagster instance.

It starts the embedded emulator unless a RunComfy token or base URL is configured, ticks the
sensors and runs what they request (as the daemon would), and stops when every partition has
finished. Then it prints a table and tells how to open the same instance in the UI.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "images"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--images", default=str(EXAMPLES), help="Image folder or s3:// prefix (default: examples/images)"
    )
    parser.add_argument(
        "--output", default="out/demo/videos", help="Where videos go (default: out/demo/videos)"
    )
    parser.add_argument(
        "--dagster-home", default="out/demo/dagster_home", help="DAGSTER_HOME to use (created if missing)"
    )
    parser.add_argument("--mode", choices=["deferred", "blocking"], default="deferred")
    parser.add_argument("--time-scale", type=float, default=0.02, help="Emulator time scale (0 = instant)")
    parser.add_argument("--timeout", type=float, default=600.0, help="Give up after this many seconds")


@dataclass
class Row:
    partition: str
    outcome: str
    video: str = ""
    duration: str = ""
    checks: str = ""
    cost: str = ""
    prompt_source: str = ""


def _prepare_home(path: Path) -> Path:
    path = path.resolve()
    path.mkdir(parents=True, exist_ok=True)
    config = path / "dagster.yaml"
    if not config.exists():
        config.write_text("telemetry:\n  enabled: false\n")
    os.environ["DAGSTER_HOME"] = str(path)
    os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")
    return path


def run(args: argparse.Namespace) -> int:
    home = _prepare_home(Path(args.dagster_home))
    from dagster import DagsterInstance

    from dagster_runway.pipeline import build_runway_pipeline
    from dagster_runway.resource import RunComfyResource

    token = os.environ.get("RUNCOMFY_API_TOKEN")
    base_url = os.environ.get("RUNCOMFY_BASE_URL")
    with contextlib.ExitStack() as stack:
        real = bool(token or base_url)
        if real:
            print(
                f"Using RunComfy at {base_url or 'https://model-api.runcomfy.net'} (real credits may be spent)."
            )
        else:
            from dagster_runway.emulator import Emulator, EmulatorConfig

            emulator = stack.enter_context(Emulator(EmulatorConfig(time_scale=args.time_scale)))
            token, base_url = emulator.token, emulator.base_url
            print(f"Started the RunComfy emulator at {base_url} (offline; no credits are spent).")
        resource = RunComfyResource(
            api_token=token or "", **({"base_url": base_url} if base_url else {}), poll_interval=0.5
        )
        output = args.output if "://" in args.output else str(Path(args.output).resolve())
        # The emulator costs nothing, so an image without a prompt may take the service's default there;
        # against the real service the safe default applies: it fails before paying.
        missing_prompt = "fail" if real else "service_default"
        if not real:
            print(
                'Images without a prompt use the service\'s default prompt here (missing_prompt="service_default"); '
                "against the real service they fail before paying unless you give one."
            )
        defs = build_runway_pipeline(args.images, output, resource=resource, mode=args.mode, missing_prompt=missing_prompt)
        instance = stack.enter_context(DagsterInstance.get())
        print(f"DAGSTER_HOME={home}")
        rows = _drive(defs, instance, args)
    _print_table(rows)
    bad = [row for row in rows if row.outcome != "ok"]
    defaulted = sum(row.prompt_source == "service default" for row in rows)
    print(
        f"\n{len(rows) - len(bad)} of {len(rows)} partitions produced a passing video; "
        f"{defaulted} used the service's default prompt."
        f"\nOpen this instance in the UI:\n  DAGSTER_HOME={home} dagster dev -f definitions.py\n"
        "then Assets -> runway/videos for materializations, checks and metadata."
    )
    return 1 if bad or not rows else 0


def _drive(defs: Any, instance: Any, args: argparse.Namespace) -> list[Row]:
    import logging

    from dagster_runway.testing import LocalDaemon

    logging.getLogger("dagster").setLevel(logging.WARNING)  # the sensors' tick logs; the table says it all

    daemon = LocalDaemon(defs, instance, log_level="CRITICAL")
    names = [s.name for s in defs.sensors]
    discovery = next(n for n in names if n.endswith("_discovery_sensor"))
    status = next((n for n in names if n.endswith("_status_sensor")), None)
    from dagster_runway.pipeline.sensors import summary

    failed_runs: list[str] = []
    outcome = daemon.tick(discovery)
    failed_runs += outcome.failed_run_ids
    print(
        f"discovery: {outcome.new_partitions} new image(s); {len(outcome.run_ids) + len(outcome.failed_run_ids)} "
        "submit run(s)"
    )
    deadline = time.monotonic() + args.timeout
    while status is not None and time.monotonic() < deadline:
        outcome = daemon.tick(status)
        failed_runs += outcome.failed_run_ids
        counts = summary(outcome.cursor)
        busy = counts.get("rebuilding") or any(counts.get(k) for k in ("in_flight", "submit", "collect", "running"))
        launched = len(outcome.run_ids) + len(outcome.failed_run_ids)
        print(f"status: {counts.get('in_flight', 0)} in flight, {launched} run(s) launched", flush=True)
        if not busy and launched == 0:
            break
        time.sleep(0.5)
    return _rows(defs, instance, failed_runs)


def _rows(defs: Any, instance: Any, failed_runs: list[str]) -> list[Row]:
    from dagster import AssetKey

    from dagster_runway.pipeline import records as rec
    from dagster_runway.pipeline.checks import CHECK_NAMES

    videos_key = next(k for k in defs.resolve_asset_graph().get_all_asset_keys() if k.path[-1] == "videos")
    partitions_name = f"{'_'.join(videos_key.path[:-1])}_images"
    requests_key = AssetKey([*videos_key.path[:-1], "requests"])
    rows = []
    for key in instance.get_dynamic_partitions(partitions_name):
        video = rec.latest_video(instance, videos_key, key)
        if video is None:
            failure = rec.latest_failure(instance, (requests_key, videos_key), key)
            why = f"{failure.reason} Next step: {failure.next_step}" if failure else "no video was produced"
            rows.append(Row(key, "failed: " + why))
            continue
        meta = {f"runway/{k}": v for k, v in video.metadata.items()}
        statuses = rec.current_check_statuses(instance, videos_key, list(CHECK_NAMES), key)
        passed_count = sum(status == "SUCCEEDED" for status in statuses.values())
        passed = passed_count == len(CHECK_NAMES)
        rows.append(
            Row(
                key,
                "ok" if passed else "checks failed",
                video=str(meta.get("runway/video_uri", "")),
                duration=f"{meta.get('runway/video_duration_s', '')}s",
                checks=f"{passed_count}/{len(CHECK_NAMES)} passed",
                cost=str(meta.get("runway/cost_usd", "")),
                prompt_source=str(meta.get("runway/prompt_source", "")),
            )
        )
    return rows


def _print_table(rows: list[Row]) -> None:
    headers = ("partition", "outcome", "video", "duration", "checks", "cost_usd")
    table = [headers] + [
        (
            r.partition,
            "ok" if r.outcome == "ok" else r.outcome.split(":")[0],
            r.video,
            r.duration,
            r.checks,
            r.cost,
        )
        for r in rows
    ]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(headers))]
    print()
    for row in table:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    for row in rows:
        if row.outcome not in ("ok", "checks failed"):
            print(f"\n{row.partition}: {row.outcome.split(': ', 1)[-1]}")
