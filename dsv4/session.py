"""A chat that continues from the cached state of its earlier turns.

The session keeps the exact token ids its state holds. A new turn renders the whole conversation in
the V4 chat format; when the cached ids are a prefix of that rendering (chat mode, and thinking mode
while earlier reasoning stays in the prompt), only the new suffix is fed. When the rendering drops
text the state already holds (the release drops earlier reasoning once a new user turn starts), the
session starts a fresh state rather than answer from a different prompt. Either way the reply is
what a from-scratch run on the rendered prompt gives. With a `PrefixCache` (`dsv4 chat --prompt-cache`)
each turn's prompt is prefilled through the cache (snapshots at its boundaries and at the prompt's end,
which is what thinking mode's next turn can reuse) and its final state is kept there too; a prompt the
session's own state cannot continue (a resumed conversation, thinking mode, after /think or /reset)
starts from the longest prefix the cache holds. `last_result.stats.reused_tokens` counts the prompt
tokens not prefilled by this turn.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .generate import Event, Result
from .prefix_cache import prefill


class ChatSession:
    def __init__(self, engine, *, thinking_mode: str = "chat", reasoning_effort: str | None = None,
                 system: str | None = None, tools: list[dict] | None = None, prefix_cache=None):  # fmt: skip
        self.engine = engine
        self.prefix_cache = prefix_cache
        self.thinking_mode = thinking_mode
        self.reasoning_effort = reasoning_effort
        self.tools = tools
        self.messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
        self.reset_state()

    def reset_state(self) -> None:
        self.state = self.engine.new_state()
        self.cached: list[int] = []  # token ids the state holds

    def reset(self) -> None:
        """Forget the conversation (keeps the system message)."""
        self.messages = [m for m in self.messages if m["role"] == "system"]
        self.reset_state()

    def send(self, content: str, **params: Any) -> Iterator[Event]:
        """Add a user turn and stream the assistant's reply; the reply joins the history when done."""
        from .chat import parse_completion

        self.messages.append({"role": "user", "content": content})
        ids = self.engine.encode(self.messages, thinking_mode=self.thinking_mode,
                                 reasoning_effort=self.reasoning_effort, tools=self.tools)  # fmt: skip
        if self.cached and ids[: len(self.cached)] == self.cached and len(ids) > len(self.cached):
            reused = len(self.cached)
        else:
            self.reset_state()
            reused = 0
        fed, t0 = reused, time.perf_counter()
        if self.prefix_cache is not None:
            # snapshots at the cache's boundaries and at the end of the prompt: thinking mode's next turn
            # renders this prompt's last token differently, so only a snapshot here serves it
            self.state, restored = prefill(
                self.engine, self.prefix_cache, ids, self.state if reused else None
            )
            reused, fed = reused + restored, len(ids) - 1
        prefill_seconds = time.perf_counter() - t0
        finished = False
        gen = self.engine.stream(ids, state=self.state, reused=fed, **params)
        try:
            yield from gen
            finished = True
        finally:
            seq = gen.sequence
            # the state holds the first state.pos tokens of prompt + output (a final sampled token, or
            # the end-of-sentence token, was never fed)
            self.cached = (ids + seq.output)[: self.state.pos] if finished else []
            if not self.cached:
                self.reset_state()
            elif self.prefix_cache is not None:
                self.prefix_cache.insert(self.cached, self.state)
            self.last_result: Result = seq.result()
            self.last_result.stats.reused_tokens = reused  # from the session's own state or the cache
            self.last_result.stats.prefill_seconds += prefill_seconds
            reply = parse_completion(seq.text.text, thinking_mode=self.thinking_mode)
            msg: dict[str, Any] = {"role": "assistant", "content": reply.content}
            if reply.reasoning:
                msg["reasoning_content"] = reply.reasoning
            if reply.tool_calls:
                msg["tool_calls"] = [c.to_openai() for c in reply.tool_calls]
            self.messages.append(msg)

    def load(self, path: str | Path) -> None:
        """Continue a conversation written by `save` (its state comes from the prefix cache, if any)."""
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
            raise ValueError(f"{path} is not a conversation saved with /save (no 'messages' list)")
        self.thinking_mode = data.get("thinking_mode", self.thinking_mode)
        self.messages = data["messages"]
        self.reset_state()

    def close(self) -> None:
        """Finish writing the prefix cache's snapshots."""
        if self.prefix_cache is not None:
            self.prefix_cache.flush()

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"thinking_mode": self.thinking_mode, "messages": self.messages}, indent=1,
                                         ensure_ascii=False))  # fmt: skip
