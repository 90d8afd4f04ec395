"""Shared fixtures. Each area keeps its fixtures in its own module under tests/fixtures/."""

import pytest

pytest_plugins = [
    "tests.fixtures.emulator",
    "tests.fixtures.s3",
    "tests.fixtures.deployment",
]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "deployment: runs on Dagster's own deployment (PostgreSQL, dagster-daemon, dagster-webserver); "
        "deselect with -m 'not deployment'",
    )
