"""The expert store: routed experts served from tiers (GPU memory, RAM, the checkpoint files on disk).

The MoE asks its layer's `LayerExperts` for "experts [ids]"; it does not know where they live. Misses
are read straight from the released safetensors shards with positioned reads on a pool of threads
(no conversion step), and the pages are released from the OS page cache afterwards
(`posix_fadvise(DONTNEED)`), so the RAM budget is real and disk figures are honest. Cached experts are
kept under a byte budget by a replacement policy (LRU, or frequency-aware LFU with aging). Prefetch:
hash layers know their experts from the token ids and routed layers can be guessed by applying the
next layer's router early to the current hidden state; such reads start on background threads while
the current layer computes.

It knows the checkpoint's tensor names and formats, not the model math (beyond calling a router).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field

import torch

from .checkpoint import Checkpoint
from .quant import MXFP4, Dense, FP8Block, Weight

ExpertWeights = tuple[Weight, Weight, Weight]  # w1, w2, w3
Key = tuple[str, int]  # (layer prefix "layers.7.ffn.experts", expert id)


@dataclass
class StoreStats:
    hits: int = 0
    misses: int = 0
    prefetched: int = 0  # reads started ahead of need
    prefetch_used: int = 0  # requests served by a read that a prefetch had started
    guessed: int = 0  # experts guessed by early routing (the next layer's router on this layer's input)
    guessed_right: int = 0  # of those, the ones the layer then used
    guess_prefetches: int = 0  # guesses acted on (prefetched): only while the measured accuracy is high
    bytes_read: int = 0
    read_seconds: float = 0.0
    evictions: int = 0
    read_errors: int = 0  # reads that raised (the request that needed one gets the error; prefetches drop it)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def as_dict(self) -> dict[str, float]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["hit_rate"] = self.hit_rate
        d["guess_accuracy"] = self.guessed_right / self.guessed if self.guessed else 0.0
        return d


class LRU:
    """Least recently used first out."""

    def __init__(self):
        self.order: OrderedDict[Key, None] = OrderedDict()

    def touch(self, key: Key) -> None:
        self.order[key] = None
        self.order.move_to_end(key)

    def remove(self, key: Key) -> None:
        self.order.pop(key, None)

    def victim(self, protect: set[Key]) -> Key | None:
        return next((k for k in self.order if k not in protect), None)


class LFU:
    """Frequency-aware: evict the least used, counts halved every `period` touches so the past fades;
    ties go to the least recently used."""

    def __init__(self, period: int = 4096):
        self.count: dict[Key, float] = {}
        self.lru = LRU()
        self.period, self.ticks = period, 0

    def touch(self, key: Key) -> None:
        self.count[key] = self.count.get(key, 0.0) + 1.0
        self.lru.touch(key)
        self.ticks += 1
        if self.ticks % self.period == 0:
            self.count = {k: v / 2 for k, v in self.count.items()}

    def remove(self, key: Key) -> None:
        self.lru.remove(key)  # the count stays: a re-read expert remembers its history

    def victim(self, protect: set[Key]) -> Key | None:
        best, best_n = None, None
        for k in self.lru.order:  # oldest first, so the first minimum is also the least recent
            if k in protect:
                continue
            n = self.count.get(k, 0.0)
            if best_n is None or n < best_n:
                best, best_n = k, n
        return best


POLICIES = {"lru": LRU, "lfu": LFU}


@dataclass
class _Slot:
    weights: ExpertWeights
    nbytes: int


@dataclass
class ExpertStore:
    """All routed experts of a checkpoint, cached in RAM under `budget_bytes`, read from disk on a miss.

    `device`: where experts are computed; with a CUDA device the cache lives in GPU memory.
    """

    ckpt: Checkpoint
    budget_bytes: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.bfloat16  # for experts stored as plain floats
    policy: str = "lfu"  # measured: bench/results/offload.md (LFU 61-67 % hits against LRU's 54-56 %)
    workers: int = 4
    prefetch_workers: int = 2  # prefetches read on threads of their own: a demand miss never queues behind them
    min_guess_accuracy: float = 0.9  # measured: bench/README.md (87 % right guesses did not pay on a disk-bound run)
    release_page_cache: bool = True
    group_bytes: int = 1 << 62  # at most this many bytes of experts requested (and held) at once
    prefetch_bytes: int = 1 << 62  # at most this many bytes of prefetch reads in flight
    lower: ExpertStore | None = None  # a slower tier to read misses from (RAM under GPU memory); else disk
    owned: frozenset[int] | None = None  # expert ids this store serves (a rank's share); None: all
    stats: StoreStats = field(default_factory=StoreStats)

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"unknown cache policy {self.policy!r}; use one of {sorted(POLICIES)}")
        self._policy = POLICIES[self.policy]()
        self._cache: dict[Key, _Slot] = {}
        self._inflight: dict[Key, Future] = {}
        self._prefetching: set[Key] = set()
        self._used = 0
        self._lock = threading.RLock()  # RLock: a read may finish and call back while we hold it
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="dsv4-expert-read")
        self._prefetch_pool = ThreadPoolExecutor(self.prefetch_workers, thread_name_prefix="dsv4-expert-prefetch")
        self._guesses: dict[str, set[int]] = {}
        self._recent = [0.0, 0.0]  # guessed, right: decaying counts, so the gate follows the recent past
        self._sizes: dict[Key, int] = {}

    # ---- public ----

    def expert_bytes(self, prefix: str, e: int) -> int:
        key = (prefix, e)
        if key not in self._sizes:
            self._sizes[key] = sum(self.ckpt.location(n)[2] for n in self._names(prefix, e) if n in self.ckpt)
        return self._sizes[key]

    @property
    def used_bytes(self) -> int:
        return self._used

    def layer(self, prefix: str) -> LayerExperts:
        return LayerExperts(self, prefix)

    def get(self, prefix: str, ids: list[int]) -> dict[int, ExpertWeights]:
        """The experts `ids` of a layer; missing ones are read in parallel, then cached."""
        keys = [(prefix, e) for e in ids]
        futures, out = {}, {}
        with self._lock:
            for k in keys:
                if k in self._cache:
                    self.stats.hits += 1
                    self._policy.touch(k)
                    out[k[1]] = self._cache[k].weights
                else:
                    self.stats.misses += 1
                    if k in self._prefetching:
                        self.stats.prefetch_used += 1
                    futures[k] = self._start_read(k)
        for k, fut in futures.items():
            out[k[1]] = fut.result()
        self._admit({k: out[k[1]] for k in futures}, protect=set(keys))
        return out

    def set_budget(self, nbytes: int) -> None:
        """Change the budget, evicting (policy order) down to it at once."""
        with self._lock:
            self.budget_bytes = nbytes
            self._evict(0, set())

    def group(self, prefix: str) -> int:
        """How many experts of a layer the MoE should ask for at once (bounds the memory they hold)."""
        return max(1, self.group_bytes // max(self.expert_bytes(prefix, 0), 1))

    def prefetch(self, prefix: str, ids: list[int]) -> None:
        """Start reading experts that will be needed soon (no-op for cached or in-flight ones)."""
        ids = self._mine(ids)
        with self._lock:
            room = self.prefetch_bytes - len(self._prefetching) * self.expert_bytes(prefix, 0)
            for e in ids:
                k = (prefix, e)
                if room < self.expert_bytes(prefix, 0):
                    break  # more would only push out experts that are as likely to be needed
                if k not in self._cache and k not in self._inflight:
                    room -= self.expert_bytes(prefix, 0)
                    self._prefetching.add(k)
                    self.stats.prefetched += 1
                    self._start_read(k, self._prefetch_pool)

    def guess(self, prefix: str, ids: list[int]) -> None:
        """Early routing's guess of a layer's experts: remembered to be scored by `score_guess`, and
        prefetched while recent guesses were at least `min_guess_accuracy` right. A wrong guess costs a
        read that competes with the real ones for the disk; a right one only hides latency."""
        ids = self._mine(ids)
        with self._lock:
            self._guesses[prefix] = set(ids)
            guessed, right = self._recent
            trusted = guessed >= 64 and right >= self.min_guess_accuracy * guessed
            if trusted:
                self.stats.guess_prefetches += len(ids)
                self.prefetch(prefix, ids)

    def score_guess(self, prefix: str, used: list[int]) -> None:
        """The layer ran and used experts `used`: score the guess made for it, if any."""
        with self._lock:
            g = self._guesses.pop(prefix, None)
            if g is None:
                return
            right = len(g & set(self._mine(used)))
            self.stats.guessed += len(g)
            self.stats.guessed_right += right
            self._recent = [0.98 * self._recent[0] + len(g), 0.98 * self._recent[1] + right]

    def wait(self) -> None:
        """Block until every read in flight (prefetches included) has finished and been admitted."""
        while True:
            with self._lock:
                pending, admitting = list(self._inflight.values()), bool(self._prefetching)
            if not pending and not admitting:
                return
            futures_wait(pending, timeout=0.01)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._prefetch_pool.shutdown(wait=True)

    # ---- internals ----

    def _mine(self, ids: list[int]) -> list[int]:
        """Of `ids`, the experts this store serves: another rank's are never read here."""
        return list(ids) if self.owned is None else [e for e in ids if e in self.owned]

    @staticmethod
    def _names(prefix: str, e: int) -> list[str]:
        return [f"{prefix}.{e}.{w}.{part}" for w in ("w1", "w2", "w3") for part in ("weight", "scale")]

    def _start_read(self, key: Key, pool: ThreadPoolExecutor | None = None) -> Future:
        """Caller holds the lock."""
        fut = self._inflight.get(key)
        if fut is None:
            fut = (pool or self._pool).submit(self._read, key)
            self._inflight[key] = fut
            fut.add_done_callback(lambda f, k=key: self._on_read(k, f))
        return fut

    def _on_read(self, key: Key, fut: Future) -> None:
        """A read ended: a prefetch's experts are admitted. A failed read is forgotten (the next request
        reads again, and a demand read raises to its caller), so nothing waits on it or counts it forever."""
        failed = fut.cancelled() or fut.exception() is not None
        with self._lock:
            self._inflight.pop(key, None)
            self.stats.read_errors += failed
        try:
            if key in self._prefetching and not failed:
                self._admit({key: fut.result()}, protect=set())
        finally:
            with self._lock:
                self._prefetching.discard(key)

    def _admit(self, new: dict[Key, ExpertWeights], protect: set[Key]) -> None:
        with self._lock:
            for k, w in new.items():
                if k in self._cache:
                    continue
                size = sum(x.nbytes for x in w)
                self._evict(size, protect | {k})
                if self._used + size > self.budget_bytes:
                    continue  # does not fit even alone: serve it uncached
                self._cache[k] = _Slot(w, size)
                self._used += size
                self._policy.touch(k)

    def _evict(self, room: int, protect: set[Key]) -> None:
        """Evict in policy order, sparing `protect`, until `room` more bytes fit the budget (or nothing
        is left to evict). Caller holds the lock."""
        while self._used + room > self.budget_bytes:
            victim = self._policy.victim(protect)
            if victim is None:
                return
            self._used -= self._cache.pop(victim).nbytes
            self._policy.remove(victim)
            self.stats.evictions += 1

    def _read(self, key: Key) -> ExpertWeights:
        import time

        t0 = time.perf_counter()
        prefix, e = key
        if self.lower is not None:
            got = self.lower.get(prefix, [e])[e]
            return tuple(_to_device(w, self.device) for w in got)
        out = []
        nbytes = 0
        for w in ("w1", "w2", "w3"):
            name = f"{prefix}.{e}.{w}.weight"
            t = self.ckpt.tensor(name, self.release_page_cache)
            nbytes += t.numel() * t.element_size()
            if t.dtype == torch.float8_e4m3fn or t.dtype in (torch.int8, torch.uint8):
                s = self.ckpt.tensor(f"{prefix}.{e}.{w}.scale", self.release_page_cache)
                nbytes += s.numel() * s.element_size()
                fmt = FP8Block(t, s) if t.dtype == torch.float8_e4m3fn else MXFP4(t.view(torch.int8), s)
            else:
                fmt = Dense(t.to(self.dtype))
            out.append(_to_device(fmt, self.device))
        with self._lock:
            self.stats.bytes_read += nbytes
            self.stats.read_seconds += time.perf_counter() - t0
        return tuple(out)


def _to_device(w: Weight, device: torch.device) -> Weight:
    if device.type == "cpu":
        return w
    if isinstance(w, Dense):
        return Dense(w.weight.to(device, non_blocking=True))
    return type(w)(w.weight.to(device, non_blocking=True), w.scale.to(device, non_blocking=True))


class LayerExperts:
    """One layer's view of the store: the provider interface the MoE calls."""

    def __init__(self, store: ExpertStore, prefix: str):
        self.store, self.prefix = store, prefix

    @property
    def group(self) -> int:
        return self.store.group(self.prefix)

    def get(self, ids: list[int]) -> dict[int, ExpertWeights]:
        return self.store.get(self.prefix, ids)

    def prefetch(self, ids: list[int]) -> None:
        self.store.prefetch(self.prefix, ids)

    def prefetch_next(self, x: torch.Tensor, tokens: torch.Tensor, used: list[int], nxt) -> None:
        """This layer uses experts `used`: score the guess made for it, then guess the next layer's
        experts by applying its router to this layer's input. A hash layer's are known exactly from
        the tokens (the forward pass asked for them at its start; ask again, as prefetches are bounded)."""
        self.store.score_guess(self.prefix, used)
        if nxt is None or not isinstance(nxt.experts, LayerExperts):
            return
        if nxt.tid2eid is not None:
            nxt.prefetch_hashed(tokens)
            return
        _, guess = nxt.route(x, tokens)
        self.store.guess(nxt.experts.prefix, torch.unique(guess).tolist())
