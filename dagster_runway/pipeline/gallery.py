"""A static review page beside the videos: ``<output>/gallery.html``.

One card per partition, from the event log (never from memory): the poster and an inline player, the
source image, the prompt, ratio, seed, cost, check results and request id; or, for a partition with no
video, why and what to do. Filters show the failed and the stale ones. The collect step rewrites it
after each run; ``write_gallery`` does it on demand. Links are relative to the page, so the folder can
be moved or served as it is.
"""

from __future__ import annotations

import html
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import quote

from dagster import AssetCheckKey, DagsterInstance

from dagster_runway.media import write_bytes_atomic
from dagster_runway.pipeline import records as rec
from dagster_runway.pipeline.checks import CHECK_NAMES
from dagster_runway.pipeline.config import RunwayPipelineConfig

GALLERY_NAME = "gallery.html"


def gallery_uri(pipeline: RunwayPipelineConfig) -> str:
    return f"{pipeline.output.rstrip('/')}/{GALLERY_NAME}"


@dataclass(frozen=True)
class Card:
    key: str
    state: str  # ok, checks failed, stale, failed, pending
    video: str | None = None  # relative to the page
    poster: str | None = None
    source: str | None = None  # an <img> src (relative), or None for a source the browser cannot reach
    source_label: str = ""
    details: Mapping[str, str] = field(default_factory=dict)
    checks: Mapping[str, str] = field(default_factory=dict)
    reason: str | None = None


def cards(pipeline: RunwayPipelineConfig, instance: DagsterInstance) -> list[Card]:
    """Every partition's card, read from the event log and the source's listing."""
    keys = instance.get_dynamic_partitions(pipeline.dynamic_partitions_name)
    videos = rec.latest_videos(instance, pipeline.videos_key, keys)
    checks = _check_statuses(instance, pipeline, keys)
    listing = {entry.partition_key: entry for entry in pipeline.image_source().list()}
    out = pipeline.output.rstrip("/")
    found = []
    for key in keys:
        entry = listing.get(key)
        source, source_label = _source(pipeline, entry.url if entry else None)
        video = videos.get(key)
        if video is None:
            failure = rec.latest_failure(instance, (pipeline.requests_key, pipeline.videos_key), key)
            state = "failed" if failure else "pending"
            reason = f"{failure.reason} Next step: {failure.next_step}" if failure else "no video yet"
            found.append(Card(key, state, source=source, source_label=source_label, reason=reason))
            continue
        meta = video.metadata
        version = rec.image_version(entry.change_token, entry.sidecar_token, entry.settings_token) if entry else None
        passed = all(status == "SUCCEEDED" for status in checks.get(key, {}).values()) and key in checks
        state = "stale" if version is not None and meta.get("source_version") != version else "ok" if passed else "checks failed"
        cost = meta.get("cost_usd")
        details = {
            "prompt": str(meta.get("prompt_text") or ""),
            "prompt from": str(meta.get("prompt_source") or ""),
            "ratio": str(meta.get("ratio") or ""),
            "seed": str(meta.get("seed") or ""),
            "duration": f"{meta.get('video_duration_s', '')} s",
            "cost": f"{cost:.2f} USD" if isinstance(cost, (int, float)) else "",
            "request": str(meta.get("request_id") or ""),
        }
        found.append(
            Card(
                key,
                state,
                video=_relative(out, pipeline.video_uri(key)),
                poster=_relative(out, pipeline.poster_uri(key)) if meta.get("poster") else None,
                source=source,
                source_label=source_label,
                details=details,
                checks=checks.get(key, {}),
            )
        )
    return found


def write_gallery(pipeline: RunwayPipelineConfig, instance: DagsterInstance) -> str:
    """Write the page for every partition now; return its URI."""
    page = render(cards(pipeline, instance), title=f"{pipeline.name}: {pipeline.source}")
    return write_bytes_atomic(
        gallery_uri(pipeline),
        page.encode(),
        storage_options=dict(pipeline.output_storage_options),
        content_type="text/html; charset=utf-8",
    )


def _check_statuses(
    instance: DagsterInstance, pipeline: RunwayPipelineConfig, keys: Sequence[str]
) -> dict[str, dict[str, str]]:
    """Each partition's check results that judged its latest video (as the UI counts them)."""
    infos = instance.event_log_storage.get_asset_check_partition_info(
        [AssetCheckKey(pipeline.videos_key, name) for name in CHECK_NAMES], partition_keys=keys
    )
    statuses: dict[str, dict[str, str]] = {}
    for info in infos:
        if info.partition_key is None:
            continue
        current = (
            info.latest_materialization_storage_id is not None
            and info.latest_target_materialization_storage_id == info.latest_materialization_storage_id
        )
        statuses.setdefault(info.partition_key, {})[info.check_key.name] = (
            info.latest_execution_status.value if current else "MISSING"
        )
    return statuses


def _relative(base: str, uri: str) -> str:
    return quote(uri[len(base) + 1 :]) if uri.startswith(base + "/") else quote(uri, safe=":/")


def _source(pipeline: RunwayPipelineConfig, url: str | None) -> tuple[str | None, str]:
    """The source image as an <img> src relative to the page (local files), else only its address."""
    if url is None:
        return None, "(the image is gone)"
    if "://" in pipeline.output or "://" in url:
        return None, url
    return quote(os.path.relpath(url, pipeline.output)), url


_STYLE = """
body { font: 14px system-ui, sans-serif; margin: 24px; color: #1d1d1f; background: #fafafa; }
h1 { font-size: 20px; margin: 0 0 4px; } .summary { color: #555; margin-bottom: 16px; }
nav button { margin-right: 6px; padding: 4px 10px; border: 1px solid #bbb; border-radius: 4px; background: #fff; }
nav button.on { background: #1d1d1f; color: #fff; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(360px, 1fr)); gap: 16px; margin-top: 16px; }
.card { background: #fff; border: 1px solid #ddd; border-radius: 8px; padding: 12px; }
.card h2 { font-size: 15px; margin: 0 0 8px; word-break: break-all; }
.state { font-size: 12px; padding: 2px 8px; border-radius: 10px; margin-left: 6px; }
.ok { background: #dff5e3; } .failed, .checks-failed { background: #fbe0e0; } .stale { background: #fff1cc; }
.pending { background: #eee; }
.media { display: flex; gap: 8px; align-items: flex-start; }
video { width: 240px; max-height: 240px; background: #000; } img.source { width: 100px; }
table { border-collapse: collapse; margin-top: 8px; width: 100%; table-layout: fixed; }
td { padding: 2px 4px; vertical-align: top; overflow-wrap: anywhere; }
td:first-child { color: #666; white-space: nowrap; width: 90px; } .reason { color: #a00; margin-top: 8px; }
.checks span { display: inline-block; font-size: 12px; margin: 2px; padding: 1px 6px; border-radius: 3px; }
.SUCCEEDED { background: #dff5e3; } .FAILED, .EXECUTION_FAILED { background: #fbe0e0; } .MISSING { background: #eee; }
"""

_SCRIPT = """
for (const button of document.querySelectorAll('nav button')) {
  button.addEventListener('click', () => {
    for (const other of document.querySelectorAll('nav button')) other.classList.toggle('on', other === button);
    const show = button.dataset.show;
    for (const card of document.querySelectorAll('.card'))
      card.hidden = !(show === 'all' || card.dataset.state === show);
  });
}
"""


def render(found: list[Card], *, title: str) -> str:
    """The page: a summary, filters (all, failed, stale) and one card per partition."""
    e = html.escape
    counts = {state: sum(card.state == state for card in found) for state in ("ok", "checks failed", "stale", "failed", "pending")}
    summary = ", ".join(f"{n} {state}" for state, n in counts.items() if n) or "no partitions yet"
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{e(title)}</h1><div class='summary'>{len(found)} partitions: {e(summary)}</div>",
        "<nav>"
        + "".join(
            f'<button data-show="{show}"{" class=on" if show == "all" else ""}>{label}</button>'
            for show, label in (("all", "All"), ("failed", f"Failed ({counts['failed']})"), ("stale", f"Stale ({counts['stale']})"))
        )
        + "</nav><div class='grid'>",
    ]
    for card in found:
        parts.append(f'<section class="card" data-state="{e(card.state)}" data-partition="{e(card.key)}">')
        parts.append(f"<h2>{e(card.key)}<span class='state {card.state.replace(' ', '-')}'>{e(card.state)}</span></h2>")
        parts.append("<div class='media'>")
        if card.video:
            poster = f' poster="{e(card.poster)}"' if card.poster else ""
            parts.append(f'<video controls muted preload="metadata" src="{e(card.video)}"{poster}></video>')
        if card.source:
            parts.append(f'<img class="source" alt="source image" title="{e(card.source_label)}" src="{e(card.source)}">')
        parts.append("</div>")
        if card.details:
            rows = "".join(f"<tr><td>{e(name)}</td><td>{e(value)}</td></tr>" for name, value in card.details.items())
            parts.append(f"<table>{rows}<tr><td>source</td><td>{e(card.source_label)}</td></tr></table>")
        if card.checks:
            badges = "".join(f"<span class='{e(status)}'>{e(name)}: {e(status.lower())}</span>" for name, status in sorted(card.checks.items()))
            parts.append(f"<div class='checks'>{badges}</div>")
        if card.reason:
            parts.append(f"<div class='reason'>{e(card.reason)}</div>")
        parts.append("</section>")
    parts.append(f"</div><script>{_SCRIPT}</script></body></html>")
    return "\n".join(parts)
