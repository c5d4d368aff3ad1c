"""Expert parallelism over torch.distributed: several processes (or machines) serve one model.

Each rank holds a disjoint share of each MoE layer's routed experts (expert e lives on rank e % N), in
its own expert store with its own tiers and RAM budget, reading only its share from its own copy of
the checkpoint. Rank 0 also holds the dense weights and runs everything else: scheduling, attention,
the shared experts, sampling, the CLI and the server. The other ranks build a `Follower`: their
experts and the routers (for early-routing prefetch), nothing dense. At each MoE layer (the MTP
layer's and DSpark stages' too) rank 0 routes, broadcasts the layer's input and routing (x [T, D],
tokens [T], weights and ids [T, K]), adds the shared expert and its own experts, and the ranks'
partial sums [T, D] (fp32) are reduced onto it. The other ranks follow these messages; they keep no
sequence state, so snapshots, rollback, sessions and speculation are rank 0's alone.

Why broadcast + reduce rather than an all-to-all dispatch (each token's x only to the ranks holding
its experts, each of those returning one partial row): a token's K experts spread over N ranks reach
a share 1 - (1 - 1/N)^K of the other ranks anyway, so for single-token decode (K = 6) the dispatch
saves 2 % of the bytes at N = 2, 18 % at N = 4 and 45 % at N = 8, and for a batch of a few tokens
nearly nothing, at the price of N - 1 point-to-point messages per layer instead of two collectives.
For the 2 to 4 machines this targets, the broadcast wins on simplicity and loses little;
bench/bench_distributed.py counts both on real routing (`CommStats.dispatch_bytes`).

Protocol: every message opens with a header broadcast, int64 [op, layer, T]. MOE is followed by the
payload broadcast and the reduce; NOOP keeps idle followers' collective timeout from firing (rank 0
sends one when it has been quiet for a quarter of the timeout); STOP sends the followers home. Because
each exchange is complete on its own, a step that raises on rank 0 between layers leaves no rank
waiting for a payload that never comes.

Faults: a collective fails at once when a peer's connection drops, and after `timeout` seconds when a
peer hangs. Rank 0 then names the silent rank(s) from heartbeats every rank keeps in the rendezvous
store, raises `RankFailure` (running requests end with that error), logs it, and exits non-zero after a
short grace. Ranks started with different checkpoints, configs or numerics refuse to start.

Launched by torchrun (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment). It knows the
MoE's route / add_routed split and the loader's `share`; not the attention, the scheduler or the server.
"""

from __future__ import annotations

import atexit
import datetime
import hashlib
import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .model import MoE, Transformer, link_layers

log = logging.getLogger("dsv4.distributed")

NOOP, MOE, STOP = 0, 1, 2
DEFAULT_TIMEOUT_S = 120.0  # a collective waits this long for a silent rank (DSV4_DIST_TIMEOUT overrides)
GRACE_S = 3.0  # after a rank failure, rank 0 exits this long after raising (the server delivers the errors)


class RankFailure(RuntimeError):
    """A rank died or stopped answering: the model cannot run without its experts."""


def launched() -> bool:
    """True when started by torchrun (or by hand) with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def share(n_experts: int, rank: int, ranks: int) -> list[int]:
    """Expert ids rank `rank` of `ranks` holds in every MoE layer: strided, so shares differ by <= 1."""
    return list(range(rank, n_experts, ranks))


@dataclass
class CommStats:
    """Rank 0's view of the exchanges: logical payload bytes (what every follower must get and give back;
    the collective algorithm may move more) and the time blocked in collectives."""

    exchanges: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    dispatch_bytes: int = 0  # both ways, had each rank got only the rows routed to its experts
    send_seconds: float = 0.0  # header + payload broadcasts
    reduce_seconds: float = 0.0  # includes waiting for the slowest rank's experts

    def as_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class Comm:
    """The process group as the engine uses it: the exchange protocol, heartbeats and fault naming."""

    def __init__(self, rank: int, ranks: int, device: torch.device, timeout: float, store):
        self.rank, self.ranks, self.device, self.timeout = rank, ranks, device, timeout
        self.store = store
        self.stats = CommStats()
        self.failure: RankFailure | None = None
        self.serving = False  # a model is loaded on every rank and the followers are in `follow`
        self.closed = False
        self.loads = 0  # models loaded in this process group (the ranks count alike)
        self._lock = threading.Lock()  # one exchange at a time: the keepalive must not interleave
        self._last = time.monotonic()
        self._beat = min(1.0, timeout / 4)
        threading.Thread(target=self._heartbeat, name="dsv4-dist-heartbeat", daemon=True).start()
        if rank == 0:
            threading.Thread(target=self._keepalive, name="dsv4-dist-keepalive", daemon=True).start()

    # ---- rank 0 ----

    def send(
        self, index: int, x: torch.Tensor, tokens: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
    ) -> None:
        """Rank 0: announce layer `index` and broadcast its input and routing. Holds the exchange lock
        until `reduce` (the keepalive waits)."""
        self._check()
        self._lock.acquire()
        try:
            t0 = time.perf_counter()
            payload = _pack([ids.long(), tokens.long(), weights.float(), x]).to(self.device)
            self._collective(f"sending layer {index}'s input", self._header, MOE, index, x.shape[0])
            self._collective(f"sending layer {index}'s input", dist.broadcast, payload, 0)
            self.stats.send_seconds += time.perf_counter() - t0
            self.stats.bytes_sent += (payload.numel() + 24) * (self.ranks - 1)
            self.stats.dispatch_bytes += self._dispatch_bytes(x, ids)
        except BaseException:
            self._lock.release()
            raise

    def reduce(self, index: int, partial: torch.Tensor) -> torch.Tensor:
        """Rank 0: its partial sum [T, D] fp32 plus every other rank's. Releases the exchange lock."""
        try:
            t0 = time.perf_counter()
            y = partial.to(self.device).contiguous()
            self._collective(f"summing layer {index}'s experts", dist.reduce, y, 0)
            self.stats.reduce_seconds += time.perf_counter() - t0
            self.stats.bytes_received += y.numel() * 4 * (self.ranks - 1)
            self.stats.exchanges += 1
            self._last = time.monotonic()
            return y.to(partial.device)
        finally:
            self._lock.release()

    def _dispatch_bytes(self, x: torch.Tensor, ids: torch.Tensor) -> int:
        """What an all-to-all dispatch would move for this routing: a header per rank, and per (token,
        other rank holding one of its experts) the token's row, routing and id out, a fp32 row back."""
        t, d = x.shape
        hit = torch.zeros(t, self.ranks, dtype=torch.bool)
        hit.scatter_(1, ids.cpu() % self.ranks, True)
        pairs = int(hit[:, 1:].sum())
        return 24 * (self.ranks - 1) + pairs * (d * x.element_size() + 12 * ids.shape[1] + 8 + 4 * d)

    def release(self) -> None:
        """Rank 0: the model is done with; the followers' `follow` returns. A no-op after a failure."""
        if self.rank != 0 or not self.serving or self.failure is not None:
            return
        with self._lock:
            self.serving = False
            try:
                self._collective("stopping", self._header, STOP, 0, 0)
            except RankFailure:
                pass

    def close(self) -> None:
        """At exit: release the followers, stop the background threads, leave the process group (a
        process that exits inside one aborts). After a failure the group is broken: left as it is."""
        global _COMM
        if self.closed:
            return
        self.release()
        self.closed = True
        if self.failure is None and dist.is_initialized():
            with self._lock:
                dist.destroy_process_group()
        _COMM = None

    def loaded(self, generation: int, timeout: float) -> None:
        """Wait until every rank has loaded its share (loading may take far longer than a collective's
        timeout, so this waits in the rendezvous store, naming the ranks still loading when it gives up)."""
        key = f"dsv4/loaded/{generation}"
        self.store.add(key, 1)
        start = last_check = time.monotonic()
        beats = self._beats()
        while self.store.add(key, 0) < self.ranks:
            now = time.monotonic()
            failed = self._failed_reports()
            if failed:
                raise RankFailure("; ".join(f"rank {r} failed: {m}" for r, m in failed.items()))
            if now - last_check > self.timeout:  # a rank killed while loading stops its heartbeat
                new = self._beats()
                silent = [r for r in range(self.ranks) if new[r] == beats[r] and r != self.rank]
                if silent:
                    raise RankFailure(f"rank {', '.join(map(str, silent))} stopped answering while loading")
                beats, last_check = new, now
            if now - start > timeout:
                raise RankFailure(f"not every rank loaded its share of the experts within {timeout:.0f} s "
                                  "(DSV4_DIST_LOAD_TIMEOUT); see the other ranks' output")  # fmt: skip
            time.sleep(0.05)
        self.serving = True
        self._last = time.monotonic()

    def _keepalive(self) -> None:
        while not self.closed and self.failure is None:
            time.sleep(self._beat)
            if not self.serving or time.monotonic() - self._last < self.timeout / 4:
                continue
            if not self._lock.acquire(blocking=False):
                continue
            try:
                if self.serving and self.failure is None:
                    self._collective("idle", self._header, NOOP, 0, 0)
                    self._last = time.monotonic()
            except RankFailure:
                return
            finally:
                self._lock.release()

    # ---- followers ----

    def receive(self) -> tuple[int, int, tuple[torch.Tensor, ...] | None]:
        """A follower: the next message, (op, layer, (x, tokens, weights, ids) or None)."""
        h = torch.zeros(3, dtype=torch.long, device=self.device)
        self._collective("waiting for rank 0", dist.broadcast, h, 0)
        op, index, t = h.tolist()
        if op != MOE:
            return op, index, None
        return op, index, self._payload_for(index, t)

    def give(self, index: int, partial: torch.Tensor) -> None:
        """A follower: add its partial sum to rank 0's."""
        self._collective(
            f"summing layer {index}'s experts", dist.reduce, partial.to(self.device).contiguous(), 0
        )

    def _payload_for(self, index: int, t: int) -> tuple[torch.Tensor, ...]:
        d, k, dtype = self.layout
        sizes = [t * k * 8, t * 8, t * k * 4, t * d * _itemsize(dtype)]
        payload = torch.empty(sum(sizes), dtype=torch.uint8, device=self.device)
        self._collective(f"receiving layer {index}'s input", dist.broadcast, payload, 0)
        ids, tokens, weights, x = torch.split(payload, sizes)
        return (x.view(dtype).view(t, d), tokens.view(torch.long), weights.view(torch.float32).view(t, k),
                ids.view(torch.long).view(t, k))  # fmt: skip

    # ---- both ----

    layout: tuple[int, int, torch.dtype] = (0, 0, torch.float32)  # D, K, compute dtype (set by `parallelize`)

    def _header(self, op: int, index: int, t: int) -> None:
        dist.broadcast(torch.tensor([op, index, t], dtype=torch.long, device=self.device), 0)

    def _check(self) -> None:
        if self.failure is not None:
            raise self.failure

    def _collective(self, what: str, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as exc:  # gloo raises RuntimeError / DistBackendError on a dropped peer or a timeout
            raise self._fail(what, exc) from exc

    def _fail(self, what: str, exc: Exception) -> RankFailure:
        if self.failure is not None:
            return self.failure
        silent = self.silent_ranks()
        failed = self._failed_reports()
        if failed:
            who = "; ".join(f"rank {r} failed: {msg}" for r, msg in failed.items())
        elif silent:
            who = f"rank {', '.join(map(str, silent))} of {self.ranks} stopped answering (no heartbeat)"
        else:
            who = f"a rank stopped answering within {self.timeout:.0f} s (every heartbeat still alive)"
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        self.failure = RankFailure(
            f"distributed model broken while {what} on rank {self.rank}: {who}; the model cannot run without "
            f"its experts, so requests fail and this rank exits ({type(exc).__name__}: {first})"
        )
        log.error("%s", self.failure)
        print(f"dsv4: {self.failure}", file=sys.stderr, flush=True)
        threading.Thread(target=_exit_later, args=(GRACE_S,), name="dsv4-dist-exit", daemon=True).start()
        return self.failure

    def _heartbeat(self) -> None:
        key = f"dsv4/alive/{self.rank}"
        while self.failure is None and not self.closed:
            try:
                self.store.add(key, 1)
            except Exception:  # the store's host went away: the collectives will say so
                return
            time.sleep(self._beat)

    def _beats(self) -> dict[int, int]:
        out = {}
        for r in range(self.ranks):
            try:
                out[r] = self.store.add(f"dsv4/alive/{r}", 0)
            except Exception:
                out[r] = -1
        return out

    def silent_ranks(self) -> list[int]:
        """Ranks whose heartbeat did not move over three beats (dead or hung)."""
        before = self._beats()
        time.sleep(3 * self._beat)
        after = self._beats()
        return [r for r in range(self.ranks) if r != self.rank and after[r] == before[r]]

    def report_failure(self, message: str) -> None:
        """A follower that cannot go on leaves its reason where rank 0 looks."""
        try:
            self.store.set(f"dsv4/failed/{self.rank}", message[:500])
        except Exception:
            pass

    def _failed_reports(self) -> dict[int, str]:
        out = {}
        for r in range(self.ranks):
            key = f"dsv4/failed/{r}"
            try:
                if r != self.rank and self.store.check([key]):
                    out[r] = self.store.get(key).decode()
            except Exception:
                pass
        return out


def _exit_later(seconds: float) -> None:
    time.sleep(seconds)
    os._exit(1)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _pack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One uint8 buffer of the tensors' bytes (ids, tokens: int64; weights: fp32; x: any dtype)."""
    return torch.cat([t.detach().contiguous().view(-1).view(torch.uint8) for t in tensors])


# ---------------------------------------------------------------- the MoE, split across ranks


class ParallelMoE(nn.Module):
    """One MoE layer of an expert-parallel model: this rank's experts plus everyone else's, summed."""

    def __init__(self, moe: MoE, comm: Comm, index: int):
        super().__init__()
        self.moe, self.comm, self.index = moe, comm, index
        self.owned = frozenset(share(moe.gate.shape[0], comm.rank, comm.ranks))

    def prefetch_hashed(self, tokens: torch.Tensor) -> None:
        self.moe.prefetch_hashed(tokens)  # the store keeps to its share

    def _local(self, y: torch.Tensor, x, tokens, weights, ids) -> torch.Tensor:
        used = [e for e in torch.unique(ids).tolist() if e in self.owned]
        self.moe.experts.prefetch_next(x, tokens, used, self.moe.next_moe)
        return self.moe.add_routed(y, x, weights, ids, used)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Rank 0: x [T, D] -> the layer's output [T, D], every rank's experts included."""
        weights, ids = self.moe.route(x, tokens)
        self.comm.send(self.index, x, tokens, weights, ids)
        try:
            y = ops_shared(self.moe, x)
            y = self._local(y, x, tokens, weights, ids)
        except BaseException:
            self.comm.reduce(self.index, torch.zeros(x.shape, dtype=torch.float32, device=x.device))
            raise
        return self.comm.reduce(self.index, y).to(x.dtype)

    def serve(self, x: torch.Tensor, tokens: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> None:
        """A follower: this rank's experts' part of the layer, summed onto rank 0's."""
        dev = self.moe.gate.device
        x, tokens, weights, ids = x.to(dev), tokens.to(dev), weights.to(dev), ids.to(dev)
        y = self._local(torch.zeros(x.shape, dtype=torch.float32, device=dev), x, tokens, weights, ids)
        self.comm.give(self.index, y)


def ops_shared(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The shared expert's output [T, D] fp32 (rank 0 only: it is counted once)."""
    from . import ops

    return ops.expert_mlp(x, *moe.shared.weights(), moe.limit).float()


def _blocks(model) -> list:
    """Every block with a MoE, in exchange-index order: the layers, the MTP layers, the DSpark stages."""
    if isinstance(model, Follower):
        return list(model.layers) + list(model.drafts)
    blocks = list(model.layers) + [m.block for m in model.mtp]
    dspark = getattr(model, "dspark", None)
    return blocks + (list(dspark.stages) if dspark is not None else [])


class ExpertShard(nn.Module):
    """A follower's part of one MoE layer: the router (hash table or gate: early-routing prefetch
    guesses with it) and this rank's routed experts. The routing math is MoE's own."""

    route, prefetch_hashed, add_routed = MoE.route, MoE.prefetch_hashed, MoE.add_routed
    next_moe: ExpertShard | None = None  # set by model.link_layers

    def __init__(self, cfg, src, p: str, hashed: bool, experts):
        super().__init__()
        self.gate = nn.Parameter(src.tensor(f"{p}.gate.weight").float(), requires_grad=False)
        self.register_buffer(
            "tid2eid", src.tensor(f"{p}.gate.tid2eid").long() if hashed else None, persistent=False
        )
        self.bias = (
            None if hashed else nn.Parameter(src.tensor(f"{p}.gate.bias").float(), requires_grad=False)
        )
        self.experts = experts
        self.k, self.score_func, self.route_scale, self.limit = (
            cfg.n_activated_experts, cfg.score_func, cfg.route_scale, cfg.swiglu_limit)  # fmt: skip


class _Slot(nn.Module):
    """Where a block's MoE sits (`.ffn`), which is all a follower keeps of a block."""

    def __init__(self, ffn: nn.Module):
        super().__init__()
        self.ffn = ffn


class Follower(nn.Module):
    """What a follower rank builds instead of the Transformer (same constructor arguments): one
    ExpertShard per MoE, in rank 0's exchange order. No attention, shared experts, embedding or head:
    rank 0 runs those, so a follower's memory is its experts (and its routers)."""

    def __init__(self, cfg, src, numerics, expert_provider, with_mtp: bool = True, progress=None):
        super().__init__()
        self.cfg, self.numerics = cfg, numerics

        def slot(p: str, hashed: bool) -> _Slot:
            return _Slot(ExpertShard(cfg, src, f"{p}.ffn", hashed, expert_provider(f"{p}.ffn.experts")))

        self.layers = nn.ModuleList()
        for i in range(cfg.n_layers):
            self.layers.append(slot(f"layers.{i}", cfg.hash_layers[i]))
            if progress is not None:
                progress(i)
        link_layers(self)
        drafts = range(cfg.n_mtp_layers) if with_mtp else ()
        if getattr(cfg, "dspark", False):  # the DSpark stages, counted as Transformer counts them
            drafts = range(len({n.split(".")[1] for n in src.names() if n.startswith("mtp.")}))
        self.drafts = nn.ModuleList(slot(f"mtp.{j}", False) for j in drafts)


def parallelize(model: Transformer | Follower, comm: Comm) -> list[ParallelMoE]:
    """Replace every MoE (the MTP layers' and DSpark stages' too) by its expert-parallel form."""
    cfg = model.cfg
    comm.layout = (cfg.dim, cfg.n_activated_experts, model.numerics.dtype)
    for i, block in enumerate(_blocks(model)):
        block.ffn = ParallelMoE(block.ffn, comm, i)
    model.comm = comm
    return [block.ffn for block in _blocks(model)]


def follow(model: Transformer | Follower, comm: Comm) -> None:
    """A follower's loop: serve rank 0's MoE exchanges until it says STOP."""
    layers = [block.ffn for block in _blocks(model)]
    n_main = len(model.layers)
    with torch.inference_mode():
        while True:
            op, index, payload = comm.receive()
            if op == STOP:
                return
            if op != MOE:
                continue
            x, tokens, weights, ids = payload
            if index == 0:  # a new step: hash layers know their experts from the tokens alone
                for layer in layers[:n_main]:
                    layer.prefetch_hashed(tokens)
            try:
                layers[index].serve(x, tokens, weights, ids)
            except RankFailure:
                raise
            except Exception as exc:
                comm.report_failure(f"{type(exc).__name__}: {exc}")
                raise


# ---------------------------------------------------------------- start-up


_COMM: Comm | None = None  # one process group per process, as torch.distributed itself keeps


def init(device: str | torch.device = "cpu", timeout: float | None = None) -> Comm:
    """Join the process group torchrun describes (gloo on CPU, NCCL for CUDA); idempotent."""
    global _COMM
    if _COMM is not None:
        return _COMM
    device = torch.device(device)
    timeout = timeout or float(os.environ.get("DSV4_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        device = torch.device("cuda", torch.cuda.current_device())
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    store = dist.distributed_c10d._get_default_store()  # the rendezvous store: heartbeats live there
    _COMM = Comm(dist.get_rank(), dist.get_world_size(), device, timeout, store)
    atexit.register(_COMM.close)
    return _COMM


def fingerprint(path: str | Path, dtype, numerics: str) -> dict[str, str]:
    """What every rank must agree on: config.json, the checkpoint's tensors (names, shapes, dtypes;
    not their bytes: hashing hundreds of GB would take minutes), the compute numerics, dsv4's version."""
    from . import __version__
    from .checkpoint import Checkpoint

    cfg = json.loads((Path(path) / "config.json").read_text())
    ckpt = Checkpoint(path)
    try:
        tensors = sorted((n, tuple(e.shape), str(e.dtype)) for n, e in ckpt.entries.items())
    finally:
        ckpt.close()

    def digest(obj) -> str:
        return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]

    return {"config.json": digest(cfg), "checkpoint tensors": digest(tensors),
            "dtype/numerics": f"{dtype}/{numerics}", "dsv4 version": __version__}  # fmt: skip


def check_same(comm: Comm, mine: dict[str, str]) -> None:
    """Every rank's fingerprint against rank 0's; all ranks raise the same error if any differs."""
    every: list[dict[str, str] | None] = [None] * comm.ranks
    dist.all_gather_object(every, mine)
    ref = every[0]
    bad = [f"rank {r}'s {k} ({fp[k]}) differs from rank 0's ({ref[k]})"
           for r, fp in enumerate(every) for k in ref if fp.get(k) != ref.get(k)]  # fmt: skip
    if bad:
        raise ValueError("ranks disagree, refusing to start: " + "; ".join(bad)
                         + ": start every rank with the same checkpoint, --dtype and --numerics")  # fmt: skip


def load_share(path: str | Path, comm: Comm, *, device="cpu", dtype=torch.bfloat16, numerics: str = "exact",
               **kwargs) -> tuple[Transformer, object]:  # fmt: skip
    """This rank's model, its MoEs made parallel: rank 0's the Transformer with its share of the routed
    experts; every other rank's a Follower (its share of the experts and the routers, nothing dense)."""
    from .config import ModelConfig
    from .loader import load_model

    check_same(comm, fingerprint(path, dtype, numerics))
    cfg = ModelConfig.from_file(path)
    mine = share(cfg.n_routed_experts, comm.rank, comm.ranks)
    model, ckpt = load_model(path, device=device, dtype=dtype, numerics=numerics, expert_ids=mine,
                             build=Transformer if comm.rank == 0 else Follower, **kwargs)  # fmt: skip
    parallelize(model, comm)
    comm.loads += 1
    comm.loaded(comm.loads, float(os.environ.get("DSV4_DIST_LOAD_TIMEOUT", 3600)))
    return model, ckpt


def load(path: str | Path, *, device="cpu", timeout: float | None = None, **kwargs):
    """`dsv4.load` under torchrun: rank 0 gets the Engine; every other rank serves its experts until rank
    0 stops, then exits the process (it never returns: the CLI's command is rank 0's to run)."""
    from .engine import Engine

    comm = init(device, timeout)
    try:
        model, ckpt = load_share(path, comm, device=device, **kwargs)
    except Exception as exc:
        comm.report_failure(f"{type(exc).__name__}: {exc}")
        if comm.rank != 0:
            print(f"dsv4 (rank {comm.rank}): error: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(2) from exc
        raise
    if comm.rank == 0:
        return Engine(model, ckpt)
    try:
        follow(model, comm)
    except Exception as exc:
        print(f"dsv4 (rank {comm.rank}): error: {exc}", file=sys.stderr, flush=True)
        os._exit(1)
    comm.close()
    raise SystemExit(0)
