"""Shared fixtures. Each area keeps its fixtures in its own module under tests/fixtures/.

``python -m pytest`` runs the fast suite; ``--full`` (what CI runs) adds the tests marked ``deployment``
(a real PostgreSQL, ``dagster-daemon`` and ``dagster-webserver``) and ``browser`` (headless Chromium).
A test file or test named on the command line always runs, whatever its marks.
"""

from pathlib import Path

import pytest

pytest_plugins = [
    "tests.fixtures.emulator",
    "tests.fixtures.s3",
    "tests.fixtures.deployment",
    "tests.fixtures.old_moto",
]

SLOW_MARKERS = ("deployment", "browser")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--full",
        action="store_true",
        help="also run the tests marked deployment or browser (PostgreSQL, the daemon, the webserver, Chromium)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "deployment: runs on Dagster's own deployment (PostgreSQL, dagster-daemon, dagster-webserver); "
        "run with --full",
    )
    config.addinivalue_line("markers", "browser: drives a headless Chromium; run with --full")


# The heavy tests (a real daemon, webserver and PostgreSQL; a real browser) run one at a time on one
# xdist worker, beside the rest on the other: two of them at once on 2 cores would starve each other.
HEAVY_FILES = {"test_deployment.py", "test_ui_browser.py", "test_gallery.py", "test_gallery_page.py"}


def _named_on_the_command_line(config: pytest.Config) -> bool:
    """Whether the arguments name test files or tests rather than only folders."""
    return any(not Path(arg.split("::")[0]).is_dir() for arg in config.args)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    run_slow = config.getoption("--full") or _named_on_the_command_line(config)
    kept, slow = [], []
    for item in items:
        is_slow = any(item.get_closest_marker(name) for name in SLOW_MARKERS)
        if is_slow or item.path.name in HEAVY_FILES:
            item.add_marker(pytest.mark.xdist_group("heavy"))
        (slow if is_slow and not run_slow else kept).append(item)
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = kept
