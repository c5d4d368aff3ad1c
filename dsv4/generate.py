"""Generation: sequences, stop rules, streaming text, and the step scheduler that batches them.

A `Sequence` owns one request's state (KV state, sampler, streamed text, stop rules, timings).
`Scheduler.step()` runs one forward pass for every active sequence at once: decoding sequences feed
one token, prefilling ones a chunk of their prompt within a token budget (chunked prefill), so new
requests join without waiting for others to finish (continuous batching). The engine's `generate`
and the server drive the same scheduler. This module knows no HTTP and no chat format.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .model import SeqState
from .sampling import Sampler, SamplingParams, TokenLogprob

_ids = itertools.count(1)
log = logging.getLogger("dsv4.generate")


@dataclass
class Event:
    """One generated token of one sequence (or its end)."""

    seq_id: int
    token_id: int | None
    text: str  # new text that is safe to show (held back while it could start a stop string)
    logprob: TokenLogprob | None = None
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" when this event ends the sequence


@dataclass
class Stats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    sampled_tokens: int = 0  # generated_tokens plus a stop token not returned: decode_seconds spans these - 1
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    reused_tokens: int = 0  # prompt tokens served from a cached state (sessions)
    draft_tokens: int = 0  # speculative drafts proposed (MTP or DSpark)
    accepted_tokens: int = 0  # drafts accepted
    draft_rounds: int = 0  # verify steps: target forwards that checked a draft

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        n = self.generated_tokens - 1  # the first token comes out of the prefill
        return n / self.decode_seconds if self.decode_seconds and n > 0 else 0.0

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else None

    @property
    def mean_accepted_length(self) -> float | None:
        """Tokens a verify step yields on average: the accepted drafts plus the target's own token."""
        return (self.accepted_tokens + self.draft_rounds) / self.draft_rounds if self.draft_rounds else None


@dataclass
class Result:
    token_ids: list[int]
    text: str
    finish_reason: str
    stats: Stats
    logprobs: list[TokenLogprob] = field(default_factory=list)


class StopText:
    """Incremental detokenization with stop strings: emits only text that cannot become a stop."""

    def __init__(self, tokenizer, stops: list[str]):
        from .tokenizer import StreamDecoder

        self.decoder = StreamDecoder(tokenizer) if tokenizer is not None else None
        self.stops = stops
        self.text = ""
        self.emitted = 0

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; return (text now safe to emit, whether a stop string was hit)."""
        if self.decoder is None:
            return "", False
        self.text += self.decoder.push(token_id)
        return self._release(final=False)

    def finish(self) -> str:
        if self.decoder is not None:
            self.text += self.decoder.flush()
        return self._release(final=True)[0]

    def _release(self, final: bool) -> tuple[str, bool]:
        start = max(self.emitted - max((len(s) for s in self.stops), default=0), 0)
        hits = [i for s in self.stops if (i := self.text.find(s, start)) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            out, self.emitted = self.text[self.emitted :], len(self.text)
            return out, True
        safe = len(self.text)
        if not final:  # hold back a tail that is a prefix of some stop string
            for s in self.stops:
                for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(s[:k]):
                        safe = min(safe, len(self.text) - k)
                        break
        out, self.emitted = self.text[self.emitted : safe], max(self.emitted, safe)
        return out, False


class Sequence:
    """One request in flight."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, state: SeqState, *, vocab_size: int,
                 eos_id: int | None, tokenizer=None, reused: int = 0, speculative: bool = False):  # fmt: skip
        if not prompt_ids:
            raise ValueError("the prompt is empty: give at least one token")
        self.id = next(_ids)
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.state = state
        self.pending = self.prompt_ids[reused:]  # tokens still to feed
        self.speculative = speculative  # decode with the checkpoint's draft where the scheduler can
        self.output: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.sampler = Sampler(params, prompt_ids, vocab_size)
        self.stop_ids = set(params.stop_token_ids) | (
            {eos_id} if eos_id is not None and not params.ignore_eos else set()
        )
        self.text = StopText(tokenizer, params.stop)
        self.finish_reason: str | None = None
        self.error: Exception | None = None
        self.stats = Stats(prompt_tokens=len(prompt_ids), reused_tokens=reused)
        self._t0 = time.perf_counter()
        self._t_first: float | None = None

    @property
    def prefilling(self) -> bool:
        return self._t_first is None

    def age(self) -> float:
        """Seconds since the sequence was made (the server's end-to-end latency when it ends)."""
        return time.perf_counter() - self._t0

    def append(self, token_id: int, logits: torch.Tensor | None) -> Event:
        """Record a sampled token, apply the stop rules, and return its event."""
        now = time.perf_counter()
        self.stats.sampled_tokens += 1
        if self._t_first is None:
            self._t_first = now
            self.stats.prefill_seconds = now - self._t0
        else:
            self.stats.decode_seconds = now - self._t_first
        lp = (
            self.sampler.logprob(logits, token_id)
            if self.params.logprobs is not None and logits is not None
            else None
        )
        self.sampler.accept(token_id)
        if token_id in self.stop_ids:
            return self._finish(token_id, "stop", lp, include=False, flush=True)
        self.output.append(token_id)
        self.stats.generated_tokens = len(self.output)
        if lp is not None:
            self.logprobs.append(lp)
        text, hit = self.text.push(token_id)
        if hit:  # the text was cut at the stop string: nothing more to flush
            return self._finish(token_id, "stop", lp, include=True, flush=False, text=text)
        if len(self.output) >= self.params.max_tokens:
            return self._finish(token_id, "length", lp, include=True, flush=True, text=text)
        self.pending = [token_id]
        return Event(self.id, token_id, text, lp)

    def cancel(self) -> Event:
        self.pending = []
        return self._finish(None, "cancelled", None, include=False, flush=True)

    def fail(self, error: Exception) -> Event:
        """End this sequence alone after an error in its own sampling or decoding."""
        self.error = error
        self.pending = []
        return Event(self.id, None, "", None, "error")

    def _finish(self, token_id, reason, lp, include: bool, flush: bool, text: str = "") -> Event:
        self.finish_reason = reason
        self.pending = []
        tail = self.text.finish() if flush else ""
        return Event(self.id, token_id if include else None, text + tail, lp, reason)

    def result(self) -> Result:
        return Result(self.output, self.text.text, self.finish_reason or "", self.stats, self.logprobs)


class Scheduler:
    """Runs many sequences together, one forward pass per `step()`.

    `max_step_tokens` bounds the tokens of one step (decode tokens first, then prefill chunks);
    `max_running` bounds the sequences holding KV state; the rest wait in order.

    Speculative sequences (`Sequence.speculative`) on a checkpoint with a DSpark draft decode in blocks:
    each step drafts B tokens for every such decoder, the shared forward pass verifies them (all B + 1
    logits of that segment) beside the other sequences' tokens and prefill chunks, and each sequence
    keeps its accepted prefix and rolls its state back past the rest. Where it cannot, the sequence
    decodes plainly that step and `fallbacks` counts why (logged once per reason): "mtp" (the preview's
    MTP layer drafts from the main model's last streams and keeps a window state of its own that only a
    single-sequence loop feeds: `speculative_events`), "budget" (the step's token budget has no room for
    a block), "rollback" (the state cannot forget B + 1 tokens), "draft_error" (the draft raised),
    "ram_budget" (experts under a RAM budget: measured slower than plain decoding, `speculative.declined`).
    """

    def __init__(self, engine, *, max_step_tokens: int = 256, max_running: int = 16):
        self.engine = engine
        self.max_step_tokens = max(1, max_step_tokens)
        self.max_running = max(1, max_running)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.fallbacks: Counter[str] = Counter()  # speculative decode steps taken plainly, by reason
        self._lock = threading.Lock()

    def add(self, seq: Sequence) -> None:
        with self._lock:
            self.waiting.append(seq)

    def cancel(self, seq_id: int) -> Event | None:
        with self._lock:
            for group in (self.running, self.waiting):
                for s in list(group):
                    if s.id == seq_id:
                        group.remove(s)
                        return s.cancel()
        return None

    @property
    def busy(self) -> bool:
        return bool(self.running or self.waiting)

    def step(self) -> list[Event]:
        """One forward pass over the active sequences; the events it produced."""
        with self._lock:
            while self.waiting and len(self.running) < self.max_running:
                self.running.append(self.waiting.popleft())
            plan, budget = [], self.max_step_tokens
            for s in [x for x in self.running if not x.prefilling]:  # decoders first
                if budget <= 0:
                    break
                plan.append((s, s.pending[:budget]))
                budget -= len(plan[-1][1])
            room, block = [], self._block_size()
            if block:  # then draft blocks, to those that verified the fewest so far
                for s in sorted((x for x, _ in plan if x.speculative), key=lambda x: x.stats.draft_rounds):
                    if budget < block:
                        break
                    room.append(s.id)
                    budget -= block
            for s in [x for x in self.running if x.prefilling]:  # then prefill chunks
                if budget <= 0:
                    break
                n = min(len(s.pending), budget)
                plan.append((s, s.pending[:n]))
                budget -= n
        if not plan:
            return []
        blocks = self._draft(plan, room)
        feeds = [fed + blocks[s.id][0] if s.id in blocks else fed for s, fed in plan]
        states = [s.state for s, _ in plan]
        logits = self.engine.step(feeds, states, [s.id in blocks for s, _ in plan])
        events = []
        for (s, fed), lg in zip(plan, logits, strict=True):
            s.pending = s.pending[len(fed) :]
            if s.pending:  # prompt not finished: no token yet
                continue
            try:
                if s.id in blocks:
                    events += self._settle(s, *blocks[s.id], lg)
                else:
                    events.append(s.append(s.sampler.sample(lg[-1]), lg[-1]))
            except Exception as e:  # one sequence's sampler or detokenizer must not end the others
                s.finish_reason = "error"
                events.append(s.fail(e))
        with self._lock:
            self.running = [s for s in self.running if s.finish_reason is None]
        return events

    # ---- speculative decoding ----

    def _block_size(self) -> int:
        dspark = getattr(getattr(self.engine, "model", None), "dspark", None)
        return dspark.block_size if dspark is not None else 0

    def _draft(self, plan: list[tuple[Sequence, list[int]]], room: list[int]) -> dict[int, tuple[list[int], list]]:  # fmt: skip
        """Draft blocks for the speculative decoders of this step (those in `room` fit the step's token
        budget): seq id -> (drafts, their q rows)."""
        blocks: dict[int, tuple[list[int], list]] = {}
        wanted = [s for s, _ in plan if s.speculative and not s.prefilling and len(s.pending) == 1]
        if not wanted:
            return blocks
        model = self.engine.model
        if model.dspark is None:
            return self._fall_back(wanted, "mtp" if model.mtp else "no_draft", blocks)
        from .speculative import declined, propose

        plain = [s for s in wanted if s.speculative != "always"] if declined(self.engine) else []
        if plain:  # only sequences that asked for "always" still draft
            self._fall_back(plain, "ram_budget", blocks)
            wanted = [s for s in wanted if s not in plain]
        b = model.dspark.block_size
        for s in wanted:
            if s.state.max_rollback < b + 1:
                self._fall_back([s], "rollback", blocks)
            elif s.id not in room:
                self._fall_back([s], "budget", blocks)
            else:
                try:
                    blocks[s.id] = propose(model, s)
                except Exception:
                    log.exception("sequence %d: the DSpark draft failed; decoding this step plainly", s.id)
                    self._fall_back([s], "draft_error", blocks)
        return blocks

    def _fall_back(self, seqs: list[Sequence], reason: str, blocks: dict) -> dict:
        if reason not in self.fallbacks:
            log.warning("speculative sequences decode plainly: %s (see Scheduler)", reason)
        self.fallbacks[reason] += len(seqs)
        return blocks

    def _settle(self, s: Sequence, drafts: list[int], qs: list, logits: torch.Tensor) -> list[Event]:
        from .speculative import settle

        before = (s.stats.draft_tokens, s.stats.accepted_tokens)
        events = settle(s, drafts, qs, logits)
        note = getattr(self.engine, "note_speculation", None)
        if note is not None:  # the engine's running totals (stats(), /metrics)
            note(Stats(draft_tokens=s.stats.draft_tokens - before[0],
                       accepted_tokens=s.stats.accepted_tokens - before[1], draft_rounds=1))  # fmt: skip
        return events

    def run(self) -> Iterator[Event]:
        while self.busy:
            yield from self.step()
