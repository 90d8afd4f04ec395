"""The example project: `dagster dev -f definitions.py` (or `-w workspace.yaml`).

Settings come from the environment, with defaults that work offline:

- RUNWAY_SOURCE: image folder or s3:// prefix (default: examples/images beside this file)
- RUNWAY_OUTPUT: where videos go (default: out/videos beside this file)
- RUNWAY_MODE: deferred (default) or blocking
- RUNWAY_MISSING_PROMPT: fail (default), warn or service_default: what an image with no prompt gets
- RUNWAY_OPTIONS: a JSON object of any other pipeline option, e.g. '{"status_interval_s": 5}'
- RUNCOMFY_API_TOKEN: the RunComfy key (read when a run starts, never at load time)
- RUNCOMFY_BASE_URL: the API, e.g. a local `dagster-runway emulator` (default: the real service)
"""

import json
import os
from pathlib import Path

import dagster as dg

from dagster_runway import RunComfyResource
from dagster_runway.client import DEFAULT_BASE_URL
from dagster_runway.pipeline import build_runway_pipeline

HERE = Path(__file__).resolve().parent


@dg.definitions
def defs() -> dg.Definitions:
    return build_runway_pipeline(
        source=os.environ.get("RUNWAY_SOURCE", str(HERE / "examples" / "images")),
        output=os.environ.get("RUNWAY_OUTPUT", str(HERE / "out" / "videos")),
        mode=os.environ.get("RUNWAY_MODE", "deferred"),
        missing_prompt=os.environ.get("RUNWAY_MISSING_PROMPT", "fail"),
        **json.loads(os.environ.get("RUNWAY_OPTIONS") or "{}"),
        resource=RunComfyResource(
            api_token=dg.EnvVar("RUNCOMFY_API_TOKEN"),
            base_url=os.environ.get("RUNCOMFY_BASE_URL", DEFAULT_BASE_URL),
        ),
    )
