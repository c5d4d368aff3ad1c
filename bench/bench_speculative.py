"""Speculative decoding on a CPU: plain vs MTP vs DSpark decode speed, acceptance and accepted length.

    python bench/bench_speculative.py demo [--tokens 96] [--threads 1]
    flock /tmp/bigmem.lock python bench/bench_speculative.py slice [--configs resident,8G] [--reps 4]

demo: the bundled demo model with its MTP layer (dsv4/demo) and with the DSpark draft trained on the
same frozen backbone (dsv4/demo-dspark, bench/train_dspark.sh). Greedy decoding per prompt: tok/s of
plain, MTP and DSpark decoding (the same tokens, checked), acceptance rate, mean accepted length
(tokens per verify step, the target's own token included).

slice: the V4-Flash-dimension slice (/tmp/dsv4-flash-slice, bench/bench_offload.py) with random DSpark
stages, written once to --out as a 0731-layout folder whose index lists the slice's own shards (only
the draft is written). Random drafts are almost never accepted, so this measures costs: one decode
step, one verify block of B + 1 tokens, one draft proposal (fresh random tokens each repetition, so
experts are not trivially cached), with every expert resident and under RAM budgets (--configs), and the
bytes the expert store read per call. From them, tok/s as a function of the mean accepted length L:
L / (t_draft + t_verify), against plain decoding's 1 / t_step; the break-even L. Plus end-to-end
plain and DSpark decoding of --tokens tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import dsv4

HERE = Path(dsv4.__file__).parent
PROMPTS = ["def quicksort(arr):", "import os\n\n\ndef main():", "class Stack:\n    def __init__(self):"]
GB = 1 << 30


def demo(args) -> None:
    plain_engine = dsv4.load(HERE / "demo", dtype=args.dtype)
    dspark_engine = dsv4.load(HERE / "demo-dspark", dtype=args.dtype)
    print(
        f"demo model, {args.tokens} greedy tokens per prompt, dtype {args.dtype}, {args.threads} thread(s)\n"
    )
    print(
        "| prompt | plain tok/s | MTP tok/s | MTP accept | MTP len | DSpark tok/s | DSpark accept | DSpark len | same |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for e in (plain_engine, dspark_engine):  # warm up (kernel build, allocator)
        e.complete(PROMPTS[0], max_tokens=8, temperature=0.0, speculative=True)
    totals = {
        k: [0, 0.0, 0, 0, 0] for k in ("plain", "mtp", "dspark")
    }  # tokens, s, rounds, drafted, accepted
    for prompt in PROMPTS:
        row, outs = [], []
        for kind, engine, spec in (("plain", plain_engine, False), ("mtp", plain_engine, True),
                                   ("dspark", dspark_engine, True)):  # fmt: skip
            t = time.perf_counter()
            r = engine.complete(
                prompt, max_tokens=args.tokens, temperature=0.0, ignore_eos=True, speculative=spec
            )
            dt = time.perf_counter() - t
            outs.append(r.token_ids)
            s = r.stats
            tot = totals[kind]
            tot[0] += len(r.token_ids)
            tot[1] += dt
            row.append(f"{len(r.token_ids) / dt:.1f}")
            if spec:
                tot[2] += s.draft_rounds
                tot[3] += s.draft_tokens
                tot[4] += s.accepted_tokens
                row += [
                    f"{s.accepted_tokens / s.draft_tokens:.0%}",
                    f"{(s.accepted_tokens + s.draft_rounds) / s.draft_rounds:.2f}",
                ]
        same = outs[0] == outs[1] == outs[2]
        print(f"| {prompt.splitlines()[0]!r} | " + " | ".join(row) + f" | {same} |")
    row = [f"{totals['plain'][0] / totals['plain'][1]:.1f}"]
    for kind in ("mtp", "dspark"):
        n, s, rounds, drafted, accepted = totals[kind]
        row += [f"{n / s:.1f}", f"{accepted / drafted:.0%}", f"{(accepted + rounds) / rounds:.2f}"]
    print("| **all** | " + " | ".join(row) + " | |")


# ---------------------------------------------------------------- the V4-Flash-dimension slice


def ensure_dspark_slice(src: Path, dst: Path, rank: int) -> None:
    """The slice turned 0731-style: random DSpark stages in dst, the backbone listed in src's shards."""
    from dsv4.writer import write_checkpoint

    raw = json.loads((src / "config.json").read_text())
    n = raw["num_hidden_layers"]
    raw.update(compress_ratios=raw["compress_ratios"][:n] + [0, 0, 0], num_nextn_predict_layers=1,
               dspark_block_size=5, dspark_noise_token_id=128799, dspark_target_layer_ids=[n - 3, n - 2, n - 1],
               dspark_markov_rank=rank)  # fmt: skip
    if (dst / "model.safetensors.index.json").exists() and json.loads(
        (dst / "config.json").read_text()
    ) == raw:
        print(f"slice: reusing {dst}", flush=True)
        return
    if dst.exists():
        shutil.rmtree(dst)
    t = time.perf_counter()
    rel = os.path.relpath(src.resolve(), dst.resolve())
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    write_checkpoint(dst, raw, None, shard_bytes=2 * GB, shared={k: f"{rel}/{f}" for k, f in index.items()})
    shutil.copy(src / "tokenizer.json", dst / "tokenizer.json")
    size = sum(f.stat().st_size for f in dst.glob("*.safetensors"))
    print(
        f"slice: wrote the draft ({size / GB:.2f} GB) to {dst} in {time.perf_counter() - t:.0f} s", flush=True
    )


def _timed(fn, reps: int, store) -> tuple[float, float]:
    """Median seconds of fn() over reps calls (after one warm-up), and mean expert bytes read per call."""
    fn()
    times, read0 = [], store.stats.bytes_read if store is not None else 0
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    read = (store.stats.bytes_read - read0) / reps if store is not None else 0
    return statistics.median(times), read


def slice_costs(engine, reps: int, g: torch.Generator) -> dict:
    """t_step, t_verify (B + 1 tokens), t_draft at a fixed position, each rolled back after."""
    model, vocab = engine.model, engine.config.vocab_size
    b = model.dspark.block_size
    state = engine.new_state()
    prompt = torch.randint(1000, vocab - 1000, (16,), generator=g).tolist()
    engine.step([prompt], [state])
    store = getattr(model, "store", None)

    def ids(k):
        return torch.randint(1000, vocab - 1000, (k,), generator=g).tolist()

    def step():
        engine.step([ids(1)], [state])
        state.rollback(1)

    def verify():
        engine.step([ids(b + 1)], [state], all_logits=True)
        state.rollback(b + 1)

    def draft():
        model.dspark_draft(state, ids(1)[0], lambda row: int(row.argmax()))

    out = {}
    for name, fn in (("step", step), ("verify", verify), ("draft", draft)):
        out[name], out[f"{name}_read"] = _timed(fn, reps, store)
    return out


def end_to_end(engine, tokens: int, g: torch.Generator) -> dict:
    prompt = torch.randint(1000, engine.config.vocab_size - 1000, (16,), generator=g).tolist()
    out = {}
    for kind, spec in (("plain", False), ("dspark", True)):
        t = time.perf_counter()
        r = engine.complete(prompt, max_tokens=tokens, temperature=0.0, ignore_eos=True, speculative=spec)
        out[kind] = len(r.token_ids) / (time.perf_counter() - t)
        if spec:
            out["accept"] = r.stats.accepted_tokens / max(r.stats.draft_tokens, 1)
    return out


def slice_one(args) -> None:
    """One configuration in this process (a fresh process per budget: freed memory stays with the
    allocator); prints a JSON line."""
    ram = None if args.one == "resident" else args.one
    engine = dsv4.load(args.out, dtype="bf16", max_ram=ram)
    g = torch.Generator().manual_seed(0)
    c = slice_costs(engine, args.reps, g)
    e2e = end_to_end(engine, args.tokens, g)
    print(
        json.dumps({"ram": args.one, **c, **e2e, "peak_rss_gb": engine.stats()["peak_rss_bytes"] / GB}),
        flush=True,
    )


def slice_bench(args) -> None:
    if args.quick:  # a 1024-wide slice (bench_offload.py --quick dimensions): small enough to run unlocked
        sys.path.insert(0, str(Path(__file__).parent))
        from bench_offload import ensure_checkpoint, slice_config

        ensure_checkpoint(args.slice, slice_config(12, 32, True))
    ensure_dspark_slice(args.slice, args.out, args.rank)
    rows = []
    for ram in args.configs.split(","):
        cmd = [sys.executable, __file__, "slice", "--one", ram, "--out", str(args.out), "--reps", str(args.reps),
               "--tokens", str(args.tokens), "--threads", str(args.threads)]  # fmt: skip
        line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        print(line, flush=True)
        r = json.loads(line)
        rows.append((r["ram"], r, r, r["peak_rss_gb"]))
    b = 5
    print(f"\nV4-Flash-dimension slice ({args.slice}, 12 layers, 32 experts) + random 3-stage DSpark draft, "
          f"bf16, {torch.get_num_threads()} thread(s), median of {args.reps}\n")  # fmt: skip
    print(
        "| experts | decode step | verify 6 tokens | draft (3 stages) | verify / step | read per step | "
        "read per verify | plain tok/s | DSpark tok/s (accept ~0) | break-even L | peak RSS |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for ram, c, e2e, rss in rows:
        cost = c["draft"] + c["verify"]
        print(f"| {ram} | {c['step'] * 1e3:.0f} ms | {c['verify'] * 1e3:.0f} ms | {c['draft'] * 1e3:.0f} ms | "
              f"{c['verify'] / c['step']:.2f}x | {c['step_read'] / 2**20:.0f} MiB | {c['verify_read'] / 2**20:.0f} MiB | "
              f"{e2e['plain']:.2f} | {e2e['dspark']:.2f} | {cost / c['step']:.2f} | {rss:.1f} GB |")  # fmt: skip
    lengths = [1, 1.5, 2, 2.5, 3, 3.5, 4, 5, b + 1]
    print(
        "\ntok/s as a function of the mean accepted length L (tokens per verify step, the target's own included):\n"
    )
    print("| experts | plain | " + " | ".join(f"L={x:g}" for x in lengths) + " |")
    print("|---|---|" + "---|" * len(lengths))
    for ram, c, _, _ in rows:
        cost = c["draft"] + c["verify"]
        print(f"| {ram} | {1 / c['step']:.2f} | " + " | ".join(f"{x / cost:.2f}" for x in lengths) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["demo", "slice"])
    ap.add_argument("--tokens", type=int, default=None, help="tokens per run (demo 96, slice 12)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--slice", type=Path, default=Path("/tmp/dsv4-flash-slice"))
    ap.add_argument(
        "--out", type=Path, default=Path("/tmp/dsparktrain-slice"), help="the 0731 variant of the slice"
    )
    ap.add_argument("--configs", default="resident,8G", help="slice runs: resident and/or RAM budgets")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument(
        "--quick", action="store_true", help="write and use a 1024-wide slice at --slice (2.3 GB)"
    )
    ap.add_argument("--rank", type=int, default=256, help="Markov rank of the slice's draft (Flash: 256)")
    ap.add_argument("--reps", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.tokens = args.tokens or (96 if args.what == "demo" else 12)
    (demo if args.what == "demo" else slice_one if args.one else slice_bench)(args)


if __name__ == "__main__":
    sys.exit(main())
