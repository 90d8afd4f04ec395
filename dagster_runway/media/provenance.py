"""Provenance a video carries when it leaves the pipeline: its lineage in the MP4's own metadata.

:func:`tag_video` remuxes a video (packets copied, nothing re-encoded) with ``tags`` written as MP4
metadata (``movflags=use_metadata_tags``: any key, read back by PyAV and by ``ffprobe`` as format
tags) and the moov atom first (``faststart``, for playback from a URL). :func:`read_tags` reads them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import av

from .errors import MediaError

TAG_PREFIX = "runway_"


class VideoTagError(MediaError):
    """The video could not be remuxed with its tags (its streams or packets are unreadable)."""


def tag_video(path: str, tags: Mapping[str, str], check: Callable[[str], Any] | None = None) -> None:
    """Rewrite the MP4 at local ``path`` in place with ``tags`` (keys prefixed ``runway_``; NUL and other
    control characters but newline and tab dropped from values). The tagged copy replaces the file only
    once it is complete and ``check(tagged_path)`` passes: on any failure the file is as it was."""
    tagged = f"{path}.tagged"
    try:
        with (
            av.open(path) as source,
            av.open(tagged, "w", format="mp4", options={"movflags": "use_metadata_tags+faststart"}) as target,
        ):
            for key, value in source.metadata.items():
                if not key.startswith(TAG_PREFIX) and key not in (
                    "major_brand",
                    "minor_version",
                    "compatible_brands",
                ):
                    target.metadata[key] = value
            for key, value in tags.items():
                target.metadata[f"{TAG_PREFIX}{key}"] = "".join(c for c in value if c >= " " or c in "\n\t")
            streams = {}
            for stream in source.streams:
                if stream.type in ("video", "audio"):
                    streams[stream.index] = target.add_stream_from_template(stream)
            for packet in source.demux(*[s for s in source.streams if s.index in streams]):
                if packet.dts is None:  # the demuxer's flush packet
                    continue
                packet.stream = streams[packet.stream.index]
                target.mux(packet)
        if check is not None:
            check(tagged)
        os.replace(tagged, path)
    except (av.FFmpegError, ValueError, KeyError) as exc:
        raise VideoTagError(f"its streams could not be copied with the lineage tags ({exc})") from None
    finally:
        if os.path.exists(tagged):
            os.unlink(tagged)


def read_tags(path: str) -> dict[str, str]:
    """The ``runway_*`` tags of the MP4 at ``path`` (a local path), without their prefix."""
    with av.open(path) as container:
        return {k[len(TAG_PREFIX) :]: v for k, v in container.metadata.items() if k.startswith(TAG_PREFIX)}
