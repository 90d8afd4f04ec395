"""Typed errors of the RunComfy client.

Every message says what happened, to which request, and what the user can do. None of them
carries the API token or a presigned URL's query string. Every ``httpx`` error of a call maps to one
of these; no ``httpx`` exception leaves the client.

* RunComfyError
  + AuthenticationError, PermissionDeniedError, InsufficientCreditsError, ModelNotFoundError
  + InputValidationError, RequestNotFoundError (the API's own 404001 only)
  + RateLimitedError
  + ServerError (5xx, a 2xx carrying an error code)
    - UnexpectedResponseError (an answer that is not the API's: undecodable, not JSON, wrong shape)
      · GatewayNotFoundError (a 404 without the API's error: a gateway or proxy page)
  + TransportError (the network failed on a call that is safe to repeat)
  + ClientConfigurationError (base_url cannot be used as configured; not retried)
  + AmbiguousSubmitError (a submit may have been accepted; never resubmitted)
  + GenerationFailedError, RequestCancelledError, WaitTimeoutError
"""

from __future__ import annotations

from typing import Any


class RunComfyError(Exception):
    """Base class of every error the client raises."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        error_code: int | None = None,
        request_id: str | None = None,
        detail: Any = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.error_code = error_code
        self.request_id = request_id
        self.detail = detail

    #: Whether the same call may succeed if made again later, without any change by the user.
    retryable: bool = False

    def __str__(self) -> str:
        return self.message


class AuthenticationError(RunComfyError):
    """The token is missing, wrong, revoked, or the account is inactive (error code 400004)."""


class PermissionDeniedError(RunComfyError):
    """The request belongs to another account (error code 403001)."""


class InsufficientCreditsError(RunComfyError):
    """The account has no balance left for this submit (error code 400002). Nothing was billed."""


class ModelNotFoundError(RunComfyError):
    """The model id is malformed or unknown (error code 400001)."""


class InputValidationError(RunComfyError):
    """The service rejected the input (422). ``field`` names the offending input field."""

    def __init__(self, message: str, *, field: str | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.field = field


class RequestNotFoundError(RunComfyError):
    """The request id is unknown, deleted or expired (error code 404001)."""


class RateLimitedError(RunComfyError):
    """429: too many requests. ``retry_after`` is the server's hint in seconds, if it gave one."""

    retryable = True

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class ServerError(RunComfyError):
    """The service failed (5xx, a 2xx carrying an error code, or an unreadable answer)."""

    retryable = True


class UnexpectedResponseError(ServerError):
    """An answer that is not the API's: a body that cannot be decoded (a false ``Content-Encoding``), is
    not JSON, or lacks the fields the API always sends. Retried on reads; on a submit it is ambiguous."""


class GatewayNotFoundError(UnexpectedResponseError):
    """A 404 without the API's error body (no ``error_code``): a gateway or proxy answered, not the API.
    It says nothing about the request, which may well exist: it is retried later, never paid again."""


class TransportError(RunComfyError):
    """The service could not be reached, or the connection broke, on a call that is safe to repeat."""

    retryable = True


class ClientConfigurationError(RunComfyError):
    """The client cannot talk to the API as configured: ``base_url`` is not a valid URL or uses a scheme
    httpx does not speak (nothing was sent), or the answers redirect in a loop. Not retried: fix it."""


class AmbiguousSubmitError(RunComfyError):
    """A submit failed after its body was sent: the request may have been accepted and billed.

    The client never resubmits in this case. ``fingerprint`` identifies the input; look for a
    request with it (RunComfy's Generations page, or the pipeline's records) before submitting again.
    """

    def __init__(
        self, message: str, *, fingerprint: str | None = None, cause: str | None = None, **kwargs: Any
    ):
        super().__init__(message, **kwargs)
        self.fingerprint = fingerprint
        self.cause = cause


def is_safety_code(code: str | None) -> bool:
    """Whether a failed generation's code is a content-moderation rejection (never retried): the one
    rule, for the client's message, the pipeline's failure class and the submit's reuse verdict."""
    upper = (code or "").upper()
    return (
        upper.startswith("SAFETY.") or ".SAFETY." in upper or upper.startswith("INPUT_PREPROCESSING.SAFETY")
    )


def is_internal_code(code: str | None) -> bool:
    """Whether a failed generation's code is the service's own failure (retried only when configured)."""
    return (code or "").upper().startswith(("INTERNAL", "INPUT_PREPROCESSING.INTERNAL"))


class GenerationFailedError(RunComfyError):
    """The request finished as ``failed``. ``failure_code`` is Runway's code, e.g. ``SAFETY.INPUT.IMAGE``."""

    def __init__(
        self,
        message: str,
        *,
        failure_code: str | None = None,
        failure_message: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(message, **kwargs)
        self.failure_code = failure_code
        self.failure_message = failure_message

    @property
    def is_safety(self) -> bool:
        """A content-moderation rejection: never retry it."""
        return is_safety_code(self.failure_code)

    @property
    def is_internal(self) -> bool:
        """An internal failure on the service's side: may be retried once, by explicit configuration."""
        return is_internal_code(self.failure_code)


class RequestCancelledError(RunComfyError):
    """The request was cancelled before it ran."""


class WaitTimeoutError(RunComfyError):
    """``wait`` reached its deadline. ``last_state`` is the last state seen; the request may still finish."""

    def __init__(self, message: str, *, last_state: str | None = None, waited_s: float = 0.0, **kwargs: Any):
        super().__init__(message, **kwargs)
        self.last_state = last_state
        self.waited_s = waited_s
