"""One rank of the expert-parallel tests: tests/test_distributed.py starts several of these (gloo).

python tests/dist_rank.py match MODEL OUT IDS_JSON   rank 0 writes logits and greedy chains (resident,
                                                    then under a RAM budget); every rank its share
python tests/dist_rank.py die|hang MODEL OUT IDS     rank 1 kills (SIGKILL) or freezes (SIGSTOP) itself
                                                    at its 6th expert exchange while rank 0 generates
python tests/dist_rank.py load MODEL                 load and stop (the fingerprint check)
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch

from dsv4 import distributed
from dsv4.engine import Engine

L1 = "layers.1.ffn.experts"


def held_experts(model) -> tuple[list[int], int]:
    """The expert ids this rank holds in layer 1 and the bytes of all its resident routed experts."""
    moes = [layer.ffn.moe for layer in model.layers] + [m.block.ffn.moe for m in model.mtp]
    ids = sorted(int(k) for k in moes[1].experts.experts.keys())
    nbytes = sum(t.numel() * t.element_size() for moe in moes for ex in moe.experts.experts.values()
                 for w in ex.weights() for t in (w.weight, getattr(w, "scale", None)) if t is not None)  # fmt: skip
    return ids, nbytes


def match(comm, model_dir: str, out: Path, ids: list[int]) -> None:
    info: dict = {"rank": comm.rank}
    results = {}
    for mode in ("resident", "budget"):
        model, ckpt = distributed.load_share(model_dir, comm, dtype=torch.float32,
                                             max_ram="none" if mode == "resident" else "4G")  # fmt: skip
        if mode == "resident":
            info["layer1_ids"], info["expert_bytes"] = held_experts(model)
        else:
            store = model.store
            store.set_budget(3 * store.expert_bytes(L1, 0))  # almost nothing fits: constant eviction
        if comm.rank == 0:
            e = Engine(model, ckpt)
            results[f"{mode}_logits"] = e.logits(ids)
            results[f"{mode}_greedy"] = e.generate(ids[:12], max_tokens=6, temperature=0.0)
            results[f"{mode}_speculative"] = e.generate(
                ids[:12], max_tokens=6, temperature=0.0, speculative=True
            )
            results[f"{mode}_comm"] = comm.stats.as_dict()
            comm.release()
        else:
            distributed.follow(model, comm)
        if mode == "budget":
            st = model.store.stats
            cached = {e for (_, e) in model.store._cache}
            info.update(
                misses=st.misses, evictions=st.evictions, cached_owned=cached <= set(info["layer1_ids"])
            )
    if comm.rank == 0:
        torch.save(results, out / "rank0.pt")
    (out / f"rank{comm.rank}.json").write_text(json.dumps(info))


def fault(comm, model_dir: str, kind: str, ids: list[int]) -> int:
    model, ckpt = distributed.load_share(model_dir, comm, dtype=torch.float32, max_ram="none")
    if comm.rank == 1:
        calls = [0]
        serve = distributed.ParallelMoE.serve

        def faulty(self, *args):
            calls[0] += 1
            if calls[0] == 6:
                os.kill(os.getpid(), signal.SIGKILL if kind == "die" else signal.SIGSTOP)
            return serve(self, *args)

        distributed.ParallelMoE.serve = faulty
    if comm.rank != 0:
        distributed.follow(model, comm)
        return 0
    e = Engine(model, ckpt)
    try:
        e.generate(ids, max_tokens=40, temperature=0.0)
    except distributed.RankFailure as exc:
        print(f"request failed: {exc}", flush=True)
        return 3
    return 0


def main() -> int:
    torch.set_num_threads(1)
    mode, model_dir = sys.argv[1], sys.argv[2]
    comm = distributed.init()
    if mode == "load":
        try:
            distributed.load_share(model_dir, comm, dtype=torch.float32, max_ram="none")
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            return 2
        return 0
    out, ids = Path(sys.argv[3]), json.loads(sys.argv[4])
    if mode == "match":
        match(comm, model_dir, out, ids)
        return 0
    return fault(comm, model_dir, mode, ids)


if __name__ == "__main__":
    sys.exit(main())
