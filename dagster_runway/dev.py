"""``dagster-runway dev``: the Dagster UI on the demo's instance, ready to act.

Offline (no RunComfy token or base URL in the environment) it starts the embedded emulator on the
home's state, then ``dagster dev`` with definitions that point at that emulator and keep the demo's
folders and options. Against the real service it needs ``--max-spend`` (kept as the pipeline's spend
cap) or ``--yes``, and images without a prompt fail before paying. Stopping it (Ctrl-C or SIGTERM)
stops the UI, its daemon and code servers, and the emulator.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from dagster_runway import demo

STOP_GRACE_S = 20.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Open the Dagster UI on the demo's instance: the emulator (offline) and `dagster dev` on the same "
        "DAGSTER_HOME, with the demo's folders and options. Ctrl-C stops both."
    )
    parser.epilog = demo.ENVIRONMENT
    parser.formatter_class = demo.HelpFormatter
    parser.add_argument(
        "--dagster-home", default=demo.DEFAULT_HOME, help="The demo's DAGSTER_HOME (created if missing)"
    )
    parser.add_argument(
        "--images",
        default=None,
        help="Image folder or s3:// prefix (default: what the demo in this home used)",
    )
    parser.add_argument(
        "--output",
        default=None,
        help=f"Where videos go (default: what the demo used, else {demo.DEFAULT_OUTPUT})",
    )
    demo.add_spend_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="Host the Dagster UI listens on")
    parser.add_argument("--port", type=int, default=3000, help="Port of the Dagster UI")


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except demo.UsageError as exc:
        print(f"dagster-runway dev: error: {exc}", file=sys.stderr)
        return 2


def _settings(args: argparse.Namespace, home: Path, real: bool) -> tuple[str, str, dict[str, Any]]:
    saved = demo.load_settings(home) or {}
    images = args.images or saved.get("images") or demo.sample_images(home)
    output = args.output or saved.get("output") or demo.DEFAULT_OUTPUT
    output = output if "://" in output else str(Path(output).resolve())
    options = {k: v for k, v in dict(saved.get("options") or {}).items() if k in ("mode", "on_change")}
    options["missing_prompt"] = "fail" if real else "service_default"
    if args.max_spend is not None:
        options["max_spend_usd"] = args.max_spend
    return images, output, options


def _run(args: argparse.Namespace) -> int:
    home = demo.prepare_home(Path(args.dagster_home))
    try:
        import dagster_webserver  # noqa: F401
    except ImportError:
        raise demo.UsageError("the UI needs its extra: pip install 'dagster-runway[ui]'") from None
    real = demo.real_service()
    images, output, options = _settings(args, home, real)
    config = demo.pipeline_config(images, output, options)
    found = demo.count_images(images, config)
    environment = dict(os.environ)
    with contextlib.ExitStack() as stack:
        if real:
            demo.check_spend_allowed(args, found, config)
            base_url = os.environ.get("RUNCOMFY_BASE_URL")
            cap = (
                f"spend cap {args.max_spend:.2f} USD"
                if args.max_spend is not None
                else "no spend cap (--yes)"
            )
            print(
                f"The UI's runs pay the real service, with {cap}; images without a prompt fail before paying."
            )
        else:
            emulator = demo.start_emulator(stack, home, args.time_scale)
            base_url = None
            environment |= {
                "RUNCOMFY_API_TOKEN": emulator.token,
                demo.EMULATOR_URL_VARIABLE: emulator.base_url,
            }
            print(f"Started the RunComfy emulator at {emulator.base_url} (offline; no credits are spent).")
        definitions = demo.definitions_file(home, images, output, options, base_url, offline=not real)
        command = [
            sys.executable, "-W", "ignore::FutureWarning",  # dagster dev's notice that `dg dev` supersedes it
            "-m", "dagster", "dev", "-f", str(definitions), "-h", args.host, "-p", str(args.port),
        ]  # fmt: skip
        print(
            f"DAGSTER_HOME={home}\nDagster UI: http://{args.host}:{args.port} (Ctrl-C stops the UI and the emulator)"
        )
        sys.stdout.flush()
        return _supervise(command, environment)


def _supervise(command: list[str], environment: dict[str, str]) -> int:
    """Run ``dagster dev`` in its own process group and wait for it; on SIGINT or SIGTERM stop the whole
    group (webserver, daemon, code servers), gracefully first."""

    def stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    # Handlers of our own (not an inherited "ignore", as in a background job): the child then starts
    # with SIGINT at its default, and Python turns it into the graceful shutdown dagster dev expects.
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    process = subprocess.Popen(command, env=environment, start_new_session=True)
    try:
        return process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        _stop_group(process)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    """Interrupt ``dagster dev`` (it stops its own children), then kill whatever of its group is left."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGINT)
    deadline = time.monotonic() + STOP_GRACE_S
    while time.monotonic() < deadline and _group_alive(process.pid):
        process.poll()  # reaps dagster dev itself once it has ended
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
