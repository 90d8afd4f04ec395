"""A small client of the Dagster webserver's GraphQL API, for tests that drive a real deployment.

Not named ``graphql.py`` (it would shadow graphql-core for anything that puts ``tests/`` on the path) nor
``gql.py`` (the webserver crashes when that module is importable from its working directory).

Every call fails loudly: a GraphQL ``errors`` list, or a result whose ``__typename`` is an error type
(``PythonError``, ``SensorNotFoundError``, ``RunConfigValidationInvalid``, ...), raises ``GraphQLError``
with the message and, for ``PythonError``, the stack. ``wait_until`` polls with a timeout and raises
``WaitTimeout`` with the last state it observed.

Asset keys are given as ``"runway/videos"`` or ``["runway", "videos"]``.
"""

from __future__ import annotations

import json
import pprint
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import httpx

T = TypeVar("T")

AssetKeyLike = str | Sequence[str]

# Union members that are failures but whose type name does not end in "Error".
_FAILURE_TYPES = {
    "AssetCheckNeedsUserCodeUpgrade",
    "PipelineConfigValidationInvalid",
    "ReloadNotSupported",
    "RepositoryLocationNotFound",
    "RunConfigValidationInvalid",
    "RunConflict",
    "TerminateRunFailure",
}

# For unions without PythonError (AssetNodeOrError, AssetCheckOrError) ...
_ERROR_FIELDS = """
    __typename
    ... on Error { message }
"""
# ... and for those with it.
_PY_ERROR_FIELDS = """
    __typename
    ... on Error { message }
    ... on PythonError { stack cause { message } }
"""

IN_PROGRESS_RUN_STATUSES = ("QUEUED", "NOT_STARTED", "STARTING", "STARTED", "CANCELING")
FINISHED_RUN_STATUSES = ("SUCCESS", "FAILURE", "CANCELED")
FINISHED_BACKFILL_STATUSES = ("COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED")


class GraphQLError(AssertionError):
    """The webserver answered with GraphQL errors or an error result."""


class WaitTimeout(AssertionError):
    """A wait ran out of time; the message carries the last observed state."""


def asset_key_input(key: AssetKeyLike) -> dict[str, list[str]]:
    return {"path": key.split("/") if isinstance(key, str) else list(key)}


def metadata_value(entry: Mapping[str, Any]) -> Any:
    """The Python value of one GraphQL ``MetadataEntry`` (as selected by ``METADATA_FIELDS``)."""
    kind = entry.get("__typename")
    if kind == "JsonMetadataEntry":
        return json.loads(entry["jsonString"])
    if kind == "NullMetadataEntry":
        return None
    for field in (
        "text",
        "intValue",
        "floatValue",
        "boolValue",
        "path",
        "url",
        "mdStr",
        "timestamp",
        "runId",
        "pool",
        "jobName",
    ):
        if field in entry:
            if field == "floatValue" and entry[field] is None:
                return float(entry["floatRepr"])  # nan and inf come as text only
            return entry[field]
    if "assetKey" in entry:
        return "/".join(entry["assetKey"]["path"])
    return {k: v for k, v in entry.items() if k not in ("__typename", "label", "description")}


METADATA_FIELDS = """
    __typename
    label
    ... on TextMetadataEntry { text }
    ... on IntMetadataEntry { intValue }
    ... on FloatMetadataEntry { floatValue floatRepr }
    ... on BoolMetadataEntry { boolValue }
    ... on JsonMetadataEntry { jsonString }
    ... on PathMetadataEntry { path }
    ... on NotebookMetadataEntry { path }
    ... on UrlMetadataEntry { url }
    ... on MarkdownMetadataEntry { mdStr }
    ... on TimestampMetadataEntry { timestamp }
    ... on PipelineRunMetadataEntry { runId }
    ... on PoolMetadataEntry { pool }
    ... on AssetMetadataEntry { assetKey { path } }
    ... on JobMetadataEntry { jobName }
"""


def _find_failures(value: Any, path: str = "") -> list[str]:
    """Every error result in a GraphQL answer: dicts whose ``__typename`` names a failure."""
    found: list[str] = []
    if isinstance(value, dict):
        kind = value.get("__typename")
        if isinstance(kind, str) and (kind.endswith("Error") or kind in _FAILURE_TYPES):
            text = f"{path or '<root>'}: {kind}: {value.get('message', '')}"
            if value.get("stack"):
                text += "\n" + "".join(value["stack"])
            cause = value.get("cause")
            if cause and cause.get("message"):
                text += f"\ncaused by: {cause['message']}"
            found.append(text)
        for key, item in value.items():
            found += _find_failures(item, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _find_failures(item, f"{path}[{index}]")
    return found


def wait_until(
    probe: Callable[[], T],
    done: Callable[[T], bool],
    *,
    timeout: float,
    interval: float = 0.5,
    what: str = "condition",
    retry_on: tuple[type[BaseException], ...] = (),
    on_poll: Callable[[], None] | None = None,
) -> T:
    """Call ``probe`` until ``done(result)``; return that result.

    Exceptions in ``retry_on`` count as "not yet" (and are reported as the last state); any other
    exception propagates at once. ``on_poll`` runs before every probe (e.g. to check that the
    processes are still alive). On timeout, raises ``WaitTimeout`` with the last observed state.
    """
    deadline = time.monotonic() + timeout
    last: Any = "<never observed>"
    while True:
        if on_poll is not None:
            on_poll()
        try:
            result = probe()
        except retry_on as exc:
            last = f"{type(exc).__name__}: {exc}"
        else:
            if done(result):
                return result
            last = result
        if time.monotonic() >= deadline:
            shown = last if isinstance(last, str) else pprint.pformat(last, width=110, compact=True)
            if len(shown) > 6000:
                shown = shown[:6000] + " ..."
            raise WaitTimeout(f"{what}: not reached within {timeout:.0f}s; last observed state:\n{shown}")
        time.sleep(interval)


# -- the documents (module constants, so a test can validate them against dagster_graphql's schema) --

Q_VERSION = "query Version { version }"
Q_SHOULD_SHOW_NUX = "query ShouldShowNux { shouldShowNux }"
M_SET_NUX_SEEN = "mutation SetNuxSeen { setNuxSeen }"

Q_LOCATIONS = f"""query Locations {{
  workspaceOrError {{
    {_PY_ERROR_FIELDS}
    ... on Workspace {{
      locationEntries {{
        name
        loadStatus
        locationOrLoadError {{
          __typename
          ... on RepositoryLocation {{ name repositories {{ name }} }}
          ... on PythonError {{ message stack }}
        }}
      }}
    }}
  }}
}}"""

M_RELOAD_LOCATION = f"""mutation ReloadLocation($name: String!) {{
  reloadRepositoryLocation(repositoryLocationName: $name) {{ {_PY_ERROR_FIELDS} }}
}}"""

Q_DAEMON_STATUSES = """query DaemonStatuses {
  instance { daemonHealth { allDaemonStatuses {
    daemonType required healthy lastHeartbeatTime lastHeartbeatErrors { message }
  } } }
}"""

M_SET_POOL_LIMIT = """mutation SetPoolLimit($key: String!, $limit: Int!) {
  setConcurrencyLimit(concurrencyKey: $key, limit: $limit)
}"""

Q_POOL = """query Pool($key: String) {
  instance { concurrencyLimit(concurrencyKey: $key) {
    concurrencyKey slotCount limit usingDefaultLimit activeSlotCount activeRunIds pendingStepCount
  } }
}"""

Q_RUN_QUEUE_CONFIG = "query RunQueueConfig { instance { runQueueConfig { maxConcurrentRuns } } }"

Q_SENSOR = f"""query Sensor($selector: SensorSelector!) {{
  sensorOrError(sensorSelector: $selector) {{
    {_PY_ERROR_FIELDS}
    ... on Sensor {{
      name
      minIntervalSeconds
      sensorState {{
        id
        status
        ticks(limit: 5) {{ id status timestamp runIds skipReason error {{ message }} }}
      }}
    }}
  }}
}}"""

M_START_SENSOR = f"""mutation StartSensor($selector: SensorSelector!) {{
  startSensor(sensorSelector: $selector) {{
    {_PY_ERROR_FIELDS}
    ... on Sensor {{ sensorState {{ status }} }}
  }}
}}"""

M_STOP_SENSOR = f"""mutation StopSensor($id: String!) {{
  stopSensor(id: $id) {{
    {_PY_ERROR_FIELDS}
    ... on StopSensorMutationResult {{ instigationState {{ status }} }}
  }}
}}"""

M_LAUNCH_BACKFILL = f"""mutation LaunchBackfill($params: LaunchBackfillParams!) {{
  launchPartitionBackfill(backfillParams: $params) {{
    {_PY_ERROR_FIELDS}
    ... on LaunchBackfillSuccess {{ backfillId }}
  }}
}}"""

Q_BACKFILL = f"""query Backfill($id: String!) {{
  partitionBackfillOrError(backfillId: $id) {{
    {_PY_ERROR_FIELDS}
    ... on PartitionBackfill {{
      id
      status
      numPartitions
      endTimestamp
      error {{ message stack }}
      runs(limit: 1000) {{ runId status }}
      assetBackfillData {{
        assetBackfillStatuses {{
          __typename
          ... on AssetPartitionsStatusCounts {{
            assetKey {{ path }}
            numPartitionsTargeted
            numPartitionsInProgress
            numPartitionsMaterialized
            numPartitionsFailed
          }}
          ... on UnpartitionedAssetStatus {{ assetKey {{ path }} inProgress materialized failed }}
        }}
      }}
    }}
  }}
}}"""

M_CANCEL_BACKFILL = f"""mutation CancelBackfill($id: String!) {{
  cancelPartitionBackfill(backfillId: $id) {{ {_PY_ERROR_FIELDS} }}
}}"""

Q_RUNS = f"""query Runs($filter: RunsFilter, $limit: Int) {{
  runsOrError(filter: $filter, limit: $limit) {{
    {_PY_ERROR_FIELDS}
    ... on Runs {{
      results {{ runId status jobName creationTime startTime endTime tags {{ key value }} }}
    }}
  }}
}}"""

M_TERMINATE_RUN = f"""mutation TerminateRun($id: String!) {{
  terminateRun(runId: $id) {{ {_PY_ERROR_FIELDS} }}
}}"""

Q_PARTITION_STATUSES = f"""query PartitionStatuses($key: AssetKeyInput!) {{
  assetNodeOrError(assetKey: $key) {{
    {_ERROR_FIELDS}
    ... on AssetNode {{
      assetPartitionStatuses {{
        __typename
        ... on DefaultPartitionStatuses {{
          materializedPartitions failedPartitions materializingPartitions unmaterializedPartitions
        }}
      }}
    }}
  }}
}}"""

Q_PARTITION_KEYS = f"""query PartitionKeys($key: AssetKeyInput!) {{
  assetNodeOrError(assetKey: $key) {{ {_ERROR_FIELDS} ... on AssetNode {{ partitionKeys }} }}
}}"""

Q_CHECK_PARTITION_STATUSES = f"""query CheckPartitionStatuses($key: AssetKeyInput!, $check: String!) {{
  assetNodeOrError(assetKey: $key) {{
    {_ERROR_FIELDS}
    ... on AssetNode {{
      partitionKeys
      assetCheckOrError(checkName: $check) {{
        {_ERROR_FIELDS}
        ... on AssetCheck {{
          partitionStatuses {{
            __typename
            ... on AssetCheckDefaultPartitionStatuses {{
              succeededPartitions failedPartitions inProgressPartitions skippedPartitions
              executionFailedPartitions
            }}
          }}
        }}
      }}
    }}
  }}
}}"""

Q_CHECK_EXECUTIONS = f"""query CheckExecutions(
  $key: AssetKeyInput!, $check: String!, $partition: String, $limit: Int!
) {{
  assetCheckExecutions(assetKey: $key, checkName: $check, partition: $partition, limit: $limit) {{
    runId status partition timestamp
    evaluation {{
      success severity description partition
      targetMaterialization {{ runId storageId timestamp }}
      metadataEntries {{ {METADATA_FIELDS} }}
    }}
  }}
}}"""

Q_LATEST_MATERIALIZATION = f"""query LatestMaterialization($key: AssetKeyInput!, $partitions: [String!]) {{
  assetNodeOrError(assetKey: $key) {{
    {_ERROR_FIELDS}
    ... on AssetNode {{
      latestMaterializationByPartition(partitions: $partitions) {{
        runId partition timestamp
        tags {{ key value }}
        metadataEntries {{ {METADATA_FIELDS} }}
      }}
    }}
  }}
}}"""

Q_LATEST_OBSERVATION = f"""query LatestObservation($key: AssetKeyInput!, $partitions: [String!]) {{
  assetNodeOrError(assetKey: $key) {{
    {_ERROR_FIELDS}
    ... on AssetNode {{
      assetObservations(partitions: $partitions, limit: 1) {{
        runId partition timestamp description
        metadataEntries {{ {METADATA_FIELDS} }}
      }}
    }}
  }}
}}"""

DOCUMENTS = {name: value for name, value in dict(globals()).items() if name.startswith(("Q_", "M_"))}


class DagsterGraphQL:
    """GraphQL calls to one Dagster webserver (``base_url`` like ``http://127.0.0.1:3000``)."""

    def __init__(self, base_url: str, timeout: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout)
        self._repository: dict[str, str] | None = None

    def close(self) -> None:
        self.http.close()

    # -- core ------------------------------------------------------------------------------------

    def query(self, document: str, variables: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Run a query or mutation; return ``data``. Raises ``GraphQLError`` on any error or error result."""
        response = self.http.post("/graphql", json={"query": document, "variables": dict(variables or {})})
        try:
            body = response.json()
        except ValueError:
            raise GraphQLError(
                f"POST {self.base_url}/graphql answered {response.status_code} with non-JSON: "
                f"{response.text[:2000]}"
            ) from None
        if body.get("errors"):
            messages = "\n".join(
                f"- {error.get('message')} (at {error.get('path')})" for error in body["errors"]
            )
            raise GraphQLError(f"GraphQL errors:\n{messages}\nquery:\n{document.strip()}")
        if response.status_code != 200:
            raise GraphQLError(f"POST /graphql answered {response.status_code}: {response.text[:2000]}")
        data = body.get("data") or {}
        failures = _find_failures(data)
        if failures:
            raise GraphQLError("GraphQL error result(s):\n" + "\n".join(failures))
        return data

    @staticmethod
    def expect(result: Mapping[str, Any], *typenames: str) -> Mapping[str, Any]:
        """``result`` itself, after checking that its ``__typename`` is one of ``typenames``."""
        if result.get("__typename") not in typenames:
            raise GraphQLError(f"expected {' or '.join(typenames)}, got {pprint.pformat(result)}")
        return result

    # -- server and workspace --------------------------------------------------------------------

    def version(self) -> str:
        return str(self.query(Q_VERSION)["version"])

    def locations(self) -> list[dict[str, Any]]:
        """Code locations: ``name``, ``loadStatus`` (LOADING, LOADED), ``locationOrLoadError``."""
        return list(self.query(Q_LOCATIONS)["workspaceOrError"]["locationEntries"])

    def repository_selector(self) -> dict[str, str]:
        """``repositoryName`` and ``repositoryLocationName`` of the one loaded repository."""
        if self._repository is None:
            repositories = [
                {"repositoryName": repo["name"], "repositoryLocationName": entry["name"]}
                for entry in self.locations()
                if (entry.get("locationOrLoadError") or {}).get("__typename") == "RepositoryLocation"
                for repo in entry["locationOrLoadError"]["repositories"]
            ]
            if len(repositories) != 1:
                raise GraphQLError(f"expected exactly one loaded repository, found {repositories}")
            self._repository = repositories[0]
        return dict(self._repository)

    def reload_location(self, name: str) -> None:
        self.expect(
            self.query(M_RELOAD_LOCATION, {"name": name})["reloadRepositoryLocation"],
            "WorkspaceLocationEntry",
        )
        self._repository = None

    def set_nux_seen(self) -> None:
        """Dismiss the UI's first-visit "Join the Dagster community" modal for this DAGSTER_HOME."""
        self.query(M_SET_NUX_SEEN)
        if self.query(Q_SHOULD_SHOW_NUX)["shouldShowNux"]:
            raise GraphQLError("setNuxSeen succeeded but shouldShowNux is still true")

    def daemon_statuses(self) -> list[dict[str, Any]]:
        """``daemonType``, ``required``, ``healthy``, ``lastHeartbeatTime`` of every daemon."""
        return list(self.query(Q_DAEMON_STATUSES)["instance"]["daemonHealth"]["allDaemonStatuses"])

    # -- concurrency -----------------------------------------------------------------------------

    def set_pool_limit(self, pool: str, limit: int) -> None:
        if not self.query(M_SET_POOL_LIMIT, {"key": pool, "limit": limit})["setConcurrencyLimit"]:
            raise GraphQLError(f"setConcurrencyLimit({pool!r}, {limit}) returned false")

    def pool(self, pool: str) -> dict[str, Any]:
        """A pool's ``slotCount``, ``limit``, ``usingDefaultLimit``, ``activeSlotCount``, ``pendingStepCount``."""
        return dict(self.query(Q_POOL, {"key": pool})["instance"]["concurrencyLimit"])

    def run_queue_config(self) -> dict[str, Any]:
        return dict(self.query(Q_RUN_QUEUE_CONFIG)["instance"]["runQueueConfig"])

    # -- sensors ---------------------------------------------------------------------------------

    def _sensor_selector(self, name: str) -> dict[str, Any]:
        return {"selector": {**self.repository_selector(), "sensorName": name}}

    def sensor(self, name: str) -> dict[str, Any]:
        """``name``, ``minIntervalSeconds`` and ``sensorState`` (``id``, ``status``, recent ``ticks``)."""
        return dict(self.expect(self.query(Q_SENSOR, self._sensor_selector(name))["sensorOrError"], "Sensor"))

    def start_sensor(self, name: str) -> str:
        """Turn a sensor on; return its status (``RUNNING``)."""
        result = self.expect(self.query(M_START_SENSOR, self._sensor_selector(name))["startSensor"], "Sensor")
        status = str(result["sensorState"]["status"])
        if status != "RUNNING":
            raise GraphQLError(f"startSensor({name!r}) left it {status}")
        return status

    def stop_sensor(self, name: str) -> str:
        """Turn a sensor off; return its status (``STOPPED``)."""
        state_id = self.sensor(name)["sensorState"]["id"]
        result = self.expect(
            self.query(M_STOP_SENSOR, {"id": state_id})["stopSensor"], "StopSensorMutationResult"
        )
        status = str(result["instigationState"]["status"])
        if status != "STOPPED":
            raise GraphQLError(f"stopSensor({name!r}) left it {status}")
        return status

    # -- backfills -------------------------------------------------------------------------------

    def launch_backfill(
        self,
        asset_keys: Iterable[AssetKeyLike],
        *,
        partition_names: Sequence[str] | None = None,
        title: str | None = None,
        tags: Mapping[str, str] | None = None,
        run_config: Mapping[str, Any] | None = None,
    ) -> str:
        """Launch an asset backfill over all partitions (or ``partition_names``); return its id."""
        params: dict[str, Any] = {"assetSelection": [asset_key_input(k) for k in asset_keys]}
        if partition_names is None:
            params["allPartitions"] = True
        else:
            params["partitionNames"] = list(partition_names)
        if title:
            params["title"] = title
        if tags:
            params["tags"] = [{"key": k, "value": v} for k, v in tags.items()]
        if run_config:
            params["runConfigData"] = dict(run_config)
        result = self.query(M_LAUNCH_BACKFILL, {"params": params})["launchPartitionBackfill"]
        return str(self.expect(result, "LaunchBackfillSuccess")["backfillId"])

    def backfill(self, backfill_id: str) -> dict[str, Any]:
        """A backfill's ``status``, ``numPartitions``, ``endTimestamp``, ``error``, ``runs`` (id and status)
        and ``assets``: per asset key, the counts ``targeted``, ``in_progress``, ``materialized``, ``failed``."""
        raw = self.expect(
            self.query(Q_BACKFILL, {"id": backfill_id})["partitionBackfillOrError"], "PartitionBackfill"
        )
        assets: dict[str, dict[str, Any]] = {}
        for entry in (raw.get("assetBackfillData") or {}).get("assetBackfillStatuses", []):
            key = "/".join(entry["assetKey"]["path"])
            if entry["__typename"] == "AssetPartitionsStatusCounts":
                assets[key] = {
                    "targeted": entry["numPartitionsTargeted"],
                    "in_progress": entry["numPartitionsInProgress"],
                    "materialized": entry["numPartitionsMaterialized"],
                    "failed": entry["numPartitionsFailed"],
                }
            else:
                assets[key] = {k: entry[k] for k in ("inProgress", "materialized", "failed")}
        return {
            "id": raw["id"],
            "status": raw["status"],
            "numPartitions": raw["numPartitions"],
            "endTimestamp": raw["endTimestamp"],
            "error": raw["error"],
            "runs": raw["runs"],
            "assets": assets,
        }

    def cancel_backfill(self, backfill_id: str) -> None:
        result = self.query(M_CANCEL_BACKFILL, {"id": backfill_id})["cancelPartitionBackfill"]
        self.expect(result, "CancelBackfillSuccess")

    def wait_for_backfill(
        self, backfill_id: str, *, timeout: float, on_poll: Callable[[], None] | None = None
    ) -> dict[str, Any]:
        """Wait until the backfill is finished (any final status); return its state."""
        return wait_until(
            lambda: self.backfill(backfill_id),
            lambda state: state["status"] in FINISHED_BACKFILL_STATUSES,
            timeout=timeout,
            interval=1.0,
            what=f"backfill {backfill_id} finished",
            on_poll=on_poll,
        )

    # -- runs ------------------------------------------------------------------------------------

    def runs(
        self,
        *,
        statuses: Sequence[str] | None = None,
        tags: Mapping[str, str] | None = None,
        job_name: str | None = None,
        limit: int = 500,
    ) -> list[dict[str, Any]]:
        """Runs, newest first: ``runId``, ``status``, ``jobName``, ``tags`` (a dict), ``creationTime``,
        ``startTime``, ``endTime``."""
        run_filter: dict[str, Any] = {}
        if statuses:
            run_filter["statuses"] = list(statuses)
        if tags:
            run_filter["tags"] = [{"key": k, "value": v} for k, v in tags.items()]
        if job_name:
            run_filter["pipelineName"] = job_name
        result = self.query(Q_RUNS, {"filter": run_filter, "limit": limit})["runsOrError"]
        runs = self.expect(result, "Runs")["results"]
        return [{**run, "tags": {t["key"]: t["value"] for t in run["tags"]}} for run in runs]

    def wait_for_runs_finished(
        self, *, timeout: float, on_poll: Callable[[], None] | None = None, **filters: Any
    ) -> list[dict[str, Any]]:
        """Wait until no run (matching ``runs()`` filters such as ``tags``) is queued or in progress;
        return all matching runs."""
        wait_until(
            lambda: self.runs(statuses=IN_PROGRESS_RUN_STATUSES, **filters),
            lambda runs: not runs,
            timeout=timeout,
            interval=1.0,
            what="no run queued or in progress",
            on_poll=on_poll,
        )
        return self.runs(**filters)

    def terminate_run(self, run_id: str) -> None:
        self.expect(self.query(M_TERMINATE_RUN, {"id": run_id})["terminateRun"], "TerminateRunSuccess")

    # -- assets and checks -----------------------------------------------------------------------

    def partition_statuses(self, asset_key: AssetKeyLike) -> dict[str, list[str]]:
        """Per-partition status of an asset with dynamic or static partitions: the lists ``materialized``,
        ``failed``, ``materializing``, ``unmaterialized`` (what the UI's partition bar shows)."""
        node = self.query(Q_PARTITION_STATUSES, {"key": asset_key_input(asset_key)})["assetNodeOrError"]
        statuses = self.expect(node, "AssetNode")["assetPartitionStatuses"]
        self.expect(statuses, "DefaultPartitionStatuses")
        return {
            "materialized": sorted(statuses["materializedPartitions"]),
            "failed": sorted(statuses["failedPartitions"]),
            "materializing": sorted(statuses["materializingPartitions"]),
            "unmaterialized": sorted(statuses["unmaterializedPartitions"]),
        }

    def partition_keys(self, asset_key: AssetKeyLike) -> list[str]:
        node = self.query(Q_PARTITION_KEYS, {"key": asset_key_input(asset_key)})["assetNodeOrError"]
        return list(self.expect(node, "AssetNode")["partitionKeys"])

    def check_partition_statuses(self, asset_key: AssetKeyLike, check_name: str) -> dict[str, list[str]]:
        """Per-partition status of a partitioned asset check, as the check's "Partitions" tab shows it:
        the lists ``succeeded``, ``failed``, ``in_progress``, ``skipped``, ``execution_failed``, and
        ``missing`` (partitions of the asset in none of those)."""
        variables = {"key": asset_key_input(asset_key), "check": check_name}
        node = self.expect(self.query(Q_CHECK_PARTITION_STATUSES, variables)["assetNodeOrError"], "AssetNode")
        statuses = self.expect(node["assetCheckOrError"], "AssetCheck")["partitionStatuses"]
        if statuses is None:
            raise GraphQLError(
                f"check {check_name} of {asset_key} has no partition statuses (unpartitioned?)"
            )
        self.expect(statuses, "AssetCheckDefaultPartitionStatuses")
        result = {
            "succeeded": sorted(statuses["succeededPartitions"]),
            "failed": sorted(statuses["failedPartitions"]),
            "in_progress": sorted(statuses["inProgressPartitions"]),
            "skipped": sorted(statuses["skippedPartitions"]),
            "execution_failed": sorted(statuses["executionFailedPartitions"]),
        }
        seen = {key for keys in result.values() for key in keys}
        result["missing"] = sorted(set(node["partitionKeys"]) - seen)
        return result

    def check_executions(
        self, asset_key: AssetKeyLike, check_name: str, *, partition: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """Executions of a check, newest first: ``runId``, ``status``, ``partition``, ``timestamp`` and the
        ``evaluation`` (``success``, ``severity``, ``description``, ``metadata`` as a dict, and
        ``targetMaterialization``)."""
        variables = {
            "key": asset_key_input(asset_key),
            "check": check_name,
            "partition": partition,
            "limit": limit,
        }
        executions = []
        for execution in self.query(Q_CHECK_EXECUTIONS, variables)["assetCheckExecutions"]:
            evaluation = execution.get("evaluation")
            if evaluation is not None:
                entries = evaluation.pop("metadataEntries")
                evaluation["metadata"] = {e["label"]: metadata_value(e) for e in entries}
            executions.append(execution)
        return executions

    def latest_materialization(self, asset_key: AssetKeyLike, partition: str) -> dict[str, Any] | None:
        """The latest materialization of one partition: ``runId``, ``timestamp``, ``tags`` and ``metadata``
        (label -> value), or ``None`` if it was never materialized."""
        variables = {"key": asset_key_input(asset_key), "partitions": [partition]}
        node = self.query(Q_LATEST_MATERIALIZATION, variables)["assetNodeOrError"]
        events = self.expect(node, "AssetNode")["latestMaterializationByPartition"]
        event = events[0] if events else None
        if event is None:
            return None
        return {
            "runId": event["runId"],
            "partition": event["partition"],
            "timestamp": event["timestamp"],
            "tags": {t["key"]: t["value"] for t in event["tags"]},
            "metadata": {e["label"]: metadata_value(e) for e in event["metadataEntries"]},
        }

    def latest_observation(self, asset_key: AssetKeyLike, partition: str) -> dict[str, Any] | None:
        """The latest observation of one partition: ``runId``, ``timestamp``, ``description`` and ``metadata``."""
        variables = {"key": asset_key_input(asset_key), "partitions": [partition]}
        node = self.query(Q_LATEST_OBSERVATION, variables)["assetNodeOrError"]
        events = self.expect(node, "AssetNode")["assetObservations"]
        if not events:
            return None
        event = events[0]
        return {
            "runId": event["runId"],
            "timestamp": event["timestamp"],
            "description": event["description"],
            "metadata": {e["label"]: metadata_value(e) for e in event["metadataEntries"]},
        }

    def latest_materialization_metadata(
        self, asset_key: AssetKeyLike, partition: str
    ) -> dict[str, Any] | None:
        event = self.latest_materialization(asset_key, partition)
        return None if event is None else event["metadata"]

    def wait_for_partitions(
        self,
        asset_key: AssetKeyLike,
        *,
        count: int | None = None,
        keys: Iterable[str] | None = None,
        timeout: float,
        fail_fast: bool = True,
        on_poll: Callable[[], None] | None = None,
    ) -> dict[str, list[str]]:
        """Wait until ``keys`` (or every partition, and at least ``count`` of them) are materialized;
        return the partition statuses. With ``fail_fast``, raises at once if a wanted partition failed."""
        wanted = set(keys) if keys is not None else None

        def done(statuses: dict[str, list[str]]) -> bool:
            target = wanted if wanted is not None else set().union(*statuses.values())
            failed = target & set(statuses["failed"])
            if failed and fail_fast:
                raise AssertionError(f"{asset_key}: partitions failed: {sorted(failed)}; statuses {statuses}")
            if count is not None and len(target) < count:
                return False
            return bool(target) and target <= set(statuses["materialized"])

        return wait_until(
            lambda: self.partition_statuses(asset_key),
            done,
            timeout=timeout,
            interval=1.0,
            what=f"{asset_key}: partitions {sorted(wanted) if wanted else f'all ({count or 1}+)'} materialized",
            on_poll=on_poll,
        )
