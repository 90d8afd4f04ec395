"""The checks of a stored video: each declared once, with its spec, its description and its evaluation.

To add a check, add one ``VideoCheck`` to ``CHECKS``. The collect step evaluates them right after it
stores a video, and the verify job (the checks alone, on a schedule or by hand) evaluates them again
on the stored objects, without regenerating anything.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dagster import AssetCheckEvaluation, AssetCheckSeverity, AssetCheckSpec, PreviewWarning

from dagster_runway import _compat
from dagster_runway.media import VideoProbe
from dagster_runway.pipeline.config import RunwayPipelineConfig
from dagster_runway.schema import ratio_size


@dataclass(frozen=True)
class CheckInputs:
    """Everything a check may look at, measured once per video."""

    probe: VideoProbe | None  # None when the stored video could not be read
    probe_error: str | None
    ratio: str | None  # what the request asked for ("W:H"), as the model's spec reads its input
    duration_s: float | None
    recorded_sha256: str | None
    sha256_at_rest: str | None
    at_rest_error: str | None
    source_change_token: str | None  # when the request was made
    current_change_token: str | None  # now (None: the image is gone)
    pipeline: RunwayPipelineConfig


CheckOutcome = tuple[bool, dict[str, Any]]


@dataclass(frozen=True)
class VideoCheck:
    name: str
    blocking: bool  # a failure is an ERROR that fails the run; otherwise a WARN
    description: str
    evaluate: Callable[[CheckInputs], CheckOutcome]


def _unreadable(inputs: CheckInputs) -> CheckOutcome:
    return False, {"error": inputs.probe_error or "the stored video could not be read"}


def _playable(inputs: CheckInputs) -> CheckOutcome:
    probe = inputs.probe
    if probe is None:
        return _unreadable(inputs)
    passed = probe.decodable and probe.codec == "h264" and probe.frames > 0
    return passed, {
        "codec": probe.codec,
        "frames": probe.frames,
        "decodable": probe.decodable,
        **({"decode_error": probe.decode_error} if probe.decode_error else {}),
    }


def _duration(inputs: CheckInputs) -> CheckOutcome:
    probe = inputs.probe
    if probe is None:
        return _unreadable(inputs)
    wanted = float(inputs.duration_s or 0)
    tolerance = inputs.pipeline.duration_tolerance_s
    return abs(probe.duration_s - wanted) <= tolerance, {
        "duration_s": round(probe.duration_s, 3),
        "requested_s": wanted,
        "tolerance_s": tolerance,
    }


def _aspect(inputs: CheckInputs) -> CheckOutcome:
    probe = inputs.probe
    if probe is None:
        return _unreadable(inputs)
    want_w, want_h = ratio_size(str(inputs.ratio))
    wanted = want_w / want_h
    aspect = probe.width / probe.height if probe.height else 0.0
    error = abs(aspect - wanted) / wanted
    return error <= inputs.pipeline.aspect_tolerance, {
        "size": f"{probe.width}x{probe.height}",
        "requested_ratio": inputs.ratio,
        "relative_error": round(error, 4),
    }


# A passed check whose rule is "two values are equal" records the value once; a failed one records both.


def _checksum(inputs: CheckInputs) -> CheckOutcome:
    if inputs.sha256_at_rest is not None and inputs.sha256_at_rest == inputs.recorded_sha256:
        return True, {"sha256": inputs.sha256_at_rest}
    return False, {
        "recorded_sha256": inputs.recorded_sha256 or "(none)",
        "sha256_at_rest": inputs.sha256_at_rest or f"unreadable: {inputs.at_rest_error}",
    }


def _source_unchanged(inputs: CheckInputs) -> CheckOutcome:
    before, now = inputs.source_change_token, inputs.current_change_token
    if before is not None and before == now:
        return True, {"change_token": now}
    why = (
        "deleted: the source image is gone; the video shows what it was"
        if now is None
        else "changed after it was hashed for this video: the video shows the earlier image (on an "
        "unversioned bucket the service may have fetched the new bytes; turn on versioning to pin them)"
    )
    return False, {
        "change_token_at_submit": before or "(unknown)",
        "change_token_now": now or "(image missing)",
        "why": why,
    }


CHECKS: tuple[VideoCheck, ...] = (
    VideoCheck("video_playable", True, "The video decodes, is H.264, and has frames.", _playable),
    VideoCheck(
        "duration_matches_request",
        True,
        "The video lasts as long as the request asked, within a tolerance.",
        _duration,
    ),
    VideoCheck(
        "aspect_matches_ratio", True, "The video's pixel aspect matches the requested ratio.", _aspect
    ),
    VideoCheck(
        "checksum_at_rest",
        False,
        "The stored object's sha256 still matches the one recorded when it was written.",
        _checksum,
    ),
    VideoCheck(
        "source_unchanged",
        False,
        "The source image has not changed since the video was made.",
        _source_unchanged,
    ),
)
CHECK_NAMES = tuple(check.name for check in CHECKS)


def check_specs(pipeline: RunwayPipelineConfig) -> list[AssetCheckSpec]:
    # Partitioned checks (one result per video) are a preview feature of Dagster 1.13; it is relied on
    # knowingly, so its warning is not passed on to every user at load time.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PreviewWarning)
        return [
            AssetCheckSpec(
                check.name,
                asset=pipeline.videos_key,
                blocking=check.blocking,
                description=check.description,
                partitions_def=pipeline.partitions_def,
            )
            for check in CHECKS
        ]


def evaluate(
    inputs: CheckInputs, partition: str, target: _compat.AssetCheckEvaluationTargetMaterializationData | None
) -> list[AssetCheckEvaluation]:
    """Every check on one video, each linked to the materialization it judged (``target``).

    A result carries what its rule measured and nothing else: its partition is a field of the result,
    and its description is the spec's (each copy would cost three times its length in the event log)."""
    pipeline = inputs.pipeline
    evaluations = []
    for check in CHECKS:
        passed, measured = check.evaluate(inputs)
        evaluations.append(
            AssetCheckEvaluation(
                asset_key=pipeline.videos_key,
                check_name=check.name,
                passed=passed,
                metadata=measured,
                partition=partition,
                severity=AssetCheckSeverity.ERROR if check.blocking else AssetCheckSeverity.WARN,
                blocking=check.blocking,
                target_materialization_data=target,
            )
        )
    return evaluations


def no_video(pipeline: RunwayPipelineConfig, partition: str, why: str) -> list[AssetCheckEvaluation]:
    """Every check on a partition that has no video, failed with the reason (a warning: there is nothing
    to judge), so its checks say why instead of "execution failed"."""
    return [
        AssetCheckEvaluation(
            asset_key=pipeline.videos_key,
            check_name=check.name,
            passed=False,
            metadata={"reason": why},
            partition=partition,
            severity=AssetCheckSeverity.WARN,
            description=f"No video to check: {why}",
        )
        for check in CHECKS
    ]
