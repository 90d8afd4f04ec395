"""``dagster-runway``: the command line (``emulator``, ``demo``, ``dev``, ``journal`` and ``models``)."""

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

    summary = "Serve a local emulator of the RunComfy Model API."
    emulator = commands.add_parser("emulator", help=summary, description=summary)
    try:
        from dagster_runway.emulator import cli as emulator_cli
    except ImportError:  # starlette and uvicorn come with the extra
        emulator.set_defaults(run=_emulator_missing)
    else:
        emulator_cli.add_arguments(emulator)
        emulator.set_defaults(run=emulator_cli.run)

    from dagster_runway import demo, dev, journal_cli, models_cli

    for name, module, summary in (
        ("demo", demo, "Run the pipeline end to end on a real Dagster instance (offline against the emulator)."),
        ("dev", dev, "Open the Dagster UI on the demo's instance, with the emulator (offline) or a spend cap."),
        ("journal", journal_cli, "Look into the submission journal: list, show, adopt an ambiguous attempt's "
                                 "request id, spend."),
        ("models", models_cli, "What the RunComfy catalog says: models, prices, input fields and rules."),
    ):  # fmt: skip
        command = commands.add_parser(name, help=summary, description=summary)
        module.add_arguments(command)  # a module's own description, where it has one, replaces the summary
        command.set_defaults(run=module.run)

    args = parser.parse_args(argv)
    return int(args.run(args) or 0)


EMULATOR_MISSING = "the emulator needs its extra: pip install 'dagster-runway[emulator]'"


def _emulator_missing(args: argparse.Namespace) -> int:
    print(f"dagster-runway emulator: error: {EMULATOR_MISSING}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
