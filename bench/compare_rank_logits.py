"""Last-position fp32 logits of a 32-token prompt, from one process or from rank 0 of a torchrun job,
saved to a file: compare expert-parallel runs with one process in bf16 and in fp32.

    python bench/compare_rank_logits.py MODEL OUT.pt [--fp32]
    torchrun --nproc-per-node 2 bench/compare_rank_logits.py MODEL OUT.pt [--fp32]
    python bench/compare_rank_logits.py --compare A.pt B.pt
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout


def main(argv: list[str]) -> None:
    if argv[0] == "--compare":
        a, b = torch.load(argv[1]), torch.load(argv[2])
        rel = ((a - b).norm() / a.norm()).item()
        print(f"argmax {a.argmax().item()} / {b.argmax().item()}, max |diff| {(a - b).abs().max().item():.3g}, "
              f"relative L2 {rel:.3g}")  # fmt: skip
        return
    import dsv4

    torch.set_num_threads(1)
    dtype = torch.float32 if "--fp32" in argv else torch.bfloat16
    engine = dsv4.load(argv[0], max_ram="none", dtype=dtype)  # under torchrun only rank 0 returns
    torch.save(engine.logits(list(range(5, 37)))[-1], argv[1])
    comm = getattr(engine.model, "comm", None)
    if comm is not None:
        comm.release()


if __name__ == "__main__":
    main(sys.argv[1:])
