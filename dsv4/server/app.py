"""The OpenAI-compatible HTTP API and the web chat page, as a FastAPI app over one engine.

`create_app(engine, ...)` wires the routes to a `Worker` (the one thread that runs the Scheduler):
/v1/chat/completions, /v1/completions, /v1/models, /health, /metrics, and the page at /. Handlers
only validate, render the prompt (off the event loop), submit sequences and shape the answers; all
generation shares one scheduler, so concurrent requests are batched into the same decode steps.
It knows HTTP and the OpenAI API, not the model math.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from ..chat import THINK_END
from . import metrics
from .errors import APIError, Guard, install_error_handlers
from .prepare import (
    Limits,
    chat_prompt,
    check_model,
    completion_budget,
    completion_prompts,
    make_params,
    sampling_fields,
    thinking_mode,
)
from .responses import Tokens, new_id
from .schemas import ChatRequest, CompletionRequest
from .streaming import Call, EventStream, chat_chunks, chat_response, completion_chunks, completion_response
from .worker import QueueFull, Worker

WEB_DIR = Path(__file__).parent / "web"
ROUTES = {"/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions"}
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"description": what} for code, what in [(400, "invalid request"), (401, "bad or missing API key"),
        (404, "unknown model"), (413, "body too large"), (429, "server at capacity")]}  # fmt: skip


class Server:
    """What the routes share: the engine, its worker, the limits and the counters."""

    def __init__(self, engine, worker: Worker, *, model_name: str, limits: Limits, figures: metrics.Metrics,
                 speculative: bool = False):  # fmt: skip
        self.engine, self.worker, self.model_name, self.limits = engine, worker, model_name, limits
        self.speculative = speculative  # the default for requests that do not say
        self.created = int(time.time())
        self.metrics = figures
        figures.watch(worker, engine)
        self._tokens: Tokens | None = None

    @property
    def tokens(self) -> Tokens:
        if self._tokens is None:
            self._tokens = Tokens(self.engine.tokenizer)
        return self._tokens

    def sequences(self, prompts: list[list[int]], fields: dict[str, Any], n: int, speculative: bool | None) -> list:
        """Sequences for every prompt x n (blocking: allocates sampler and state)."""
        params = make_params(fields, n)
        spec = self.speculative if speculative is None else speculative
        if spec and not has_draft(self.engine):
            raise APIError(400, "speculative decoding needs the checkpoint's draft (DSpark or MTP); this "
                           "checkpoint has no mtp.* tensors", param="speculative", code="invalid_value")  # fmt: skip
        try:
            return [self.engine.sequence(ids, p, speculative=spec) for ids in prompts for p in params]
        except ValueError as e:
            raise APIError(400, str(e), code="invalid_value") from None

    def submit(self, seqs: list):
        try:
            return self.worker.submit(seqs)
        except QueueFull as e:
            raise APIError(
                429, f"{e}; retry shortly", code="server_busy", headers={"Retry-After": "1"}
            ) from None

    def model_card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "dsv4",
                "max_model_len": self.limits.context}  # fmt: skip


def has_draft(engine) -> bool:
    model = engine.model
    return getattr(model, "dspark", None) is not None or bool(getattr(model, "mtp", None))


def _add_api_routes(app: FastAPI, srv: Server) -> None:
    @app.post("/v1/chat/completions", responses=_ERRORS)
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        """Chat in the V4 format: thinking, tools (DSML), streaming, n choices, logprobs."""
        check_model(body.model, srv.model_name)
        mode = thinking_mode(body)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(
                400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value"
            )
        ids = await run_in_threadpool(chat_prompt, srv.engine, body, mode)
        fields = sampling_fields(body, srv.limits)
        asked, name = (body.max_completion_tokens, "max_completion_tokens") if body.max_completion_tokens \
            else (body.max_tokens, "max_tokens")  # fmt: skip
        fields["max_tokens"] = completion_budget(len(ids), asked, srv.limits, name)
        if body.logprobs:
            fields["logprobs"] = body.top_logprobs or 0
        seqs = await run_in_threadpool(srv.sequences, [ids], fields, body.n, body.speculative)
        call = Call(srv.submit(seqs), new_id("chatcmpl"), srv.model_name, [len(ids)], srv.tokens,
                    thinking=mode == "thinking", logprobs=body.logprobs,
                    include_usage=bool(body.stream_options and body.stream_options.include_usage),
                    think_end_id=srv.engine.tokenizer.token_to_id(THINK_END))  # fmt: skip
        if body.stream:
            return EventStream(chat_chunks(call), call.ticket)
        return await chat_response(call, request.receive)

    @app.post("/v1/completions", responses=_ERRORS)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        """Plain text completion of a prompt (text, token ids, or a batch of either)."""
        check_model(body.model, srv.model_name)
        prompts = await run_in_threadpool(completion_prompts, srv.engine, body)
        fields = sampling_fields(body, srv.limits)
        budgets = [completion_budget(len(p), body.max_tokens, srv.limits, "max_tokens") for p in prompts]
        fields["max_tokens"] = min(budgets)
        if body.logprobs is not None:
            fields["logprobs"] = body.logprobs
        seqs = await run_in_threadpool(srv.sequences, prompts, fields, body.n, body.speculative)
        echo = []
        if body.echo:
            texts = await run_in_threadpool(lambda: [srv.engine.tokenizer.decode(p) for p in prompts])
            echo = [t for t in texts for _ in range(body.n)]
        call = Call(srv.submit(seqs), new_id("cmpl"), srv.model_name, [len(p) for p in prompts], srv.tokens,
                    logprobs=body.logprobs is not None, echo=echo,
                    include_usage=bool(body.stream_options and body.stream_options.include_usage))  # fmt: skip
        if body.stream:
            return EventStream(completion_chunks(call), call.ticket)
        return await completion_response(call, request.receive)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [srv.model_card()]}

    @app.get("/v1/models/{model_id:path}", responses=_ERRORS)
    async def model(model_id: str) -> dict[str, Any]:
        check_model(model_id, srv.model_name)
        return srv.model_card()


def _add_service_routes(app: FastAPI, srv: Server) -> None:
    @app.get("/health")
    async def health() -> JSONResponse:
        """200 while the generation thread runs, 503 if it died; `threads`: the CPU threads its forward
        passes use (`dsv4 serve --threads`)."""
        w = srv.worker
        body = {"status": "ok" if w.alive else "worker stopped", "model": srv.model_name,
                "running": w.running, "waiting": w.waiting, "threads": w.threads}  # fmt: skip
        return JSONResponse(body, status_code=200 if w.alive else 503)

    @app.get("/metrics", response_class=Response)
    async def prometheus() -> Response:
        """Prometheus text format: requests, tokens, tokens/s, queue, running, memory, expert cache, and
        histograms of time to first token, time per output token, request latency and lengths."""
        text = await run_in_threadpool(srv.metrics.render)
        return Response(text, media_type=metrics.CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", headers={"cache-control": "no-cache"})

    app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")


def create_app(engine, *, model_name: str, api_key: str | None = None, max_queue: int = 64,
               max_running: int = 16, max_body_bytes: int = 4 << 20, max_context: int | None = None,
               max_step_tokens: int = 256, default_max_tokens: int | None = None,
               sampling_defaults: dict[str, Any] | None = None, prefix_cache=None,
               speculative: bool = False, threads: int | None = None) -> FastAPI:  # fmt: skip
    """The app serving `engine` as `model_name`.

    max_running sequences decode together; up to max_queue more wait; beyond that requests get a 429.
    The context is the model's max_seq_len, or max_context if smaller; a request without max_tokens
    gets the room left in the context, at most default_max_tokens when given (`dsv4 serve --max-tokens`).
    sampling_defaults (SamplingParams fields) fill what a request leaves out. The generation thread
    starts here and runs until `app.state.server.worker.close()` (a daemon thread: it never holds the
    process open); app lifespans are left alone, so test clients that run them do not stop it.
    prefix_cache (a `dsv4.prefix_cache.PrefixCache`) lets requests reuse earlier prompts' states.
    speculative: requests decode with the checkpoint's draft unless they say `"speculative": false`;
    DSpark blocks are verified in the shared batch, MTP checkpoints decode plainly (see `Scheduler`).
    threads: CPU threads of the generation thread's forward passes (default: torch's, as the caller has it).
    """
    context = min(engine.config.max_seq_len, max_context or engine.config.max_seq_len)
    limits = Limits(
        context=context, default_max_tokens=default_max_tokens, defaults=dict(sampling_defaults or {})
    )
    figures = metrics.Metrics(ROUTES)
    worker = Worker(engine, max_running=max_running, max_queue=max_queue, max_step_tokens=max_step_tokens,
                    prefix_cache=prefix_cache, on_finish=figures.finished, threads=threads)  # fmt: skip
    srv = Server(engine, worker, model_name=model_name, limits=limits, figures=figures,
                 speculative=speculative)  # fmt: skip

    app = FastAPI(title="dsv4", summary="DeepSeek V4: an OpenAI-compatible API", redoc_url=None)
    app.state.server = srv
    install_error_handlers(app)
    _add_api_routes(app, srv)
    _add_service_routes(app, srv)
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes)
    app.add_middleware(metrics.CountRequests, counts=figures.requests)
    return app
