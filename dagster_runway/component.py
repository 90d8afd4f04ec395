"""``RunwayPipelineComponent``: the pipeline as a ``dg`` Component, configured in ``defs.yaml``.

Its attributes are ``RunwayPipelineConfig``'s fields (the one model of the pipeline's options; nested
models such as ``defaults`` are given as mappings and validated by it), plus how to reach the service:
``api_token_env`` names the environment variable that holds the token (it is read inside each run, never
stored), ``base_url`` overrides the API's address (an emulator, for example), and ``model_id`` selects the
model whose rules ``defaults`` and every image are checked against.

.. code-block:: yaml

    type: dagster_runway.component.RunwayPipelineComponent
    attributes:
      source: s3://my-bucket/stills/
      output: s3://my-bucket/videos/
      defaults: {prompt_text: "slow dolly-in, golden hour", ratio: auto}
      max_spend_usd: 50
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import BaseModel, Field, create_model

from dagster_runway.client import DEFAULT_BASE_URL
from dagster_runway.models import DEFAULT_MODEL, model_spec
from dagster_runway.pipeline.config import RunwayPipelineConfig
from dagster_runway.pipeline.factory import build_definitions
from dagster_runway.resource import RunComfyResource


class _RunwayPipelineComponentBase(dg.Component, dg.Resolvable, dg.Model):
    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        options = {
            name: getattr(self, name)
            for name in self.model_fields_set
            if name in RunwayPipelineConfig.model_fields
        }
        api_token_env: str = getattr(self, "api_token_env")  # noqa: B009 - a generated field
        base_url: str = getattr(self, "base_url")  # noqa: B009
        model_id: str = getattr(self, "model_id")  # noqa: B009
        validation = {"model": model_spec(model_id)}  # the defaults are checked against its rules
        if "resource_key" not in options and (api_token_env, base_url, model_id) != _DEFAULT_SERVICE:
            # Another service, token or model: its own resource key, so that it loads beside the others.
            prefix = RunwayPipelineConfig.model_validate(options, context=validation).key_prefix
            options["resource_key"] = "runcomfy_" + re.sub(r"\W+", "_", "_".join(prefix)).strip("_")
        pipeline = RunwayPipelineConfig.model_validate(options, context=validation)
        _check_local_source(pipeline, getattr(context, "path", None))
        return build_definitions(pipeline, _resource(api_token_env, base_url, model_id))


_DEFAULT_SERVICE = ("RUNCOMFY_API_TOKEN", DEFAULT_BASE_URL, DEFAULT_MODEL.model_id)


def _check_local_source(pipeline: RunwayPipelineConfig, where: Path | None) -> None:
    """A local source folder must exist when the project loads (so `dg check defs` says so); a bucket
    is not listed at load."""
    if "://" in pipeline.source and not pipeline.source.startswith("file://"):
        return
    folder = Path(os.path.normpath(pipeline.source.removeprefix("file://")))
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        defs_yaml = f"{where}/defs.yaml" if where else "its defs.yaml"
        raise ValueError(
            f"RunwayPipelineComponent {'/'.join(pipeline.key_prefix)}: source {folder} {what}; create it (put the "
            f"images there), or set `source` in {defs_yaml} to the folder or s3:// prefix of the images"
        )


@functools.cache
def _resource(api_token_env: str, base_url: str, model_id: str) -> RunComfyResource:
    """One resource object per (token variable, base URL, model): Dagster merges the definitions of
    several components only when a shared resource key holds the very same object. A component with
    another token variable, base URL or model gets a resource key of its own (``runcomfy_<key prefix>``)."""
    return RunComfyResource(api_token=dg.EnvVar(api_token_env), base_url=base_url, model_id=model_id)


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
        Field(
            "RUNCOMFY_API_TOKEN",
            description="The environment variable that holds the API token (read in each run).",
        ),
    ),
    base_url=(str, Field(DEFAULT_BASE_URL, description="The API's base URL, e.g. a local emulator's.")),
    model_id=(
        str,
        Field(
            DEFAULT_MODEL.model_id,
            description="The model (dagster_runway.models.known_models()); `defaults` and every image are "
            "checked against its rules.",
        ),
    ),
)
del _RunwayPipelineComponentBase  # only the generated class is a component to list and scaffold


class RunwayScaffoldParams(BaseModel):
    """What ``dg scaffold defs dagster_runway.component.RunwayPipelineComponent <path> --source ... --output ...``
    writes into the new ``defs.yaml``."""

    source: str = Field(
        "{{ context.project_root }}/images", description="The folder or s3:// prefix of the images."
    )
    output: str = Field(
        "{{ context.project_root }}/videos", description="Where the videos and the journal go."
    )
    api_token_env: str = Field(
        "RUNCOMFY_API_TOKEN", description="The environment variable that holds the token."
    )
    max_spend_usd: float = Field(10.0, gt=0, description="The spending cap written into the new component.")


_TEMPLATE = """\
# Image-to-video with Runway Gen-4 Turbo on RunComfy: one partition per image, one video per partition.
# Every attribute is a RunwayPipelineConfig option (the README's options table lists them all).
type: {type_name}

attributes:
  key_prefix: [{key_prefix}]   # assets <prefix>/images, /requests, /videos; jobs and sensors are named after it
  group_name: {key_prefix}
  source: {source}   # a folder, or s3://bucket/prefix/
  output: {output}
  defaults:
    ratio: auto      # picked from each image's aspect
    duration: 5
    # prompt_text: "slow dolly-in, golden hour"   # or a sidecar beside each image: cat.png -> cat.txt
  missing_prompt: fail   # an image with no prompt fails before anything is paid
  max_spend_usd: {max_spend_usd}
  api_token_env: {api_token_env}   # the token itself is read in each run, never written here
  # base_url: http://127.0.0.1:8188   # a local emulator: `dagster-runway emulator --port 8188`
"""


class RunwayPipelineScaffolder(dg.Scaffolder[RunwayScaffoldParams]):
    """Writes a ``defs.yaml`` with the attributes a first run needs, commented, instead of ``{}``. The
    key prefix is the new folder's name, so a second pipeline in a project does not collide with the first."""

    @classmethod
    def get_scaffold_params(cls) -> type[RunwayScaffoldParams]:
        return RunwayScaffoldParams

    def scaffold(self, request: dg.ScaffoldRequest[RunwayScaffoldParams]) -> None:
        params = request.params
        if request.scaffold_format != "yaml" or request.append:
            dg.scaffold_component(request, params.model_dump())
            return
        text = _TEMPLATE.format(
            type_name=request.type_name,
            key_prefix=re.sub(r"\W+", "_", request.target_path.name).strip("_") or "runway",
            source=json.dumps(params.source),  # a JSON string is a valid double-quoted YAML string
            output=json.dumps(params.output),
            max_spend_usd=params.max_spend_usd,
            api_token_env=json.dumps(params.api_token_env),
        )
        (request.target_path / "defs.yaml").write_text(text, encoding="utf-8")


RunwayPipelineComponent = dg.scaffold_with(RunwayPipelineScaffolder)(RunwayPipelineComponent)
