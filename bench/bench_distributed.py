"""Benchmark expert parallelism: the same model on 1, 2 and 4 gloo ranks of this machine, and the planner's
network prediction for V4-Flash and V4-Pro on 2 and 4 machines over 10 and 25 GbE.

The ranks share this machine's cores and memory, so the measured rows are a correctness-and-overhead run
(time per decoded token, bytes each token moves and what an all-to-all dispatch would have moved for the
same routing, time rank 0 spends blocked in collectives), not a speed-up measurement. It also measures
the link (gloo between two local processes: latency and bandwidth of the broadcast and reduce the engine
uses) and compares broadcast + reduce with a dispatch for V4-Flash/Pro at 2, 4 and 8 ranks. Prints
markdown tables and writes them to bench/results/distributed.md (--append adds the measured table only:
a second model, e.g. the Flash slice, under `flock /tmp/bigmem.lock`).

    python3 bench/bench_distributed.py [--model DIR] [--ranks 1 2 4] [--tokens 16] [--max-ram none|5G]
                                       [--latency-us 50] [--append]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = RESULTS.parent.parent
sys.path.insert(0, str(ROOT))

# V4_SPEC.md section 1 (only what the exchange size depends on)
RELEASES = {
    "V4-Flash": {"dim": 4096, "n_layers": 43, "k": 6},
    "V4-Pro": {"dim": 7168, "n_layers": 61, "k": 6},
}


def rank_main(model: str, tokens: int, max_ram: str, out: Path) -> None:
    import torch

    from dsv4 import distributed
    from dsv4.engine import Engine, load
    from dsv4.memory import peak_rss_bytes

    torch.set_num_threads(1)
    prompt = list(range(5, 37))
    if not distributed.launched():
        e = load(model, max_ram=max_ram)
    else:
        comm = distributed.init()
        m, ck = distributed.load_share(model, comm, max_ram=max_ram)
        if comm.rank != 0:
            distributed.follow(m, comm)
            out.with_suffix(f".rss{comm.rank}").write_text(str(peak_rss_bytes()))
            return
        e = Engine(m, ck)
    e.generate(prompt[:8], max_tokens=2, temperature=0.0)  # warm-up
    comm = getattr(e.model, "comm", None)
    before = comm.stats.as_dict() if comm else {}
    t = time.perf_counter()
    got = e.generate(prompt, max_tokens=tokens, temperature=0.0)
    seconds = time.perf_counter() - t
    after = comm.stats.as_dict() if comm else {}
    delta = {k: after[k] - before[k] for k in after}
    result = {"seconds": seconds, "tokens": len(got), "prompt": len(prompt), "chain": got, **delta}
    if comm:
        comm.release()
    out.write_text(json.dumps({**result, "rss0": peak_rss_bytes()}))


def link_main(out: Path, small_iters: int = 200, big_bytes: int = 32 << 20, big_iters: int = 5) -> None:
    """Two ranks: latency (a 3-int64 header, as the engine's) and bandwidth (32 MB) of broadcast and
    reduce between these processes; rank 0 writes seconds per call."""
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    res = {}
    for name, fn in (("broadcast", lambda t: dist.broadcast(t, 0)), ("reduce", lambda t: dist.reduce(t, 0))):
        for size, iters in (("small", small_iters), ("big", big_iters)):
            t = torch.zeros(
                3 if size == "small" else big_bytes // 4,
                dtype=torch.int64 if size == "small" else torch.float32,
            )
            fn(t)  # warm-up: connections, buffers
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(iters):
                fn(t)
            dist.barrier()
            res[f"{name}_{size}"] = (time.perf_counter() - t0) / iters
    if dist.get_rank() == 0:
        out.write_text(json.dumps({**res, "big_bytes": big_bytes}))
    dist.destroy_process_group()


def launch(ranks: int, out: Path, args: list[str]) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for r in range(ranks):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        if ranks > 1:
            env.update(
                RANK=str(r),
                LOCAL_RANK=str(r),
                WORLD_SIZE=str(ranks),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
            )
        procs.append(subprocess.Popen([sys.executable, __file__, *args, "--out", str(out)], env=env))
    for p in procs:
        if p.wait(timeout=1800) != 0:
            raise SystemExit(f"a rank exited with {p.returncode}")
    res = json.loads(out.read_text())
    res["rss"] = [res["rss0"]] + [int(out.with_suffix(f".rss{r}").read_text()) for r in range(1, ranks)]
    return res


def measure_link() -> dict:
    out = Path(tempfile.gettempdir()) / "dsv4_bench_link.json"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for r in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, __file__, "--link-of", "--out", str(out)], env=env))
    for p in procs:
        if p.wait(timeout=600) != 0:
            raise SystemExit(f"a link rank exited with {p.returncode}")
    return json.loads(out.read_text())


def link_table(link: dict) -> tuple[str, float, float]:
    """The measured link as a table, and the (latency s, bytes/s) the planner takes from it: latency of
    the small broadcast, bandwidth of the big one."""
    rows = ["| collective (2 ranks, gloo over loopback) | small (3 x int64): us per call | 32 MB: ms per call | GB/s |",
            "|---|---|---|---|"]  # fmt: skip
    for name in ("broadcast", "reduce"):
        small, big = link[f"{name}_small"], link[f"{name}_big"]
        rows.append(f"| {name} | {small * 1e6:.0f} | {big * 1e3:.1f} | {link['big_bytes'] / big / 1e9:.2f} |")
    return "\n".join(rows), link["broadcast_small"], link["big_bytes"] / link["broadcast_big"]


def predictions(latency_us: float, measured: tuple[float, float]) -> str:
    from dsv4.plan import Link, exchange_bytes, network_seconds_per_token

    rows = ["| model | machines | link | bytes per token (rank 0 out + in) | network ms per token | network-only ceiling tok/s |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    links = [(f"{g} GbE, {latency_us:.0f} us", Link(latency_us * 1e-6, g * 1e9 / 8)) for g in (10, 25)]
    links.append((f"this machine's loopback (measured: {measured[0] * 1e6:.0f} us, {measured[1] * 8 / 1e9:.1f} Gbit/s)",
                  Link(*measured)))  # fmt: skip
    for name in RELEASES:
        cfg = release_config(name)
        for ranks in (2, 4):
            for label, link in links:
                sent, got = exchange_bytes(cfg)
                per_token = (ranks - 1) * (sent + got) * cfg.n_layers
                sec = network_seconds_per_token(cfg, ranks, link)
                rows.append(
                    f"| {name} | {ranks} | {label} | {per_token / 1e3:.0f} kB | {sec * 1e3:.2f} | {1 / sec:.0f} |"
                )
    return "\n".join(rows)


def release_config(name: str):
    from types import SimpleNamespace

    d = RELEASES[name]
    return SimpleNamespace(
        dim=d["dim"], n_layers=d["n_layers"], n_activated_experts=d["k"]
    )  # what plan reads


def dispatch_table() -> str:
    """Broadcast + reduce (what dsv4.distributed does) against an all-to-all dispatch, per decoded token."""
    from dsv4.plan import dispatch_bytes, exchange_bytes

    rows = ["| model | ranks | broadcast + reduce kB per token | all-to-all dispatch kB per token (uniform routing) | dispatch saves |",
            "|---|---|---|---|---|"]  # fmt: skip
    for name in RELEASES:
        cfg = release_config(name)
        for ranks in (2, 4, 8):
            sent, got = exchange_bytes(cfg)
            now = (ranks - 1) * (sent + got) * cfg.n_layers
            a2a = dispatch_bytes(cfg, ranks) * cfg.n_layers
            rows.append(f"| {name} | {ranks} | {now / 1e3:.0f} | {a2a / 1e3:.0f} | {1 - a2a / now:.0%} |")
    return "\n".join(rows)


def measured_table(a: argparse.Namespace) -> str:
    rows = ["| ranks | ms per decoded token | kB per token (rank 0 out + in) | all-to-all dispatch would move kB | ms per token blocked in collectives | peak RSS per rank GB | same chain as 1 rank |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    base = None
    for n in a.ranks:
        out = Path(tempfile.gettempdir()) / f"dsv4_bench_dist_{n}.json"
        r = launch(n, out, ["--rank-of", a.model, "--tokens", str(a.tokens), "--max-ram", a.max_ram])
        steps = r["tokens"]  # the prompt's step included: every generated token is one step
        base = base or r["chain"]
        moved = (r.get("bytes_sent", 0) + r.get("bytes_received", 0)) / steps / 1e3
        a2a = r.get("dispatch_bytes", 0) / steps / 1e3
        blocked = (r.get("send_seconds", 0) + r.get("reduce_seconds", 0)) / steps * 1e3
        rss = " / ".join(f"{b / 1e9:.2f}" for b in r["rss"])
        rows.append(f"| {n} | {r['seconds'] / steps * 1e3:.1f} | {moved:.1f} | {a2a:.1f} | {blocked:.1f} | {rss} "
                    f"| {r['chain'] == base} |")  # fmt: skip
        print(rows[-1], flush=True)  # a long run (the Flash slice) shows each row as it lands
    return (f"measured on this machine ({os.cpu_count()} cores shared by all ranks and other jobs: noisy), model "
            f"{a.model}, --max-ram {a.max_ram} per rank, {a.tokens} greedy tokens after a 32-token prompt (bf16), "
            "gloo on localhost; per token = per generated token, the prompt's step included\n\n" + "\n".join(rows))  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=str(ROOT / "dsv4" / "demo"))
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--max-ram", default="none", help="each rank's RAM budget (none: every expert resident)")
    p.add_argument("--latency-us", type=float, default=50.0)
    p.add_argument("--append", action="store_true", help="add the measured table to the results file")
    p.add_argument("--rank-of", default=None, help=argparse.SUPPRESS)
    p.add_argument("--link-of", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.rank_of:
        rank_main(a.rank_of, a.tokens, a.max_ram, Path(a.out))
        return
    if a.link_of:
        link_main(Path(a.out))
        return
    RESULTS.mkdir(exist_ok=True)
    text = measured_table(a) + "\n"
    if not a.append:
        table, latency, bandwidth = link_table(measure_link())
        text += (f"\nthe link, measured\n\n{table}\n\nso `dsv4 plan --ranks N --link-latency {latency * 1e6:.0f} --link-gbps "
                 f"{bandwidth * 8 / 1e9:.1f}` plans for this loopback\n\nplanner prediction, network part only "
                 f"(dsv4.plan.network_seconds_per_token)\n\n{predictions(a.latency_us, (latency, bandwidth))}\n\n"
                 f"broadcast + reduce against an all-to-all dispatch (dsv4.plan.dispatch_bytes)\n\n{dispatch_table()}\n")  # fmt: skip
    print(text)
    path = RESULTS / "distributed.md"
    if a.append:
        path.write_text(path.read_text() + "\n" + text)
    else:
        path.write_text(text)


if __name__ == "__main__":
    main()
