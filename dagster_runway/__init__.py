"""dagster_runway: turn folders and buckets of still images into videos with Runway Gen-4 Turbo on RunComfy.

Only light modules (schema, client, errors) are imported here. ``RunComfyResource``,
``LiteralTokenWarning``, ``build_runway_pipeline``, ``RunwayPipelineConfig``, ``GenerationSettings``,
``RunwayPipelineComponent`` and ``write_gallery`` load dagster on first use, so that the client and the emulator can be used without it.
"""

from typing import TYPE_CHECKING, Any

from dagster_runway.client import AsyncRunComfyClient as AsyncRunComfyClient
from dagster_runway.client import ModelInfo as ModelInfo
from dagster_runway.client import ModelPage as ModelPage
from dagster_runway.client import RetryPolicy as RetryPolicy
from dagster_runway.client import RunComfyClient as RunComfyClient
from dagster_runway.errors import AmbiguousSubmitError as AmbiguousSubmitError
from dagster_runway.errors import AuthenticationError as AuthenticationError
from dagster_runway.errors import ClientConfigurationError as ClientConfigurationError
from dagster_runway.errors import GatewayNotFoundError as GatewayNotFoundError
from dagster_runway.errors import GenerationFailedError as GenerationFailedError
from dagster_runway.errors import InputValidationError as InputValidationError
from dagster_runway.errors import InsufficientCreditsError as InsufficientCreditsError
from dagster_runway.errors import ModelNotFoundError as ModelNotFoundError
from dagster_runway.errors import PermissionDeniedError as PermissionDeniedError
from dagster_runway.errors import RateLimitedError as RateLimitedError
from dagster_runway.errors import RequestCancelledError as RequestCancelledError
from dagster_runway.errors import RequestNotFoundError as RequestNotFoundError
from dagster_runway.errors import RunComfyError as RunComfyError
from dagster_runway.errors import ServerError as ServerError
from dagster_runway.errors import TransportError as TransportError
from dagster_runway.errors import UnexpectedResponseError as UnexpectedResponseError
from dagster_runway.errors import WaitTimeoutError as WaitTimeoutError
from dagster_runway.schema import CancelResult as CancelResult
from dagster_runway.schema import ImageToVideoInput as ImageToVideoInput
from dagster_runway.schema import RequestResult as RequestResult
from dagster_runway.schema import RequestState as RequestState
from dagster_runway.schema import RequestStatus as RequestStatus
from dagster_runway.schema import Submission as Submission
from dagster_runway.version import __version__ as __version__

if TYPE_CHECKING:
    from dagster_runway.component import RunwayPipelineComponent as RunwayPipelineComponent
    from dagster_runway.media import GenerationSettings as GenerationSettings
    from dagster_runway.pipeline import RunwayPipelineConfig as RunwayPipelineConfig
    from dagster_runway.pipeline import build_runway_pipeline as build_runway_pipeline
    from dagster_runway.pipeline.gallery import write_gallery as write_gallery
    from dagster_runway.resource import LiteralTokenWarning as LiteralTokenWarning
    from dagster_runway.resource import RunComfyResource as RunComfyResource

# What needs dagster (or Pillow), imported on first use.
_LAZY = {
    "RunComfyResource": "dagster_runway.resource",
    "LiteralTokenWarning": "dagster_runway.resource",
    "GenerationSettings": "dagster_runway.media",
    "RunwayPipelineConfig": "dagster_runway.pipeline",
    "build_runway_pipeline": "dagster_runway.pipeline",
    "RunwayPipelineComponent": "dagster_runway.component",
    "write_gallery": "dagster_runway.pipeline.gallery",
}

__all__ = [
    "AmbiguousSubmitError",
    "AsyncRunComfyClient",
    "AuthenticationError",
    "CancelResult",
    "ClientConfigurationError",
    "GatewayNotFoundError",
    "GenerationFailedError",
    "GenerationSettings",
    "ImageToVideoInput",
    "InputValidationError",
    "InsufficientCreditsError",
    "LiteralTokenWarning",
    "ModelInfo",
    "ModelNotFoundError",
    "ModelPage",
    "PermissionDeniedError",
    "RateLimitedError",
    "RequestCancelledError",
    "RequestNotFoundError",
    "RequestResult",
    "RequestState",
    "RequestStatus",
    "RetryPolicy",
    "RunComfyClient",
    "RunComfyError",
    "RunComfyResource",
    "RunwayPipelineComponent",
    "RunwayPipelineConfig",
    "ServerError",
    "Submission",
    "TransportError",
    "UnexpectedResponseError",
    "WaitTimeoutError",
    "__version__",
    "build_runway_pipeline",
    "write_gallery",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dagster_runway' has no attribute {name!r}")
