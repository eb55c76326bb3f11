"""The Starlette app: OpenAI chat completions over one generation worker with a bounded queue.

One worker thread runs every generation, one request at a time (the model is not shared
between threads); requests wait in a queue of ``max_queue``. A request that finds the queue
full gets a 429 with ``Retry-After`` at once, so overload costs the server nothing and it never
falls over; once the worker has stopped every request gets a 503. A malformed request is a
400 with an OpenAI-style JSON error; any failure inside a generation is a 500 for that request
only. A streaming client that goes away cancels its generation.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Optional

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from .protocol import (ChatRequest, RequestError, chunk_body, completion_body, error_body, models_body, new_id, now,
                       parse_chat_request)

log = logging.getLogger("tunelab")
MAX_BODY = 1 << 20

# generate(request, choice index, on_text, cancelled) -> an infer.generate.Completion-like object
GenerateFn = Callable[[ChatRequest, int, Optional[Callable[[str], None]], threading.Event], Any]


@dataclass(eq=False)
class Job:
    request: ChatRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    cancelled: threading.Event = field(default_factory=threading.Event)

    def post(self, *event: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Engine:
    """The generation worker and its bounded queue."""

    def __init__(self, generate: GenerateFn, max_queue: int = 16):
        self.generate = generate
        self.max_queue = max_queue
        self.queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self.stats = {"completed": 0, "rejected": 0, "failed": 0}
        self.running = True
        self.thread = threading.Thread(target=self._loop, name="tunelab-serve-worker", daemon=True)
        self.thread.start()

    @property
    def alive(self) -> bool:
        return self.running and self.thread.is_alive()

    def submit(self, job: Job) -> None:
        if not self.alive:
            raise RequestError("the server is shutting down", status=503, kind="service_unavailable")
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            self.stats["rejected"] += 1
            raise RequestError(f"the server is busy ({self.max_queue} requests queued); retry shortly", status=429,
                               kind="rate_limit_error", code="queue_full") from None

    def stop(self) -> None:
        self.running = False
        try:
            self.queue.put_nowait(None)
        except queue.Full:
            pass

    def _loop(self) -> None:
        while self.running:
            job = self.queue.get()
            if job is None:
                break
            if job.cancelled.is_set():
                continue
            try:
                for i in range(job.request.n):
                    on_text = (lambda t, i=i: job.post("text", i, t)) if job.request.stream else None
                    job.post("done", i, self.generate(job.request, i, on_text, job.cancelled))
                    if job.cancelled.is_set():
                        break
                self.stats["completed"] += 1
            except Exception as e:  # one request fails, the server goes on
                self.stats["failed"] += 1
                log.exception("generation failed")
                job.post("error", f"generation failed: {type(e).__name__}: {e}")
        # whatever is still queued gets its answer
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.post("error", "the server is shutting down")


def _error(e: RequestError) -> JSONResponse:
    headers = {"Retry-After": "1"} if e.status == 429 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def build_app(engine: Engine, model_name: str, max_tokens_limit: int = 2048, info: Optional[dict] = None) -> Starlette:
    created = now()

    async def health(request: Request) -> JSONResponse:
        body = {"status": "ok" if engine.alive else "stopped", "model": model_name, "queued": engine.queue.qsize(),
                "max_queue": engine.max_queue, **engine.stats, **(info or {})}
        return JSONResponse(body, status_code=200 if engine.alive else 503)

    async def models(request: Request) -> JSONResponse:
        return JSONResponse(models_body(model_name, created))

    async def chat(request: Request):
        try:
            raw = await request.body()
            if len(raw) > MAX_BODY:
                raise RequestError(f"request body over {MAX_BODY} bytes", status=413)
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise RequestError(f"the request body is not valid JSON: {e}") from None
            req = parse_chat_request(body, max_tokens_limit)
            if req.model is not None and req.model != model_name:
                raise RequestError(f"model {req.model!r} is not served here; this server serves {model_name!r} (GET /v1/models)",
                                   "model", status=404, code="model_not_found")
            job = Job(req, asyncio.get_running_loop(), asyncio.Queue())
            engine.submit(job)
        except RequestError as e:
            return _error(e)
        cid, ts = new_id(), now()
        if req.stream:
            include_usage = isinstance(body.get("stream_options"), dict) and bool(body["stream_options"].get("include_usage"))
            return StreamingResponse(_sse(job, cid, ts, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            done = await _collect(job)
        except RequestError as e:
            return _error(e)
        except asyncio.CancelledError:
            job.cancelled.set()
            raise
        choices = [(done[i].text, done[i].finish_reason) for i in range(req.n)]
        return JSONResponse(completion_body(cid, model_name, ts, choices, done[0].prompt_tokens, sum(c.completion_tokens for c in done.values())))

    async def _collect(job: Job) -> dict[int, Any]:
        done: dict[int, Any] = {}
        while len(done) < job.request.n:
            kind, *rest = await job.events.get()
            if kind == "error":
                raise RequestError(rest[0], status=503 if "shutting down" in rest[0] else 500, kind="server_error")
            if kind == "done":
                done[rest[0]] = rest[1]
        return done

    async def _sse(job: Job, cid: str, ts: int, include_usage: bool) -> AsyncIterator[str]:
        def event(obj: dict) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        finished = 0
        started: set[int] = set()
        usage = [0, 0]
        try:
            while finished < job.request.n:
                kind, *rest = await job.events.get()
                if kind == "error":
                    yield event(error_body(rest[0], "server_error"))
                    break
                i = rest[0]
                if i not in started:
                    started.add(i)
                    yield event(chunk_body(cid, model_name, ts, i, {"role": "assistant", "content": ""}))
                if kind == "text":
                    yield event(chunk_body(cid, model_name, ts, i, {"content": rest[1]}))
                elif kind == "done":
                    finished += 1
                    usage = [rest[1].prompt_tokens, usage[1] + rest[1].completion_tokens]
                    yield event(chunk_body(cid, model_name, ts, i, {}, rest[1].finish_reason))
            if include_usage:
                yield event({"id": cid, "object": "chat.completion.chunk", "created": ts, "model": model_name, "choices": [],
                             "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)}})
            yield "data: [DONE]\n\n"
        finally:  # the client went away, or we are done: stop generating for it
            job.cancelled.set()

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error", code=str(exc.status_code)), status_code=exc.status_code)

    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"), status_code=500)

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error})
