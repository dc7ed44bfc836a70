"""The FastAPI app: OpenAI-compatible routes in front of one `EngineWorker`.

Request path: read the body (413 past `max_body_bytes`, 400 if not JSON) -> `protocol.parse_*` (400/404)
-> in a thread pool, with `compile_timeout_s`: compile the constraint (cached by spec, so the scheduler's
own compile is a hit) and tokenize the prompts (400 `context_length_exceeded`) -> admission (429 past
`max_waiting`) -> submit to the engine thread -> events arrive on an asyncio queue. Nothing is queued
before every check passed, and the decode loop never waits for a compile."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import hmac
import json
import logging
import os
import secrets
import threading
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmqp import FinishedEvent
from llmqp.errors import LLMQPError
from llmqp.server import protocol
from llmqp.server.config import ServerConfig
from llmqp.server.errors import APIError, from_engine_error, invalid
from llmqp.server.metrics import Metrics
from llmqp.server.tools import check_tool_schemas, may_be_call, parse_call
from llmqp.server.worker import Crashed, EngineWorker, Rejected

log = logging.getLogger("llmqp.server")

# The playground (`GET /` and its files): static, holds no data, so it loads without the API key (the
# page then sends the key the user enters with every API call).
STATIC_DIR = os.path.join(os.path.dirname(__file__), "static")


def _public(path: str) -> bool:
    return path in ("/health", "/") or path.startswith("/static/")


class ServerState:
    """What the routes share: the config, the engine and its worker once loaded, metrics, the pool."""

    def __init__(self, config: ServerConfig, engine=None):
        self.config = config
        self.engine = engine
        self.worker: EngineWorker | None = None
        self.metrics = Metrics()
        self.compile_pool = concurrent.futures.ThreadPoolExecutor(config.compile_workers,
                                                                  thread_name_prefix="llmqp-compile")
        self.load_error: str | None = None
        self.ready = threading.Event()
        self.created = int(time.time())
        self.on_load_error = None  # set by the CLI: stop the server when the model cannot load

    @property
    def served_name(self) -> str:
        return self.config.served_name()

    def load(self) -> None:
        """Load the engine (unless given) and start the engine thread; /health answers 200 afterwards."""
        try:
            import llmqp

            if self.engine is None:
                self.engine = llmqp.Engine(self.config.model, dtype=self.config.dtype)
            engine, slots, warm = self.engine, self.config.max_batch, self.config.warm_up

            def scheduler():
                sched = llmqp.Scheduler(engine, max_slots=slots)
                if warm:
                    log.info("compiled %d prefill shapes ahead", sched.warm_up())
                return sched

            self.worker = EngineWorker(scheduler, on_step=self._gauges, on_event=self._count)
            self.worker.start()
            self.ready.set()
        except Exception as e:  # a missing/bad checkpoint: report it on /health and to the CLI
            self.load_error = f"{type(e).__name__}: {e}" if not isinstance(e, LLMQPError) else str(e)
            log.error("model load failed: %s", self.load_error)
            if self.on_load_error is not None:
                self.on_load_error(self.load_error)

    def _count(self, event) -> None:
        """Engine thread: output tokens by plan, requests by finish reason (aborted ones included)."""
        result = getattr(event, "result", None)
        if result is not None:
            self.metrics.finished.labels(finish_reason=result.finish_reason).inc()
            if result.drafts:
                self.metrics.draft_tokens.labels(result="accepted").inc(result.accepted_tokens)
                self.metrics.draft_tokens.labels(result="rejected").inc(result.rejected_tokens)
            return
        for step in event.steps:
            self.metrics.tokens.labels(plan=step.plan).inc()

    def _gauges(self, worker: EngineWorker) -> None:
        self.metrics.running.set(worker.num_running)
        self.metrics.waiting.set(worker.pending())

    def close(self) -> None:
        if self.worker is not None:
            self.worker.stop(timeout=60)
        self.compile_pool.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------------- ASGI guard
class Guard:
    """Pure ASGI middleware (it must not buffer streams): API key on every path but /health and the
    playground's static page, compared in constant time; bodies over the limit get 413 — at once from
    Content-Length, or while reading."""

    def __init__(self, app, state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        key = self.state.config.api_key
        if key and not _public(scope["path"]):
            auth = headers.get("authorization", "")
            given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(given.encode(), key.encode()):
                err = APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                               type="invalid_request_error", code="invalid_api_key")
                return await self._answer(err, scope, receive, send)
        limit = self.state.config.max_body_bytes
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await self._answer(_too_large(limit), scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _too_large(limit)
            return message

        await self.app(scope, limited_receive, send)

    async def _answer(self, err: APIError, scope, receive, send):
        self.state.metrics.errors.labels(type=err.code or err.type).inc()
        await JSONResponse(err.body(), status_code=err.status)(scope, receive, send)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"request body larger than {limit} bytes", code="request_too_large")


# ---------------------------------------------------------------------- the app
def create_app(config: ServerConfig | None = None, engine=None, *, load_in_background: bool = True) -> FastAPI:
    """The ASGI app. engine: an already loaded `llmqp.Engine` to serve (default: load `config.model` on
    startup, in a background thread — /health answers 503 until it is ready)."""
    config = config or ServerConfig()
    state = ServerState(config, engine)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        loader = threading.Thread(target=state.load, name="llmqp-load", daemon=True)
        loader.start()
        if not load_in_background:
            await asyncio.get_running_loop().run_in_executor(None, loader.join)
        yield
        await asyncio.get_running_loop().run_in_executor(None, state.close)

    app = FastAPI(title="LLM-QP", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.llmqp = state

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        state.metrics.errors.labels(type=e.code or e.type).inc()
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        err = APIError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None)
        return await api_error(request, err)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        log.exception("internal error")
        err = APIError(500, f"internal server error ({type(e).__name__})", type="server_error")
        return await api_error(request, err)

    @app.get("/health")
    async def health():
        if state.ready.is_set():
            return {"status": "ok", "model": state.served_name}
        return JSONResponse({"status": "error" if state.load_error else "loading", "error": state.load_error},
                            status_code=503)

    @app.get("/", include_in_schema=False)
    async def playground():
        return FileResponse(os.path.join(STATIC_DIR, "index.html"), headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != state.served_name:
            raise APIError(404, f"The model {model_id!r} does not exist", param="model", code="model_not_found")
        return _model_card(state)

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await _serve(state, request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _serve(state, request, "completion")

    return Guard(app, state)


def _model_card(state: ServerState) -> dict:
    card = {"id": state.served_name, "object": "model", "created": state.created, "owned_by": "llmqp"}
    if state.engine is not None:
        card["max_model_len"] = state.engine.config.max_position
    return card


# ---------------------------------------------------------------------- one request
async def _serve(state: ServerState, request: Request, kind: str):
    if not state.ready.is_set():
        raise APIError(503, "the model is still loading" if not state.load_error else state.load_error,
                       type="server_error", code="model_not_ready")
    arrived = time.perf_counter()
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise invalid(f"the request body is not valid JSON: {e}") from None
    parse = protocol.parse_chat if kind == "chat" else protocol.parse_completion
    job = parse(body, state.served_name)
    requests = await _prepare(state, job)
    worker = state.worker
    free = max(0, state.config.max_batch - worker.num_running)
    if worker.pending() + len(requests) > state.config.max_waiting + free:
        raise APIError(429, f"too many requests waiting (limit {state.config.max_waiting}); retry later",
                       type="rate_limit_error", code="too_many_waiting_requests")
    run = _Run(state, job, requests, arrived)
    run.submit()
    if job.stream:
        first = await run.first_event(request)
        return StreamingResponse(_stream(run, first, request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return JSONResponse(await run.collect(request))


async def _prepare(state: ServerState, job: protocol.Job) -> list[dict]:
    """Off the event loop: compile the constraint (in the compile pool, within compile_timeout_s) and
    tokenize the prompts; then fill in max_tokens and check the context length. Returns the engine
    requests to submit."""
    engine = state.engine
    loop = asyncio.get_running_loop()

    def compile_constraint(started: list):
        started.append(time.perf_counter())
        constraint = job.constraint
        if job.tools is not None:
            check_tool_schemas(engine, job.tools)
            constraint = job.tools.constraint()
        if constraint:
            engine.constraint(**constraint)
        return constraint, time.perf_counter() - started[0]

    def tokenize():
        lengths = {}
        for r in job.requests:
            key = _prompt_key(r["prompt"])
            if key not in lengths:
                try:
                    lengths[key] = _prompt_length(engine, r["prompt"], r["raw"])
                except LLMQPError as e:
                    raise from_engine_error(e, param="messages" if job.kind == "chat" else "prompt") from None
        return lengths

    try:
        constraint, compile_s = ({}, 0.0)
        if job.constraint or job.tools is not None:
            constraint, compile_s = await _within(loop, state.compile_pool, compile_constraint,
                                                  state.config.compile_timeout_s)
    except LLMQPError as e:
        raise from_engine_error(e, param=job.constraint_param) from None
    # Tokenizing is quick, but not on the event loop; nor in the compile pool, behind slow compiles.
    lengths = await loop.run_in_executor(None, tokenize)
    if constraint:
        state.metrics.compile_time.observe(compile_s)
    context = engine.config.max_position
    out = []
    for r in job.requests:
        n_prompt = lengths[_prompt_key(r["prompt"])]
        if n_prompt >= context:
            raise invalid(f"This model's maximum context length is {context} tokens. However, your prompt is "
                          f"{n_prompt} tokens.", param="messages" if job.kind == "chat" else "prompt",
                          code="context_length_exceeded")
        max_tokens = r["max_tokens"]
        if max_tokens is None:
            max_tokens = min(state.config.default_max_tokens, context - n_prompt)
        elif n_prompt + max_tokens > context:
            raise invalid(f"This model's maximum context length is {context} tokens. However, you requested "
                          f"{n_prompt + max_tokens} tokens ({n_prompt} in the prompt, {max_tokens} for the "
                          "completion).", param="max_tokens", code="context_length_exceeded")
        out.append(dict(r, max_tokens=max_tokens, **constraint))
    return out


async def _within(loop, pool, work, timeout_s: float):
    """Run work(started) in the pool; raise a 400 `constraint_compile_timeout` once it has *run* for
    timeout_s (time spent queued behind other compiles does not count). A timed-out compile cannot be
    interrupted: it finishes in its thread (and lands in the cache) while this request is already answered."""
    started: list[float] = []
    future = loop.run_in_executor(pool, work, started)
    while True:
        remaining = timeout_s - (time.perf_counter() - started[0]) if started else timeout_s
        if remaining <= 0:
            raise APIError(400, f"compiling the constraint took longer than {timeout_s:g} s",
                           code="constraint_compile_timeout")
        done, _ = await asyncio.wait({future}, timeout=remaining)
        if done:
            return future.result()


def _prompt_key(prompt) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt)


def _prompt_length(engine, prompt, raw: bool) -> int:
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        vocab = engine.config.vocab_size
        if any(t < 0 or t >= vocab for t in prompt):
            raise invalid(f"prompt token ids must be in [0, {vocab})", param="prompt")
        return len(prompt)
    return len(engine.prompt_ids(prompt, raw=raw))


class _Run:
    """The engine requests of one HTTP request, their event queue and per-choice progress."""

    def __init__(self, state: ServerState, job: protocol.Job, requests: list[dict], arrived: float):
        self.state = state
        self.job = job
        self.requests = requests
        self.arrived = arrived
        self.id = ("chatcmpl-" if job.kind == "chat" else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self.rids = [f"{self.id}-{i}" for i in range(len(requests))]
        self.index = {rid: i for i, rid in enumerate(self.rids)}
        self.queue: asyncio.Queue = asyncio.Queue()
        self.unfinished = set(self.rids)
        self.last_token_at: dict[str, float] = {}
        self.first_token_seen = False

    def submit(self) -> None:
        loop = asyncio.get_running_loop()
        deliver = functools.partial(loop.call_soon_threadsafe, self.queue.put_nowait)
        for rid, req in zip(self.rids, self.requests):
            self.state.worker.submit(req, rid, deliver)

    def abort(self) -> None:
        for rid in self.unfinished:
            self.state.worker.abort(rid)

    async def next_event(self):
        event = await self.queue.get()
        self._observe(event)
        return event

    def _observe(self, event) -> None:
        m = self.state.metrics
        now = time.perf_counter()
        rid = event.request_id
        if isinstance(event, (Rejected, Crashed, FinishedEvent)):
            self.unfinished.discard(rid)
            if isinstance(event, FinishedEvent):
                m.e2e.observe(now - self.arrived)
            return
        n = len(event.token_ids)
        if not n:
            return
        if rid not in self.last_token_at:
            m.ttft.observe(now - self.arrived)
            for _ in range(n - 1):
                m.itl.observe(0.0)
        else:
            gap = (now - self.last_token_at[rid]) / n
            for _ in range(n):
                m.itl.observe(gap)
        self.last_token_at[rid] = now

    async def first_event(self, request: Request):
        """The first event of any choice (for streams: errors before it become HTTP errors)."""
        event = await self._watched(self.next_event(), request)
        error = _event_error(event)
        if error is not None:
            self.abort()
            raise error
        return event

    async def _watched(self, coro, request: Request):
        """Await coro; if the client disconnects first, abort every choice and answer 499."""
        task = asyncio.ensure_future(coro)
        watcher = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if task not in done:
            task.cancel()
            self.abort()
            # Nobody reads this answer; 499 ("client closed request") keeps it out of the error logs.
            raise APIError(499, "the client disconnected", code="client_disconnected")
        return task.result()

    async def collect(self, request: Request) -> dict:
        """Wait for every choice to finish (aborting them if the client goes away); the response body."""
        results: dict[int, Any] = {}

        async def gather():
            while self.unfinished:
                event = await self.next_event()
                error = _event_error(event)
                if error is not None:
                    self.abort()
                    raise error
                if isinstance(event, FinishedEvent):
                    results[self.index[event.request_id]] = event.result

        await self._watched(gather(), request)
        return self._body([results[i] for i in range(len(self.rids))])

    # ------------------------------------------------------------ non-streamed body
    def _body(self, results: list) -> dict:
        job = self.job
        choices = []
        for i, r in enumerate(results):
            finish = r.finish_reason
            if job.kind == "chat":
                message: dict = {"role": "assistant", "content": r.text, "refusal": None}
                call = parse_call(r.text, job.tools) if job.tools is not None and finish == "stop" else None
                if call is not None:
                    message = {"role": "assistant", "content": None, "refusal": None, "tool_calls": [call]}
                    finish = "tool_calls"
                choice = {"index": i, "message": message, "finish_reason": finish,
                          "logprobs": {"content": self._chat_logprobs(r.token_ids, r.logprobs,
                                                                      getattr(r, "top_logprobs", None))}
                          if job.logprobs else None}
            else:
                text = (job.echo_prompts[i] + r.text) if job.echo_prompts else r.text
                choice = {"index": i, "text": text, "finish_reason": finish,
                          "logprobs": self._completion_logprobs(r.token_ids, r.logprobs,
                                                                getattr(r, "top_logprobs", None))
                          if job.logprobs else None}
            choices.append(choice)
        obj = "chat.completion" if job.kind == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": job.model, "choices": choices,
                "usage": self._usage(results), "system_fingerprint": None}

    def _usage(self, results: list) -> dict:
        n = len(self.requests) // max(1, len({_prompt_key(r["prompt"]) for r in self.requests}))
        prompt = sum(r.prompt_tokens for r in results[::max(1, n)])
        completion = sum(len(r.token_ids) for r in results)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    # ------------------------------------------------------------ logprobs
    def _token(self, token_id: int) -> tuple[str, list[int]]:
        return _token_text(self.state.engine, int(token_id))

    def _chat_logprobs(self, ids, logprobs, tops) -> list[dict]:
        out = []
        for j, (tid, lp) in enumerate(zip(ids, logprobs)):
            text, raw = self._token(tid)
            alts = []
            for alt_id, alt_lp in (tops[j] if tops else [])[: self.job.top_logprobs]:
                alt_text, alt_raw = self._token(alt_id)
                alts.append({"token": alt_text, "logprob": float(alt_lp), "bytes": alt_raw})
            out.append({"token": text, "logprob": float(lp), "bytes": raw, "top_logprobs": alts})
        return out

    def _completion_logprobs(self, ids, logprobs, tops, offset: int = 0) -> dict:
        tokens, lps, top_maps, offsets = [], [], [], []
        for j, (tid, lp) in enumerate(zip(ids, logprobs)):
            text, _ = self._token(tid)
            offsets.append(offset)
            offset += len(text)
            tokens.append(text)
            lps.append(float(lp))
            alts = (tops[j] if tops else [])[: self.job.top_logprobs]
            top_maps.append({self._token(a)[0]: float(b) for a, b in alts} if self.job.top_logprobs else None)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": top_maps, "text_offset": offsets}


@functools.lru_cache(maxsize=1 << 16)
def _token_bytes(engine_id: int, llg_state, token_id: int) -> bytes:
    return llg_state.llg.decode_bytes([token_id])


def _token_text(engine, token_id: int) -> tuple[str, list[int]]:
    """A token as OpenAI reports it: its text (invalid UTF-8 of a partial character replaced) and bytes."""
    from llmqp.constraints.llguidance_backend import tokenizer_state

    raw = _token_bytes(id(engine), tokenizer_state(engine.tokenizer), token_id)
    return raw.decode("utf-8", errors="replace"), list(raw)


def _event_error(event) -> APIError | None:
    """The HTTP error an event stands for, if any."""
    if isinstance(event, Rejected):
        return from_engine_error(event.exception) if isinstance(event.exception, LLMQPError) else \
            APIError(400, str(event.exception))
    if isinstance(event, Crashed):
        return APIError(500, f"internal server error ({type(event.exception).__name__})", type="server_error")
    result = getattr(event, "result", None)
    if result is not None and result.finish_reason == "error":
        exc = getattr(event, "exception", None)
        if isinstance(exc, LLMQPError) or exc is None:
            return invalid(getattr(result, "error", None) or str(exc))
        return APIError(500, f"internal server error ({type(exc).__name__})", type="server_error")
    return None


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone away (the body is already read, so only http.disconnect remains)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# ---------------------------------------------------------------------- streaming
def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream(run: _Run, first, request: Request):
    """SSE chunks: per choice a role chunk (chat), one chunk per token event (text delta, logprobs, and
    `llmqp.tokens`: id, text, plan, k, latency_ms, logprob of each token), a finish chunk; the usage chunk
    when asked; `data: [DONE]`. Tool calls are held back and sent whole when the call completes."""
    job = run.job
    chat = job.kind == "chat"
    obj = "chat.completion.chunk" if chat else "text_completion"
    held: dict[int, str] = {}  # per choice: text held back while it may be a tool call
    streaming_text: set[int] = set()
    results: dict[int, Any] = {}

    def chunk(index: int, *, delta: dict | None = None, text: str | None = None, finish=None,
              logprobs=None, extra: dict | None = None) -> str:
        choice: dict = {"index": index}
        if chat:
            choice["delta"] = delta or {}
        else:
            choice["text"] = text or ""
        choice["logprobs"] = logprobs
        choice["finish_reason"] = finish
        if extra:
            choice["llmqp"] = extra
        body = {"id": run.id, "object": obj, "created": run.created, "model": job.model, "choices": [choice]}
        if job.include_usage:
            body["usage"] = None
        return _sse(body)

    def on_tokens(event) -> list[str]:
        i = run.index[event.request_id]
        extra = {"tokens": [{"id": int(t), "text": run._token(t)[0], "plan": s.plan, "k": int(s.k),
                             "latency_ms": round(s.latency_ms, 3), "logprob": round(float(lp), 4)}
                            for t, s, lp in zip(event.token_ids, event.steps, event.logprobs)]}
        lps = None
        if job.logprobs:
            tops = getattr(event, "top_logprobs", None)
            lps = ({"content": run._chat_logprobs(event.token_ids, event.logprobs, tops)} if chat else
                   run._completion_logprobs(event.token_ids, event.logprobs, tops))
        text = event.text
        if chat and job.tools is not None and i not in streaming_text:
            held[i] = held.get(i, "") + text
            if may_be_call(held[i], job.tools):
                return [chunk(i, extra=extra, logprobs=lps)]
            text = held.pop(i)
            streaming_text.add(i)
        if chat:
            return [chunk(i, delta={"content": text}, logprobs=lps, extra=extra)]
        return [chunk(i, text=text, logprobs=lps, extra=extra)]

    def on_finished(event) -> list[str]:
        i = run.index[event.request_id]
        r = event.result
        results[i] = r
        out = []
        finish = r.finish_reason
        if chat and i in held:
            text = held.pop(i)
            call = parse_call(r.text, job.tools) if finish == "stop" else None
            if call is not None:
                delta = {"tool_calls": [{"index": 0, "id": call["id"], "type": "function",
                                         "function": call["function"]}]}
                out.append(chunk(i, delta=delta))
                finish = "tool_calls"
            elif text:
                out.append(chunk(i, delta={"content": text}))
        out.append(chunk(i, finish=finish))
        return out

    try:
        if chat:
            for i in range(len(run.rids)):
                yield chunk(i, delta={"role": "assistant", "content": ""})
        elif job.echo_prompts:
            for i, p in enumerate(job.echo_prompts):
                yield chunk(i, text=p)
        event = first
        while True:
            error = _event_error(event)
            if error is not None:
                run.state.metrics.errors.labels(type=error.code or error.type).inc()
                yield _sse(error.body())
                run.abort()
                break
            parts = on_finished(event) if isinstance(event, FinishedEvent) else on_tokens(event)
            for part in parts:
                yield part
            if not run.unfinished:
                break
            event = await run.next_event()
        if job.include_usage and len(results) == len(run.rids):
            usage = run._usage([results[i] for i in range(len(run.rids))])
            yield _sse({"id": run.id, "object": obj, "created": run.created, "model": job.model, "choices": [],
                        "usage": usage})
        yield "data: [DONE]\n\n"
    finally:
        if run.unfinished:  # the client went away (the stream was cancelled) or an error ended it
            run.abort()
