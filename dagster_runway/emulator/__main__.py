"""``python -m dagster_runway.emulator``: the same as ``dagster-runway emulator``."""

import argparse
import sys

from dagster_runway.emulator.cli import add_arguments, run

parser = argparse.ArgumentParser(prog="python -m dagster_runway.emulator", description=__doc__)
add_arguments(parser)
sys.exit(run(parser.parse_args()))
