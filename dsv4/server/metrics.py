"""/metrics with `prometheus_client`: one registry per app, so several apps in a process never collide.

Requests are counted by route and status by an ASGI middleware; tokens, rates, queue depth and running
sequences come from the worker; expert-cache figures from the engine's `stats()` when it has one
(every number in it is exported, flattened, as `dsv4_engine_*`); memory from /proc. These are read at
scrape time by a collector. The latency and length histograms (the ones vLLM-style dashboards chart:
time to first token, time per output token, end-to-end latency, prompt and generation lengths) are
observed once per finished sequence (a request with n choices counts n) from the worker's thread.
It knows nothing of how the figures are produced.
"""

from __future__ import annotations

import re
import threading
from collections import Counter as Tally
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ..memory import rss_bytes

__all__ = ["CONTENT_TYPE_LATEST", "CountRequests", "Metrics", "RequestCounts", "engine_figures", "rss_bytes"]

_NAME_BAD = re.compile(r"[^a-zA-Z0-9_]")

# Seconds: from milliseconds (a small model) to minutes (a large one streaming experts from disk).
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)
TOKEN_TIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5, 5, 10, 20)
REQUEST_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640, 1280, 2560)
# Tokens: 1-2-5 steps up to V4's million-token context.
LENGTH_BUCKETS = tuple(float(m * 10**e) for e in range(7) for m in (1, 2, 5))


class RequestCounts:
    """Finished HTTP requests by (route, status code); routes outside `routes` count as "other"."""

    def __init__(self, routes: set[str]):
        self.routes = routes
        self.counts: Tally[tuple[str, int]] = Tally()
        self._lock = threading.Lock()

    def add(self, path: str, status: int) -> None:
        with self._lock:
            self.counts[(path if path in self.routes else "other", status)] += 1

    def items(self) -> list[tuple[tuple[str, int], int]]:
        with self._lock:
            return sorted(self.counts.items())


class CountRequests:
    """ASGI middleware feeding `RequestCounts` (499: the client left before a response started)."""

    def __init__(self, app, *, counts: RequestCounts):
        self.app, self.counts = app, counts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 0

        async def send_seen(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_seen)
        finally:
            self.counts.add(scope.get("path", ""), status or 499)


def _flatten(prefix: str, value: Any, out: dict[str, float]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}_{_NAME_BAD.sub('_', str(k))}", v, out)
    elif isinstance(value, bool):
        out[prefix] = int(value)
    elif isinstance(value, int | float):
        out[prefix] = value


def engine_figures(engine) -> dict[str, float]:
    """Every number the engine's `stats()` reports, flattened; {} if it has no such hook."""
    hook = getattr(engine, "stats", None)
    if not callable(hook):
        return {}
    try:
        stats = hook()
    except Exception:
        return {}
    out: dict[str, float] = {}
    _flatten("dsv4_engine", stats, out)
    return out


def _gauge(name: str, help: str, value: float, **labels: str) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, help, labels=list(labels))
    g.add_metric(list(labels.values()), value)
    return g


def _counter(name: str, help: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, help, value=value)


class _Live(Collector):
    """The figures read at scrape time: requests, worker counters and gauges, prefix cache, engine stats."""

    def __init__(self, requests: RequestCounts, worker, engine):
        self.requests, self.worker, self.engine = requests, worker, engine

    def collect(self):
        w = self.worker
        by_route = CounterMetricFamily("dsv4_requests", "HTTP requests by route and status code.",
                                       labels=["route", "status"])  # fmt: skip
        for (route, status), n in self.requests.items():
            by_route.add_metric([route, str(status)], n)
        yield by_route
        yield _counter("dsv4_prompt_tokens", "Prompt tokens admitted.", w.prompt_tokens)
        yield _counter("dsv4_generated_tokens", "Tokens generated.", w.generated_tokens)
        yield _gauge("dsv4_generation_tokens_per_second",
                     "Generated tokens per second over the last 10 s, all sequences together.",
                     float(w.tokens_per_second()))  # fmt: skip
        yield _gauge("dsv4_queue_depth", "Sequences waiting for a running slot.", w.waiting)
        yield _gauge("dsv4_running_sequences", "Sequences holding state and decoding.", w.running)
        yield _counter("dsv4_failed_sequences", "Sequences ended by an engine error.", w.failures)
        yield _gauge("dsv4_process_resident_memory_bytes", "Resident memory of this process.", rss_bytes())
        yield from self._prefix_cache()
        fallbacks = sorted(getattr(getattr(w, "scheduler", None), "fallbacks", {}).items())
        if fallbacks:
            fam = CounterMetricFamily("dsv4_speculative_fallback",
                                      "Decode steps of speculative sequences taken plainly, by reason "
                                      "(see dsv4.generate.Scheduler).", labels=["reason"])  # fmt: skip
            for reason, n in fallbacks:
                fam.add_metric([reason], n)
            yield fam
        for name, value in sorted(engine_figures(self.engine).items()):
            yield _gauge(name, "From the engine's stats().", value)

    def _prefix_cache(self):
        cache = getattr(self.worker, "prefix_cache", None)
        if cache is None:
            return
        fig = cache.summary()
        yield _counter("dsv4_prefix_cache_lookups", "Prompts looked up in the prefix cache.", fig["lookups"])
        yield _counter("dsv4_prefix_cache_hits", "Prompts that restored a cached prefix.", fig["hits"])
        yield _counter("dsv4_prefix_cache_tokens_saved", "Prompt tokens restored instead of prefilled.",
                       fig["tokens_saved"])  # fmt: skip
        held = GaugeMetricFamily("dsv4_prefix_cache_bytes", "Bytes of prefix snapshots held, by tier.",
                                 labels=["tier"])  # fmt: skip
        held.add_metric(["ram"], fig["ram_bytes"])
        held.add_metric(["disk"], fig["disk_bytes"])
        yield held
        yield _gauge("dsv4_prefix_cache_entries", "Prefix snapshots indexed.", fig["entries"])


class Metrics:
    """One app's registry: the live collector and the per-sequence histograms."""

    def __init__(self, routes: set[str]):
        self.registry = CollectorRegistry()
        self.requests = RequestCounts(routes)
        h = self._histogram
        self.ttft = h("dsv4_time_to_first_token_seconds", "From a sequence's arrival to its first token.",
                      LATENCY_BUCKETS)  # fmt: skip
        self.tpot = h("dsv4_time_per_output_token_seconds",
                      "Mean time between a sequence's generated tokens (a stop token included).",
                      TOKEN_TIME_BUCKETS)  # fmt: skip
        self.e2e = h(
            "dsv4_e2e_request_latency_seconds", "From a sequence's arrival to its end.", REQUEST_BUCKETS
        )
        self.prompt_len = h("dsv4_request_prompt_tokens", "Prompt tokens of a sequence.", LENGTH_BUCKETS)
        self.output_len = h(
            "dsv4_request_generation_tokens", "Tokens generated for a sequence.", LENGTH_BUCKETS
        )
        self.ended = Counter("dsv4_sequences_finished", "Sequences ended, by finish reason.",
                             labelnames=["reason"], registry=self.registry)  # fmt: skip

    def _histogram(self, name: str, help: str, buckets: tuple[float, ...]) -> Histogram:
        return Histogram(name, help, buckets=buckets, registry=self.registry)

    def watch(self, worker, engine) -> None:
        """Read `worker`'s and `engine`'s figures at every scrape."""
        self.registry.register(_Live(self.requests, worker, engine))

    def finished(self, seq, reason: str) -> None:
        """Record a sequence that has just ended (called from the worker's thread)."""
        st = seq.stats
        self.ended.labels(reason=reason).inc()
        self.e2e.observe(seq.age())
        self.prompt_len.observe(len(seq.prompt_ids))
        self.output_len.observe(len(seq.output))
        if not seq.prefilling:  # it produced a token
            self.ttft.observe(st.prefill_seconds)
        if st.sampled_tokens > 1:
            self.tpot.observe(st.decode_seconds / (st.sampled_tokens - 1))

    def render(self) -> bytes:
        """The whole /metrics page, in the Prometheus text format."""
        return generate_latest(self.registry)
