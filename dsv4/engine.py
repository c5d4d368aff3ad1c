"""The engine: a loaded model plus the per-sequence state bookkeeping that callers need.

`Engine.logits(ids)` is the simplest entry point (one sequence from position 0). `Engine.prefill` /
`Engine.step` advance `SeqState`s by any number of tokens, several sequences per step, and return
the logits asked for. Generation (sampling, stop rules, speculation) builds on these.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .checkpoint import Checkpoint
from .config import ModelConfig
from .generate import Event, Result, Scheduler, Sequence
from .model import SeqState, Transformer
from .sampling import SamplingParams

Prompt = str | list[int] | list[dict[str, Any]]


class Generation:
    """One prompt's generation, as `Engine.stream` returns it: an iterator of Events; `sequence`
    is what is being generated (prompt, output, state), `result()` the whole result once it ended."""

    def __init__(self, sequence: Sequence, events: Iterator[Event]):
        self.sequence, self._events = sequence, events

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        return next(self._events)

    def result(self) -> Result:
        return self.sequence.result()


class Engine:
    def __init__(self, model: Transformer, checkpoint: Checkpoint | None = None, tokenizer=None):
        self.model = model
        self.checkpoint = checkpoint
        self._tokenizer = tokenizer
        self._speculation = {"rounds": 0, "drafted": 0, "accepted": 0}
        self._chat_format: str | None = None

    @property
    def chat_format(self) -> str:
        """The chat format prompts are rendered in: "preview" or "0731". The detected release's
        (`model.release.chat`) unless set (the CLI's --chat-format)."""
        if self._chat_format is not None:
            return self._chat_format
        release = getattr(self.model, "release", None)
        return release.chat if release is not None else "preview"

    @chat_format.setter
    def chat_format(self, value: str | None) -> None:
        from .chat import CHAT_FORMATS

        if value is not None and value not in CHAT_FORMATS:
            raise ValueError(f"chat format {value!r}: expected one of {CHAT_FORMATS} (or None: the release's)")  # fmt: skip
        self._chat_format = value

    @property
    def config(self) -> ModelConfig:
        return self.model.cfg

    @property
    def tokenizer(self):
        """The checkpoint's tokenizer.json, else the official V4 tokenizer (loaded on first use)."""
        if self._tokenizer is None:
            from .tokenizer import Tokenizer

            self._tokenizer = Tokenizer.from_dir(self.checkpoint.path if self.checkpoint else None)
        return self._tokenizer

    # ---- prompts ----

    def encode(self, prompt: Prompt, *, thinking_mode: str = "chat", reasoning_effort: str | None = None,
               tools: list[dict] | None = None) -> list[int]:  # fmt: skip
        """Token ids of a prompt: ids pass through, text gets BOS, chat messages use the V4 format
        (`chat_format`: the preview's or 0731's reasoning-effort levels)."""
        if isinstance(prompt, str):
            return [self.tokenizer.bos_id, *self.tokenizer.encode(prompt)]
        if prompt and all(isinstance(m, dict) for m in prompt):
            from .chat import encode_messages_ids

            messages = list(prompt)
            if tools:
                messages = _attach_tools(messages, tools)
            return encode_messages_ids(self.tokenizer, messages, thinking_mode=thinking_mode,
                                       reasoning_effort=reasoning_effort, chat_format=self.chat_format)  # fmt: skip
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        raise TypeError("a prompt is text, a list of token ids, or a list of chat messages (dicts)")

    def sequence(self, prompt_ids: list[int], params: SamplingParams, state: SeqState | None = None,
                 reused: int = 0, speculative: bool = False) -> Sequence:  # fmt: skip
        """A new in-flight sequence (for the scheduler); `reused` prompt tokens are already in `state`.
        `speculative`: the scheduler verifies DSpark draft blocks for it (see `Scheduler`)."""
        tok = self._tokenizer if self._tokenizer is not None else self._try_tokenizer()
        if params.stop and tok is None:
            raise ValueError(
                "stop strings need a tokenizer; this checkpoint has none that fits its vocabulary"
            )
        return Sequence(prompt_ids, params, state if state is not None else self.new_state(),
                        vocab_size=self.config.vocab_size, eos_id=self.config.eos_token_id, tokenizer=tok, reused=reused,
                        speculative=speculative)  # fmt: skip

    def _try_tokenizer(self):
        try:
            tok = self.tokenizer
        except (OSError, ValueError):
            return None
        return tok if tok.vocab_size <= self.config.vocab_size else None

    # ---- generation ----

    def stream(self, prompt: Prompt, *, speculative: bool | str = False, state: SeqState | None = None, reused: int = 0,
               thinking_mode: str = "chat", reasoning_effort: str | None = None, tools: list[dict] | None = None,
               **params: Any) -> Generation:  # fmt: skip
        """Generate for one prompt: iterate the returned Generation for an Event per token (text deltas
        safe to show); its `sequence` (output, state) and `result()` stay with it.

        Chat messages are rendered with thinking_mode / reasoning_effort / tools; `params` are
        `SamplingParams` fields. `state` + `reused` continue a cached state (sessions).
        speculative=True drafts with the checkpoint's draft where that is measured to pay (see
        `speculative.declined`; else decodes plainly and `stats()` says why); "always" drafts regardless.
        """
        ids = self.encode(prompt, thinking_mode=thinking_mode, reasoning_effort=reasoning_effort, tools=tools)
        seq = self.sequence(ids, SamplingParams.of(**params), state, reused)
        return Generation(seq, self._events(seq, speculative))

    def _events(self, seq: Sequence, speculative: bool | str) -> Iterator[Event]:
        if speculative:
            from .speculative import declined, speculative_events

            reason = None if speculative == "always" else declined(self)
            if reason is None:
                yield from speculative_events(self, seq)
                return
            self._speculation["declined"] = reason  # decode plainly: measured to be faster here
        sched = Scheduler(self)
        sched.add(seq)
        yield from sched.run()

    def complete(self, prompt: Prompt, **kwargs: Any) -> Result:
        """Generate for one prompt; the whole result with its statistics."""
        gen = self.stream(prompt, **kwargs)
        for _ in gen:
            pass
        return gen.result()

    def generate(self, token_ids: list[int] | list[list[int]], **params: Any) -> list[int] | list[list[int]]:
        """New token ids for one sequence (or for each of several, decoded together in one batch)."""
        many = bool(token_ids) and isinstance(token_ids[0], list)
        prompts = token_ids if many else [token_ids]
        speculative = params.pop("speculative", False)
        if speculative and not many:
            return self.complete(list(token_ids), speculative=speculative, **params).token_ids
        sp = SamplingParams.of(**params)
        seqs = [self.sequence(list(p), sp) for p in prompts]
        sched = Scheduler(self, max_running=len(seqs), max_step_tokens=max(256, len(seqs)))
        for s in seqs:
            sched.add(s)
        for _ in sched.run():
            pass
        outs = [s.output for s in seqs]
        return outs if many else outs[0]

    def stats(self) -> dict[str, Any]:
        """Expert-cache and memory figures (for the server's /metrics, benchmarks and the CLI's notices)."""
        from .memory import peak_rss_bytes, rss_bytes

        out: dict[str, Any] = {"rss_bytes": rss_bytes(), "peak_rss_bytes": peak_rss_bytes()}
        spec = self._speculation
        if spec.get("declined"):
            out["speculation_declined"] = spec["declined"]
        if spec["rounds"]:
            out["speculative"] = {**spec, "acceptance_rate": spec["accepted"] / spec["drafted"],
                                  "mean_accepted_length": (spec["accepted"] + spec["rounds"]) / spec["rounds"]}  # fmt: skip
        store = getattr(self.model, "store", None)
        if store is not None:
            out["expert_cache"] = {**store.stats.as_dict(), "used_bytes": store.used_bytes, "budget_bytes": store.budget_bytes}
        comm = getattr(self.model, "comm", None)
        if comm is not None:
            out["distributed"] = {"ranks": comm.ranks, **comm.stats.as_dict()}
        return out

    def new_state(self) -> SeqState:
        return self.model.new_state()

    def note_speculation(self, stats) -> None:
        """Add one speculative sequence's draft counts to the totals `stats()` reports."""
        spec = self._speculation
        spec["rounds"] += stats.draft_rounds
        spec["drafted"] += stats.draft_tokens
        spec["accepted"] += stats.accepted_tokens

    # ---- the DSpark draft, for comparisons with other implementations ----

    @torch.inference_mode()
    def draft_logits(self, token_ids: list[int]) -> torch.Tensor:
        """fp32 [B, vocab] Markov-corrected logits of the greedy DSpark block that follows `token_ids`
        (anchor = the target's greedy next token; row i is conditioned on the greedy d_<i)."""
        return self._greedy_draft(token_ids).logits

    @torch.inference_mode()
    def draft_tokens(self, token_ids: list[int]) -> list[int]:
        """The B greedy DSpark draft ids that follow `token_ids` (after the target's greedy next token)."""
        return self._greedy_draft(token_ids).tokens

    def _greedy_draft(self, token_ids: list[int]):
        if self.model.dspark is None:
            raise ValueError("this checkpoint has no DSpark draft (a preview checkpoint drafts with MTP)")
        logits, state = self.prefill(list(token_ids))
        return self.model.dspark_draft(state, int(logits[-1].argmax()), lambda row: int(row.argmax()))

    @torch.inference_mode()
    def step(
        self, seqs: list[list[int]], states: list[SeqState], all_logits: bool | list[bool] = False
    ) -> list[torch.Tensor]:
        """Feed new tokens to each sequence; return per sequence its logits [S, V] (or [1, V], the last).
        `all_logits` may be a list: one flag per sequence (speculative ones verify every fed token)."""
        batch = self.model.make_batch(seqs, states)
        h = self.model(batch, states)
        if all_logits is True:
            logits = self.model.logits_from(h)
            return [logits[a:b] for a, b in batch.segments]
        every = all_logits if isinstance(all_logits, list) else [False] * len(seqs)
        spans = [(a, b) if full else (b - 1, b) for (a, b), full in zip(batch.segments, every, strict=True)]
        if len(spans) == 1:  # one sequence (batch-1 decode): a view, no index tensor
            logits = self.model.logits_from(h[spans[0][0] : spans[0][1]])
        else:
            rows = torch.tensor([r for a, b in spans for r in range(a, b)], device=h.device)
            logits = self.model.logits_from(h[rows])
        out, at = [], 0
        for a, b in spans:
            out.append(logits[at : at + b - a])
            at += b - a
        return out

    def prefill(self, ids: list[int], state: SeqState | None = None, chunk: int | None = None,
                all_logits: bool = False) -> tuple[torch.Tensor, SeqState]:  # fmt: skip
        """Feed `ids` (in chunks of `chunk` tokens if given) to one sequence; returns logits and state."""
        state = state if state is not None else self.new_state()
        if not ids:
            raise ValueError("prefill needs at least one token")
        chunk = chunk or len(ids)
        outs = [self.step([ids[i : i + chunk]], [state], all_logits)[0] for i in range(0, len(ids), chunk)]
        return (torch.cat(outs) if all_logits else outs[-1]), state

    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """float32 logits [len(token_ids), vocab] for one sequence from position 0."""
        return self.prefill(list(token_ids), all_logits=True)[0].float()


def _attach_tools(messages: list[dict], tools: list[dict]) -> list[dict]:
    """Tools ride on the system message (a new one first if there is none)."""
    if messages and messages[0].get("role") == "system":
        return [{**messages[0], "tools": tools}, *messages[1:]]
    return [{"role": "system", "content": "", "tools": tools}, *messages]


def load(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.bfloat16,
         numerics: str = "exact", **kwargs) -> Engine:  # fmt: skip
    """Load a checkpoint folder (official or transformers layout) into an Engine.

    dtype is the compute dtype (bf16 default, fp32 for checks); numerics 'exact' computes what
    transformers computes, 'released' adds the official FP8 KV / FP4 indexer roundings.
    """
    from . import distributed

    if distributed.launched():  # under torchrun: experts split across ranks; only rank 0 returns
        return distributed.load(path, device=device, dtype=dtype, numerics=numerics, **kwargs)
    from .loader import load_model

    model, ckpt = load_model(path, device=device, dtype=dtype, numerics=numerics, **kwargs)
    return Engine(model, ckpt)
