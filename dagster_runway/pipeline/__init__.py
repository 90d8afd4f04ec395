"""Layer 4: the Dagster side. Assets, sensors and checks over the client, media and journal layers."""

from dagster_runway.pipeline.config import RunwayPipelineConfig as RunwayPipelineConfig
from dagster_runway.pipeline.factory import build_runway_pipeline as build_runway_pipeline
