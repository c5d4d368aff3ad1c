"""A chat that continues from the cached state of its earlier turns.

The session keeps the exact token ids its state holds, and a snapshot (`SeqState.snapshot`) of the
state at the end of its last prompt (all but the prompt's last token). A new turn renders the whole
conversation in the V4 chat format and continues from the longest prefix of that rendering it can
reach: its state rolled back to where the ids diverge (when that is within the state's rollback room),
else the prompt snapshot when the rendering still starts with that prompt (the previous reply rendered
differently than it was sampled, or thinking mode dropped its reasoning and re-rendered `<think>`),
else a fresh state. Only the rest is fed, so the reply is what a from-scratch run on the rendered
prompt gives. The snapshot costs one copy of the state per turn (`SeqState.nbytes`).

With a `PrefixCache` (`dsv4 chat --prompt-cache`) the cache keeps the prompt snapshots instead: each
turn's prompt is prefilled through it (snapshots at its boundaries and at the prompt's end) and its
final state is kept there too; a prompt the session's own state cannot continue (a resumed
conversation, after /think or /reset, a diverged reply) starts from the longest prefix the cache
holds. `last_result.stats.reused_tokens` counts the prompt tokens not prefilled by this turn.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .generate import Event, Result
from .prefix_cache import prefill
from .state import SeqState

PREFILL_CHUNK = 512  # tokens fed per step when a turn's prompt is prefilled before generating


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
        self.mark: SeqState | None = None  # snapshot at the end of the last prompt (without a prefix cache)
        self.mark_ids: list[int] = []  # the token ids it holds

    def reset(self) -> None:
        """Forget the conversation (keeps the system message)."""
        self.messages = [m for m in self.messages if m["role"] == "system"]
        self.reset_state()

    def _resume(self, ids: list[int]) -> int:
        """Make `self.state` hold the longest prefix of ids[:-1] it can reach; return its length."""
        want = ids[:-1]  # the last prompt token is fed by the generator, so it has logits
        n = common_prefix(self.cached, want)
        if n and self.state.pos - n <= self.state.room:
            self.state.rollback(self.state.pos - n)
            self.cached = self.cached[:n]
            return n
        n = common_prefix(self.mark_ids, want)
        if self.mark is not None and n and self.mark.pos - n <= self.mark.room:
            self.state.restore(self.mark)
            self.state.rollback(self.mark.pos - n)
            self.cached = self.mark_ids[:n]
            return n
        self.state, self.cached = self.engine.new_state(), []
        return 0

    def send(self, content: str, **params: Any) -> Iterator[Event]:
        """Add a user turn and stream the assistant's reply; the reply joins the history when done."""
        from .chat import parse_completion

        self.messages.append({"role": "user", "content": content})
        ids = self.engine.encode(self.messages, thinking_mode=self.thinking_mode,
                                 reasoning_effort=self.reasoning_effort, tools=self.tools)  # fmt: skip
        reused = self._resume(ids)
        t0 = time.perf_counter()
        if self.prefix_cache is not None:
            # snapshots at the cache's boundaries and at the end of the prompt: thinking mode's next turn
            # renders this prompt's last token differently, so only a snapshot here serves it
            self.state, restored = prefill(
                self.engine, self.prefix_cache, ids, self.state if reused else None
            )
            reused += restored
        else:
            if reused < len(ids) - 1:
                self.engine.prefill(ids[reused:-1], self.state, chunk=PREFILL_CHUNK)
            self.mark, self.mark_ids = self.state.snapshot(), ids[:-1]
        prefill_seconds = time.perf_counter() - t0
        finished = False
        gen = self.engine.stream(ids, state=self.state, reused=len(ids) - 1, **params)
        try:
            yield from gen
            finished = True
        finally:
            seq = gen.sequence
            # the state holds the first state.pos tokens of prompt + output (a final sampled token, or
            # the end-of-sentence token, was never fed)
            self.cached = (ids + seq.output)[: self.state.pos] if finished else []
            if not self.cached:
                self.state = self.engine.new_state()  # the prompt snapshot stays good
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


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading ids a and b share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
