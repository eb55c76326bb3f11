"""The OpenAI chat-completions request, validated, and the response objects.

Only what tunelab can honour is accepted: an unknown role, a non-text content part, a value
out of range or of the wrong type is a 400 with OpenAI's error shape
(``{"error": {"message", "type", "param", "code"}}``), never a silent default.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

ROLES = ("system", "user", "assistant")
MAX_N = 8
MAX_STOP = 4


class RequestError(ValueError):
    """A request the server refuses; ``status`` is the HTTP status (400 unless said)."""

    def __init__(self, message: str, param: Optional[str] = None, status: int = 400, code: Optional[str] = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.kind = message, param, status, code, kind

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass
class ChatRequest:
    messages: list[dict]
    model: Optional[str] = None
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    n: int = 1
    stream: bool = False
    seed: Optional[int] = None


def _number(body: dict, key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise RequestError(f"{key} must be a number, got {type(v).__name__}", key)
    if v > hi or v < lo or (lo_open and v == lo):
        raise RequestError(f"{key} must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}", key)
    return float(v)


def _integer(body: dict, key: str, default: Optional[int], lo: int, hi: int) -> Optional[int]:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise RequestError(f"{key} must be an integer, got {type(v).__name__}", key)
    if not lo <= v <= hi:
        raise RequestError(f"{key} must be in [{lo}, {hi}], got {v}", key)
    return v


def _content(m: dict, j: int) -> str:
    c = m.get("content")
    if isinstance(c, str):
        return c
    if isinstance(c, list):  # content parts: text only
        parts = []
        for p in c:
            if not (isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)):
                raise RequestError(f"messages[{j}].content: only text parts ({{type: text, text: ...}}) are supported", f"messages[{j}].content")
            parts.append(p["text"])
        return "".join(parts)
    raise RequestError(f"messages[{j}].content must be a string or a list of text parts", f"messages[{j}].content")


def parse_chat_request(body: Any, max_tokens_limit: int) -> ChatRequest:
    """A validated :class:`ChatRequest`, or :class:`RequestError` saying what is wrong."""
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RequestError("messages must be a non-empty list of {role, content}", "messages")
    messages = []
    for j, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise RequestError(f"messages[{j}] must be an object {{role, content}}", f"messages[{j}]")
        role = m.get("role")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if role not in ROLES:
            raise RequestError(f"messages[{j}].role must be one of {list(ROLES)}, got {role!r}", f"messages[{j}].role")
        messages.append({"role": role, "content": _content(m, j)})
    if messages[-1]["role"] == "assistant":
        raise RequestError("the last message must be from the user or the system: the server writes the next assistant turn", "messages")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError("model must be a string", "model")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop) and len(stop) <= MAX_STOP):
        raise RequestError(f"stop must be a non-empty string or a list of at most {MAX_STOP} non-empty strings", "stop")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise RequestError("stream must be true or false", "stream")
    mt = body.get("max_completion_tokens", body.get("max_tokens"))
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer({key: mt}, key, min(256, max_tokens_limit), 1, max_tokens_limit)
    return ChatRequest(
        messages=messages, model=model, max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        stop=stop, n=_integer(body, "n", 1, 1, MAX_N), stream=stream,
        seed=_integer(body, "seed", None, 0, 2**63 - 1),
    )


def new_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def completion_body(cid: str, model: str, created: int, choices: list[tuple[str, str]], prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "id": cid, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": fr, "logprobs": None}
                    for i, (text, fr) in enumerate(choices)],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens},
    }


def chunk_body(cid: str, model: str, created: int, index: int, delta: dict, finish_reason: Optional[str] = None) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}


def models_body(name: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "tunelab"}]}


def now() -> int:
    return int(time.time())
