"""``RunwayPipelineComponent``: the pipeline as a ``dg`` Component, configured in ``defs.yaml``.

Its attributes are ``RunwayPipelineConfig``'s fields (the one model of the pipeline's options; nested
models such as ``defaults`` are given as mappings and validated by it), plus how to reach the service:
``api_token_env`` names the environment variable that holds the token (it is read inside each run, never
stored), and ``base_url`` overrides the API's address (an emulator, for example).

.. code-block:: yaml

    type: dagster_runway.component.RunwayPipelineComponent
    attributes:
      source: s3://my-bucket/stills/
      output: s3://my-bucket/videos/
      defaults: {prompt_text: "slow dolly-in, golden hour", ratio: auto}
      max_spend_usd: 50
"""

from __future__ import annotations

from typing import Any

import dagster as dg
from pydantic import BaseModel, Field, create_model

from dagster_runway.client import DEFAULT_BASE_URL
from dagster_runway.pipeline.config import RunwayPipelineConfig
from dagster_runway.pipeline.factory import build_definitions
from dagster_runway.resource import RunComfyResource


class _RunwayPipelineComponentBase(dg.Component, dg.Resolvable, dg.Model):
    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        options = {name: getattr(self, name) for name in self.model_fields_set if name in RunwayPipelineConfig.model_fields}
        pipeline = RunwayPipelineConfig.model_validate(options)
        api_token_env: str = getattr(self, "api_token_env")  # noqa: B009 - a generated field
        base_url: str = getattr(self, "base_url")  # noqa: B009
        resource = RunComfyResource(api_token=dg.EnvVar(api_token_env), base_url=base_url)
        return build_definitions(pipeline, resource)


def _attribute(annotation: Any, field: Any) -> tuple[Any, Any]:
    """A config field as a component attribute: a nested model becomes a mapping (validated in
    build_defs); a default from a factory becomes "unset" (the config model applies it)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        annotation = dict[str, Any]
    if field.is_required():
        return annotation, Field(..., description=field.description)
    if field.default_factory is not None:
        return annotation | None, Field(None, description=field.description)
    return annotation, Field(field.default, description=field.description)


_ATTRIBUTES: dict[str, Any] = {
    name: _attribute(field.annotation, field) for name, field in RunwayPipelineConfig.model_fields.items()
}
RunwayPipelineComponent = create_model(
    "RunwayPipelineComponent",
    __base__=_RunwayPipelineComponentBase,
    __module__=__name__,
    __doc__="Image-to-video with Runway Gen-4 Turbo on RunComfy: partitioned assets, checks, sensors and jobs.",
    **_ATTRIBUTES,
    api_token_env=(
        str,
        Field("RUNCOMFY_API_TOKEN", description="The environment variable that holds the API token (read in each run)."),
    ),
    base_url=(str, Field(DEFAULT_BASE_URL, description="The API's base URL, e.g. a local emulator's.")),
)
del _RunwayPipelineComponentBase  # only the generated class is a component to list and scaffold
