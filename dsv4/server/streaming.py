"""Delivering a request's events to its client: server-sent events while generating, or one JSON body at the end.

A `Call` is one admitted request (its ticket, ids, what the client asked to see). While it runs, a
watcher reads the ASGI `receive` channel: when the client disconnects, streaming or not, the call's
sequences are cancelled at once and the response ends. Engine failures end the affected call with an
error saying what failed (a 500 body, or an `error` event in a stream: the exception's type and
message, never its traceback), never the others. It knows the OpenAI shapes
(through `responses`) and ASGI, not the model.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.responses import JSONResponse, Response, StreamingResponse

from ..chat import parse_completion
from .errors import error_body
from .responses import ReplySplitter, Tokens, chat_message, envelope, finish_reason, tool_calls_openai, usage
from .worker import Ticket

ENGINE_FAILED = "generation failed inside the engine for this request"
MAX_REASON_CHARS = 500


@dataclass
class Call:
    ticket: Ticket
    rid: str
    model: str
    prompt_lens: list[int]  # one per distinct prompt
    tokens: Tokens
    thinking: bool = False
    logprobs: bool = False
    include_usage: bool = False
    echo: list[str] = field(default_factory=list)  # completions: prompt text per choice
    think_end_id: int | None = None

    def usage(self) -> dict[str, Any]:
        out = sum(len(s.output) for s in self.ticket.seqs)
        reasoning = None
        if self.thinking:
            reasoning = sum(s.output.index(self.think_end_id) if self.think_end_id in s.output else len(s.output)
                            for s in self.ticket.seqs)  # fmt: skip
        per_prompt = len(self.ticket.seqs) // max(len(self.prompt_lens), 1)  # the n choices of each prompt
        cached = sum(s.stats.reused_tokens for s in self.ticket.seqs[::per_prompt]) if per_prompt else 0
        return usage(sum(self.prompt_lens), out, reasoning, cached)


def engine_failed(call: Call, seq_id: int) -> dict[str, Any]:
    """The error body of a sequence that failed in the engine: what failed (the exception's type and
    message, e.g. the tensor and shard a read failed on), never the traceback (that is in the log)."""
    error = call.ticket.seqs[call.ticket.index[seq_id]].error
    reason = f"{type(error).__name__}: {error}" if error is not None else "unknown error"
    if len(reason) > MAX_REASON_CHARS:
        reason = reason[: MAX_REASON_CHARS - 3] + "..."
    return error_body(f"{ENGINE_FAILED}: {reason}", "server_error", None, "engine_error")


async def _watch(receive, ticket: Ticket) -> None:
    """Cancel the ticket as soon as the client disconnects."""
    while True:
        message = await receive()
        if message.get("type") == "http.disconnect":
            ticket.cancel()
            return


async def _gone_or_failed(call: Call, receive) -> Response | None:
    """Wait until every sequence of the call ends; the response if it did not end well: 499 when the
    client left, 500 with the engine's reason when a sequence failed, else None."""
    watcher = asyncio.ensure_future(_watch(receive, call.ticket))
    try:
        async for ev in call.ticket.events():
            if ev.finish_reason == "error":
                return JSONResponse(engine_failed(call, ev.seq_id), status_code=500)
        if call.ticket.cancelled:
            return Response(status_code=499)  # nobody reads it; counted as "client closed request"
        return None
    finally:
        watcher.cancel()
        call.ticket.cancel()


async def chat_response(call: Call, receive) -> Response:
    """The whole chat.completion body once every choice has finished."""
    failed = await _gone_or_failed(call, receive)
    if failed is not None:
        return failed
    choices = []
    for i, s in enumerate(call.ticket.seqs):
        done = parse_completion(s.result().text, thinking_mode="thinking" if call.thinking else "chat")
        choices.append({"index": i, "message": chat_message(done),
                        "logprobs": call.tokens.chat_logprobs(s.logprobs) if call.logprobs else None,
                        "finish_reason": finish_reason(s.finish_reason or "stop", done)})  # fmt: skip
    return JSONResponse(
        envelope("chat.completion", call.rid, call.model, choices=choices, usage=call.usage())
    )


async def completion_response(call: Call, receive) -> Response:
    """The whole text_completion body once every choice has finished."""
    failed = await _gone_or_failed(call, receive)
    if failed is not None:
        return failed
    choices = []
    for i, s in enumerate(call.ticket.seqs):
        prefix = call.echo[i] if call.echo else ""
        lps = call.tokens.text_logprobs(s.logprobs, len(prefix)) if call.logprobs else None
        choices.append({"index": i, "text": prefix + s.result().text, "logprobs": lps,
                        "finish_reason": s.finish_reason or "stop"})  # fmt: skip
    return JSONResponse(
        envelope("text_completion", call.rid, call.model, choices=choices, usage=call.usage())
    )


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


DONE = "data: [DONE]\n\n"


async def chat_chunks(call: Call) -> AsyncIterator[str]:
    """chat.completion.chunk events: role first, then reasoning/content deltas, tool calls at the end."""
    base = envelope("chat.completion.chunk", call.rid, call.model)
    n = len(call.ticket.seqs)
    splitters = [ReplySplitter(call.thinking) for _ in range(n)]

    def chunk(i: int, delta: dict, lp: Any = None, reason: str | None = None) -> str:
        return _sse(
            {**base, "choices": [{"index": i, "delta": delta, "logprobs": lp, "finish_reason": reason}]}
        )

    for i in range(n):
        yield chunk(i, {"role": "assistant", "content": ""})
    async for ev in call.ticket.events():
        if ev.finish_reason == "error":
            yield _sse(engine_failed(call, ev.seq_id))
            call.ticket.cancel()
            break
        i = call.ticket.index[ev.seq_id]
        delta = splitters[i].push(ev.text)
        lp = call.tokens.chat_logprobs([ev.logprob]) if call.logprobs and ev.logprob is not None else None
        if delta or lp:
            yield chunk(i, delta, lp)
        if ev.finish_reason is not None:
            rest, done = splitters[i].finish()
            if done.tool_calls:
                rest["tool_calls"] = [{"index": k, **c} for k, c in enumerate(tool_calls_openai(done))]
            yield chunk(i, rest, None, finish_reason(ev.finish_reason, done))
    else:
        if call.include_usage and not call.ticket.cancelled:
            yield _sse({**base, "choices": [], "usage": call.usage()})
    yield DONE


async def completion_chunks(call: Call) -> AsyncIterator[str]:
    """text_completion events, one per text delta (the prompt first when echo is on)."""
    base = envelope("text_completion", call.rid, call.model)

    def chunk(i: int, text: str, lp: Any = None, reason: str | None = None) -> str:
        return _sse(
            {**base, "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": reason}]}
        )

    for i, prefix in enumerate(call.echo):
        yield chunk(i, prefix)
    async for ev in call.ticket.events():
        if ev.finish_reason == "error":
            yield _sse(engine_failed(call, ev.seq_id))
            call.ticket.cancel()
            break
        i = call.ticket.index[ev.seq_id]
        lp = call.tokens.text_logprobs([ev.logprob]) if call.logprobs and ev.logprob is not None else None
        if ev.text or lp or ev.finish_reason:
            yield chunk(i, ev.text, lp, ev.finish_reason)
    else:
        if call.include_usage and not call.ticket.cancelled:
            yield _sse({**base, "choices": [], "usage": call.usage()})
    yield DONE


class EventStream(StreamingResponse):
    """Server-sent events that cancel the call's sequences the moment the client disconnects."""

    def __init__(self, chunks: AsyncIterator[str], ticket: Ticket):
        super().__init__(chunks, media_type="text/event-stream",
                         headers={"cache-control": "no-cache", "x-accel-buffering": "no"})  # fmt: skip
        self.ticket = ticket

    async def __call__(self, scope, receive, send) -> None:
        watcher = asyncio.ensure_future(_watch(receive, self.ticket))
        try:
            await send(
                {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            )
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk.encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away while we were writing
            pass
        finally:
            watcher.cancel()
            self.ticket.cancel()
            await self.body_iterator.aclose()
