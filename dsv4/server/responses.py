"""Response bodies in OpenAI's shapes, built from finished sequences or from streamed events.

`ReplySplitter` turns the streamed text of a chat reply into `reasoning_content` and `content` deltas
while it is being generated; what it has emitted when the reply ends always equals
`parse_completion(full text)`, because it only emits text that no later token can move to another
field (a possible `</think>` or DSML tool-call start is held back until it is decided). Tool calls are
taken from the finished text. It knows the response shapes and the chat markers, not the model.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from ..chat import DSML, EOS, THINK_END, THINK_START, TOOL_CALLS_OPEN, Completion, parse_completion
from ..sampling import TokenLogprob

_TOOL_START = f"<{DSML}"
_TOOLS_AFTER_REASONING = "\n\n" + TOOL_CALLS_OPEN


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def _held(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of one of `markers`."""
    best = 0
    for m in markers:
        for k in range(min(len(m) - 1, len(text)), best, -1):
            if text.endswith(m[:k]):
                best = k
                break
    return best


def _safe_content(text: str) -> str:
    """The part of chat content that stays content whatever comes next."""
    start = text.find(_TOOL_START)
    if start >= 0:
        return text[:start].removesuffix("\n\n")
    cut = len(text) - _held(text, (_TOOL_START,))
    for _ in range(2):  # "\n\n" before a tool block is not content
        if cut > 0 and text[cut - 1] == "\n":
            cut -= 1
    return text[:cut]


def safe_split(text: str, thinking: bool) -> tuple[str, str]:
    """(reasoning, content) of a reply so far that no continuation can change, only extend."""
    text = text.split(EOS, 1)[0]
    text = text[: len(text) - _held(text, (EOS,))]  # the parser drops everything from EOS on
    if not thinking:
        if len(text) < len(THINK_END) and THINK_END.startswith(text):
            return "", ""
        return "", _safe_content(text.removeprefix(THINK_END))
    if len(text) < len(THINK_START) and THINK_START.startswith(text):
        return "", ""
    text = text.removeprefix(THINK_START)
    end = text.find(THINK_END)
    if end >= 0:
        return text[:end], _safe_content(text[end + len(THINK_END) :])
    tools = text.find(_TOOLS_AFTER_REASONING)
    cut = tools if tools >= 0 else len(text) - _held(text, (THINK_END, _TOOLS_AFTER_REASONING))
    return text[:cut], ""


class ReplySplitter:
    """Streamed chat text -> reasoning / content deltas; `finish` gives the rest and the tool calls."""

    def __init__(self, thinking: bool):
        self.thinking = thinking
        self.text = ""
        self.sent = ["", ""]  # reasoning, content emitted so far

    def push(self, delta: str) -> dict[str, str]:
        self.text += delta
        return self._advance(safe_split(self.text, self.thinking))

    def finish(self) -> tuple[dict[str, str], Completion]:
        done = parse_completion(self.text, thinking_mode="thinking" if self.thinking else "chat")
        return self._advance((done.reasoning or "", done.content)), done

    def _advance(self, now: tuple[str, str]) -> dict[str, str]:
        out = {}
        for i, key in enumerate(("reasoning_content", "content")):
            if len(now[i]) > len(self.sent[i]) and now[i].startswith(self.sent[i]):
                out[key] = now[i][len(self.sent[i]) :]
                self.sent[i] = now[i]
        return out


def tool_calls_openai(done: Completion) -> list[dict[str, Any]]:
    return [{"id": new_id("call"), **c.to_openai()} for c in done.tool_calls]


def finish_reason(reason: str, done: Completion | None) -> str:
    if done is not None and done.tool_calls and reason == "stop":
        return "tool_calls"
    return reason


def chat_message(done: Completion) -> dict[str, Any]:
    """The assistant message of a finished chat reply."""
    msg: dict[str, Any] = {"role": "assistant", "content": done.content}
    if done.reasoning is not None:
        msg["reasoning_content"] = done.reasoning
    if done.tool_calls:
        msg["tool_calls"] = tool_calls_openai(done)
        msg["content"] = done.content or None
    return msg


def usage(prompt_tokens: int, completion_tokens: int, reasoning_tokens: int | None = None,
          cached_tokens: int = 0) -> dict[str, Any]:  # fmt: skip
    out: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                           "total_tokens": prompt_tokens + completion_tokens,
                           "prompt_tokens_details": {"cached_tokens": cached_tokens}}  # fmt: skip
    if reasoning_tokens is not None:
        out["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return out


class Tokens:
    """Token ids as OpenAI shows them in logprobs: text and raw bytes."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        raw = self.tokenizer.token_bytes(token_id)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

    def chat_logprobs(self, lps: list[TokenLogprob]) -> dict[str, Any]:
        return {"content": [{**self.entry(lp.token_id, lp.logprob),
                             "top_logprobs": [self.entry(t, v) for t, v in lp.top]} for lp in lps]}  # fmt: skip

    def text_logprobs(self, lps: list[TokenLogprob], offset: int = 0) -> dict[str, Any]:
        """The legacy completions shape: tokens, token_logprobs, top_logprobs, text_offset."""
        tokens = [self.entry(lp.token_id, lp.logprob)["token"] for lp in lps]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
                "top_logprobs": [{self.entry(t, v)["token"]: v for t, v in lp.top} for lp in lps],
                "text_offset": offsets}  # fmt: skip


def envelope(kind: str, rid: str, model: str, created: int | None = None, **body: Any) -> dict[str, Any]:
    return {"id": rid, "object": kind, "created": created or int(time.time()), "model": model, **body}
