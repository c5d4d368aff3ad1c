"""One rank of the expert-parallel tests: tests/test_distributed.py starts N of these (gloo) once per
rank count and they run a list of cases in order, so each launch pays the start-up (torch import, the
process group) once.

    python tests/dist_rank.py OUT CASES_JSON

CASES_JSON is a list of {"case": ..., "tag": ..., "model": DIR, ...}; each case writes its results
under OUT as `<tag>.rank<r>.json` (and rank 0's tensors as `<tag>.pt`):

    rss      load resident, decode two tokens: each rank's peak RSS growth (over the load, and over
             load + decode) and its expert bytes
    match    logits and greedy chains (plain and speculative) resident, then under a RAM budget with
             constant eviction; every rank's share of the expert ids and bytes, its store's counters
    refuse   rank `rank` loads `other` instead of `model`: every rank's error text (fingerprint check)
    die/hang rank `rank` kills (SIGKILL) or freezes (SIGSTOP) itself at its 6th expert exchange while
             rank 0 generates; rank 0 prints the error and exits non-zero (a fault case comes last)
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch

from dsv4 import distributed, kernels
from dsv4.engine import Engine
from dsv4.memory import peak_rss_bytes, rss_bytes

L1 = "layers.1.ffn.experts"


def held_experts(model) -> tuple[list[int], int, int]:
    """The expert ids this rank holds in layer 1, the bytes of all its resident routed experts, and
    the number of MoE layers (the MTP layers and DSpark stages included)."""
    moes = [block.ffn.moe for block in distributed._blocks(model)]
    ids = sorted(int(k) for k in moes[1].experts.experts.keys())
    nbytes = sum(t.numel() * t.element_size() for moe in moes for ex in moe.experts.experts.values()
                 for w in ex.weights() for t in (w.weight, getattr(w, "scale", None)) if t is not None)  # fmt: skip
    return ids, nbytes, len(moes)


def serve_or_run(comm, model, ckpt, run) -> dict:
    """Rank 0: `run(engine)` -> its results; the others serve their experts until rank 0 is done."""
    if comm.rank != 0:
        distributed.follow(model, comm)
        return {}
    out = run(Engine(model, ckpt))
    comm.release()
    return out


def reset_peak_rss() -> None:
    """Peak RSS (VmHWM) back to the current RSS (Linux >= 4.0), so a case's peak is its own."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def rss(comm, c: dict) -> dict:
    """Peak RSS growth over the load, and over load + two tokens (rank 0's also counts its engine)."""
    reset_peak_rss()
    before = rss_bytes()
    model, ckpt = distributed.load_share(c["model"], comm, dtype=torch.float32, max_ram="none")
    loaded = peak_rss_bytes() - before

    def run(e: Engine) -> dict:
        e.generate(c["ids"], max_tokens=2, temperature=0.0)
        return {}

    serve_or_run(comm, model, ckpt, run)
    _, nbytes, _ = held_experts(model)
    return {"load_growth": loaded, "growth": peak_rss_bytes() - before, "expert_bytes": nbytes}


def match(comm, c: dict) -> dict:
    ids, info, results = c["ids"], {}, {}
    for mode in ("resident", "budget"):
        model, ckpt = distributed.load_share(c["model"], comm, dtype=torch.float32,
                                             max_ram="none" if mode == "resident" else "4G")  # fmt: skip
        if mode == "resident":
            info["layer1_ids"], info["expert_bytes"], info["moe_layers"] = held_experts(model)
        else:
            store = model.store
            store.set_budget(3 * store.expert_bytes(L1, 0))  # almost nothing fits: constant eviction

        def run(e: Engine, mode=mode) -> dict:
            return {f"{mode}_logits": e.logits(ids),
                    f"{mode}_greedy": e.generate(ids[:12], max_tokens=6, temperature=0.0),
                    f"{mode}_speculative": e.generate(ids[:12], max_tokens=6, temperature=0.0, speculative=True),
                    f"{mode}_comm": comm.stats.as_dict()}  # fmt: skip

        results.update(serve_or_run(comm, model, ckpt, run))
        if mode == "budget":
            st = model.store.stats
            cached = {e for (_, e) in model.store._cache}
            info.update(
                misses=st.misses, evictions=st.evictions, cached_owned=cached <= set(info["layer1_ids"])
            )
    if comm.rank == 0:
        torch.save(results, Path(c["out"]) / f"{c['tag']}.pt")
    return info


def refuse(comm, c: dict) -> dict:
    try:
        distributed.load_share(c["other"] if comm.rank == c["rank"] else c["model"], comm, dtype=torch.float32,
                               max_ram="none")  # fmt: skip
    except ValueError as exc:
        return {"error": str(exc)}
    return {"error": None}


def fault(comm, c: dict) -> dict:
    model, ckpt = distributed.load_share(c["model"], comm, dtype=torch.float32, max_ram="none")
    if comm.rank == c["rank"]:
        calls = [0]
        serve = distributed.ParallelMoE.serve

        def faulty(self, *args):
            calls[0] += 1
            if calls[0] == 6:
                os.kill(os.getpid(), signal.SIGKILL if c["case"] == "die" else signal.SIGSTOP)
            return serve(self, *args)

        distributed.ParallelMoE.serve = faulty
    if comm.rank != 0:
        distributed.follow(model, comm)
        return {}
    try:
        Engine(model, ckpt).generate(c["ids"], max_tokens=40, temperature=0.0)
    except distributed.RankFailure as exc:
        print(f"request failed: {exc}", flush=True)
        sys.exit(3)
    return {}


CASES = {"rss": rss, "match": match, "refuse": refuse, "die": fault, "hang": fault}


def main() -> int:
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    comm = distributed.init()
    kernels.available()  # loaded before any RSS baseline
    for c in json.loads(sys.argv[2]):
        got = CASES[c["case"]](comm, {**c, "out": str(out)})
        (out / f"{c['tag']}.rank{comm.rank}.json").write_text(json.dumps({"rank": comm.rank, **got}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
