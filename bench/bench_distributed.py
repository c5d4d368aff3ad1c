"""Benchmark expert parallelism: the same model on 1, 2 and 4 gloo ranks of this machine, and the planner's
network prediction for V4-Flash and V4-Pro on 2 and 4 machines over 10 and 25 GbE.

The ranks share this machine's cores and memory, so the measured rows are a correctness-and-overhead run
(time per decoded token, bytes each token moves, time rank 0 spends blocked in collectives), not a
speed-up measurement. Prints markdown tables and writes them to bench/results/distributed.md.

    python3 bench/bench_distributed.py [--model DIR] [--ranks 1 2 4] [--tokens 16] [--latency-us 50]
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


def rank_main(model: str, tokens: int, out: Path) -> None:
    import torch

    from dsv4 import distributed
    from dsv4.engine import Engine, load

    torch.set_num_threads(1)
    prompt = list(range(5, 37))
    if not distributed.launched():
        e = load(model, max_ram="none")
    else:
        comm = distributed.init()
        m, ck = distributed.load_share(model, comm, max_ram="none")
        if comm.rank != 0:
            distributed.follow(m, comm)
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
    out.write_text(
        json.dumps({"seconds": seconds, "tokens": len(got), "prompt": len(prompt), "chain": got, **delta})
    )
    if comm:
        comm.release()


def launch(model: str, ranks: int, tokens: int, out: Path) -> dict:
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
        cmd = [sys.executable, __file__, "--rank-of", model, "--tokens", str(tokens), "--out", str(out)]
        procs.append(subprocess.Popen(cmd, env=env))
    for p in procs:
        if p.wait(timeout=1800) != 0:
            raise SystemExit(f"a rank exited with {p.returncode}")
    return json.loads(out.read_text())


def predictions(latency_us: float) -> str:
    from types import SimpleNamespace

    from dsv4.plan import Link, exchange_bytes, network_seconds_per_token

    rows = ["| model | machines | link | bytes per token (rank 0 out + in) | network ms per token | network-only ceiling tok/s |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    for name, d in RELEASES.items():
        cfg = SimpleNamespace(
            dim=d["dim"], n_layers=d["n_layers"], n_activated_experts=d["k"]
        )  # what they read
        for ranks in (2, 4):
            for gbe in (10, 25):
                link = Link(latency_us * 1e-6, gbe * 1e9 / 8)
                sent, got = exchange_bytes(cfg)
                per_token = (ranks - 1) * (sent + got) * d["n_layers"]
                s = network_seconds_per_token(cfg, ranks, link)
                rows.append(f"| {name} | {ranks} | {gbe} GbE, {latency_us:.0f} us | {per_token / 1e3:.0f} kB | "
                            f"{s * 1e3:.2f} | {1 / s:.0f} |")  # fmt: skip
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=str(ROOT / "dsv4" / "demo"))
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--latency-us", type=float, default=50.0)
    p.add_argument("--rank-of", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.rank_of:
        rank_main(a.rank_of, a.tokens, Path(a.out))
        return
    RESULTS.mkdir(exist_ok=True)
    rows = ["| ranks | ms per decoded token | kB per token (rank 0 out + in) | ms per token blocked in collectives | same chain as 1 rank |",
            "|---|---|---|---|---|"]  # fmt: skip
    base = None
    for n in a.ranks:
        r = launch(a.model, n, a.tokens, Path(tempfile.gettempdir()) / f"dsv4_bench_dist_{n}.json")
        steps = r["tokens"]  # the prompt's step included: every generated token is one step
        base = base or r["chain"]
        moved = (r.get("bytes_sent", 0) + r.get("bytes_received", 0)) / steps / 1e3
        blocked = (r.get("send_seconds", 0) + r.get("reduce_seconds", 0)) / steps * 1e3
        rows.append(
            f"| {n} | {r['seconds'] / steps * 1e3:.1f} | {moved:.1f} | {blocked:.1f} | {r['chain'] == base} |"
        )
    text = (f"measured on this machine ({os.cpu_count()} cores shared by all ranks and other jobs: noisy), model "
            f"{a.model}, {a.tokens} greedy tokens after a 32-token prompt, gloo on localhost\n\n" + "\n".join(rows)
            + "\n\nplanner prediction, network part only (dsv4.plan.network_seconds_per_token)\n\n"
            + predictions(a.latency_us) + "\n")  # fmt: skip
    print(text)
    (RESULTS / "distributed.md").write_text(text)


if __name__ == "__main__":
    main()
