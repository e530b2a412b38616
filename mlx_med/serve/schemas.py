"""Request bodies checked field by field, and OpenAI-shaped response bodies.

Every mistake becomes an ``ApiError`` naming the field (``messages[2].role``), so a client sees
which part of its request to fix; fields this server does not use are ignored, as OpenAI-compatible
servers commonly do, except those that would silently change the answer (``n`` > 1, tools).
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from mlx_med.serve.errors import ApiError
from mlx_med.serve.mixes import MixCatalog

ROLES = ("system", "developer", "user", "assistant")
MAX_STOP = 4  # as OpenAI


@dataclass
class Defaults:
    """Values for fields a request leaves out, and the ceilings it may not pass."""

    temperature: float = 0.7
    top_p: float = 0.9
    max_tokens: int = 256
    max_tokens_limit: int = 4096


@dataclass
class Sampling:
    temperature: float
    top_p: float
    top_k: int
    max_tokens: int
    seed: int | None
    stop: list[str] = field(default_factory=list)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class CompletionRequest:
    """One validated request for ``/v1/chat/completions`` (``messages``) or ``/v1/completions`` (``prompt``)."""

    model: str
    weights: dict[str, float]
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None


def parse_chat(body: Any, catalog: MixCatalog, defaults: Defaults) -> CompletionRequest:
    """Check a chat-completions body (OpenAI's fields plus ``alpha``, ``lora``, ``top_k``)."""
    body = _object(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
    request = _common(body, catalog, defaults)
    request.messages = [_message(m, i) for i, m in enumerate(messages)]
    return request


def parse_completion(body: Any, catalog: MixCatalog, defaults: Defaults) -> CompletionRequest:
    """Check a (legacy) completions body: a raw ``prompt`` string, no chat template."""
    body = _object(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, "prompt must be a non-empty string (one prompt per request)", param="prompt")
    request = _common(body, catalog, defaults)
    request.prompt = prompt
    return request


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _message(m: Any, i: int) -> dict[str, str]:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise ApiError(400, f"{where} must be an object with role and content", param=where)
    role = m.get("role")
    if role not in ROLES:
        raise ApiError(400, f"{where}.role: {role!r} is not one of {', '.join(ROLES)}", param=f"{where}.role")
    content = m.get("content")
    if isinstance(content, list):  # content parts: only text can be read by a language model
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"{where}.content[{j}]: only {{\"type\": \"text\", \"text\": ...}} parts are "
                                    "supported", param=f"{where}.content[{j}]")
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise ApiError(400, f"{where}.content must be a string", param=f"{where}.content")
    return {"role": "system" if role == "developer" else role, "content": content}


def _common(body: dict, catalog: MixCatalog, defaults: Defaults) -> CompletionRequest:
    model, weights = catalog.resolve(body.get("model"), body.get("alpha"), body.get("lora"))
    n = body.get("n", 1)
    if n not in (1, None):
        raise ApiError(400, f"n must be 1 (one choice per request), got {n!r}", param="n")
    if body.get("tools"):
        raise ApiError(400, "tools are not supported by this server", param="tools")
    stream = _flag(body, "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", param="stream_options")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = defaults.max_tokens if max_tokens is None else max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ApiError(400, f"max_tokens must be a positive integer, got {max_tokens!r}", param="max_tokens")
    if max_tokens > defaults.max_tokens_limit:
        raise ApiError(400, f"max_tokens is {max_tokens}, more than this server's limit of "
                            f"{defaults.max_tokens_limit}", param="max_tokens")
    sampling = Sampling(
        temperature=_number(body, "temperature", defaults.temperature, 0.0, 2.0),
        top_p=_number(body, "top_p", defaults.top_p, 0.0, 1.0, open_low=True),
        top_k=int(_number(body, "top_k", 0, 0, 1e9, integer=True)),
        max_tokens=max_tokens,
        seed=None if body.get("seed") is None else int(_number(body, "seed", 0, -2**63, 2**63 - 1, integer=True)),
        stop=_stop(body.get("stop")),
    )
    return CompletionRequest(model=model, weights=weights, sampling=sampling, stream=stream,
                             include_usage=_flag(options, "include_usage"))


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} must be true or false, got {value!r}", param=name)
    return value


def _number(body: dict, name: str, default: float, low: float, high: float, open_low: bool = False,
            integer: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
        raise ApiError(400, f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}", param=name)
    if value > high or value < low or (open_low and value == low):
        bracket = "(" if open_low else "["
        raise ApiError(400, f"{name} must be in {bracket}{low:g}, {high:g}], got {value}", param=name)
    return value


def _stop(stop: Any) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP:
        raise ApiError(400, f"stop must be a string or a list of up to {MAX_STOP} non-empty strings", param="stop")
    return stops


# ------------------------------------------------------------------------------------ responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(request: CompletionRequest, rid: str, text: str, finish: str, prompt_tokens: int,
                    completion_tokens: int, alpha: float | None) -> dict:
    """The whole answer: ``chat.completion`` or ``text_completion``."""
    if request.messages is not None:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                  "logprobs": None}
        kind = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        kind = "text_completion"
    body = {"id": rid, "object": kind, "created": int(time.time()), "model": request.model, "choices": [choice],
            "usage": usage(prompt_tokens, completion_tokens)}
    if alpha is not None:
        body["alpha"] = alpha
    return body


def chunk_body(request: CompletionRequest, rid: str, text: str | None, finish: str | None,
               first: bool = False) -> dict:
    """One server-sent event's data: a ``chat.completion.chunk`` (or ``text_completion``) piece."""
    if request.messages is not None:
        delta = {"role": "assistant", "content": text or ""} if first else ({} if text is None else {"content": text})
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        kind = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        kind = "text_completion"
    return {"id": rid, "object": kind, "created": int(time.time()), "model": request.model, "choices": [choice]}


def usage_chunk(request: CompletionRequest, rid: str, prompt_tokens: int, completion_tokens: int) -> dict:
    kind = "chat.completion.chunk" if request.messages is not None else "text_completion"
    return {"id": rid, "object": kind, "created": int(time.time()), "model": request.model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}
