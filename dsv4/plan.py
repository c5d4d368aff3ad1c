"""Where each part of a checkpoint goes for given memory budgets, and the decode speed that implies.

Decode of one sequence is bound by bytes moved per token: every dense weight once, plus the active
routed experts, each from wherever it lives (GPU memory, RAM, or the disk). The planner measures this
machine's RAM and disk read bandwidth, assumes uniform routing for the cache hit rate (real routing is
skewed, so actual hit rates run higher), and prints the layout and the bound. It reads no weights.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch

from .checkpoint import Checkpoint
from .config import ModelConfig
from .inspect import human, summarize
from .memory import available_bytes, rss_bytes
from .prefix_cache import RAM_SHARE, RAM_SHARE_MAX, ram_share


@dataclass(frozen=True)
class RamLayout:
    """How a RAM budget divides: the one rule both `dsv4 plan` and `load` (loader._size_ram_tier) follow.

    budget = resident + prompts + reserve + 2 * working + cache, where `resident` is the process with its
    dense weights loaded (measured by `load`; estimated by the planner), `working` bounds both the experts
    a layer holds at once and the prefetch reads in flight, and `cache` is the expert cache's budget."""

    budget: int
    resident: int
    prompts: int  # prompt snapshots (the prefix cache), 0 without one
    reserve: int  # activations, KV state, reader threads, allocator slack
    working: int
    cache: int
    need: int  # the least `cache + 2 * working` that works: one layer's active experts, twice over

    @property
    def fits(self) -> bool:
        return self.cache + 2 * self.working >= self.need

    def check(self) -> None:
        if not self.fits:
            raise ValueError(
                f"--max-ram {self.budget / 2**30:.2f} GiB is too small: the process already uses "
                f"{self.resident / 2**30:.2f} GiB with the dense weights loaded, and the expert cache needs at "
                f"least {self.need / 2**20:.0f} MiB more plus a {self.reserve / 2**20:.0f} MiB reserve"
                + (f" and {self.prompts / 2**20:.0f} MiB of prompt snapshots" if self.prompts else "")
            )


def ram_layout(budget: int, resident: int, prompts: int, expert_bytes: int, active: int) -> RamLayout:
    """Divide `budget` (see RamLayout); `expert_bytes` is one routed expert, `active` experts per token."""
    reserve = max(128 << 20, budget // 10)
    left = budget - resident - prompts - reserve
    working = max(active * expert_bytes, left // 10)
    need = active * expert_bytes + 2 * working
    return RamLayout(budget, resident, prompts, reserve, working, max(left - 2 * working, 0), need)


def one_expert_bytes(ckpt: Checkpoint) -> int:
    """Bytes of one routed expert (w1, w2, w3 with their scales), as stored."""
    prefix = "layers.0.ffn.experts.0"
    return sum(ckpt.nbytes(f"{prefix}.{w}.{part}") for w in ("w1", "w2", "w3") for part in ("weight", "scale")
               if f"{prefix}.{w}.{part}" in ckpt)  # fmt: skip


@dataclass
class Plan:
    dense_bytes: int
    expert_bytes: int  # all routed experts
    expert_bytes_per_token: int  # the active ones, all layers
    head_bytes: int
    ram_budget: int | None
    vram_budget: int | None
    cache_bytes: int  # routed experts that fit in RAM (and VRAM)
    prompt_cache_bytes: int  # prompt snapshots (the server's prefix cache): prefix_cache.ram_share
    ram: RamLayout  # the budget (all available memory without one) as `load` will divide it
    ram_gbs: float
    disk_gbs: float

    @property
    def resident(self) -> bool:
        return self.cache_bytes >= self.expert_bytes

    @property
    def hit_rate(self) -> float:
        return min(1.0, self.cache_bytes / self.expert_bytes) if self.expert_bytes else 1.0

    @property
    def seconds_per_token(self) -> float:
        ram, disk = self.ram_gbs * 1e9, self.disk_gbs * 1e9
        experts = self.expert_bytes_per_token * (self.hit_rate / ram + (1 - self.hit_rate) / disk)
        return self.dense_bytes / ram + experts

    @property
    def tokens_per_second(self) -> float:
        return 1.0 / self.seconds_per_token


def measure_ram_gbs(nbytes: int = 256 << 20, repeats: int = 3) -> float:
    """Read bandwidth of this process: the best of a few full sums over a buffer larger than cache."""
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


def measure_disk_gbs(ckpt: Checkpoint, nbytes: int = 128 << 20) -> float:
    """Cold sequential read speed of the checkpoint's largest shard (page cache dropped for it first)."""
    files = sorted({e.file for e in ckpt.entries.values()}, key=lambda f: f.stat().st_size, reverse=True)
    path = files[0]
    n = min(nbytes, path.stat().st_size)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, n, os.POSIX_FADV_DONTNEED)
        t, done = time.perf_counter(), 0
        while done < n:
            chunk = os.pread(fd, min(8 << 20, n - done), done)
            if not chunk:
                break
            done += len(chunk)
        seconds = time.perf_counter() - t
        os.posix_fadvise(fd, 0, n, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return done / max(seconds, 1e-9) / 1e9


def make_plan(ckpt: Checkpoint, cfg: ModelConfig, ram: int | None = None, vram: int | None = None,
              resident: int | None = None) -> Plan:  # fmt: skip
    """Budgets in bytes; None means all of the machine's available RAM (no GPU tier). `resident`: the
    process with its dense weights loaded, by default this process (Python, torch) plus the dense bytes.
    The prefix cache's share is set aside as `dsv4 serve` (and --prompt-cache) does."""
    s = summarize(ckpt, cfg)
    per_token = s.expert_bytes * cfg.n_activated_experts // max(cfg.n_routed_experts, 1)
    head = ckpt.nbytes("head.weight")
    budget = ram if ram is not None else available_bytes()
    prompts = ram_share(ram, available_bytes())
    resident = rss_bytes() + s.dense_bytes if resident is None else resident
    layout = ram_layout(budget, resident, prompts, one_expert_bytes(ckpt), cfg.n_activated_experts)
    cache = layout.cache + (vram or 0)
    # the embedding is read one row per token, not whole
    dense_read = s.dense_bytes - ckpt.nbytes("embed.weight")
    return Plan(dense_read, s.expert_bytes, per_token, head, ram, vram, min(cache, s.expert_bytes), prompts, layout,
                measure_ram_gbs(), measure_disk_gbs(ckpt))  # fmt: skip


def render(plan: Plan, ckpt: Checkpoint, cfg: ModelConfig) -> str:
    rows = [
        ("dense weights (attention, shared experts, router, mHC, norms, head)", "RAM", plan.dense_bytes),
        ("routed experts cached", "VRAM + RAM" if plan.vram_budget else "RAM", plan.cache_bytes),
        ("routed experts read on demand", "disk (checkpoint shards)", plan.expert_bytes - plan.cache_bytes),
        ("prompt snapshots (prefix cache of serve, or with --prompt-cache)", "RAM", plan.prompt_cache_bytes),
    ]
    out = [f"plan for {ckpt.path} ({cfg.n_layers} layers, {cfg.n_routed_experts} experts x {cfg.n_activated_experts} active)",
           f"budget: RAM {human(plan.ram_budget) if plan.ram_budget else 'all available'}"
           + (f", VRAM {human(plan.vram_budget)}" if plan.vram_budget else ""),
           "", "| part | where | bytes |", "|---|---|---|"]  # fmt: skip
    out += [f"| {name} | {where} | {human(b)} |" for name, where, b in rows]
    out += [
        "",
        f"measured: RAM read {plan.ram_gbs:.1f} GB/s, disk read {plan.disk_gbs:.2f} GB/s",
        f"per token: {human(plan.dense_bytes)} dense + {human(plan.expert_bytes_per_token)} of experts, "
        f"expected cache hit rate >= {plan.hit_rate:.0%} (uniform routing)",
        f"bandwidth-bound decode: {plan.tokens_per_second:.2f} tokens/s",
        f"RAM rule: the prefix cache holds 1/{RAM_SHARE} of the budget (at most {human(RAM_SHARE_MAX)}), "
        "the expert cache what the dense weights, runtime and prefix cache leave",
        render_ram(plan.ram),
    ]
    return "\n".join(out)


def render_ram(r: RamLayout) -> str:
    """The budget's division in MiB (what `load` prints at -v and what its test compares)."""
    mib = lambda n: f"{n / 2**20:.0f} MiB"  # noqa: E731
    line = (f"RAM {mib(r.budget)} = process with dense weights {mib(r.resident)} + prompt snapshots {mib(r.prompts)} "
            f"+ reserve {mib(r.reserve)} + 2 x experts in use / in flight {mib(r.working)} + expert cache {mib(r.cache)}")  # fmt: skip
    return line if r.fits else line + f" (too small: load refuses it, the experts need {mib(r.need)})"


# ---------------------------------------------------------------- expert parallelism (dsv4.distributed)


@dataclass
class Link:
    """The network between ranks: one-way latency (s) and bandwidth (bytes/s) of rank 0's link."""

    latency_s: float = 50e-6
    bytes_per_s: float = 10e9 / 8


def exchange_bytes(cfg: ModelConfig, tokens: int = 1, act_bytes: int = 2) -> tuple[int, int]:
    """Bytes rank 0 sends to and gets from each other rank per MoE layer (dsv4.distributed's protocol):
    header (3 int64) + ids (int64) and weights (fp32) [T, K], tokens [T] and x [T, D]; back fp32 [T, D]."""
    k, d = cfg.n_activated_experts, cfg.dim
    return 24 + tokens * (12 * k + 8 + d * act_bytes), tokens * d * 4


def dispatch_bytes(cfg: ModelConfig, ranks: int, act_bytes: int = 2) -> float:
    """Expected bytes per token and MoE layer (both ways, rank 0's link) of an all-to-all dispatch: x,
    routing and a fp32 row back only for the other ranks holding one of the token's K experts, a
    share 1 - (1 - 1/N)^K of them under uniform routing (what dsv4.distributed's broadcast sends to all)."""
    k, d = cfg.n_activated_experts, cfg.dim
    reached = (ranks - 1) * (1 - (1 - 1 / ranks) ** k)
    return 24 * (ranks - 1) + reached * (12 * k + 8 + d * act_bytes + 4 * d)


def network_seconds_per_token(cfg: ModelConfig, ranks: int, link: Link, act_bytes: int = 2) -> float:
    """One decoded token's time on the wire: per MoE layer three collectives (header, payload, reduce),
    each ceil(log2 N) latencies deep, and rank 0's link carrying N-1 copies each way (star: an upper bound
    on the bytes, the collective algorithm may spread them)."""
    if ranks <= 1:
        return 0.0
    sent, got = exchange_bytes(cfg, 1, act_bytes)
    hops = math.ceil(math.log2(ranks))
    per_layer = 3 * hops * link.latency_s + (ranks - 1) * (sent + got) / link.bytes_per_s
    return cfg.n_layers * per_layer


def render_ranks(plan: Plan, cfg: ModelConfig, ranks: int, link: Link) -> str:
    """Each rank's share and memory, and the decode bound with the network time added. Every rank reads
    its experts in parallel (an active expert per token lives on one rank): the experts' time divides by N
    when routing spreads evenly. Rank 0 alone holds and reads the dense weights; the other ranks hold
    their experts and the routers, so their budget (the same --ram) caches more of their share."""
    share = plan.expert_bytes / ranks
    routers = cfg.n_layers * cfg.n_routed_experts * cfg.dim * 4
    caches = [plan.cache_bytes] + [plan.cache_bytes + plan.dense_bytes - routers] * (ranks - 1)
    hits = [min(share, max(0, c)) / share if share else 1.0 for c in caches]
    ram, disk = plan.ram_gbs * 1e9, plan.disk_gbs * 1e9
    experts = plan.expert_bytes_per_token / ranks * (hits[0] / ram + (1 - hits[0]) / disk)  # the slowest rank
    net = network_seconds_per_token(cfg, ranks, link)
    compute = plan.dense_bytes / ram + experts
    sent, got = exchange_bytes(cfg)
    out = [
        "",
        f"expert parallel over {ranks} ranks (experts e % {ranks} on rank r; dense weights on rank 0, routers on all)",
        "| rank | routed experts per layer | expert bytes | dense bytes | expected cache hit |",
        "|---|---|---|---|---|",
    ]
    for r in range(ranks):
        n = len(range(r, cfg.n_routed_experts, ranks))
        out.append(f"| {r} | {n} of {cfg.n_routed_experts} | {human(int(plan.expert_bytes * n / cfg.n_routed_experts))} "
                   f"| {human(plan.dense_bytes if r == 0 else routers)} | {hits[r]:.0%} |")  # fmt: skip
    out += [
        f"link: {link.latency_s * 1e6:.0f} us latency, {link.bytes_per_s * 8 / 1e9:.1f} Gbit/s (given: --link-latency, "
        "--link-gbps; bench/bench_distributed.py measures a link)",
        f"per token and MoE layer: {sent} B out and {got} B back per other rank; {cfg.n_layers} layers",
        f"per token: compute {compute * 1e3:.1f} ms (dense {plan.dense_bytes / ram * 1e3:.1f} ms on rank 0, "
        f"experts {experts * 1e3:.1f} ms), network {net * 1e3:.2f} ms",
        f"bandwidth-bound decode over {ranks} ranks: {1 / (compute + net):.2f} tokens/s",
    ]
    return "\n".join(out)
