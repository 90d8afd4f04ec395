"""The clients' defaults, in one place: the clients' keyword defaults and the resource's fields read them.
Retry numbers live in :class:`dagster_runway.retry.RetryPolicy`."""

from __future__ import annotations

REQUEST_TIMEOUT_S = 60.0  # one HTTP answer
CONNECT_TIMEOUT_S = 10.0  # one connection
POLL_INTERVAL_S = 5.0  # between status polls of a blocking wait (+/-20% jitter)
WAIT_TIMEOUT_S = 900.0  # a blocking wait, before it gives up
MAX_CONCURRENCY = 16  # API calls in flight at once from one async client
