"""``dagster-runway demo``: the real pipeline, end to end, on a real Dagster instance.

It starts the embedded emulator unless a RunComfy token or base URL is configured, ticks the
sensors and runs what they request (as the daemon would), and stops when every partition has
finished. Then it prints a table and tells how to open the same instance in the UI
(``dagster-runway dev``, :mod:`dagster_runway.dev`).

The demo's home keeps what the UI session needs: ``runway-demo.json`` (the folders and options),
``definitions.py`` (the pipeline for the UI) and ``emulator/`` (the emulator's requests, ledger and
videos, and the port it last served on, so links recorded by the demo still work in the UI).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "images"
ENVIRONMENT = """environment:
  RUNCOMFY_API_TOKEN   your RunComfy API token; set it (or RUNCOMFY_BASE_URL) to use the real service,
                       which spends credits: the demo then asks for --yes or --max-spend first
  RUNCOMFY_BASE_URL    the API's base URL (default https://model-api.runcomfy.net)
Without either, the demo starts the embedded emulator: offline, nothing is spent."""
SETTINGS_FILE = "runway-demo.json"
EMULATOR_URL_VARIABLE = "DAGSTER_RUNWAY_EMULATOR_URL"
DEFAULT_HOME = "out/demo/dagster_home"
DEFAULT_OUTPUT = "out/demo/videos"


class UsageError(Exception):
    """A bad argument: printed as one line, exit code 2."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's layout and shows each option's default, unless its help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" in text
            or action.default in (None, False, argparse.SUPPRESS)
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Run the pipeline end to end on a real Dagster instance: discover the images, submit them, collect "
        "and check the videos, then print a table. Offline against the embedded emulator unless a RunComfy "
        "token or base URL is set."
    )
    parser.epilog = ENVIRONMENT
    parser.formatter_class = HelpFormatter
    parser.add_argument(
        "--images",
        default=None,
        help="Image folder or s3:// prefix (default: the bundled examples, or four generated samples)",
    )
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="Where videos, posters and the journal go")
    parser.add_argument(
        "--dagster-home", default=DEFAULT_HOME, help="DAGSTER_HOME to use (created if missing)"
    )
    add_spend_arguments(parser)
    parser.add_argument(
        "--mode",
        choices=["deferred", "blocking"],
        default="deferred",
        help="deferred: submit, let the status sensor see each render finish, then collect (no worker waits); "
        "blocking: one step submits, waits and collects",
    )
    parser.add_argument(
        "--on-change",
        choices=["mark_stale", "regenerate"],
        default="mark_stale",
        help="A changed image whose video exists: show it stale, or pay to regenerate it",
    )
    parser.add_argument(
        "--adopt-output",
        action="store_true",
        help="Let --output take these images although it holds videos of another image folder (its journal "
        "says which); without it the demo refuses, so two folders never mix",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="Give up after this many seconds")


def add_spend_arguments(parser: argparse.ArgumentParser) -> None:
    """The options the demo and the UI session share: how much may be spent, and the emulator's pace."""
    parser.add_argument("--yes", action="store_true", help="Allow spending real credits, with no cap")
    parser.add_argument(
        "--max-spend",
        type=float,
        default=None,
        metavar="USD",
        help="Allow spending real credits, up to USD in all",
    )
    parser.add_argument(
        "--time-scale",
        type=float,
        default=0.02,
        help="Emulator time scale: 1 renders at the real service's pace, 0 at once",
    )


@dataclass
class Row:
    partition: str
    outcome: str
    video: str = ""
    duration: str = ""
    checks: str = ""
    cost: str = ""
    prompt_source: str = ""
    paid_now: bool = False  # its request was made by this run of the demo


def prepare_home(path: Path) -> Path:
    path = path.resolve()
    path.mkdir(parents=True, exist_ok=True)
    config = path / "dagster.yaml"
    if not config.exists():
        config.write_text("telemetry:\n  enabled: false\n")
    os.environ["DAGSTER_HOME"] = str(path)
    os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")
    return path


def sample_images(home: Path) -> str:
    """The bundled example images in a checkout; installed from a wheel, four generated ones with prompts."""
    if EXAMPLES.is_dir():
        return str(EXAMPLES)
    from PIL import Image, ImageDraw

    folder = home.parent / "images"
    folder.mkdir(parents=True, exist_ok=True)
    samples = {
        "landscape-sunrise.png": ((1280, 720), "the sun rises slowly over the hills, mist drifting"),
        "portrait-tower.png": ((720, 1280), "the camera tilts up the tower as clouds pass"),
        "square-garden.png": ((960, 960), "leaves sway gently in a light breeze"),
        "wide-coast.png": ((1200, 640), "waves roll onto the shore, slow aerial drift"),
    }
    for i, (name, ((width, height), prompt)) in enumerate(samples.items()):
        path = folder / name
        if not path.exists():
            image = Image.new("RGB", (width, height), (40 + 50 * i, 110, 170 - 30 * i))
            ImageDraw.Draw(image).ellipse(
                [width // 4, height // 4, 3 * width // 4, 3 * height // 4], fill=(240, 190, 60)
            )
            image.save(path)
            path.with_suffix(".txt").write_text(prompt)
    return str(folder)


def count_images(images: str, config: Any) -> int:
    """How many images ``--images`` holds; a missing folder or no match is a usage error."""
    if "://" not in images and not Path(images).is_dir():
        raise UsageError(f"--images: {images} is not a folder; give a folder of images or an s3:// prefix")
    found = len(config.image_source().list())
    if found == 0:
        patterns = ", ".join(config.patterns)
        raise UsageError(f"--images: no file in {images} matches {patterns}; add images or check the path")
    return found


def definitions_file(
    home: Path, images: str, output: str, options: dict[str, Any], base_url: str | None, *, offline: bool
) -> Path:
    """The pipeline for the UI, in the demo's home. Offline, it reads the emulator's URL from the
    environment that ``dagster-runway dev`` sets, and refuses to load without it: definitions written
    by an offline demo never point at the real service."""
    path = home / "definitions.py"
    if offline:
        where = f"""EMULATOR_URL = os.environ.get({EMULATOR_URL_VARIABLE!r})
if not EMULATOR_URL:
    raise RuntimeError(
        "This pipeline was written by an offline demo and runs only against its emulator: "
        "open it with `dagster-runway dev --dagster-home {home}`."
    )
"""
        resource_args = 'api_token=dg.EnvVar("RUNCOMFY_API_TOKEN"), base_url=EMULATOR_URL'
    else:
        where = ""
        resource_args = 'api_token=dg.EnvVar("RUNCOMFY_API_TOKEN")' + (
            f", base_url={base_url!r}" if base_url else ""
        )
    path.write_text(
        f'''"""The demo's pipeline, for the UI: dagster-runway dev --dagster-home {home}"""

import os

import dagster as dg

from dagster_runway import RunComfyResource
from dagster_runway.pipeline import build_runway_pipeline

{where}
defs = build_runway_pipeline(
    {images!r},
    {output!r},
    resource=RunComfyResource({resource_args}),
    **{options!r},
)
'''
    )
    return path


def save_settings(home: Path, images: str, output: str, options: dict[str, Any]) -> None:
    """What the demo ran with, for ``dagster-runway dev`` on the same home."""
    (home / SETTINGS_FILE).write_text(
        json.dumps({"images": images, "output": output, "options": options}, indent=2)
    )


def load_settings(home: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads((home / SETTINGS_FILE).read_text()))
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise UsageError(
            f"{home / SETTINGS_FILE} is not valid JSON ({exc}); delete it and run the demo again"
        ) from None


def start_emulator(stack: contextlib.ExitStack, home: Path, time_scale: float) -> Any:
    """The embedded emulator, keeping its state in the home and serving on the port it last used (when free)."""
    try:
        from dagster_runway.emulator import Emulator, EmulatorConfig
    except ImportError:
        from dagster_runway.cli import EMULATOR_MISSING

        raise UsageError(f"{EMULATOR_MISSING}, or set RUNCOMFY_API_TOKEN to use the real service") from None
    state = home / "emulator"
    state.mkdir(exist_ok=True)
    port_file = state / "port"
    config = EmulatorConfig(time_scale=time_scale, state_dir=str(state))
    emulator = None
    with contextlib.suppress(ValueError, OSError, RuntimeError):
        emulator = stack.enter_context(Emulator(config, port=int(port_file.read_text())))
    if emulator is None:
        emulator = stack.enter_context(Emulator(config))
    port_file.write_text(str(emulator.port))
    return emulator


def pipeline_config(images: str, output: str, options: dict[str, Any]) -> Any:
    """The pipeline's configuration; what it refuses (an output inside the images, say) is a usage error."""
    from pydantic import ValidationError

    from dagster_runway.pipeline import RunwayPipelineConfig

    try:
        return RunwayPipelineConfig(source=images, output=output, **options)
    except ValidationError as exc:
        messages = "; ".join(str(error["msg"]).removeprefix("Value error, ") for error in exc.errors())
        raise UsageError(f"--images {images} / --output {output}: {messages}") from None


def bind_output(config: Any, *, adopt: bool) -> None:
    """Tie the output to its images; an output of another image folder is a usage error unless adopted."""
    from dagster_runway.journal import Journal, JournalError

    try:
        previous = Journal(config.journal_url, config.journal_options).bind_output(
            config.output, config.source, adopt=adopt
        )
    except JournalError as exc:
        raise UsageError(str(exc)) from None
    if previous:
        print(
            f"The output {config.output} held videos of {previous}; it is now {config.source}'s (--adopt-output)."
        )


def real_service() -> bool:
    """A token or a base URL in the environment means the real (paid) service."""
    return bool(os.environ.get("RUNCOMFY_API_TOKEN") or os.environ.get("RUNCOMFY_BASE_URL"))


def check_spend_allowed(args: argparse.Namespace, found: int, config: Any) -> None:
    """Against the real service: say what it may cost (at the catalog's price when it can be read), and
    refuse without --yes or --max-spend."""
    from dagster_runway.client import DEFAULT_BASE_URL, RetryPolicy, RunComfyClient
    from dagster_runway.pipeline import catalog
    from dagster_runway.schema import MODEL_ID

    base_url = os.environ.get("RUNCOMFY_BASE_URL") or DEFAULT_BASE_URL
    token = os.environ.get("RUNCOMFY_API_TOKEN")
    if token:
        with RunComfyClient(api_token=token, base_url=base_url, retry=RetryPolicy(deadline=20)) as client:
            price = catalog.read_with(client, MODEL_ID, config.estimated_usd_per_second, warn=False).price
    else:
        price = catalog.Price(
            catalog.ESTIMATE, config.estimated_usd_per_second, why_estimate="no token to read it"
        )
    estimate = found * price.estimate_usd(int(config.defaults.duration))
    print(
        f"Using RunComfy at {base_url}: {found} image(s), about {estimate:.2f} USD if every one is generated, "
        f"at {price.describe()}."
    )
    if not (args.yes or args.max_spend is not None):
        raise UsageError("this spends real credits; pass --yes, or --max-spend USD to cap the spend")
    if not token:
        raise UsageError(
            "RUNCOMFY_BASE_URL is set but RUNCOMFY_API_TOKEN is not: export RUNCOMFY_API_TOKEN=<your token>"
        )


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except UsageError as exc:
        print(f"dagster-runway demo: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    home = prepare_home(Path(args.dagster_home))
    from dagster import DagsterInstance, EnvVar

    from dagster_runway.client import DEFAULT_BASE_URL
    from dagster_runway.journal import Journal
    from dagster_runway.pipeline import build_runway_pipeline
    from dagster_runway.pipeline.gallery import write_gallery
    from dagster_runway.resource import RunComfyResource

    images = args.images or sample_images(home)
    output = args.output if "://" in args.output else str(Path(args.output).resolve())
    real = real_service()
    # The emulator costs nothing, so an image without a prompt may take the service's default there;
    # against the real service the safe default applies: it fails before paying.
    options: dict[str, Any] = {
        "mode": args.mode,
        "on_change": args.on_change,
        "missing_prompt": "fail" if real else "service_default",
    }
    if args.max_spend is not None:
        options["max_spend_usd"] = args.max_spend
    config = pipeline_config(images, output, options)
    found = count_images(images, config)
    bind_output(config, adopt=args.adopt_output)
    with contextlib.ExitStack() as stack:
        base_url = os.environ.get("RUNCOMFY_BASE_URL")
        if real:
            check_spend_allowed(args, found, config)
        else:
            emulator = start_emulator(stack, home, args.time_scale)
            os.environ["RUNCOMFY_API_TOKEN"], base_url = emulator.token, emulator.base_url
            print(f"Started the RunComfy emulator at {base_url} (offline; no credits are spent).")
            print(
                'Images without a prompt use the service\'s default prompt here (missing_prompt="service_default"); '
                "against the real service they fail before paying unless you give one."
            )
        # The token is read from the environment inside each run: never a literal Dagster would snapshot.
        resource = RunComfyResource(
            api_token=EnvVar("RUNCOMFY_API_TOKEN"), base_url=base_url or DEFAULT_BASE_URL, poll_interval=0.5
        )
        defs = build_runway_pipeline(images, output, resource=resource, **options)
        instance = stack.enter_context(DagsterInstance.get())
        print(f"DAGSTER_HOME={home}")
        save_settings(home, images, output, options)
        rows = _drive(defs, instance, args, config)
        paid = [row for row in rows if row.paid_now]
        paid_usd = sum(float(row.cost) for row in paid if row.cost.replace(".", "", 1).isdigit())
        gallery = write_gallery(config, instance, run_spend_usd=paid_usd)
    _print_table(rows)
    bad = [row for row in rows if row.outcome not in ("ok", "stale", "source missing")]
    stale = sum(row.outcome == "stale" for row in rows)
    missing = sum(row.outcome == "source missing" for row in rows)
    defaulted = sum(row.prompt_source == "service default" for row in rows)
    total_usd = Journal(config.journal_url, config.journal_options).spent_usd()
    definitions_file(home, images, output, options, base_url if real else None, offline=not real)
    print(
        f"\n{len(rows) - len(bad)} of {len(rows)} partitions produced a passing video; "
        f"{defaulted} used the service's default prompt."
        + f"\nThis run paid for {len(paid)} video(s), {paid_usd:.2f} USD; this output has cost {total_usd:.2f} USD in all."
        + (
            f"\n{stale} video(s) are stale: their image changed; --on-change regenerate pays for new ones."
            if stale
            else ""
        )
        + (
            f"\n{missing} video(s) have no source image any more (deleted or moved); nothing is paid for them."
            if missing
            else ""
        )
        + f"\nReview the videos: {gallery}"
        + f"\nOpen this instance in the Dagster UI (from any folder):\n  dagster-runway dev --dagster-home {home}\n"
        "then Assets -> runway/videos for materializations, checks and metadata."
    )
    return 1 if bad or not rows else 0


def _drive(defs: Any, instance: Any, args: argparse.Namespace, config: Any) -> list[Row]:
    import logging

    from dagster_runway.journal import Journal
    from dagster_runway.pipeline.status import summary
    from dagster_runway.testing import LocalDaemon

    for name in ("dagster", "dagster_runway"):  # the sensors' tick logs; the progress line says it all
        logging.getLogger(name).setLevel(logging.WARNING)

    daemon = LocalDaemon(defs, instance, log_level="CRITICAL")
    names = [s.name for s in defs.sensors]
    discovery = next(n for n in names if n.endswith("_discovery_sensor"))
    status = next((n for n in names if n.endswith("_status_sensor")), None)
    journal = Journal(config.journal_url, config.journal_options)
    deadline = time.monotonic() + args.timeout
    new = 0
    while True:  # a tick records what its time budget allows; the rest waits for the next one
        outcome = daemon.tick(discovery)
        new += outcome.new_partitions
        if not discovery_pending(outcome.cursor) or time.monotonic() > deadline:
            break
    print(f"discovery: {new} new image(s)")
    before = _request_ids(instance, config)
    total_before = journal.spent_usd()
    interactive = sys.stdout.isatty()
    while status is not None and time.monotonic() < deadline:
        outcome = daemon.tick(status)
        counts = summary(outcome.cursor)
        busy = counts.get("rebuilding") or any(
            counts.get(k) for k in ("in_flight", "submit", "collect", "running")
        )
        launched = len(outcome.run_ids) + len(outcome.failed_run_ids)
        total = journal.spent_usd()
        line = (
            f"progress: {counts.get('submit', 0)} to submit, {counts.get('in_flight', 0)} rendering, "
            f"{counts.get('collect', 0)} to collect, {counts.get('done', 0)} done, {counts.get('failed', 0)} failed; "
            f"this run {max(total - total_before, 0):.2f} USD, this output {total:.2f} USD in all"
        )
        print(f"\r{line}" if interactive else line, end="" if interactive else "\n", flush=True)
        if not busy and launched == 0:
            break
        time.sleep(0.5)
    if interactive:
        print()
    return _rows(defs, instance, config, before)


def discovery_pending(cursor: str | None) -> bool:
    """Whether the discovery sensor left images for its next tick: some it listed but did not judge, or
    a pass over the source it has not finished (its cursor says)."""
    try:
        data = json.loads(cursor or "{}")
    except ValueError:
        return False
    return isinstance(data, dict) and (bool(data.get("deferred")) or data.get("pass_done") is False)


def _request_ids(instance: Any, config: Any) -> set[str]:
    """The request ids recorded for the partitions so far: a video made from another is paid for now."""
    from dagster_runway.pipeline import records as rec

    keys = instance.get_dynamic_partitions(config.dynamic_partitions_name)
    return {record.request_id for record in rec.latest_requests(instance, config.requests_key, keys).values()}


def _rows(defs: Any, instance: Any, config: Any, before: set[str]) -> list[Row]:
    from dagster_runway.pipeline import records as rec
    from dagster_runway.pipeline.checks import CHECK_NAMES

    videos_key, requests_key = config.videos_key, config.requests_key
    current = {entry.partition_key: entry for entry in config.image_source().list()}
    rows = []
    for key in instance.get_dynamic_partitions(config.dynamic_partitions_name):
        video = rec.latest_video(instance, videos_key, key)
        if video is None:
            failure = rec.latest_failure(instance, (requests_key, videos_key), key)
            why = f"{failure.reason} Next step: {failure.next_step}" if failure else "no video was produced"
            rows.append(Row(key, "failed: " + why))
            continue
        meta = video.metadata  # keyed by RunwayMetadata field
        statuses = rec.current_check_statuses(instance, videos_key, list(CHECK_NAMES), key)
        passed_count = sum(status == "SUCCEEDED" for status in statuses.values())
        entry = current.get(key)
        stale = entry is not None and meta.get("source_version") != rec.image_version(
            entry.change_token, entry.sidecar_token, entry.settings_token
        )
        checks = f"{passed_count}/{len(CHECK_NAMES)} passed"
        if entry is None:
            outcome = "source missing"
        elif stale:
            outcome, checks = "stale", f"{checks} (before the change)"
        else:
            outcome = "ok" if passed_count == len(CHECK_NAMES) else "checks failed"
        rows.append(
            Row(
                key,
                outcome,
                video=str(meta.get("video_uri", "")),
                duration=f"{meta.get('video_duration_s', '')}s",
                checks=checks,
                cost=str(meta.get("cost_usd", "")),
                prompt_source=str(meta.get("prompt_source", "")),
                paid_now=video.request_id not in before,
            )
        )
    return rows


def _print_table(rows: list[Row]) -> None:
    headers = ("partition", "outcome", "video", "duration", "checks", "cost_usd", "paid")
    table = [headers] + [
        (
            r.partition,
            "ok" if r.outcome == "ok" else r.outcome.split(":")[0],
            r.video,
            r.duration,
            r.checks,
            r.cost,
            "this run" if r.paid_now else "",
        )
        for r in rows
    ]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(headers))]
    print()
    for line in table:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())
    for row in rows:
        if row.outcome not in ("ok", "checks failed", "stale", "source missing"):
            print(f"\n{row.partition}: {row.outcome.split(': ', 1)[-1]}")
