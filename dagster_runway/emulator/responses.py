"""Answers shared by the API and the faults: the error body, and the ways to not answer properly."""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from dagster_runway.emulator.render import Video

# What a gateway or a captive portal answers in the API's place: pages, not the API's error body.
GATEWAY_404_PAGE = (
    b"<html><head><title>404 Not Found</title></head><body><center><h1>404 Not Found</h1></center>"
    b"<hr><center>nginx</center></body></html>"
)
PORTAL_PAGE = b"<!doctype html><html><body><h1>Sign in to the network</h1><form></form></body></html>"


def error_response(
    status: int,
    code: int,
    message: str,
    detail: Any = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    """RunComfy's error body: a six-digit ``error_code``, a message and a detail."""
    body = {"error_code": code, "error_message": message, "detail": detail, **extra}
    return JSONResponse(body, status_code=status, headers=headers)


async def until_disconnected(receive: Receive) -> None:
    """Return once the client has gone (the request body must have been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class DropConnection(Response):
    """Resets the TCP connection (RST, through SO_LINGER 0) instead of answering."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sock = self._transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._transport.abort()
        await until_disconnected(receive)


class TruncatedFile(Response):
    """Announces the whole video, sends a fraction of it, then closes the connection."""

    def __init__(self, video: Video, fraction: float, transport: asyncio.Transport) -> None:
        self._video, self._fraction, self._transport = video, fraction, transport

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        data = self._video.path.read_bytes()
        headers = [(b"content-type", b"video/mp4"), (b"content-length", str(len(data)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send(
            {"type": "http.response.body", "body": data[: int(len(data) * self._fraction)], "more_body": True}
        )
        # close() sends what is buffered first, then ends the connection.
        self._transport.close()
        await until_disconnected(receive)
