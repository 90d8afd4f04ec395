"""``dagster-runway``: the command line (``emulator``, ``demo``, ``dev`` and ``journal``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dagster_runway.version import __version__


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dagster-runway", description="Turn folders of still images into videos with Runway Gen-4 Turbo."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    emulator = commands.add_parser("emulator", help="Serve a local emulator of the RunComfy Model API.")
    try:
        from dagster_runway.emulator import cli as emulator_cli
    except ImportError:  # starlette and uvicorn come with the extra
        emulator.set_defaults(run=_emulator_missing)
    else:
        emulator_cli.add_arguments(emulator)
        emulator.set_defaults(run=emulator_cli.run)

    from dagster_runway import demo

    demo_parser = commands.add_parser(
        "demo", help="Run the pipeline end to end on a real Dagster instance (offline against the emulator)."
    )
    demo.add_arguments(demo_parser)
    demo_parser.set_defaults(run=demo.run)

    from dagster_runway import dev

    dev_parser = commands.add_parser(
        "dev", help="Open the Dagster UI on the demo's instance, with the emulator (offline) or a spend cap."
    )
    dev.add_arguments(dev_parser)
    dev_parser.set_defaults(run=dev.run)

    from dagster_runway import journal_cli

    journal_parser = commands.add_parser(
        "journal", help="Look into the submission journal: list, show, adopt an ambiguous attempt's request id, spend."
    )
    journal_cli.add_arguments(journal_parser)
    journal_parser.set_defaults(run=journal_cli.run)

    args = parser.parse_args(argv)
    return int(args.run(args) or 0)


EMULATOR_MISSING = "the emulator needs its extra: pip install 'dagster-runway[emulator]'"


def _emulator_missing(args: argparse.Namespace) -> int:
    print(f"dagster-runway emulator: error: {EMULATOR_MISSING}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
