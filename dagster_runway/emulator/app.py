"""The emulator's HTTP side: a Starlette app speaking RunComfy's Model API protocol.

API calls under ``/v1`` need ``Authorization: Bearer <token>``, the catalog's reads too (RunComfy's
own clients send the token there). Videos under ``/files`` are
served without auth, like a CDN. The ``/_emulator`` admin endpoints need no auth either: the
emulator binds to loopback by default, so only local processes reach them.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.server import ServerState

from dagster_runway._redact import redact_url
from dagster_runway.emulator.catalog import DEFAULT_LIMIT, MAX_LIMIT, Catalog, served_entry
from dagster_runway.emulator.catalog_models import CatalogModel
from dagster_runway.emulator.config import EmulatorConfig
from dagster_runway.emulator.faults import ApiCall, FaultBook, FaultRule, FaultStage, Hit
from dagster_runway.emulator.holds import Holds
from dagster_runway.emulator.inputs import InputInvalid, parse_body, validate_input
from dagster_runway.emulator.ledger import account_id
from dagster_runway.emulator.render import Video
from dagster_runway.emulator.responses import error_response
from dagster_runway.emulator.state import (
    ForeignRequest,
    GenerationFailure,
    InsufficientBalance,
    RequestView,
    State,
    Store,
    UnknownRequest,
)

logger = logging.getLogger(__name__)

# What /status says for each state: a finished request is "completed" whether it succeeded or not.
_STATUS_NAMES: dict[State, str] = {
    "in_queue": "in_queue",
    "in_progress": "in_progress",
    "succeeded": "completed",
    "failed": "completed",
    "cancelled": "cancelled",
}

_FAULT_RULES = TypeAdapter(list[FaultRule])


class _Release(BaseModel):
    model_config = ConfigDict(extra="forbid")

    count: int | None = Field(default=None, ge=0, description="How many held answers to release; None: all.")


class ApiError(Exception):
    """An error answer: HTTP status, RunComfy's six-digit error code, a message and a detail."""

    def __init__(self, status: int, code: int, message: str, detail: Any = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.detail = status, code, message, detail


def _timestamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="microseconds")


class EmulatorApp:
    """Routes and handlers; ``asgi`` is the app to serve."""

    def __init__(self, config: EmulatorConfig, store: Store, faults: FaultBook, holds: Holds) -> None:
        self._config = config
        self._store = store
        self._faults = faults
        self._holds = holds
        self._accounts = {token: account_id(token) for token in config.tokens}
        # The server's connections, set once the server exists: needed to drop one on purpose.
        self.server_state: ServerState | None = None
        self.asgi = Starlette(
            routes=[
                # The exact paths first: "categories" is not a model id, and /v1/models is not redirected.
                Route("/v1/models", self._models, methods=["GET"]),
                Route("/v1/models/categories", self._categories, methods=["GET"]),
                Route("/v1/models/{model_id:path}", self._model, methods=["GET"]),
                Route("/v1/models/{model_id:path}", self._submit, methods=["POST"]),
                Route("/v1/requests/{request_id}/status", self._status, methods=["GET"]),
                Route("/v1/requests/{request_id}/result", self._result, methods=["GET"]),
                Route("/v1/requests/{request_id}/cancel", self._cancel, methods=["POST"]),
                Route("/files/{request_id}.mp4", self._file, methods=["GET", "HEAD"]),
                Route("/_emulator/ledger", self._ledger, methods=["GET"]),
                Route("/_emulator/reset", self._reset, methods=["POST"]),
                Route("/_emulator/faults", self._add_faults, methods=["POST"]),
                Route("/_emulator/faults", self._clear_faults, methods=["DELETE"]),
                Route("/_emulator/pause", self._pause, methods=["POST"]),
                Route("/_emulator/resume", self._resume, methods=["POST"]),
                Route("/_emulator/held", self._held, methods=["GET"]),
                Route("/_emulator/release", self._release, methods=["POST"]),
            ],
            middleware=[Middleware(_Latency, seconds=config.latency_seconds)],
            exception_handlers={
                ApiError: self._api_error,
                InputInvalid: self._input_invalid,
                HTTPException: self._http_error,
                Exception: self._internal_error,
            },
        )

    # The API

    async def _submit(self, request: Request) -> Response:
        account = self._account(request)
        model_id = request.path_params["model_id"]
        other: CatalogModel | None = None
        if model_id != self._config.model_id:
            entry = self.catalog().get(model_id)
            other = CatalogModel.of(entry) if entry is not None else None
            if other is None:
                raise ApiError(
                    404,
                    400001,
                    f"Unknown model {model_id!r}; this emulator serves {self._config.model_id}"
                    + (" and the catalog models it can render" if self._config.catalog else ""),
                )
        # Faults come before validation, as a gateway's would; an unparsable body is reported after them.
        body: Any = None
        invalid: InputInvalid | None = None
        try:
            body = parse_body(await request.body())
        except InputInvalid as exc:
            invalid = exc
        hint = body if isinstance(body, dict) else None
        if (response := await self._fault("submit", "call", hint, request)) is not None:
            return response
        if invalid is not None:
            raise invalid
        if other is not None:
            model_input = other.validate(body, allow_any_http=self._config.allow_any_http)
        else:
            model_input = validate_input(body, allow_any_http=self._config.allow_any_http)
        rule = self._faults.pick("submit", "generation", model_input.fields)
        injected = GenerationFailure(rule.failure_code, rule.message) if rule is not None else None
        try:
            price = other.price if other is not None else None
            request_id = self._store.submit(account, model_input, model_id, injected, price)
        except InsufficientBalance as exc:
            raise ApiError(
                self._config.insufficient_balance_status, 400002, f"Insufficient balance: {exc}"
            ) from exc
        logger.info(
            "emulator: accepted request %s of account %s, image %s",
            request_id,
            account,
            redact_url(model_input.prompt_image),
        )
        accepted = await self._fault("submit", "accepted", model_input.fields, request, request_id=request_id)
        if accepted is not None:
            return accepted
        return JSONResponse(
            {"request_id": request_id, **self._urls(request, request_id, "status", "result", "cancel")}
        )

    async def _model(self, request: Request) -> Response:
        self._account(request)
        if (response := await self._fault("models", "call", None, request)) is not None:
            return response
        model_id = request.path_params["model_id"]
        entry = self.catalog().get(model_id)
        if entry is None:
            raise ApiError(
                404, 400001, f"Unknown model {model_id!r}; see GET /v1/models for the models listed"
            )
        return JSONResponse(entry.model_dump(mode="json"))

    async def _models(self, request: Request) -> Response:
        self._account(request)
        if (response := await self._fault("models", "call", None, request)) is not None:
            return response
        query = request.query_params
        limit = _query_int(query, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
        offset = _query_int(query, "offset", 0, 0, None)
        found = self.catalog().search(query.get("search"), query.get("category"))
        return JSONResponse(
            {
                "models": [entry.model_dump(mode="json") for entry in found[offset : offset + limit]],
                "total": len(found),
                "limit": limit,
                "offset": offset,
            }
        )

    async def _categories(self, request: Request) -> Response:
        self._account(request)
        if (response := await self._fault("models", "call", None, request)) is not None:
            return response
        return JSONResponse({"categories": self.catalog().categories()})

    async def _status(self, request: Request) -> Response:
        account, request_id = self._account(request), request.path_params["request_id"]
        if (response := await self._fault("status", "call", self._fields(request_id), request)) is not None:
            return response
        view = self._view(account, request_id)
        body: dict[str, Any] = {"request_id": request_id, "status": _STATUS_NAMES[view.state]}
        if view.queue_position is not None:
            body["queue_position"] = view.queue_position
        return JSONResponse(body | self._urls(request, request_id, "status", "result"))

    async def _result(self, request: Request) -> Response:
        account, request_id = self._account(request), request.path_params["request_id"]
        if (response := await self._fault("result", "call", self._fields(request_id), request)) is not None:
            return response
        view = self._view(account, request_id)
        body: dict[str, Any] = {
            "request_id": request_id,
            "model_id": self._config.model_id,
            "status": view.state,
            "created_at": _timestamp(view.created),
        }
        if view.started is not None:
            body["started_at"] = _timestamp(view.started)
        if view.finished is not None:
            body["finished_at"] = _timestamp(view.finished)
        if view.video is not None:
            body["output"] = {"video": f"{_base(request)}/files/{request_id}.mp4"}
        # A generation that ran states what the ledger keeps for it (a refunded failure: 0).
        ran = view.state in ("succeeded", "failed")
        if ran and request.query_params.get("include_cost", "").lower() in ("true", "1"):
            body["cost"] = view.cost
        if view.failure is not None:
            body["error"] = {"code": view.failure.code, "message": view.failure.message}
        return JSONResponse(body)

    async def _cancel(self, request: Request) -> Response:
        account, request_id = self._account(request), request.path_params["request_id"]
        if (response := await self._fault("cancel", "call", self._fields(request_id), request)) is not None:
            return response
        try:
            view, cancelled = self._store.cancel(account, request_id)
        except (UnknownRequest, ForeignRequest) as exc:
            raise _not_yours(exc, request_id) from exc
        outcome = "cancelled" if cancelled else "not_cancellable"
        return JSONResponse(
            {"request_id": request_id, "status": _STATUS_NAMES[view.state], "outcome": outcome},
            status_code=202,
        )

    async def _file(self, request: Request) -> Response:
        request_id = request.path_params["request_id"]
        view = self._store.peek(request_id)
        fields, video = (view.fields, view.video) if view is not None else (None, None)
        if (response := await self._fault("files", "call", fields, request, video)) is not None:
            return response
        if video is None:
            raise ApiError(404, 404001, f"No video for request {request_id} (unknown, unfinished or expired)")
        return FileResponse(video.path, media_type="video/mp4")

    # Admin

    async def _ledger(self, request: Request) -> Response:
        return JSONResponse(self._store.ledger().model_dump(mode="json"))

    async def _reset(self, request: Request) -> Response:
        self.reset()
        return JSONResponse({"reset": True})

    async def _add_faults(self, request: Request) -> Response:
        try:
            payload = json.loads(await request.body())
            rules = _FAULT_RULES.validate_python(payload if isinstance(payload, list) else [payload])
        except ValueError as exc:
            detail = json.loads(exc.json(include_url=False)) if isinstance(exc, ValidationError) else str(exc)
            raise ApiError(422, 422001, "Invalid fault rule", detail) from exc
        for rule in rules:
            self._faults.add(rule)
        return JSONResponse({"faults": self._faults.listing()})

    async def _clear_faults(self, request: Request) -> Response:
        self._faults.clear()
        return JSONResponse({"faults": []})

    async def _pause(self, request: Request) -> Response:
        self._store.pause()
        return JSONResponse({"paused": True})

    async def _resume(self, request: Request) -> Response:
        self._store.resume()
        return JSONResponse({"paused": False})

    async def _held(self, request: Request) -> Response:
        request_ids = self._holds.held()
        return JSONResponse({"held": len(request_ids), "request_ids": request_ids})

    async def _release(self, request: Request) -> Response:
        raw = await request.body()
        try:
            count = _Release.model_validate_json(raw).count if raw.strip() else None
        except ValidationError as exc:
            raise ApiError(422, 422001, "Invalid release", json.loads(exc.json(include_url=False))) from exc
        released = self._holds.release(count)
        return JSONResponse({"released": released, "held": len(self._holds.held())})

    def catalog(self) -> Catalog:
        """The catalog now: the served model's entry follows the config's price."""
        config = self._config
        served = served_entry(config.model_id, config.price_usd, config.price_unit, config.input_schema)
        return Catalog(served, config.catalog)

    def reset(self) -> None:
        """Wipe requests, ledger and faults."""
        self._store.reset()
        self._faults.reset()

    # Helpers

    def _account(self, request: Request) -> str:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if not token.strip():
            raise ApiError(
                self._config.auth_error_status, 400004, "No API token: send 'Authorization: Bearer <token>'"
            )
        account = self._accounts.get(token.strip()) if scheme.lower() == "bearer" else None
        if account is None:
            raise ApiError(
                self._config.auth_error_status, 400004, "The API token is invalid, expired or revoked"
            )
        return account

    def _fields(self, request_id: str) -> dict[str, Any] | None:
        view = self._store.peek(request_id)
        return view.fields if view is not None else None

    def _view(self, account: str, request_id: str) -> RequestView:
        try:
            return self._store.view(account, request_id)
        except (UnknownRequest, ForeignRequest) as exc:
            raise _not_yours(exc, request_id) from exc

    def _urls(self, request: Request, request_id: str, *names: str) -> dict[str, str]:
        prefix = f"{_base(request)}/v1/requests/{request_id}"
        return {f"{name}_url": f"{prefix}/{name}" for name in names}

    async def _fault(
        self,
        call: ApiCall,
        stage: FaultStage,
        fields: dict[str, Any] | None,
        request: Request,
        video: Video | None = None,
        request_id: str | None = None,
    ) -> Response | None:
        """The answer of the fault rule that fires here, if one does; None to answer normally."""
        rule = self._faults.pick(call, stage, fields)
        if rule is None:
            return None
        logger.info("emulator: injecting %s on %s", rule.kind, call)
        hit = Hit(call, request, functools.partial(self._transport, request), self._holds, request_id, video)
        return await rule.answer(hit)

    def _transport(self, request: Request) -> asyncio.Transport:
        client = request.scope.get("client")
        connections = self.server_state.connections if self.server_state is not None else ()
        for connection in list(connections):
            if getattr(connection, "client", None) == client:
                return connection.transport
        raise RuntimeError("emulator: cannot find this request's connection")

    # Error answers

    async def _api_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return error_response(exc.status, exc.code, exc.message, exc.detail)

    async def _input_invalid(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, InputInvalid)
        return error_response(422, 422001, f"Input validation failed: {exc}", exc.detail)

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return error_response(
            exc.status_code,
            exc.status_code * 1000 + 1,
            exc.detail,
            headers=dict(exc.headers) if exc.headers else None,
        )

    async def _internal_error(self, request: Request, exc: Exception) -> Response:
        logger.error("emulator: internal error on %s", request.url.path, exc_info=exc)
        return error_response(500, 500001, f"Internal error: {type(exc).__name__}")


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def _query_int(query: Any, name: str, default: int, low: int, high: int | None) -> int:
    """A whole-number query parameter within bounds, or a 422 naming it."""
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    bounds = f"from {low} to {high}" if high is not None else f"{low} or more"
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < low or (high is not None and value > high):
        message = f"Query parameter {name}={raw[:40]!r} must be a whole number {bounds}"
        detail = [{"loc": ["query", name], "msg": message, "type": "value_error"}]
        raise ApiError(422, 422001, message, detail)
    return value


def _not_yours(exc: Exception, request_id: str) -> ApiError:
    if isinstance(exc, ForeignRequest):
        return ApiError(403, 403001, f"Request {request_id} belongs to another account")
    return ApiError(404, 404001, f"Request {request_id} not found (unknown, deleted or expired)")


class _Latency:
    """Delays every API and file answer, without blocking other requests."""

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self._app, self._seconds = app, seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._seconds and scope["type"] == "http" and scope["path"].startswith(("/v1/", "/files/")):
            await asyncio.sleep(self._seconds)
        await self._app(scope, receive, send)
