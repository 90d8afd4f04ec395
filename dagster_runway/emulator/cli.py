"""``dagster-runway emulator``: serve the emulator in the foreground until interrupted."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any

from pydantic import ValidationError

from dagster_runway.emulator.catalog import CatalogFileError, load_catalog_file
from dagster_runway.emulator.config import EmulatorConfig
from dagster_runway.emulator.faults import FaultRule
from dagster_runway.emulator.persist import StateDirError
from dagster_runway.emulator.server import Emulator


def parse_fault(text: str) -> FaultRule:
    """``KIND[:key=value,...]``, e.g. ``rate_limit:endpoint=submit,rate=0.1,retry_after=2``."""
    kind, _, params = text.partition(":")
    fields: dict[str, Any] = {"kind": kind.strip()}
    for item in filter(None, (part.strip() for part in params.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"fault parameter {item!r} is not key=value")
        fields[key.strip()] = None if value.strip().lower() == "none" else value.strip()
    try:
        return FaultRule.model_validate(fields)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'rule'}: {e['msg']}" for e in exc.errors())
        raise argparse.ArgumentTypeError(f"invalid fault {text!r}: {problems}") from exc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The emulator's command-line options."""
    defaults = EmulatorConfig()
    parser.add_argument(
        "--host", default="127.0.0.1", help="Address to bind (default: %(default)s, loopback)."
    )
    parser.add_argument(
        "--port", type=int, default=8765, help="Port to bind; 0 picks a free one (default: %(default)s)."
    )
    parser.add_argument(
        "--token",
        action="append",
        dest="tokens",
        metavar="TOKEN",
        help=f"An accepted API token, one account each; repeatable (default: {defaults.tokens[0]}).",
    )
    parser.add_argument(
        "--time-scale",
        type=float,
        default=defaults.time_scale,
        help="Factor on queue and render times: 1 is realistic, 0 is instant (default: %(default)s).",
    )
    parser.add_argument(
        "--max-concurrency",
        type=int,
        default=defaults.max_concurrency,
        help="Requests per account in progress at once (default: %(default)s).",
    )
    parser.add_argument(
        "--video-scale",
        type=float,
        default=defaults.video_scale,
        help="Output size as a fraction of the ratio's pixels (default: %(default)s).",
    )
    parser.add_argument(
        "--fps", type=int, default=defaults.fps, help="Frames per second (default: %(default)s)."
    )
    parser.add_argument(
        "--reuse-renders",
        action="store_true",
        help="Render one clip per ratio and duration and serve copies of it (for benchmarks at scale).",
    )
    parser.add_argument(
        "--latency",
        type=float,
        default=defaults.latency_seconds,
        help="Seconds added to every answer (default: %(default)s).",
    )
    price = parser.add_mutually_exclusive_group()
    price.add_argument(
        "--price-usd-per-second",
        "--price-per-second",
        dest="price_per_second",
        type=float,
        default=None,
        metavar="USD",
        help=f"USD billed per second of video, and the catalog's price (default: {defaults.price_usd}).",
    )
    price.add_argument(
        "--price-usd-per-output",
        dest="price_per_output",
        type=float,
        default=None,
        metavar="USD",
        help="USD billed per video whatever its length; the catalog's price_unit is then 'output'.",
    )
    parser.add_argument(
        "--catalog",
        default=None,
        metavar="FILE",
        help="A JSON file of other models' catalog entries (a list, or a saved GET /v1/models answer) to list.",
    )
    parser.add_argument(
        "--bill-failed",
        action=argparse.BooleanOptionalAction,
        default=defaults.bill_failed,
        help="Keep failed generations charged; --no-bill-failed refunds them (default: %(default)s).",
    )
    parser.add_argument(
        "--balance", type=float, default=None, help="Credit of each account in USD (default: unlimited)."
    )
    parser.add_argument(
        "--ttl",
        type=float,
        default=defaults.ttl_seconds,
        help="Seconds requests and videos are kept (default: %(default)s, 7 days).",
    )
    parser.add_argument("--seed", type=int, default=None, help="Random seed for timings and faults.")
    parser.add_argument(
        "--state-dir",
        default=None,
        metavar="DIR",
        help="Keep requests, ledger and videos in DIR across restarts (default: in memory, gone at exit).",
    )
    parser.add_argument(
        "--fault",
        action="append",
        dest="faults",
        type=parse_fault,
        metavar="KIND[:key=value,...]",
        help="A fault rule, e.g. rate_limit:endpoint=submit,rate=0.1,retry_after=2; repeatable.",
    )


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM; print the base URL and the token first."""
    try:
        config = _config(args)
    except CatalogFileError as exc:
        print(f"dagster-runway emulator: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        print(f"dagster-runway emulator: invalid option: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    emulator = Emulator(config, host=args.host, port=args.port)
    try:
        emulator.start()
    except StateDirError as exc:
        print(f"dagster-runway emulator: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"dagster-runway emulator: cannot bind {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    try:
        print(f"RunComfy emulator serving on {emulator.base_url}", flush=True)
        print(f"API token: {emulator.token}", flush=True)
        print(f"Model: {emulator.base_url}/v1/models/{config.model_id}", flush=True)
        refund = "" if config.bill_failed else "; failed generations are refunded"
        print(f"Price: {config.price_usd:g} USD per {config.price_unit}{refund}", flush=True)
        if config.state_dir:
            print(f"State: {config.state_dir} ({emulator.ledger().submissions} requests kept)", flush=True)
        print("Press Ctrl+C to stop.", flush=True)
        stop.wait()
    finally:
        emulator.stop()
    return 0


def _config(args: argparse.Namespace) -> EmulatorConfig:
    price: dict[str, Any] = {}
    if args.price_per_second is not None:
        price = {"price_usd": args.price_per_second, "price_unit": "second"}
    elif args.price_per_output is not None:
        price = {"price_usd": args.price_per_output, "price_unit": "output"}
    return EmulatorConfig(
        **price,
        bill_failed=args.bill_failed,
        catalog=load_catalog_file(args.catalog) if args.catalog else [],
        tokens=args.tokens or EmulatorConfig().tokens,
        time_scale=args.time_scale,
        max_concurrency=args.max_concurrency,
        video_scale=args.video_scale,
        fps=args.fps,
        reuse_renders=args.reuse_renders,
        latency_seconds=args.latency,
        balance_usd=args.balance,
        ttl_seconds=args.ttl,
        random_seed=args.seed,
        faults=args.faults or [],
        state_dir=args.state_dir,
    )
