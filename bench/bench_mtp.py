"""Decode speed with and without MTP speculative decoding, and the draft acceptance rate.

    python bench/bench_mtp.py [--model DIR] [--tokens 128] [--prompts 3]

Default model: the bundled demo (dsv4/demo). Greedy decoding, so both runs give the same tokens
(checked). Prints a markdown table.
"""

import argparse
import time
from pathlib import Path

import torch

import dsv4

PROMPTS = ["def quicksort(arr):", "import os\n\n\ndef main():", "class Stack:\n    def __init__(self):"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=Path(dsv4.__file__).parent / "demo")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--dtype", default="bf16")
    args = ap.parse_args()
    torch.set_num_threads(2)
    engine = dsv4.load(args.model, dtype=args.dtype)
    print(f"model {args.model}, {args.tokens} greedy tokens per prompt, dtype {args.dtype}\n")
    print("| prompt | plain tok/s | MTP tok/s | speed-up | acceptance | same tokens |")
    print("|---|---|---|---|---|---|")
    prompts = PROMPTS[: args.prompts]
    if engine._try_tokenizer() is None:  # a random tiny checkpoint without a fitting tokenizer: token ids
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(2, engine.config.vocab_size, (16,), generator=g).tolist() for _ in prompts]
    engine.complete(prompts[0], max_tokens=4, temperature=0.0)  # warm up (kernel build, allocator)
    for prompt in prompts:
        runs = {}
        for spec in (False, True):
            t = time.perf_counter()
            r = engine.complete(prompt, max_tokens=args.tokens, temperature=0.0, ignore_eos=True, speculative=spec)
            runs[spec] = (r, len(r.token_ids) / (time.perf_counter() - t))
        (plain, tps0), (mtp, tps1) = runs[False], runs[True]
        label = prompt.splitlines()[0] if isinstance(prompt, str) else f"{len(prompt)} random ids"
        print(f"| {label!r} | {tps0:.1f} | {tps1:.1f} | {tps1 / tps0:.2f}x | "
              f"{mtp.stats.acceptance_rate:.0%} | {plain.token_ids == mtp.token_ids} |")  # fmt: skip


if __name__ == "__main__":
    main()
