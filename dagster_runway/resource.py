"""``RunComfyResource``: configuration for the RunComfy clients, as a Dagster resource."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from dagster import ConfigurableResource, EnvVar, InitResourceContext
from dagster_shared.libraries import DagsterLibraryRegistry
from pydantic import Field, PrivateAttr, field_validator

from dagster_runway.client import DEFAULT_BASE_URL, AsyncRunComfyClient, RetryPolicy, RunComfyClient
from dagster_runway.client._defaults import (
    CONNECT_TIMEOUT_S,
    MAX_CONCURRENCY,
    POLL_INTERVAL_S,
    REQUEST_TIMEOUT_S,
    WAIT_TIMEOUT_S,
)
from dagster_runway.models import ModelSpec, known_models, model_spec
from dagster_runway.schema import MODEL_ID
from dagster_runway.version import __version__

_RETRY = RetryPolicy()  # the retry defaults, whose home is RetryPolicy

DagsterLibraryRegistry.register("dagster-runway", __version__, is_dagster_package=False)


class LiteralTokenWarning(UserWarning):
    """A RunComfy token given as a literal string in a definition Dagster will snapshot."""


class RunComfyResource(ConfigurableResource):  # type: ignore[type-arg]  # Dagster's own subclasses leave it bare
    """Holds RunComfy configuration and hands out clients; it makes no call itself.

    .. code-block:: python

        import dagster as dg
        from dagster_runway import RunComfyResource

        runcomfy = RunComfyResource(api_token=dg.EnvVar("RUNCOMFY_API_TOKEN"))
    """

    api_token: str = Field(
        repr=False,
        description="RunComfy API token (a Bearer key from your RunComfy profile). Pass it as "
        'dg.EnvVar("RUNCOMFY_API_TOKEN") so that it never lands in code or in the UI.',
    )
    base_url: str = Field(
        default=DEFAULT_BASE_URL,
        description="Base URL of the Model API. Point it at a local emulator "
        "(dagster-runway emulator) to run without the real service.",
    )
    model_id: str = Field(
        default=MODEL_ID,
        description=f"The model to run: one the package has a ModelSpec for ({', '.join(known_models())}); "
        "its schema's rules check every input before it is paid for. Another id is refused.",
    )
    request_timeout: float = Field(
        default=REQUEST_TIMEOUT_S, description="Seconds to wait for one HTTP answer."
    )
    connect_timeout: float = Field(default=CONNECT_TIMEOUT_S, description="Seconds to wait for a connection.")
    max_attempts: int = Field(
        default=_RETRY.max_attempts,
        description="Attempts per call that is safe to repeat (status, result, cancel; a submit only when "
        "the connection was never made or the answer was 429).",
    )
    backoff_initial: float = Field(
        default=_RETRY.backoff_initial, description="First backoff ceiling in seconds (full jitter)."
    )
    backoff_max: float = Field(
        default=_RETRY.backoff_max, description="Largest backoff between two attempts, in seconds."
    )
    retry_deadline: float = Field(
        default=_RETRY.deadline, description="No call retries past this many seconds in all."
    )
    retry_after_max: float = Field(
        default=_RETRY.retry_after_max,
        description="Longest Retry-After the client will sleep through; a longer one raises RateLimitedError.",
    )
    poll_interval: float = Field(
        default=POLL_INTERVAL_S,
        description="Seconds between status polls in blocking waits (with +/-20% jitter).",
    )
    wait_timeout: float = Field(
        default=2 * WAIT_TIMEOUT_S,
        description="Seconds a blocking wait goes on before giving up: twice the client's, since a blocking-mode "
        "step waits for a whole batch behind the service's queue.",
    )
    max_concurrency: int = Field(
        default=MAX_CONCURRENCY // 2,
        description="Most API calls in flight at once from one async client (submits and polls): half the "
        "client's, since several runs (and the status sensor) share the account's rate limit.",
    )

    _client: RunComfyClient | None = PrivateAttr(default=None)

    def literal_token_warning(self) -> str | None:
        """Why a literal ``api_token`` is unsafe here, or None (an ``EnvVar``, or a local emulator's).

        Dagster keeps a resource's config values in every job snapshot it stores, so a literal token
        would be written into the instance's run storage; an ``EnvVar`` is stored as its name only."""
        if isinstance(self.api_token, EnvVar) or not self.api_token:
            return None
        host = urlsplit(self.base_url).hostname or ""
        if host in ("127.0.0.1", "localhost", "::1"):
            return None  # a local emulator's token is not a secret
        return (
            "RunComfyResource got api_token as a literal string: Dagster stores resource config in its job "
            "snapshots, so the token would be written into the instance's storage. Pass "
            'dg.EnvVar("RUNCOMFY_API_TOKEN") instead.'
        )

    @field_validator("model_id")
    @classmethod
    def _known_model(cls, value: str) -> str:
        return model_spec(value).model_id  # UnknownModelError lists the known ones

    @property
    def model(self) -> ModelSpec:
        """The spec of ``model_id``: its field names, enums, bounds and image rules."""
        return model_spec(self.model_id)

    def __repr__(self) -> str:
        return f"RunComfyResource(base_url={self.base_url!r}, model_id={self.model_id!r})"

    __str__ = __repr__

    @property
    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(
            max_attempts=self.max_attempts,
            backoff_initial=self.backoff_initial,
            backoff_max=self.backoff_max,
            deadline=self.retry_deadline,
            retry_after_max=self.retry_after_max,
        )

    def _client_kwargs(self) -> dict[str, Any]:
        return {
            "api_token": self.api_token,
            "base_url": self.base_url,
            "model_id": self.model_id,
            "request_timeout": self.request_timeout,
            "connect_timeout": self.connect_timeout,
            "retry": self.retry_policy,
            "poll_interval": self.poll_interval,
        }

    def setup_for_execution(self, context: InitResourceContext) -> None:
        self._client = RunComfyClient(**self._client_kwargs())

    def teardown_after_execution(self, context: InitResourceContext) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def get_client(self) -> RunComfyClient:
        """The blocking client, opened for this execution and closed after it."""
        if self._client is None:
            self._client = RunComfyClient(**self._client_kwargs())
        return self._client

    def get_async_client(self) -> AsyncRunComfyClient:
        """A new async client for one event loop; use it as ``async with resource.get_async_client() as c``.

        An httpx async connection pool belongs to the loop it first ran in, so each ``asyncio.run``
        gets its own client, closed when its ``async with`` block ends.
        """
        return AsyncRunComfyClient(**self._client_kwargs(), max_concurrency=self.max_concurrency)
