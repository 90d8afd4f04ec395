"""Layer 4: the Dagster side. Assets, sensors and checks over the client and media layers."""

from dagster_runway.pipeline.driver import LocalDaemon as LocalDaemon
from dagster_runway.pipeline.factory import build_runway_pipeline as build_runway_pipeline
