"""Shared fixtures. Each area keeps its fixtures in its own module under tests/fixtures/."""

import pytest

pytest_plugins = [
    "tests.fixtures.emulator",
    "tests.fixtures.s3",
    "tests.fixtures.deployment",
    "tests.fixtures.old_moto",
]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "deployment: runs on Dagster's own deployment (PostgreSQL, dagster-daemon, dagster-webserver); "
        "deselect with -m 'not deployment'",
    )


# The heavy tests (a real daemon, webserver and PostgreSQL; a real browser) run one at a time on one
# xdist worker, beside the rest on the other: two of them at once on 2 cores would starve each other.
HEAVY_FILES = {"test_deployment.py", "test_ui_browser.py", "test_gallery.py"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("deployment") or item.path.name in HEAVY_FILES:
            item.add_marker(pytest.mark.xdist_group("heavy"))
