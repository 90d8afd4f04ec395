"""A local emulator of RunComfy's Model API for Runway Gen-4 Turbo image-to-video.

It is a real HTTP server (Starlette on uvicorn, in a background thread) that speaks the protocol
of RunComfy's Model API (the README's "The emulator" lists what it serves): submit, status, result and cancel with bearer auth, a queue with
a per-account concurrency limit on an emulator clock, image fetching and checks when a request
starts, real H.264 MP4s (a pan and zoom over the input image) served under ``/files``, a ledger of
what was billed, and fault injection (among the faults, ``hold``: a submit billed whose answer
waits for ``release()``). It validates inputs on its own, so that it can serve as an independent
oracle for the client. With ``state_dir`` it keeps its requests, videos and ledger across restarts.

    with Emulator(EmulatorConfig(time_scale=0.0)) as emu:
        ...  # point a client at emu.base_url with emu.token

It binds to loopback by default; its ``/_emulator`` admin endpoints have no auth.
"""

from dagster_runway.emulator.config import EmulatorConfig
from dagster_runway.emulator.faults import FaultRule
from dagster_runway.emulator.ledger import FingerprintTotal, Ledger, LedgerEntry, account_id
from dagster_runway.emulator.persist import StateDirError
from dagster_runway.emulator.server import Emulator

__all__ = [
    "Emulator",
    "EmulatorConfig",
    "FaultRule",
    "FingerprintTotal",
    "Ledger",
    "LedgerEntry",
    "StateDirError",
    "account_id",
]
