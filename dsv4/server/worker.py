"""The one thread that runs generation for the server, and the bridge that hands its events to asyncio.

Every request's sequences go into one `Scheduler`; a single background thread loops `step()` while
anything is active and sleeps otherwise, so concurrent requests share decode steps and a new request
joins at the next step (continuous batching). Each `Event` is handed to the event loop that owns the
request with `loop.call_soon_threadsafe`. Admission is bounded: at most `max_running + max_queue`
sequences may be in flight, beyond that `submit` raises `QueueFull` instead of queueing.

A forward pass that raises fails only the sequences that cause it: a step is atomic (a forward that
raises leaves its states as they were), each sequence of that step is tried alone on a snapshot, and
only those that fail alone end, with finish_reason "error" and the exception in `Sequence.error` (its
message reaches the client; the traceback goes to the log only).

With a `PrefixCache`, the worker thread looks every new sequence's prompt up before it joins the
scheduler (a hit restores the state and leaves only the rest of the prompt to feed), and after each
step keeps snapshots of prompts at the cache's boundaries and of finished sequences' prompt + output.
`threads` (`dsv4 serve --threads`) is applied on the worker thread itself: torch's intra-op thread count
belongs to the calling thread, and this thread runs every forward pass. It knows nothing of HTTP, JSON
or the chat format.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch

from ..generate import Event, Scheduler, Sequence

log = logging.getLogger("dsv4.server")

RATE_WINDOW_S = 10.0  # tokens/s is measured over this many recent seconds


class QueueFull(Exception):
    """More sequences asked for than the server admits at once."""


@dataclass
class _Sink:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class _GuardedEngine:
    """The engine as the scheduler sees it: remembers what each forward pass was fed and rolls the
    states back when one raises, so the worker can retry the sequences one by one."""

    def __init__(self, engine):
        self.engine = engine
        self.fed: list[tuple[list[int], object]] = []  # (tokens, state) of the last forward pass
        self.forward_failed = False

    def __getattr__(self, name):  # the model, note_speculation: the engine's own
        return getattr(self.engine, name)

    def reset(self) -> None:
        self.fed, self.forward_failed = [], False

    def step(self, seqs, states, all_logits=False):
        self.fed = list(zip(seqs, states, strict=True))
        try:
            return self.engine.step(seqs, states, all_logits)  # atomic: a step that raises changes no state
        except Exception:
            self.forward_failed = True
            raise


def _put_all(batch: list[tuple[asyncio.Queue, Event]]) -> None:
    for queue, ev in batch:
        queue.put_nowait(ev)


class Worker:
    """Owns the Scheduler and its thread. `submit` and `cancel` are called from the event loop."""

    def __init__(self, engine, *, max_running: int = 16, max_queue: int = 64, max_step_tokens: int = 256,
                 prefix_cache=None, on_finish=None, threads: int | None = None):  # fmt: skip
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads} (--threads)")
        self.engine = engine
        self.threads = threads  # CPU threads of the forward passes; the worker thread's own once it runs
        self.on_finish = on_finish  # (sequence, finish reason) of each that ends, on this thread
        self.prefix_cache = prefix_cache
        self._incoming: list[Sequence] = []  # submitted, not yet looked up in the prefix cache
        self._guard = _GuardedEngine(engine)
        self.scheduler = Scheduler(self._guard, max_step_tokens=max_step_tokens, max_running=max_running)
        self.capacity = max_running + max(0, max_queue)
        self._sinks: dict[int, _Sink] = {}
        self._seqs: dict[int, Sequence] = {}
        self._cv = threading.Condition()
        self._closed = False
        self.prompt_tokens = 0  # counters for /metrics
        self.generated_tokens = 0
        self.failures = 0
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) per step, for tokens/s
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), name="dsv4-worker", daemon=True)
        self._thread.start()
        started.wait()

    # ---- event-loop side ----

    def submit(self, seqs: list[Sequence]) -> Ticket:
        """Queue sequences for generation; their events arrive on the returned ticket."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._cv:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if len(self._sinks) + len(seqs) > self.capacity:
                raise QueueFull(
                    f"the server is at capacity: {len(self._sinks)} sequences running or queued, "
                    f"{len(seqs)} more asked for, limit {self.capacity} (--max-running + --max-queue)"
                )
            for s in seqs:
                self._sinks[s.id] = _Sink(loop, queue)
                self._seqs[s.id] = s
                self.prompt_tokens += len(s.prompt_ids)
                if self.prefix_cache is not None:
                    self._incoming.append(s)
                else:
                    self.scheduler.add(s)
            self._cv.notify()
        return Ticket(self, seqs, queue)

    def cancel(self, seq_ids: list[int]) -> None:
        """Stop sequences and drop everything held for them (no more events are delivered)."""
        with self._cv:
            for i in seq_ids:
                self._sinks.pop(i, None)
                self._seqs.pop(i, None)
            self._incoming = [s for s in self._incoming if s.id not in seq_ids]
        for i in seq_ids:
            self.scheduler.cancel(i)

    @property
    def in_flight(self) -> int:
        return len(self._sinks)

    @property
    def running(self) -> int:
        return len(self.scheduler.running)

    @property
    def waiting(self) -> int:
        return len(self.scheduler.waiting) + len(self._incoming)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the last RATE_WINDOW_S seconds (all sequences together)."""
        now = time.monotonic()
        recent = [(t, n) for t, n in list(self._recent) if now - t <= RATE_WINDOW_S]
        if not recent:
            return 0.0
        span = max(now - recent[0][0], 1e-3) if len(recent) > 1 else RATE_WINDOW_S
        return sum(n for _, n in recent) / min(span, RATE_WINDOW_S)

    def close(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout)

    # ---- worker thread ----

    def _run(self, started: threading.Event) -> None:
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        self.threads = torch.get_num_threads()  # what this thread's forward passes use
        started.set()
        while True:
            with self._cv:
                while not self._closed and not self.scheduler.busy and not self._incoming:
                    self._cv.wait()
                if self._closed:
                    return
                incoming, self._incoming = self._incoming, []
            for s in incoming:
                self._reuse(s)
            self._guard.reset()
            try:
                events = self.scheduler.step()
            except Exception as exc:
                events = self._isolate(exc)
            else:
                self._remember(events)
            self._deliver(events)

    def _reuse(self, s: Sequence) -> None:
        """Start a new sequence from the longest cached prefix of its prompt, then schedule it."""
        try:
            found = self.prefix_cache.lookup(s.prompt_ids)
        except Exception:  # a cache fault costs a prefill, never the request
            log.exception("prompt cache lookup failed for sequence %d", s.id)
            found = None
        if found is not None:
            s.state, n = found
            s.pending, s.stats.reused_tokens = s.prompt_ids[n:], n
        self.scheduler.add(s)

    def _remember(self, events: list[Event]) -> None:
        """After a step: snapshots of prompts at the cache's boundaries and of finished sequences."""
        if self.prefix_cache is None:
            return
        with self._cv:
            by_state = {id(s.state): s for s in self._seqs.values()}
            done = [self._seqs.get(ev.seq_id) for ev in events if ev.finish_reason in ("stop", "length")]
        try:
            for toks, st in self._guard.fed:
                s = by_state.get(id(st))
                if s is not None and self.prefix_cache.boundary(st.pos - len(toks), st.pos, len(s.prompt_ids)):
                    self.prefix_cache.insert(s.prompt_ids[: st.pos], st)
            for s in done:
                if s is not None and s.state.pos > len(s.prompt_ids):
                    self.prefix_cache.insert((s.prompt_ids + s.output)[: s.state.pos], s.state)
        except Exception:
            log.exception("prompt cache: keeping a snapshot failed")

    def _deliver(self, events: list[Event]) -> None:
        now = time.monotonic()
        tokens = sum(1 for ev in events if ev.token_id is not None)
        self.generated_tokens += tokens
        self._recent.append((now, tokens))
        while self._recent and now - self._recent[0][0] > RATE_WINDOW_S:
            self._recent.popleft()
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Event]]] = {}
        ended: list[tuple[Sequence, str]] = []
        with self._cv:
            for ev in events:
                sink = self._sinks.get(ev.seq_id)
                if ev.finish_reason is not None:
                    self._sinks.pop(ev.seq_id, None)
                    if (s := self._seqs.pop(ev.seq_id, None)) is not None:
                        ended.append((s, ev.finish_reason))
                if sink is not None:  # else cancelled meanwhile
                    batches.setdefault(sink.loop, []).append((sink.queue, ev))
        if self.on_finish is not None:
            for s, reason in ended:
                try:
                    self.on_finish(s, reason)
                except Exception:  # a metrics fault never costs a request
                    log.exception("on_finish failed for sequence %d", s.id)
        for loop, batch in batches.items():  # one wake-up per event loop and step
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # the requests' event loop is gone
                self.cancel([ev.seq_id for _, ev in batch])

    def _isolate(self, exc: Exception) -> list[Event]:
        """After a failed step: find the sequences that fail on their own and end only those."""
        with self._cv:
            by_state = {id(s.state): s for s in self._seqs.values()}
        fed = [(toks, by_state.get(id(st))) for toks, st in self._guard.fed]
        suspects = [s for _, s in fed if s is not None]
        own: dict[int, Exception] = {}  # what each sequence raised when tried alone
        if not self._guard.forward_failed or not suspects:
            # failed outside the forward pass (states advanced, tokens half recorded): end what it touched
            bad = suspects or list(self.scheduler.running)
        else:
            bad = []
            for toks, s in fed:
                if s is None:
                    continue
                snap = s.state.snapshot()
                try:
                    self.engine.step([toks], [s.state])
                except Exception as e:
                    bad.append(s)
                    own[s.id] = e
                finally:
                    s.state.restore(snap)
            bad = bad or suspects  # fails only together (e.g. out of memory): end the whole step
        log.error("generation failed for sequence(s) %s", [s.id for s in bad], exc_info=exc)
        self.failures += len(bad)
        for s in bad:
            s.error = own.get(s.id, exc)  # the reason its request is told
            try:
                self.scheduler.cancel(s.id)
            except Exception:  # the sequence's own text state may be what broke
                log.exception("cancelling failed sequence %d", s.id)
        return [Event(s.id, None, "", None, "error") for s in bad]


class Ticket:
    """The event-loop side of one request: its sequences and the queue their events arrive on."""

    def __init__(self, worker: Worker, seqs: list[Sequence], queue: asyncio.Queue):
        self.worker = worker
        self.seqs = seqs
        self.index = {s.id: i for i, s in enumerate(seqs)}
        self._queue = queue
        self._open = set(self.index)
        self.cancelled = False

    @property
    def done(self) -> bool:
        return not self._open

    async def events(self) -> AsyncIterator[Event]:
        """Events of this request's sequences, in order, until all have finished or it is cancelled."""
        while self._open and not self.cancelled:
            ev = await self._queue.get()
            if ev is None:  # cancel() woke us
                return
            if ev.finish_reason is not None:
                self._open.discard(ev.seq_id)
            yield ev

    def cancel(self) -> None:
        """Cancel the unfinished sequences (a no-op once all finished) and wake `events`."""
        if self._open and not self.cancelled:
            self.cancelled = True
            self.worker.cancel(sorted(self._open))
            self._open.clear()
            self._queue.put_nowait(None)
