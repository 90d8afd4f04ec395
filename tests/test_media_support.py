"""Helpers for the media tests: real images and MP4s made on the spot, and a scriptable HTTP server.

This module holds no tests of its own; the ``test_media_*`` modules import from it.
"""

from __future__ import annotations

import hashlib
import io
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import av
import pytest
from PIL import Image


def png_bytes(width: int, height: int, color: tuple[int, int, int] = (40, 120, 200)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, "PNG")
    return buffer.getvalue()


def jpeg_bytes(width: int, height: int, quality: int = 85) -> bytes:
    buffer = io.BytesIO()
    Image.linear_gradient("L").resize((width, height)).convert("RGB").save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def webp_bytes(width: int, height: int, lossless: bool = False) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buffer, "WEBP", lossless=lossless)
    return buffer.getvalue()


def big_png_bytes(width: int = 7000, height: int = 7000) -> bytes:
    """A real, valid PNG of ``width x height`` that is several MB (smooth noise, fast to encode)."""
    noise = Image.effect_noise((width // 64, height // 64), 80).resize(
        (width, height), Image.Resampling.BILINEAR
    )
    buffer = io.BytesIO()
    noise.save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def mp4_bytes(
    width: int = 160, height: int = 96, fps: int = 8, seconds: float = 1.0, codec: str = "libx264"
) -> bytes:
    """A small real H.264 MP4 (fast start), made with PyAV."""
    buffer = io.BytesIO()
    frames = max(1, round(fps * seconds))
    with av.open(buffer, "w", format="mp4", options={"movflags": "frag_keyframe+empty_moov"}) as container:
        _encode(container, width, height, fps, frames, codec)
    return buffer.getvalue()


def write_mp4(path: Path, width: int = 160, height: int = 96, fps: int = 8, seconds: float = 1.0) -> Path:
    """A small real H.264 MP4 written to ``path`` with the moov atom first (``faststart``)."""
    frames = max(1, round(fps * seconds))
    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:
        _encode(container, width, height, fps, frames, "libx264")
    return path


def _encode(
    container: av.container.OutputContainer, width: int, height: int, fps: int, frames: int, codec: str
) -> None:
    stream = container.add_stream(codec, rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    for index in range(frames):
        shade = (index * 37) % 255
        image = Image.new("RGB", (width, height), (shade, 255 - shade, 90))
        for packet in stream.encode(av.VideoFrame.from_image(image)):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class ServerScript:
    """What :class:`ScriptedServer` does, request by request."""

    payload: bytes = b""
    content_type: str = "video/mp4"
    #: statuses answered (with an empty body) before serving, one per request
    statuses: list[int] = field(default_factory=list)
    #: the Retry-After header sent with a 429 or 503 status
    retry_after: str = "0"
    #: how many GETs announce the full Content-Length but send only ``truncate_fraction`` of it
    truncate_times: int = 0
    truncate_fraction: float = 0.5
    #: support Range requests (with an ETag and Accept-Ranges: bytes)
    ranges: bool = False
    #: answer every request with a Content-Length larger than the body it sends ("lies")
    always_truncate: bool = False
    #: stop after this many body bytes (of the first full response) until ``resume`` is set
    pause_at: int | None = None
    paused: threading.Event = field(default_factory=threading.Event)
    resume: threading.Event = field(default_factory=threading.Event)
    requests: list[dict[str, str]] = field(default_factory=list)


class ScriptedServer:
    """A real HTTP server on 127.0.0.1 that serves one payload and misbehaves on cue."""

    def __init__(self, script: ServerScript) -> None:
        self.script = script
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # silence
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                server._handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        script = self.script
        with self.lock:
            script.requests.append({"path": handler.path, "range": handler.headers.get("Range", "")})
            status = script.statuses.pop(0) if script.statuses else None
            truncate = script.always_truncate or script.truncate_times > 0
            if script.truncate_times > 0 and not script.always_truncate:
                script.truncate_times -= 1
        if status is not None:
            handler.send_response(status)
            handler.send_header("Content-Length", "0")
            if status in (429, 503):
                handler.send_header("Retry-After", script.retry_after)
            handler.end_headers()
            return
        body, code, extra = script.payload, 200, {}
        etag = f'"{sha256(script.payload)[:16]}"'
        wanted = handler.headers.get("Range", "")
        match = re.match(r"bytes=(\d+)-$", wanted)
        if script.ranges and match and handler.headers.get("If-Range", etag) == etag:
            start = int(match.group(1))
            body, code = script.payload[start:], 206
            extra["Content-Range"] = f"bytes {start}-{len(script.payload) - 1}/{len(script.payload)}"
        handler.send_response(code)
        handler.send_header("Content-Type", script.content_type)
        handler.send_header("Content-Length", str(len(body)))
        if script.ranges:
            handler.send_header("Accept-Ranges", "bytes")
            handler.send_header("ETag", etag)
        for key, value in extra.items():
            handler.send_header(key, value)
        if truncate:
            handler.send_header("Connection", "close")
        handler.end_headers()
        if truncate:
            handler.wfile.write(body[: int(len(body) * script.truncate_fraction)])
            handler.wfile.flush()
            handler.close_connection = True
            return
        if script.pause_at is not None and not script.paused.is_set():
            handler.wfile.write(body[: script.pause_at])
            handler.wfile.flush()
            script.paused.set()
            script.resume.wait(30)
            body = body[script.pause_at :]
        handler.wfile.write(body)

    def __enter__(self) -> ScriptedServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.script.resume.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def scripted_server() -> Iterator[ScriptedServer]:
    with ScriptedServer(ServerScript()) as server:
        yield server
