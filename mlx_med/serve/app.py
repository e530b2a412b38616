"""The HTTP layer: a Starlette app with OpenAI's endpoints over the batching scheduler.

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions``,
``POST /v1/completions`` and llama.cpp's ``GET/POST /lora-adapters``. Every refusal is an
OpenAI-style error object with a 4xx status (``mlx_med.serve.errors``); a request is checked in
full before it reaches the batch, so a bad one never disturbs the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from mlx_med.serve.errors import ApiError
from mlx_med.serve.mixes import MixCatalog
from mlx_med.serve.scheduler import Scheduler
from mlx_med.serve.schemas import (
    CompletionRequest,
    Defaults,
    chunk_body,
    completion_body,
    new_id,
    parse_chat,
    parse_completion,
    usage_chunk,
)

log = logging.getLogger("mlx_med.serve")
# How often a waiting non-streaming request checks that its client is still there.
DISCONNECT_POLL_S = 0.25


@dataclass
class ServerState:
    """Everything the handlers need; built by ``mlx_med.serve.server.build_state``."""

    tokenizer: Any
    scheduler: Scheduler
    catalog: MixCatalog
    defaults: Defaults
    system: str | None  # added to chat requests without a system message (as ``mlx-med chat`` does)
    window: int  # context length in tokens
    api_key: str | None = None
    max_body_bytes: int = 1_000_000
    log_prompts: bool = False


def create_app(state: ServerState) -> Starlette:
    """The ASGI app; the scheduler's thread starts and stops with it."""

    def guarded(handler: Callable) -> Callable:
        async def endpoint(request: Request) -> Response:
            try:
                check_key(request, state.api_key)
                return await handler(request)
            except ApiError as err:
                return error_response(err)
        return endpoint

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "active_requests": state.scheduler.active})

    async def models(request: Request) -> Response:
        created = int(time.time())
        return JSONResponse({"object": "list", "data": [
            {"id": i, "object": "model", "created": created, "owned_by": "mlx-med"}
            for i in state.catalog.model_ids()]})

    async def lora_get(request: Request) -> Response:
        return JSONResponse(state.catalog.lora_list())

    async def lora_post(request: Request) -> Response:
        body = await read_json(request, state.max_body_bytes)
        state.catalog.weights = state.catalog.parse_lora(body, where="body")
        log.info("server-wide adapter scales: %s", state.catalog.weights)
        return JSONResponse({"success": True})

    async def chat(request: Request) -> Response:
        return await complete(request, state, parse_chat)

    async def completions(request: Request) -> Response:
        return await complete(request, state, parse_completion)

    async def on_http_error(request: Request, exc: HTTPException) -> Response:
        kind = {404: f"no such endpoint: {request.method} {request.url.path}",
                405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return error_response(ApiError(exc.status_code, kind))

    async def on_crash(request: Request, exc: Exception) -> Response:
        log.exception("internal error on %s", request.url.path)
        return error_response(ApiError(500, f"internal error: {type(exc).__name__}"))

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", guarded(models), methods=["GET"]),
        Route("/v1/chat/completions", guarded(chat), methods=["POST"]),
        Route("/v1/completions", guarded(completions), methods=["POST"]),
        Route("/lora-adapters", guarded(lora_get), methods=["GET"]),
        Route("/lora-adapters", guarded(lora_post), methods=["POST"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.scheduler.start()
        yield
        state.scheduler.stop()

    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={HTTPException: on_http_error, Exception: on_crash})


def error_response(err: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def check_key(request: Request, api_key: str | None) -> None:
    """Refuse (401) unless ``Authorization: Bearer <api_key>`` matches, compared in constant time."""
    if api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')", code="invalid_api_key")


async def read_json(request: Request, limit: int) -> Any:
    """The body parsed as JSON, refusing bodies over ``limit`` bytes (413) before reading them whole."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {declared} bytes; this server accepts at most {limit}")
    data = bytearray()
    async for piece in request.stream():
        data += piece
        if len(data) > limit:
            raise ApiError(413, f"the request body is over this server's limit of {limit} bytes")
    try:
        return json.loads(bytes(data))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON ({err})") from None


def encode(state: ServerState, request: CompletionRequest) -> list[int]:
    """Prompt ids: chat messages through the chat template (with the default system prompt), or raw text."""
    from mlx_med.evaluation.generate import encode_chat

    if request.messages is None:
        return list(state.tokenizer.encode(request.prompt))
    try:
        return encode_chat(state.tokenizer, request.messages, state.system)
    except Exception as err:  # jinja templates raise their own errors (roles out of order, ...)
        raise ApiError(400, f"the model's chat template refused these messages: {err}", param="messages") from None


async def complete(request: Request, state: ServerState, parse: Callable) -> Response:
    """``/v1/chat/completions`` and ``/v1/completions``: check, queue, then answer whole or as SSE."""
    started = time.perf_counter()
    body = await read_json(request, state.max_body_bytes)
    req = parse(body, state.catalog, state.defaults)
    prompt = encode(state, req)
    room = state.window - len(prompt)
    if room < 1:
        raise ApiError(400, f"the prompt is {len(prompt)} tokens; this model's context window is {state.window}",
                       param="messages" if req.messages is not None else "prompt", code="context_length_exceeded")
    sampling = replace(req.sampling, max_tokens=min(req.sampling.max_tokens, room))
    job = state.scheduler.submit(prompt, req.weights, sampling)
    rid = new_id("chatcmpl" if req.messages is not None else "cmpl")
    alpha = req.weights.get("sft") if state.catalog.pair and _sums_to_one(req.weights) else None
    text = TextStream(state.tokenizer, sampling.stop)
    what = {"id": rid, "path": request.url.path, "model": req.model, "weights": req.weights,
            "prompt_tokens": len(prompt), "stream": req.stream}
    if state.log_prompts:
        what["input"] = req.messages if req.messages is not None else req.prompt

    def finished(finish: str) -> None:
        log.info("%s", json.dumps({**what, "completion_tokens": text.count, "finish_reason": finish,
                                   "seconds": round(time.perf_counter() - started, 3)}, ensure_ascii=False))

    if not req.stream:
        finish = "cancelled"
        try:
            async for _piece, reason in run(job, state.scheduler, text, request):
                finish = reason or finish
        except asyncio.CancelledError:
            finished("disconnected")
            raise
        except Exception as err:
            finished("error")
            return error_response(ApiError(500, f"generation failed: {err}"))
        if finish == "cancelled":
            finished("disconnected")
            return Response(status_code=499)
        finished(finish)
        return JSONResponse(completion_body(req, rid, text.final, finish, len(prompt), text.count, alpha))

    async def events() -> AsyncIterator[str]:
        finish = "disconnected"
        try:
            yield sse(chunk_body(req, rid, "" if req.messages is not None else None, None, first=True))
            async for piece, reason in run(job, state.scheduler, text, request=None):
                if piece:
                    yield sse(chunk_body(req, rid, piece, None))
                if reason:
                    finish = reason
                    yield sse(chunk_body(req, rid, None, reason))
            if req.include_usage:
                yield sse(usage_chunk(req, rid, len(prompt), text.count))
            yield "data: [DONE]\n\n"
        except asyncio.CancelledError:
            raise
        except Exception as err:  # headers are sent: the error travels as an event
            finish = "error"
            yield sse(ApiError(500, f"generation failed: {err}").body())
        finally:
            state.scheduler.cancel(job)
            finished(finish)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _sums_to_one(weights: dict[str, float]) -> bool:
    return abs(sum(weights.values()) - 1.0) < 1e-9


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def run(job, scheduler: Scheduler, text: TextStream, request: Request | None) -> AsyncIterator[tuple[str, str | None]]:
    """Yield ``(new text, finish_reason or None)`` as the job's tokens arrive.

    Stops early (and frees the batch slot) on a stop string, or when ``request``'s client has gone.
    The stop token itself is not part of the answer.
    """
    getter = None
    try:
        while True:
            getter = asyncio.ensure_future(job.queue.get())
            while not getter.done():
                await asyncio.wait({getter}, timeout=DISCONNECT_POLL_S)
                if not getter.done() and request is not None and await request.is_disconnected():
                    getter.cancel()
                    return
            event = getter.result()
            if isinstance(event, BaseException):
                raise event
            token, finish = event
            piece = text.add(token, counted=finish != "stop")
            if text.stopped:
                yield text.flush(), "stop"
                return
            if finish is not None:
                yield piece + text.flush(), finish
                return
            yield piece, None
    finally:
        if getter is not None and not getter.done():
            getter.cancel()
        scheduler.cancel(job)


class TextStream:
    """Tokens → text pieces that add up to the answer decoded in one go (special tokens left out).

    Each step decodes the whole answer so far and sends what is new; a piece ending in an
    incomplete UTF-8 character, or that could be the start of a stop string, is held back.
    """

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.sent = ""
        self.final = ""
        self.stopped = False
        self._hold = max((len(s) for s in stops), default=1) - 1

    @property
    def count(self) -> int:
        return len(self.ids)

    def add(self, token: int, counted: bool = True) -> str:
        if counted:
            self.ids.append(token)
        self.final = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for stop in self.stops:
            at = self.final.find(stop)
            if at >= 0:
                self.final, self.stopped = self.final[:at], True
        if self.stopped or self.final.endswith("\ufffd") or not self.final.startswith(self.sent):
            return ""
        ready = self.final[: len(self.final) - self._hold] if self._hold else self.final
        piece = ready[len(self.sent):]
        self.sent += piece
        return piece

    def flush(self) -> str:
        """What is left of the answer once it has ended."""
        piece = self.final[len(self.sent):] if self.final.startswith(self.sent) else ""
        self.sent += piece
        return piece
