"""Held answers: the ``hold`` fault records and bills a submit, then keeps its answer until released.

This is the window between "the service accepted and billed" and "the client got the answer",
made as long as a test needs: to kill a client in it, or to look at the ledger from inside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from dataclasses import dataclass
from typing import Any, Literal

from starlette.types import Receive

from dagster_runway.emulator.responses import until_disconnected

logger = logging.getLogger(__name__)

HoldOutcome = Literal["released", "dropped", "gone"]


@dataclass(eq=False)
class _Held:
    request_id: str
    loop: asyncio.AbstractEventLoop
    outcome: asyncio.Future[HoldOutcome]


class Holds:
    """The answers held now, oldest first. Every method but ``hold`` may be called from any thread."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._held: list[_Held] = []
        self._closed = False

    async def hold(self, request_id: str, receive: Receive) -> HoldOutcome:
        """Hold an answer until it is released, dropped (the emulator stops) or the client has gone.

        ``receive`` is the request's ASGI receive, its body read already: it reports the disconnect.
        """
        loop = asyncio.get_running_loop()
        held = _Held(request_id, loop, loop.create_future())
        with self._changed:
            if self._closed:
                return "dropped"
            self._held.append(held)
            self._changed.notify_all()
        gone = asyncio.ensure_future(until_disconnected(receive))
        try:
            waiting: list[asyncio.Future[Any]] = [held.outcome, gone]
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            with self._changed:
                if held in self._held:
                    self._held.remove(held)
                    self._changed.notify_all()
        if held.outcome.done():
            return held.outcome.result()
        logger.info("emulator: the client of held request %s left; the request stays billed", request_id)
        return "gone"

    def held(self) -> list[str]:
        """The request ids of the held answers, oldest first."""
        with self._changed:
            return [held.request_id for held in self._held]

    def release(self, count: int | None = None) -> list[str]:
        """Let the oldest ``count`` held answers go (all if None); return their request ids."""
        with self._changed:
            chosen = self._held[:count] if count is not None else list(self._held)
            del self._held[: len(chosen)]
            self._changed.notify_all()
        for held in chosen:
            _settle(held, "released")
        return [held.request_id for held in chosen]

    def drop_all(self) -> None:
        """Drop every held answer (their connections are closed unanswered), and any held later."""
        with self._changed:
            chosen, self._held, self._closed = self._held, [], True
            self._changed.notify_all()
        for held in chosen:
            _settle(held, "dropped")

    def wait_for(self, count: int, timeout: float) -> list[str]:
        """Block until exactly ``count`` answers are held; return their request ids.

        Raises TimeoutError if that does not happen within ``timeout`` seconds.
        """
        with self._changed:
            if not self._changed.wait_for(lambda: len(self._held) == count, timeout):
                raise TimeoutError(
                    f"{len(self._held)} answers are held, not {count}, after waiting {timeout:g} s"
                )
            return [held.request_id for held in self._held]


def _settle(held: _Held, outcome: HoldOutcome) -> None:
    def settle() -> None:
        if not held.outcome.done():
            held.outcome.set_result(outcome)

    with contextlib.suppress(RuntimeError):  # the loop has closed: the answer went with it
        held.loop.call_soon_threadsafe(settle)
