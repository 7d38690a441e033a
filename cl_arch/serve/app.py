"""The HTTP API of ``cl-arch serve`` (FastAPI): OpenAI-compatible completions, rewards over the
network, session reads and deletion, health, Prometheus metrics and a status page.

| route | body | answer |
| --- | --- | --- |
| ``POST /v1/completions`` | ``prompt`` (text or ids), ``max_tokens``, ``temperature``, ``top_p``, ``stop``, ``stream``, ``user`` (the session id) | OpenAI ``text_completion``; with ``stream`` server-sent events ending ``data: [DONE]`` |
| ``POST /v1/sessions/{id}/reward`` | ``{"reward": r}`` (``null``: commit without reward) | the session's counts and ``stored_sha256``, once the store has the commit |
| ``POST /v1/sessions/{id}/observe`` | ``{"text": ...}`` | tokens read, bits per token |
| ``GET``/``DELETE /v1/sessions/{id}`` | | counts, ``p_sha256``, ``stored_sha256`` / ``deleted`` |
| ``GET /health``, ``/metrics``, ``/``, ``/status.json`` | | liveness; Prometheus text; status page and its data |

Errors are ``{"error": {"message", "type", "param", "code"}}``; a broken limit is named in
``code`` and in the message (``max_tokens``, ``max_request_bytes``, ``max_queue``, ...). With
bearer tokens (``tokens``: token -> ids it may use, or ``"*"`` for all and for the status data),
a request without one gets 401 and one for an id its token is not bound to 403.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import Iterable
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    StreamingResponse,
)
from pydantic import BaseModel, ConfigDict, ValidationError

from .config import RequestError, encode
from .engine import Engine, Job
from .status import STATUS_PAGE

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error"}


class CompletionRequest(BaseModel):
    """``POST /v1/completions``. Fields OpenAI has and this server does not support are accepted
    only at their defaults (``n=1``, no ``logprobs``, ...); unknown fields are refused."""
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | list[int]
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    user: str | None = None
    n: Literal[1] = 1
    best_of: Literal[1] | None = None
    echo: Literal[False] = False
    logprobs: None = None
    suffix: None = None
    presence_penalty: Literal[0] = 0
    frequency_penalty: Literal[0] = 0


class RewardRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reward: float | None


class ObserveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str


def _error(e: RequestError) -> JSONResponse:
    kind = _TYPES.get(e.status, "server_error")
    return JSONResponse({"error": {"message": e.message, "type": kind, "param": e.param, "code": e.code}},
                        status_code=e.status)


async def _read_json(request: Request, limit: int, model):
    """The body parsed into ``model``; RequestError 413 past ``limit`` bytes, 400 if invalid."""
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > limit:
        raise RequestError(413, f"request body of {size} bytes exceeds the server's limit "
                           f"max_request_bytes={limit}", "max_request_bytes")
    body = bytearray()
    async for chunk in request.stream():  # a chunked body has no length up front
        body += chunk
        if len(body) > limit:
            raise RequestError(413, f"request body exceeds the server's limit max_request_bytes={limit}",
                               "max_request_bytes")
    try:
        return model.model_validate(json.loads(body))
    except json.JSONDecodeError as e:
        raise RequestError(400, f"request body is not JSON: {e}", "invalid_json") from None
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(x) for x in err["loc"]) or "body"
        raise RequestError(400, f"{field}: {err['msg']}", "invalid_field", field) from None


def _check_token(tokens: dict[str, object] | None, request: Request, uid: str | None) -> None:
    """401 without a known bearer token, 403 when it is not bound to ``uid`` (None: needs ``"*"``)."""
    if tokens is None:
        return
    got = request.headers.get("authorization", "")
    scheme, _, token = got.partition(" ")
    allowed = None
    if scheme.lower() == "bearer":
        for known, ids in tokens.items():
            if hmac.compare_digest(known.encode(), token.strip().encode()):
                allowed = ids
    if allowed is None:
        raise RequestError(401, "a valid bearer token is required (Authorization: Bearer <token>)", "unauthorized")
    if allowed != "*" and (uid is None or uid not in allowed):
        raise RequestError(403, f"this token is not bound to session {uid!r}" if uid else
                           "this token may not read server-wide data", "forbidden", "user")


async def _call(engine: Engine, kind: str, uid: str, args: dict, queue: asyncio.Queue | None = None):
    """Submit a job; await its result, or (with ``queue``) return at once and feed the queue."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def post(fn, *a):
        try:
            loop.call_soon_threadsafe(fn, *a)
        except RuntimeError:  # the loop closed: the client is gone
            pass

    def settle(value, error):
        if queue is not None:
            queue.put_nowait(("error", error) if error else ("done", value))
        elif not fut.done():
            fut.set_exception(error) if error else fut.set_result(value)

    on_text = (lambda piece: post(queue.put_nowait, ("text", piece))) if queue is not None else None
    engine.submit(Job(kind, uid, args, lambda r: post(settle, r, None), lambda e: post(settle, None, e), on_text))
    return None if queue is not None else await fut


def _completion_body(cid: str, created: int, name: str, text: str, reason, usage=None) -> dict:
    body = {"id": cid, "object": "text_completion", "created": created, "model": name,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": reason}]}
    if usage is not None:
        body["usage"] = usage
    return body


def create_app(engine: Engine, tokens: dict[str, str | Iterable[str]] | None = None,
               model_name: str = "cl_arch") -> FastAPI:
    """The FastAPI app serving ``engine`` (started and stopped with the app's lifespan).

    Args:
        tokens: bearer token -> the session ids it may use (a list) or ``"*"`` (every id, and
            ``/status.json``); None: no authentication.
        model_name: what completions report as ``model``.
    """
    if tokens is not None:
        tokens = {str(k): ("*" if v == "*" else frozenset(v)) for k, v in tokens.items()}

    async def lifespan(app):
        if engine._thread is None:
            engine.start()
        yield
        engine.stop()

    app = FastAPI(title="cl_arch", lifespan=lifespan)

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        response = await call_next(request)
        route = request.scope.get("route")
        engine.metrics.count("requests", (getattr(route, "path", "other"), response.status_code))
        return response

    @app.exception_handler(RequestError)
    async def request_error(request: Request, e: RequestError):
        if e.code.startswith("max_") and e.status != 429:  # the engine counts its own 429s
            engine.metrics.count("rejected", e.code)
        return _error(e)

    _completion_route(app, engine, tokens, model_name)
    _session_routes(app, engine, tokens)
    _info_routes(app, engine, tokens, model_name)
    return app


def _completion_route(app: FastAPI, engine: Engine, tokens, model_name: str) -> None:
    """``POST /v1/completions``, plain or streamed."""
    limit = engine.config.max_request_bytes

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await _read_json(request, limit, CompletionRequest)
        if not req.user:
            raise RequestError(400, "user is required: it names the session whose memory reads and learns",
                               "user_required", "user")
        _check_token(tokens, request, req.user)
        prompt = encode(req.prompt, engine.model.config.vocab_size) if isinstance(req.prompt, str) else req.prompt
        stop = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        args = {"prompt": prompt, "max_tokens": req.max_tokens, "temperature": req.temperature,
                "top_p": None if req.top_p in (None, 1, 1.0) else req.top_p, "stop": stop}
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if not req.stream:
            r = await _call(engine, "complete", req.user, args)
            usage = {"prompt_tokens": r["prompt_tokens"], "completion_tokens": r["completion_tokens"],
                     "total_tokens": r["prompt_tokens"] + r["completion_tokens"]}
            return _completion_body(cid, created, model_name, r["text"], r["finish_reason"], usage)
        queue: asyncio.Queue = asyncio.Queue()
        await _call(engine, "complete", req.user, args, queue)  # refusals raise here, before the stream

        async def events():
            while True:
                kind, value = await queue.get()
                if kind == "text":
                    yield f"data: {json.dumps(_completion_body(cid, created, model_name, value, None))}\n\n"
                elif kind == "done":
                    body = _completion_body(cid, created, model_name, "", value["finish_reason"])
                    yield f"data: {json.dumps(body)}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                else:
                    yield f"data: {json.dumps({'error': {'message': value.message, 'code': value.code}})}\n\n"
                    return

        return StreamingResponse(events(), media_type="text/event-stream")


def _session_routes(app: FastAPI, engine: Engine, tokens) -> None:
    """Reward, observe, read and delete one session."""
    limit = engine.config.max_request_bytes

    @app.post("/v1/sessions/{uid}/reward")
    async def reward(uid: str, request: Request):
        req = await _read_json(request, limit, RewardRequest)
        _check_token(tokens, request, uid)
        return await _call(engine, "reward", uid, {"reward": req.reward})

    @app.post("/v1/sessions/{uid}/observe")
    async def observe(uid: str, request: Request):
        req = await _read_json(request, limit, ObserveRequest)
        _check_token(tokens, request, uid)
        return await _call(engine, "observe", uid, {"ids": encode(req.text, engine.model.config.vocab_size)})

    @app.get("/v1/sessions/{uid}")
    async def get_session(uid: str, request: Request):
        _check_token(tokens, request, uid)
        return await _call(engine, "get", uid, {})

    @app.delete("/v1/sessions/{uid}")
    async def delete_session(uid: str, request: Request):
        _check_token(tokens, request, uid)
        return await _call(engine, "delete", uid, {})


def _info_routes(app: FastAPI, engine: Engine, tokens, model_name: str) -> None:
    """Health, metrics, the status page and its data."""

    @app.get("/health")
    async def health():
        alive = engine._thread is not None and engine._thread.is_alive()
        return JSONResponse({"status": "ok" if alive else "engine stopped", "model": model_name,
                             "fingerprint": engine.model.fingerprint(), "adapt": engine.config.adapt},
                            status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics.prometheus(), media_type="text/plain; version=0.0.4")

    @app.get("/status.json")
    async def status(request: Request):
        _check_token(tokens, request, None)
        return engine.status()

    @app.get("/")
    async def page():
        return HTMLResponse(STATUS_PAGE)
