"""/metrics in the Prometheus text format (written by hand: it is a few lines per metric).

Requests are counted by route and status by an ASGI middleware; tokens, rates, queue depth and running
sequences come from the worker; expert-cache figures from the engine's `stats()` when it has one
(every number in it is exported, flattened, as `dsv4_engine_*`); memory from /proc. It knows nothing
of how the figures are produced.
"""

from __future__ import annotations

import math
import re
import threading
from collections import Counter
from typing import Any

from ..memory import rss_bytes

_NAME_BAD = re.compile(r"[^a-zA-Z0-9_]")


class RequestCounts:
    """Finished HTTP requests by (route, status code); routes outside `routes` count as "other"."""

    def __init__(self, routes: set[str]):
        self.routes = routes
        self.counts: Counter[tuple[str, int]] = Counter()
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


def _line(name: str, value: float, labels: dict[str, Any] | None = None) -> str:
    if labels:
        inner = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                         for k, v in labels.items())  # fmt: skip
        name = f"{name}{{{inner}}}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"{name} {'NaN' if math.isnan(value) else ('+Inf' if value > 0 else '-Inf')}"
    return f"{name} {value:g}" if isinstance(value, float) else f"{name} {value}"


def _metric(out: list[str], name: str, kind: str, help: str, samples: list[tuple[dict, float]]) -> None:
    out += [f"# HELP {name} {help}", f"# TYPE {name} {kind}"]
    out += [_line(name, v, labels) for labels, v in samples]


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


def render(requests: RequestCounts, worker, engine) -> str:
    """The whole /metrics page."""
    out: list[str] = []
    counts = requests.items()
    _metric(out, "dsv4_requests_total", "counter", "HTTP requests by route and status code.",
            [({"route": r, "status": s}, n) for (r, s), n in counts])  # fmt: skip
    _metric(
        out, "dsv4_prompt_tokens_total", "counter", "Prompt tokens admitted.", [({}, worker.prompt_tokens)]
    )
    _metric(
        out, "dsv4_generated_tokens_total", "counter", "Tokens generated.", [({}, worker.generated_tokens)]
    )
    _metric(out, "dsv4_generation_tokens_per_second", "gauge",
            "Generated tokens per second over the last 10 s, all sequences together.",
            [({}, float(worker.tokens_per_second()))])  # fmt: skip
    _metric(out, "dsv4_queue_depth", "gauge", "Sequences waiting for a running slot.", [({}, worker.waiting)])
    _metric(
        out,
        "dsv4_running_sequences",
        "gauge",
        "Sequences holding state and decoding.",
        [({}, worker.running)],
    )
    _metric(out, "dsv4_failed_sequences_total", "counter", "Sequences ended by an engine error.",
            [({}, worker.failures)])  # fmt: skip
    _metric(out, "dsv4_process_resident_memory_bytes", "gauge", "Resident memory of the server process.",
            [({}, rss_bytes())])  # fmt: skip
    cache = getattr(worker, "prefix_cache", None)
    if cache is not None:
        fig = cache.summary()
        for key, kind, help in [("lookups", "counter", "Prompts looked up in the prefix cache."),
                                ("hits", "counter", "Prompts that restored a cached prefix."),
                                ("tokens_saved", "counter", "Prompt tokens restored instead of prefilled.")]:  # fmt: skip
            _metric(out, f"dsv4_prefix_cache_{key}_total", kind, help, [({}, fig[key])])
        _metric(out, "dsv4_prefix_cache_bytes", "gauge", "Bytes of prefix snapshots held, by tier.",
                [({"tier": "ram"}, fig["ram_bytes"]), ({"tier": "disk"}, fig["disk_bytes"])])  # fmt: skip
        _metric(out, "dsv4_prefix_cache_entries", "gauge", "Prefix snapshots indexed.", [({}, fig["entries"])])
    fallbacks = sorted(getattr(getattr(worker, "scheduler", None), "fallbacks", {}).items())
    if fallbacks:
        _metric(out, "dsv4_speculative_fallback_total", "counter",
                "Decode steps of speculative sequences taken plainly, by reason (see dsv4.generate.Scheduler).",
                [({"reason": r}, n) for r, n in fallbacks])  # fmt: skip
    for name, value in sorted(engine_figures(engine).items()):
        _metric(out, name, "gauge", "From the engine's stats().", [({}, value)])
    return "\n".join(out) + "\n"
