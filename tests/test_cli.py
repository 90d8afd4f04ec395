"""The command line as a user first meets it: ``--version``, and every command's help says what it does
and shows its defaults."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dagster_runway.version import __version__

COMMANDS = ("demo", "dev", "journal", "emulator")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dagster_runway.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_version() -> None:
    done = _cli("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"dagster-runway {__version__}"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_a_description_and_the_top_level_help_lists_it(command: str) -> None:
    top = _cli("--help")
    assert command in top.stdout
    done = _cli(command, "--help")
    assert done.returncode == 0, done.stderr
    usage, _, rest = done.stdout.partition("\n\n")
    description = rest.split("\n\n", 1)[0].strip()
    assert description and not description.startswith(("options:", "positional arguments:")), done.stdout
    assert "(default: None)" not in done.stdout and "(default: False)" not in done.stdout


def test_the_demo_and_dev_show_their_defaults() -> None:
    demo = _cli("demo", "--help").stdout
    for shown in (
        "(default: out/demo/videos)",
        "(default: deferred)",
        "(default: mark_stale)",
        "(default: 0.02)",
    ):
        assert shown in " ".join(demo.split()), shown
    dev = " ".join(_cli("dev", "--help").stdout.split())
    assert "(default: 3000)" in dev and "(default: 127.0.0.1)" in dev


def test_the_package_root_exports_what_it_lists() -> None:
    import dagster_runway

    public = {name for name in vars(dagster_runway) if not name.startswith("_")} - {"TYPE_CHECKING", "Any"}
    modules = {name for name in public if isinstance(getattr(dagster_runway, name), type(dagster_runway))}
    assert set(dagster_runway.__all__) - {"__version__"} == (public - modules) | set(dagster_runway._LAZY)
    for name in dagster_runway.__all__:
        assert getattr(dagster_runway, name) is not None, name
