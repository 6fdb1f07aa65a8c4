"""`storyseek serve`: the story page at `/` and an OpenAI-compatible API under `/v1`, over one model.

    GET  /                      the story page (static files shipped in the package, no CDN)
    GET  /health                {"status": "ok", active/queued rows, limits}; 503 while the model loads
    GET  /v1/models             the one model served
    POST /v1/completions        raw continuation of `prompt` (story mode with "mode": "story")
    POST /v1/chat/completions   a story about the last user message (raw with "mode": "raw")

The model loads in the background while the server already answers (503 "loading" until then).
Every request becomes rows of the one decode batch (engine.py, scheduler.py); a stream is
server-sent events ending with `data: [DONE]`. Nothing from a request names a file; bodies are
capped at BODY_LIMIT bytes and prompts at --max-prompt-chars.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import socket
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException

from ..data.tokenizer import begin_id, stop_ids
from ..errors import StoryseekError
from ..generate.config import SamplingConfig
from ..generate.text import encode_prompt
from . import protocol as p
from .config import ServeConfig
from .engine import Engine, Row
from .scheduler import Job, QueueFull, Scheduler

STATIC = Path(__file__).parent / "static"
BODY_LIMIT = 1 << 20  # bytes: a story prompt is short; anything bigger is refused before it is parsed


class _State:
    """What the routes need; `scheduler` is None until the model has loaded."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.scheduler: Scheduler | None = None
        self.tokenizer = None
        self.block_size = 0
        self.error: str | None = None
        self.on_load_error: Callable[[str], None] = lambda message: None

    def ready(self) -> Scheduler:
        if self.scheduler is None:
            raise p.APIError(503, self.error or "the model is still loading; try again in a moment",
                             code="model_load_failed" if self.error else "model_loading")
        return self.scheduler


def create_app(cfg: ServeConfig, load: Callable[[], tuple] | None = None):
    """The ASGI app. `load` returns (model, tokenizer); by default the checkpoint at cfg.model."""
    state = _State(cfg)

    def load_in_background():
        try:
            if load is None:
                from ..generate.load import load_model

                model, tokenizer = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
            else:
                model, tokenizer = load()
            engine = Engine(model, tokenizer, cfg.max_batch, cfg.compile, cfg.cuda_graphs)
            scheduler = Scheduler(engine, cfg.max_queue)
            scheduler.start()
            state.tokenizer, state.block_size = tokenizer, model.cfg.block_size
            state.scheduler = scheduler
            compiled = f", the decode step compiled in {engine.forward_step.compile_s:.1f} s" if cfg.compile else ""
            print(f"storyseek serve: ready: {model.cfg.n_layer} layers x {model.cfg.n_embd}, context "
                  f"{model.cfg.block_size}, {next(model.parameters()).dtype} on {model.embed.weight.device}, "
                  f"up to {cfg.max_batch} rows at once{compiled}", file=sys.stderr, flush=True)
        except Exception as e:  # StoryseekError for bad files; anything else is reported the same way
            state.error = f"cannot load {cfg.model}: {e}"
            state.on_load_error(state.error)

    @asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=load_in_background, name="storyseek-load", daemon=True).start()
        yield
        if state.scheduler is not None:
            await asyncio.to_thread(state.scheduler.stop)

    app = FastAPI(title="storyseek", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.storyseek = state
    app.add_middleware(_BodyLimit, limit=BODY_LIMIT)

    # ------------------------------------------------------------------ errors
    def error_response(e: p.APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(p.APIError)
    async def _api_error(request, e: p.APIError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        err = e.errors()[0]
        if err.get("type") == "json_invalid":
            return error_response(p.APIError(400, f"the body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})",
                                              code="invalid_json"))
        where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        return error_response(p.APIError(400, f"{where}: {err.get('msg')}" if where else str(err.get("msg")),
                                          param=where or None))

    @app.exception_handler(HTTPException)
    async def _http(request, e: HTTPException):
        message = {404: f"unknown route: {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return error_response(p.APIError(e.status_code, message))

    @app.exception_handler(Exception)
    async def _crash(request, e: Exception):  # a bug: its traceback goes to the server's log, not to the client
        traceback.print_exception(e, file=sys.stderr)
        return error_response(p.APIError(500, f"internal error: {type(e).__name__}"))

    # ------------------------------------------------------------------ page, health, models
    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health")
    async def health():
        limits = {"max_tokens": cfg.max_tokens, "max_prompt_chars": cfg.max_prompt_chars,
                  "max_batch": cfg.max_batch, "max_queue": cfg.max_queue, "api_key": cfg.api_key is not None}
        if state.scheduler is None:
            status = "error" if state.error else "loading"
            return JSONResponse({"status": status, "error": state.error, "limits": limits}, status_code=503)
        return {"status": "ok", "model": cfg.model_name, **state.scheduler.load(),
                "steps": state.scheduler.steps, "limits": limits}

    def authorize(request: Request) -> None:
        if cfg.api_key is None:
            return
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), cfg.api_key.encode()):
            raise p.APIError(401, "incorrect or missing API key (send it as 'Authorization: Bearer KEY')",
                             code="invalid_api_key")

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "storyseek"}]}

    # ------------------------------------------------------------------ completions
    def rows_for(req: p._Sampling, prompts: list[str], raw: bool) -> list[Row]:
        if req.model not in (None, "", cfg.model_name):
            raise p.APIError(404, f"model {req.model!r} does not exist; this server serves {cfg.model_name!r}",
                             code="model_not_found", param="model")
        choices = req.n * len(prompts)
        if choices > cfg.max_batch:
            raise p.APIError(400, f"{choices} choices asked for; this server decodes at most {cfg.max_batch} at once",
                             param="n")
        max_tokens = min(getattr(req, "max_completion_tokens", None) or req.max_tokens or cfg.max_tokens, cfg.max_tokens)
        defaults = SamplingConfig()
        sampling = SamplingConfig(temperature=defaults.temperature if req.temperature is None else req.temperature,
                                  top_p=req.top_p or defaults.top_p, top_k=req.top_k or 0,
                                  min_tokens=defaults.min_tokens if req.min_tokens is None else req.min_tokens)
        tok = state.tokenizer
        stops = frozenset(stop_ids(tok, raw))
        bias = {i: b for i, b in (req.logit_bias or {}).items()}
        if any(not 0 <= i < tok.vocab_size for i in bias):
            raise p.APIError(400, f"logit_bias: token ids must be in 0..{tok.vocab_size - 1}", param="logit_bias")
        rows = []
        for prompt in prompts:
            if len(prompt) > cfg.max_prompt_chars:
                raise p.APIError(413, f"the prompt is {len(prompt)} characters; this server takes at most "
                                 f"{cfg.max_prompt_chars}", code="prompt_too_long")
            try:
                ids = encode_prompt(tok, prompt, raw)
            except StoryseekError as e:
                raise p.APIError(400, str(e), param="prompt") from None
            if len(ids) >= state.block_size:
                raise p.APIError(413, f"the prompt is {len(ids)} tokens; the model reads at most "
                                 f"{state.block_size - 1} before it writes", code="context_length_exceeded")
            for i in range(req.n):
                rows.append(Row(prompt=ids, max_tokens=max_tokens, sampling=sampling, stop_ids=stops, raw=raw,
                                seed=None if req.seed is None else req.seed + len(rows), stop=tuple(req.stop or ()),
                                logit_bias=bias, begin_id=begin_id(tok, raw)))
        return rows

    def submit(rows: list[Row]) -> tuple[Scheduler, Job]:
        scheduler = state.ready()
        job = Job(rows, asyncio.get_running_loop())
        try:
            scheduler.submit(job)
        except QueueFull as e:
            raise p.APIError(429, f"the server is busy: {e}; try again in a moment", code="queue_full") from None
        except RuntimeError as e:
            raise p.APIError(503, str(e), code="shutting_down") from None
        return scheduler, job

    async def answer(request: Request, req: p._Sampling, prompts: list[str], raw: bool, chat: bool, echo: bool = False):
        state.ready()
        rows = rows_for(req, prompts, raw)
        scheduler, job = submit(rows)
        id_, name = p.new_id("chatcmpl" if chat else "cmpl"), cfg.model_name
        prefix = [prompts[i // req.n] if echo else "" for i in range(len(rows))]
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return EventSourceResponse(_sse(scheduler, job, id_, name, chat, prefix, include_usage), ping=15)
        texts, finish = await _collect(request, scheduler, job)
        use = p.usage(job.prompt_tokens, job.completion_tokens)
        texts = [a + b for a, b in zip(prefix, texts)]
        return (p.chat_completion if chat else p.completion)(id_, name, texts, finish, use)

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(request: Request, req: p.CompletionRequest):
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        return await answer(request, req, prompts, raw=req.mode != "story", chat=False, echo=req.echo)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(request: Request, req: p.ChatRequest):
        return await answer(request, req, [req.story_prompt()], raw=req.mode == "raw", chat=True)

    return app


def _json(obj) -> str:
    return json.dumps(obj, separators=(",", ":"))


async def _events(job: Job) -> list:
    """Wait for the next events, then take every one already queued (a slow reader gets bigger pieces)."""
    events = [await job.events.get()]
    while not job.events.empty():
        events.append(job.events.get_nowait())
    return events


async def _collect(request, scheduler: Scheduler, job: Job) -> tuple[list[str], list[str | None]]:
    """A whole (non-streamed) answer; a client that hangs up meanwhile cancels its rows."""
    texts, finish = [""] * len(job.rows), [None] * len(job.rows)
    left = len(job.rows)
    try:
        while left:
            get = asyncio.ensure_future(_events(job))
            while not get.done():
                await asyncio.wait({get}, timeout=0.5)
                if not get.done() and await request.is_disconnected():
                    get.cancel()
                    raise p.APIError(499, "client disconnected")
            for ev in get.result():
                if ev.error:
                    raise p.APIError(500, ev.error, code="server_error")
                texts[ev.index] += ev.text
                if ev.finish_reason:
                    finish[ev.index], left = ev.finish_reason, left - 1
    finally:
        scheduler.cancel(job)  # a no-op once every row has finished
    return texts, finish


async def _sse(scheduler: Scheduler, job: Job, id_: str, name: str, chat: bool, prefix: list[str],
               include_usage: bool) -> AsyncIterator[dict]:
    """The chunks of a streamed answer, then usage (if asked) and [DONE]. A client that hangs up
    cancels this generator, and its rows leave the batch at the next step."""

    def chunk(index: int, text: str, finish: str | None) -> dict:
        if chat:
            return p.chat_chunk(id_, name, index, {"content": text} if text else {}, finish)
        return p.completion_chunk(id_, name, index, text, finish)

    try:
        for i in range(len(job.rows)):
            if chat:
                yield {"data": _json(p.chat_chunk(id_, name, i, {"role": "assistant", "content": ""}, None))}
            elif prefix[i]:
                yield {"data": _json(chunk(i, prefix[i], None))}
        left = len(job.rows)
        while left:
            merged: dict[int, list] = {}  # choice -> [text, finish]: one chunk per choice per wake-up
            for ev in await _events(job):
                if ev.error:
                    yield {"data": _json(p.error_body(ev.error, "server_error"))}
                    return
                m = merged.setdefault(ev.index, ["", None])
                m[0] += ev.text
                m[1] = ev.finish_reason
            for index, (text, finish) in merged.items():
                yield {"data": _json(chunk(index, text, finish))}
                left -= finish is not None
        if include_usage:
            obj = "chat.completion.chunk" if chat else "text_completion"
            yield {"data": _json(p.usage_chunk(id_, name, obj, p.usage(job.prompt_tokens, job.completion_tokens)))}
        yield {"data": "[DONE]"}
    finally:
        scheduler.cancel(job)


class _BodyLimit:
    """ASGI middleware: a body over `limit` bytes is answered 413 before anything parses it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await _send_json(send, 413, p.APIError(413, f"the request body is over {self.limit} bytes",
                                                          code="request_too_large").body())
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:  # chunked upload without a length: stop reading
                raise p.APIError(413, f"the request body is over {self.limit} bytes", code="request_too_large")
            return message

        return await self.app(scope, limited, send)


async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


# ---------------------------------------------------------------------- the command
def serve_command(cfg: ServeConfig) -> None:
    """Listen on cfg.host:cfg.port until Ctrl-C or SIGTERM; in-flight streams get a few seconds to end."""
    import torch
    import uvicorn

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if not Path(cfg.model).exists():
        raise StoryseekError(f"{cfg.model}: no such checkpoint file or model directory")
    sock = _listen(cfg.host, cfg.port)
    host, port = sock.getsockname()[:2]
    app = create_app(cfg)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # a clean stop, exit code 0 (uvicorn would re-raise the signal)
            self.force_exit = self.should_exit  # a second Ctrl-C does not wait for open streams
            self.should_exit = True

    server = Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=3))
    app.state.storyseek.on_load_error = lambda message: setattr(server, "should_exit", True)
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    print(f"storyseek serve: listening on {url}/ (the story page) and {url}/v1 (OpenAI API); "
          f"loading {cfg.model}", file=sys.stderr, flush=True)
    server.run(sockets=[sock])
    if app.state.storyseek.error:
        raise StoryseekError(app.state.storyseek.error)
    print("storyseek serve: stopped", file=sys.stderr, flush=True)


def _listen(host: str, port: int) -> socket.socket:
    try:
        family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        raise StoryseekError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock
