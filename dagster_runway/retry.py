"""The one retry rule of the package, used by the API client and by video downloads.

What is safe to retry differs (a submit is never resent after it may have reached the service; a GET
of a video always may be), so each caller decides *whether* an error is retryable. How long to wait,
and when to give up, is decided here: capped exponential backoff with full jitter, the server's
``Retry-After`` honoured when it is longer, within a number of attempts and a deadline.
"""

from __future__ import annotations

import email.utils
import random
import time
from dataclasses import dataclass
from datetime import UTC

#: API answers that are safe to repeat for an idempotent call: rate limits and gateway failures.
RETRYABLE_STATUS = frozenset({429, 502, 503, 504})


@dataclass(frozen=True)
class RetryPolicy:
    """How a call that is safe to repeat is retried.

    Before retry ``n`` it sleeps a random time in ``[0, min(backoff_max, backoff_initial * 2**(n-1))]``,
    or the server's ``Retry-After`` when that is longer. It gives up after ``max_attempts`` attempts,
    when the wait would end past ``deadline`` seconds from the first attempt, or at once when the
    server asks for a wait longer than ``retry_after_max``.
    """

    max_attempts: int = 5
    backoff_initial: float = 0.5
    backoff_max: float = 20.0
    deadline: float = 120.0
    retry_after_max: float = 60.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """The jittered backoff before retry ``attempt`` (1 for the first retry)."""
        ceiling = min(self.backoff_max, self.backoff_initial * 2 ** (attempt - 1))
        return (rng or random).uniform(0.0, ceiling)

    def next_delay(
        self, attempt: int, elapsed: float, retry_after: float | None = None, rng: random.Random | None = None
    ) -> float | None:
        """Seconds to wait after failed attempt number ``attempt``, ``elapsed`` seconds after the first
        one began; None when the call must give up instead."""
        remaining = self.deadline - elapsed
        delay = self.backoff(attempt, rng)
        if retry_after is not None:
            if retry_after > self.retry_after_max or retry_after > remaining:
                return None
            delay = max(delay, retry_after)
        if attempt >= self.max_attempts or delay > remaining:
            return None
        return delay


#: Downloads of generated videos: three attempts; a long transfer may use most of the deadline.
DOWNLOAD_RETRY = RetryPolicy(
    max_attempts=3, backoff_initial=0.5, backoff_max=10.0, deadline=900.0, retry_after_max=30.0
)


def retry_after_seconds(header: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header value (delay-seconds or an HTTP date); None when
    absent or unreadable. A date in the past gives 0."""
    if not header:
        return None
    try:
        return max(0.0, float(header))
    except ValueError:
        pass
    try:
        parsed = email.utils.parsedate_to_datetime(header)
    except (TypeError, ValueError):
        return None
    if parsed.tzinfo is None:  # "-0000": UTC, not local time
        parsed = parsed.replace(tzinfo=UTC)
    return max(0.0, parsed.timestamp() - time.time())
