"""The deployment guide's files (examples/deploy/) are valid Dagster instance configuration.

The daemon itself runs on ``dagster.yaml`` in tests/test_deployment.py; here, every file is checked
against Dagster's instance schema without a database, and the launcher fragments name the secrets the
pipeline reads.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from dagster._core.instance.config import dagster_instance_config

GUIDE = Path(__file__).resolve().parents[1] / "examples" / "deploy"
DATABASE_ENV = {
    "DAGSTER_PG_HOST": "db.internal",
    "DAGSTER_PG_PORT": "5432",
    "DAGSTER_PG_DB": "dagster",
    "DAGSTER_PG_USERNAME": "dagster",
    "DAGSTER_PG_PASSWORD": "not-a-real-password",
}


@pytest.fixture
def database_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in DATABASE_ENV.items():
        monkeypatch.setenv(name, value)


def _validated(tmp_path: Path, *fragments: str) -> dict:
    merged: dict = yaml.safe_load((GUIDE / "dagster.yaml").read_text())
    for fragment in fragments:
        merged |= yaml.safe_load((GUIDE / fragment).read_text())
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(merged))
    config, _ = dagster_instance_config(str(tmp_path))
    return dict(config)


def test_the_guide_dagster_yaml_is_a_valid_instance_config_with_its_limits(
    tmp_path: Path, database_env
) -> None:
    shutil.copy(GUIDE / "dagster.yaml", tmp_path / "dagster.yaml")
    config, _ = dagster_instance_config(str(tmp_path))
    database = config["storage"]["postgres"]["postgres_db"]
    assert database.pop("scheme") == "postgresql+psycopg2"  # the driver the postgres extra installs
    assert all(
        isinstance(value, dict) and set(value) == {"env"} for value in database.values()
    )  # no literal in the file
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert config["concurrency"] == {"runs": {"max_concurrent_runs": 4}, "pools": {"default_limit": 2}}
    assert config["run_monitoring"]["max_resume_run_attempts"] == 0
    assert "not-a-real-password" not in (GUIDE / "dagster.yaml").read_text()


@pytest.mark.parametrize("fragment, module", [("docker.yaml", "dagster_docker"), ("k8s.yaml", "dagster_k8s")])
def test_each_run_launcher_fragment_merges_into_a_valid_config_and_passes_the_token(
    tmp_path: Path, database_env, fragment: str, module: str
) -> None:
    config = _validated(tmp_path, fragment)
    launcher = config["run_launcher"]
    assert launcher["module"] == module
    text = (GUIDE / fragment).read_text()
    assert "RUNCOMFY_API_TOKEN" in text  # passed through the launcher's own secret mechanism
    if module == "dagster_docker":
        assert "RUNCOMFY_API_TOKEN" in launcher["config"]["env_vars"]
    else:
        assert launcher["config"]["env_secrets"] == ["runcomfy-api"]
