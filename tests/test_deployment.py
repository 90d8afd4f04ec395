"""The pipeline on Dagster's own deployment: PostgreSQL storage, the real daemon and the webserver.

Everything here goes through the processes a user runs (``dagster-daemon run``, ``dagster-webserver``)
and GraphQL, never in-process Dagster APIs, so it proves what the unit tests cannot: the definitions
load in a code server, the sensors tick in the daemon, runs launch through the queued run coordinator
as separate processes, and Postgres storage holds the records.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from dagster import AssetKey

from dagster_runway.pipeline.checks import CHECK_NAMES
from tests.graphql_client import DOCUMENTS
from tests.pipeline_helpers import write_images

VIDEOS = "runway/videos"
GUIDE_YAML = Path(__file__).resolve().parents[1] / "examples" / "deploy" / "dagster.yaml"


def test_graphql_documents_match_dagster_graphql_schema() -> None:
    """Every document the harness sends is valid against the installed dagster-graphql (no server)."""
    from dagster_graphql.schema import create_schema
    from graphql import parse, validate

    schema = create_schema().graphql_schema
    problems = {
        name: [error.message for error in errors]
        for name, document in DOCUMENTS.items()
        if (errors := validate(schema, parse(document)))
    }
    assert not problems


@pytest.mark.deployment
def test_images_become_videos_on_a_real_deployment_within_its_run_and_pool_limits(
    deploy, tmp_path: Path
) -> None:
    images = write_images(tmp_path / "images", valid=8, invalid=False)
    options = '{"status_interval_s": 3, "discovery_interval_s": 3, "submit_batch_size": 2}'
    deployment = deploy(
        source=tmp_path / "images", output=tmp_path / "videos", time_scale=0.01,
        env={"RUNWAY_MISSING_PROMPT": "service_default", "RUNWAY_OPTIONS": options},
        max_concurrent_runs=2, pool_limits={"runcomfy_api": 1},
    )  # fmt: skip
    slow = {"kind": "slow", "endpoint": "submit", "delay_seconds": 0.3}  # submits take a while: steps overlap
    deployment.emulator_admin("POST", "/faults", json=slow).raise_for_status()
    gql = deployment.graphql
    assert gql.pool("runcomfy_api")["limit"] == 1
    started = time.monotonic()
    gql.start_sensor("runway_discovery_sensor")
    gql.start_sensor("runway_status_sensor")
    statuses = gql.wait_for_partitions(VIDEOS, count=8, timeout=240, on_poll=deployment.assert_alive)
    elapsed = time.monotonic() - started
    # The checks are reported after their partition's materialization, by the same step: let it end.
    runs = gql.wait_for_runs_finished(timeout=120, on_poll=deployment.assert_alive)
    assert {run["status"] for run in runs} == {"SUCCESS"}, runs
    print(f"startup {deployment.timings}; sensors on -> 8 videos in {elapsed:.1f}s")

    assert statuses["materialized"] == sorted(images)
    videos = sorted((tmp_path / "videos").glob("*.mp4"))
    assert len(videos) == 8 and all(video.stat().st_size > 0 for video in videos)
    ledger = deployment.ledger()
    assert ledger.billed_submissions == 8 and len(ledger.by_fingerprint) == 8
    _assert_checks_passed(gql, sorted(images))
    metadata = gql.latest_materialization_metadata(VIDEOS, sorted(images)[0])
    assert metadata["runway/request_id"] in {entry.request_id for entry in ledger.entries}

    # The queued run coordinator's limit (2 runs) and the API pool's limit (1 paid submit step) held.
    assert _max_overlap([(r["startTime"], r["endTime"]) for r in runs if r["startTime"]]) <= 2
    instance = deployment.instance()
    steps = []
    for run in runs:
        if run["jobName"] != "runway_submit_job":
            continue
        kinds = {"STEP_START": [], "STEP_SUCCESS": [], "STEP_FAILURE": []}
        for event in instance.all_logs(run["runId"]):
            if event.dagster_event and event.dagster_event.event_type_value in kinds:
                kinds[event.dagster_event.event_type_value].append(event.timestamp)
        steps.append((kinds["STEP_START"][0], (kinds["STEP_SUCCESS"] + kinds["STEP_FAILURE"])[-1]))
    assert len(steps) >= 4  # 8 images in submit runs of 2
    assert _max_overlap(steps) <= 1, steps


REQUESTS = "runway/requests"
QUIET_S = 10.0
FAST = {
    "RUNWAY_MISSING_PROMPT": "service_default",
    "RUNWAY_OPTIONS": '{"status_interval_s": 3, "discovery_interval_s": 3}',
}


def _outcomes(deployment) -> dict[str, tuple[str, str | None]]:
    """Per partition, from the instance's records: ("video", request id) or ("failed", failure class)."""
    from dagster_runway.pipeline import records as rec

    instance = deployment.instance()
    requests, videos = AssetKey.from_user_string(REQUESTS), AssetKey.from_user_string(VIDEOS)
    found: dict[str, tuple[str, str | None]] = {}
    for key in instance.get_dynamic_partitions("runway_images"):
        video = rec.latest_video(instance, videos, key)
        failure = rec.latest_failure(instance, (requests, videos), key)
        if video is not None and (failure is None or failure.storage_id < video.storage_id):
            found[key] = ("video", video.request_id)
        elif failure is not None:
            found[key] = ("failed", failure.failure_class)
    return found


def _settle(deployment, count: int, timeout: float = 240) -> dict[str, tuple[str, str | None]]:
    """Wait until every one of ``count`` partitions has a video or a failure and no run is left to finish."""

    def probe() -> tuple[dict[str, Any], list[Any]]:
        return _outcomes(deployment), deployment.graphql.runs(
            statuses=["QUEUED", "NOT_STARTED", "STARTING", "STARTED"]
        )

    # Settled means it stays so for a quiet period longer than two status ticks (3 s each here): between
    # two runs nothing is in progress, yet the sensor may still owe a collect or a resubmit.
    deadline = time.monotonic() + timeout
    while True:
        outcomes, _ = deployment.wait_until(
            probe, lambda state: len(state[0]) == count and not state[1], timeout=max(1.0, deadline - time.monotonic()),
            interval=1.0, what=f"{count} partitions with a video or a failure, and no run in progress",
        )  # fmt: skip
        time.sleep(QUIET_S)
        again, running = probe()
        if again == outcomes and not running:
            return outcomes
        assert time.monotonic() < deadline, f"not settled within {timeout:.0f}s: {again}, runs {running}"


def _assert_each_input_billed_once(deployment) -> None:
    ledger = deployment.ledger()
    assert all(total.billed_submissions <= 1 for total in ledger.by_fingerprint.values()), (
        ledger.by_fingerprint
    )


def _assert_checks_passed(gql, keys: list[str]) -> None:
    for check in CHECK_NAMES:
        statuses = gql.check_partition_statuses(VIDEOS, check)  # the check's Partitions tab
        assert statuses["succeeded"] == sorted(keys), (check, statuses)


@pytest.mark.deployment
def test_backfills_over_all_partitions_beside_active_sensors_end_green_and_pay_once(deploy, tmp_path: Path):
    images = tmp_path / "images"
    write_images(images, valid=6, invalid=False)
    # On the deployment guide's dagster.yaml, as it is (Postgres through DAGSTER_PG_*).
    deployment = deploy(
        source=images, output=tmp_path / "videos", time_scale=0.01, env=FAST, dagster_yaml=GUIDE_YAML
    )
    gql = deployment.graphql
    gql.start_sensor("runway_discovery_sensor")
    gql.start_sensor("runway_status_sensor")
    _settle(deployment, 6)
    assert deployment.ledger().billed_submissions == 6

    more = write_images(tmp_path / "more", valid=10, invalid=False)  # four new images among the done ones
    for name in sorted(more)[6:]:
        more[name].rename(images / f"new-{name}")
    deployment.wait_until(lambda: gql.partition_keys(VIDEOS), lambda keys: len(keys) == 10, timeout=60)
    backfill = gql.launch_backfill([REQUESTS, VIDEOS])  # "Materialize all", while the sensors are busy
    state = gql.wait_for_backfill(backfill, timeout=300, on_poll=deployment.assert_alive)
    assert state["status"] == "COMPLETED_SUCCESS", state
    assert state["assets"][VIDEOS]["materialized"] == 10 and state["assets"][VIDEOS]["failed"] == 0, state
    assert state["assets"][REQUESTS]["materialized"] == 10, state
    outcomes = _settle(deployment, 10)
    assert {kind for kind, _ in outcomes.values()} == {"video"}
    assert deployment.ledger().billed_submissions == 10
    _assert_each_input_billed_once(deployment)
    keys = sorted(outcomes)
    _assert_checks_passed(gql, keys)

    again = gql.wait_for_backfill(
        gql.launch_backfill([REQUESTS, VIDEOS]), timeout=300, on_poll=deployment.assert_alive
    )
    assert again["status"] == "COMPLETED_SUCCESS", again
    assert deployment.ledger().billed_submissions == 10  # the second, identical backfill bills nothing
    _settle(deployment, 10)
    _assert_checks_passed(gql, keys)
    reverified = gql.latest_materialization_metadata(VIDEOS, keys[0])
    assert reverified["runway/state"] == "verified" and reverified["runway/verified_unchanged"] is True


@pytest.mark.deployment
def test_a_daemon_restart_mid_submit_loses_nothing_and_leaves_nothing_stuck(deploy, tmp_path: Path):
    import threading

    images = write_images(tmp_path / "images", valid=12, invalid=False)
    for i, path in enumerate(sorted(images.values())):  # sidecar prompts pick who is held and who is flagged
        prompt = "held: a calm sea" if i < 4 else "flagged: a calm sea" if i == 5 else "a calm sea"
        path.with_suffix(".txt").write_text(prompt)
    deployment = deploy(source=tmp_path / "images", output=tmp_path / "videos", time_scale=0.01, env=FAST)
    hold = {"kind": "hold", "endpoint": "submit", "match_prompt": "held:"}
    safety = {"kind": "generation_failed", "match_prompt": "flagged:", "failure_code": "SAFETY.INPUT.IMAGE"}
    deployment.emulator_admin("POST", "/faults", json=[hold, safety]).raise_for_status()
    gql = deployment.graphql
    gql.start_sensor("runway_discovery_sensor")
    gql.start_sensor("runway_status_sensor")
    deployment.wait_until(
        lambda: deployment.emulator_admin("GET", "/held").json()["held"], lambda n: n == 4, timeout=180,
        what="four submit answers held",
    )  # fmt: skip
    claims = tmp_path / "videos" / ".runway" / "claims"
    deployment.wait_until(
        lambda: sum('"submitted"' in p.read_text() for p in claims.rglob("*.json")), lambda n: n >= 8, timeout=60,
        what="the other eight answers journaled",
    )  # fmt: skip

    # SIGTERM to the daemon's process group while the submit run waits for four answers; they are
    # released (billed, answered) while the run is going down.
    stopping = threading.Thread(target=deployment.stop_daemon)
    stopping.start()
    time.sleep(1.0)
    deployment.emulator_admin("DELETE", "/faults").raise_for_status()
    # The flagged image stays flagged: the dying run may cancel (refund) its request before the service
    # fails it, and then the restarted daemon submits it again.
    deployment.emulator_admin("POST", "/faults", json=[safety]).raise_for_status()
    deployment.emulator_admin("POST", "/release").raise_for_status()
    stopping.join(120)
    deployment.start_daemon()

    outcomes = _settle(deployment, 12, timeout=300)
    _assert_each_input_billed_once(deployment)  # cancelled ones were refunded before their resubmit
    failed = {k: cls for k, (kind, cls) in outcomes.items() if kind == "failed"}
    # What stays failed is explained: a generation the service rejected, or a submit whose answer was
    # held when its run died (billed, id unknown: the one window no client can close).
    held = {f"img{i:02d}.png" for i in range(4)}
    assert {k for k, cls in failed.items() if cls != "ambiguous"} == {"img05.png"}, outcomes
    assert failed["img05.png"] == "generation_safety", outcomes
    assert {k for k, cls in failed.items() if cls == "ambiguous"} <= held, outcomes  # the rest is collected

    # The failed generation says its code and the next step on its partition, where the UI shows it.
    (bad,) = [k for k, cls in failed.items() if cls == "generation_safety"]
    assert bad in gql.partition_statuses(VIDEOS)["failed"]
    observed = gql.latest_observation(VIDEOS, bad)
    assert observed["metadata"]["runway/failure_code"] == "SAFETY.INPUT.IMAGE"
    assert "change the image or its prompt" in observed["metadata"]["runway/next_step"]
    assert "SAFETY.INPUT.IMAGE" in observed["description"]


def _max_overlap(spans: list[tuple[float, float]]) -> int:
    points = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    current = best = 0
    for _, delta in points:
        current += delta
        best = max(best, current)
    return best
