"""The dg Component: configured from YAML, built from the one options model, and found by ``dg``."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import yaml

from dagster_runway import RunComfyResource, RunwayPipelineComponent, build_runway_pipeline
from dagster_runway.pipeline import RunwayPipelineConfig

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "component_project"
DG = Path(sys.executable).with_name("dg")


def _defs(yaml: str) -> dg.Definitions:
    return dg.build_defs_for_component(RunwayPipelineComponent.resolve_from_yaml(yaml))


def test_every_pipeline_option_is_a_component_attribute_with_its_description() -> None:
    attributes = RunwayPipelineComponent.model_fields
    for name, field in RunwayPipelineConfig.model_fields.items():
        assert name in attributes, name
        assert attributes[name].description == field.description, name
    assert set(attributes) - set(RunwayPipelineConfig.model_fields) == {
        "api_token_env",
        "base_url",
        "model_id",
    }


def test_the_component_builds_what_the_factory_builds_with_the_token_by_name(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    defs = _defs(
        f"""
source: {tmp_path}/images
output: {tmp_path}/videos
defaults: {{prompt_text: "slow dolly-in", ratio: auto}}
max_spend_usd: 5
api_token_env: MY_RUNCOMFY_TOKEN
base_url: http://127.0.0.1:8188
"""
    )
    token = RunComfyResource(api_token=dg.EnvVar("MY_RUNCOMFY_TOKEN"))
    factory = build_runway_pipeline(f"{tmp_path}/images", f"{tmp_path}/videos", resource=token)
    keys = lambda d: sorted(k.to_user_string() for k in d.resolve_asset_graph().get_all_asset_keys())  # noqa: E731
    assert keys(defs) == keys(factory)
    assert sorted(s.name for s in defs.sensors) == sorted(s.name for s in factory.sensors)
    assert sorted(j.name for j in defs.jobs) == sorted(j.name for j in factory.jobs)
    resource = defs.resources["runcomfy_runway"]  # another token and service: a key of its own
    assert (
        isinstance(resource.api_token, dg.EnvVar) and resource.api_token.env_var_name == "MY_RUNCOMFY_TOKEN"
    )
    assert resource.base_url == "http://127.0.0.1:8188"
    sensor = next(s for s in defs.sensors if s.name.endswith("discovery_sensor"))
    assert (
        sensor.minimum_interval_seconds == RunwayPipelineConfig.model_fields["discovery_interval_s"].default
    )


def test_two_pipelines_with_other_services_load_side_by_side_and_identical_ones_share(tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()

    def component(name: str, extra: str = "", prefix: str = "") -> dg.Definitions:
        return _defs(
            f"source: {tmp_path}/{name}\noutput: {tmp_path}/{prefix or name}-out\nkey_prefix: [{prefix or name}]\n{extra}"
        )

    defs = dg.Definitions.merge(
        component("a"),
        component("b", "base_url: http://127.0.0.1:8188\n"),
        component("c", "api_token_env: OTHER_TOKEN\n"),
        component("a", prefix="d"),  # the same service and token as "a": one resource, shared
    )
    assert sorted(defs.resources) == ["runcomfy", "runcomfy_b", "runcomfy_c"]
    assert defs.resources["runcomfy_b"].base_url == "http://127.0.0.1:8188"
    assert defs.resources["runcomfy_c"].api_token.env_var_name == "OTHER_TOKEN"
    status = {s.name: s for s in defs.sensors}["b_status_sensor"]
    assert status.required_resource_keys == {"runcomfy_b"}


def test_a_local_source_folder_that_does_not_exist_fails_at_load_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(Exception, match=r"source .*missing does not exist; create it") as failed:
        _defs(f"source: {tmp_path}/missing\noutput: {tmp_path}/v\n")
    assert "defs.yaml" in str(failed.value)
    _defs(f"source: s3://not-listed-at-load/x\noutput: {tmp_path}/v\n")  # a bucket is not read at load


def test_a_bad_attribute_is_named_by_the_options_model(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="max_run_attempts"):
        _defs(f"source: {tmp_path}\noutput: {tmp_path}/v\nmax_run_attempts: 0\n")
    with pytest.raises(Exception, match="missing_prompt"):
        _defs(f"source: {tmp_path}\noutput: {tmp_path}/v\nmissing_prompt: maybe\n")


def test_the_component_is_registered_for_dg() -> None:
    entry_points = importlib.metadata.entry_points(group="dagster_dg_cli.registry_modules")
    assert "dagster_runway.component" in {entry.value for entry in entry_points}
    from dagster_shared.libraries import DagsterLibraryRegistry

    import dagster_runway.resource  # noqa: F401 - registers the library

    assert DagsterLibraryRegistry.get()["dagster-runway"] == dagster_runway.__version__


def _dg(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DAGSTER_DISABLE_TELEMETRY": "1"}
    return subprocess.run([str(DG), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("where", [REPO, EXAMPLE], ids=["repo", "example-project"])
def test_dg_check_and_list_defs_pass(where: Path) -> None:
    checked = _dg("check", "defs", cwd=where)
    assert checked.returncode == 0, checked.stdout[-3000:] + checked.stderr[-3000:]
    assert "All definitions loaded successfully" in checked.stdout + checked.stderr
    listed = _dg("list", "defs", "--json", cwd=where)
    assert listed.returncode == 0, listed.stderr[-3000:]
    found = json.loads(listed.stdout)
    assert len(found["assets"]) == 3 and len(found["asset_checks"]) == 5 and len(found["sensors"]) == 2


def test_dg_scaffolds_the_component_into_a_project(tmp_path: Path) -> None:
    project = tmp_path / "project"
    shutil.copytree(EXAMPLE, project, ignore=shutil.ignore_patterns("out", "__pycache__"))
    missing = _dg(
        "check", "defs", cwd=project
    )  # the copy's ../images is not there: said at load, not at a tick
    assert (
        missing.returncode != 0
        and f"source {tmp_path / 'images'} does not exist" in missing.stdout + missing.stderr
    )
    shutil.copytree(REPO / "examples" / "images", tmp_path / "images")
    listed = _dg("list", "components", cwd=project)
    assert "dagster_runway.component.RunwayPipelineComponent" in listed.stdout, listed.stdout + listed.stderr
    readme = (REPO / "README.md").read_text()
    (line,) = [line for line in readme.splitlines() if line.startswith("dg scaffold defs ")]
    as_written = _dg(*line.split()[1:], cwd=project)  # the README's own line works inside the example project
    assert as_written.returncode == 0, as_written.stderr[-3000:]
    assert yaml.safe_load((project / "runway_videos" / "defs" / "campaign" / "defs.yaml").read_text())[
        "attributes"
    ]["key_prefix"] == ["campaign"]
    shutil.rmtree(project / "runway_videos" / "defs" / "campaign")
    scaffolded = _dg(
        "scaffold", "defs", "dagster_runway.component.RunwayPipelineComponent", "more_videos",
        "--source", "s3://stills/in/", "--max-spend-usd", "2.5",
        cwd=project,
    )  # fmt: skip
    assert scaffolded.returncode == 0, scaffolded.stderr[-3000:]
    written = (project / "runway_videos" / "defs" / "more_videos" / "defs.yaml").read_text()
    attributes = yaml.safe_load(written)["attributes"]
    assert yaml.safe_load(written)["type"] == "dagster_runway.component.RunwayPipelineComponent"
    assert attributes["source"] == "s3://stills/in/" and attributes["max_spend_usd"] == 2.5
    assert attributes["key_prefix"] == ["more_videos"] and attributes["api_token_env"] == "RUNCOMFY_API_TOKEN"
    assert (
        attributes["output"] == "{{ context.project_root }}/videos" and attributes["missing_prompt"] == "fail"
    )
    # The scaffolded pipeline loads beside the project's first one: its own prefix, jobs and sensors.
    checked = _dg("check", "defs", cwd=project)
    assert checked.returncode == 0, checked.stdout[-3000:] + checked.stderr[-3000:]
    listed = _dg("list", "defs", "--json", cwd=project)
    found = json.loads(listed.stdout)
    assert len(found["assets"]) == 6 and len(found["sensors"]) == 4, listed.stdout[-2000:]
    assert {a["asset_key"] for a in found["assets"] if a["group_name"] == "more_videos"} == {
        "more_videos/images",
        "more_videos/requests",
        "more_videos/videos",
    }
