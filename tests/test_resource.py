"""``RunComfyResource``: configuration only, clients handed out per execution, token never shown."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import dagster as dg
import pytest

from dagster_runway import AsyncRunComfyClient, RunComfyClient, RunComfyResource
from dagster_runway.emulator import Emulator
from dagster_runway.schema import RequestState
from tests.test_client import image_input

TOKEN = "rc_live_RESOURCE_5e4d3c2b1a"


@pytest.fixture
def emu(emulator_factory: Callable[..., Emulator], monkeypatch: pytest.MonkeyPatch) -> Emulator:
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", TOKEN)
    return emulator_factory(tokens=[TOKEN])


def make_resource(emu: Emulator, **overrides: object) -> RunComfyResource:
    config: dict[str, object] = {
        "api_token": dg.EnvVar("RUNCOMFY_API_TOKEN"),
        "base_url": emu.base_url,
        "poll_interval": 0.01,
        "backoff_initial": 0.01,
        "backoff_max": 0.02,
    }
    return RunComfyResource(**(config | overrides))


def test_env_var_token_through_build_resources(emu: Emulator) -> None:
    with dg.build_resources({"runcomfy": make_resource(emu)}) as resources:
        runcomfy: RunComfyResource = resources.runcomfy
        client = runcomfy.get_client()
        assert runcomfy.get_client() is client  # one client per execution
        request_id = client.submit(image_input()).request_id
        assert client.wait(request_id, timeout=30).status is RequestState.SUCCEEDED
        for text in (repr(runcomfy), str(runcomfy), repr(client)):
            assert TOKEN not in text
        assert emu.base_url in repr(runcomfy)
    # Teardown closed the client's connections.
    with pytest.raises(RuntimeError):
        client.status(request_id)
    assert emu.ledger().billed_submissions == 1


def test_a_missing_env_var_is_named(emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RUNCOMFY_API_TOKEN", raising=False)
    with (
        pytest.raises(dg.DagsterInvalidConfigError, match="RUNCOMFY_API_TOKEN"),
        dg.build_resources({"runcomfy": make_resource(emulator)}),
    ):
        pass


def test_setup_and_teardown_with_build_init_resource_context(emu: Emulator) -> None:
    resource = RunComfyResource(api_token=TOKEN, base_url=emu.base_url, poll_interval=0.01)
    context = dg.build_init_resource_context()
    resource.setup_for_execution(context)
    client = resource.get_client()
    assert isinstance(client, RunComfyClient)
    request_id = client.submit(image_input()).request_id
    assert client.status(request_id).request_id == request_id
    resource.teardown_after_execution(context)
    with pytest.raises(RuntimeError):
        client.status(request_id)
    # A later get_client opens a fresh client rather than handing out the closed one.
    fresh = resource.get_client()
    assert fresh is not client
    assert fresh.status(request_id).request_id == request_id
    fresh.close()


def test_configuration_reaches_the_clients(emu: Emulator) -> None:
    resource = RunComfyResource(
        api_token=TOKEN,
        base_url=emu.base_url + "/",
        max_attempts=7,
        backoff_initial=0.1,
        backoff_max=3.0,
        retry_deadline=30.0,
        retry_after_max=9.0,
        poll_interval=2.5,
        max_concurrency=5,
    )
    policy = resource.retry_policy
    assert (policy.max_attempts, policy.backoff_initial, policy.backoff_max, policy.deadline) == (
        7,
        0.1,
        3.0,
        30.0,
    )
    assert policy.retry_after_max == 9.0
    client = resource.get_client()
    assert client.base_url == emu.base_url and client.poll_interval == 2.5
    assert client.model_id == "runwayml/runway-gen-4/turbo/image-to-video"
    aclient = resource.get_async_client()
    assert aclient.max_concurrency == 5 and aclient.base_url == emu.base_url
    client.close()
    asyncio.run(aclient.aclose())


def test_get_async_client_works_against_the_emulator(emu: Emulator) -> None:
    with dg.build_resources({"runcomfy": make_resource(emu, max_concurrency=4)}) as resources:
        runcomfy: RunComfyResource = resources.runcomfy

        async def run() -> AsyncRunComfyClient:
            async with runcomfy.get_async_client() as client:
                submissions = await asyncio.gather(*(client.submit(image_input(f"n{n}")) for n in range(3)))
                results = await asyncio.gather(*(client.wait(s.request_id, timeout=30) for s in submissions))
                assert [result.status for result in results] == [RequestState.SUCCEEDED] * 3
                statuses = await client.status_many([s.request_id for s in submissions])
                assert {status.status for status in statuses.values()} == {RequestState.COMPLETED}  # type: ignore[union-attr]
            return client

        first = asyncio.run(run())
        second = asyncio.run(run())  # each event loop gets its own client
        assert first is not second
        assert TOKEN not in repr(first)
    assert emu.ledger().billed_submissions == 6


def test_every_field_has_a_description() -> None:
    fields = RunComfyResource.model_fields
    assert len(fields) >= 10
    for name, field in fields.items():
        assert field.description and len(field.description) > 10, name
    # The same descriptions reach the config schema the Dagster UI shows.
    schema_fields = RunComfyResource.to_config_schema().as_field().config_type.fields  # type: ignore[attr-defined]
    assert set(schema_fields) == set(fields)
    for name, field in schema_fields.items():
        assert field.description == fields[name].description, name


def test_the_token_stays_out_of_a_materialization(emu: Emulator) -> None:
    @dg.asset
    def one_video(runcomfy: RunComfyResource) -> dg.MaterializeResult:
        client = runcomfy.get_client()
        result = client.wait(client.submit(image_input()).request_id, timeout=30)
        return dg.MaterializeResult(metadata={"video_url": result.video_url, "resource": repr(runcomfy)})

    with dg.instance_for_test() as instance:
        outcome = dg.materialize([one_video], resources={"runcomfy": make_resource(emu)}, instance=instance)
        assert outcome.success
        materialization = outcome.asset_materializations_for_node("one_video")[0]
        assert str(materialization.metadata["video_url"].value).startswith(emu.base_url)
        events = instance.all_logs(outcome.run_id)
        assert events
        for event in events:
            assert TOKEN not in str(event)
        assert TOKEN not in str(instance.get_run_by_id(outcome.run_id))
    assert emu.ledger().billed_submissions == 1


def test_the_resource_takes_the_clients_defaults_except_where_it_says_why() -> None:
    from dagster_runway.client import _defaults as d
    from dagster_runway.resource import RunComfyResource
    from dagster_runway.retry import RetryPolicy

    fields = RunComfyResource.model_fields
    retry = RetryPolicy()
    same = {
        "request_timeout": d.REQUEST_TIMEOUT_S, "connect_timeout": d.CONNECT_TIMEOUT_S,
        "poll_interval": d.POLL_INTERVAL_S, "max_attempts": retry.max_attempts,
        "backoff_initial": retry.backoff_initial, "backoff_max": retry.backoff_max,
        "retry_deadline": retry.deadline, "retry_after_max": retry.retry_after_max,
    }  # fmt: skip
    assert {name: fields[name].default for name in same} == same
    for name, client_default in (("wait_timeout", d.WAIT_TIMEOUT_S), ("max_concurrency", d.MAX_CONCURRENCY)):
        assert fields[name].default != client_default and "the client's" in (fields[name].description or "")
