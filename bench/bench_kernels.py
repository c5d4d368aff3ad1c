"""Benchmark the quantized-weight matmuls against the machine's memory read bandwidth.

Measures the read bandwidth (`tensor.sum()` over 512 MB, best of several), then the GB/s of weight
bytes (codes + scales) that `dsv4.kernels.mxfp4_linear` / `fp8_linear` stream for batches of 1, 4,
32 and 128 rows, compiled kernels against the plain-torch fallback, cycling through enough distinct
weights that they do not sit in cache. Prints a markdown table. A script, not a test: nothing here
asserts a time.

    python3 bench/bench_kernels.py [--quick] [--threads N] [--mb MB]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from dsv4 import kernels
from dsv4.quant import quantize_fp8_block, quantize_mxfp4

BATCHES = (1, 4, 32, 128)
MXFP4_SHAPES = ((4096, 2048), (2048, 4096))  # expert w1/w3 and w2 of V4-Flash width
FP8_SHAPES = ((4096, 4096), (1024, 4096), (32768, 1024))


def read_bandwidth(reps: int) -> float:
    t = torch.ones(128 << 20)  # 512 MB of fp32
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        t.sum()
        best = min(best, time.perf_counter() - t0)
    return t.numel() * 4 / best / 1e9


def make_weights(fmt: str, shape: tuple[int, int], total_mb: int) -> list[tuple]:
    """Distinct weights of one shape totalling ~total_mb; copies of one random weight are enough."""
    w = torch.randn(shape) * 0.02
    q, s = quantize_mxfp4(w) if fmt == "mxfp4" else quantize_fp8_block(w)
    n = max(2, total_mb * 2**20 // (q.numel() + s.numel() * s.element_size()))
    return [(q.clone(), s.clone()) for _ in range(n)]


def time_pass(fn, weights, x, budget_s: float) -> float:
    """Best seconds per call over passes through `weights`, repeated until budget_s is spent.

    The best pass, not the mean: on a shared machine the other tenants only ever slow a pass down.
    """
    fn(x, *weights[0])  # first call: build, allocator warm-up
    best, start = float("inf"), time.perf_counter()
    while True:
        t0 = time.perf_counter()
        calls = 0
        for q, s in weights:
            fn(x, q, s)
            calls += 1
            if time.perf_counter() - t0 > budget_s:
                break  # a slow case: part of one pass says enough
        best = min(best, (time.perf_counter() - t0) / calls)
        if time.perf_counter() - start > budget_s:
            return best


def bench_case(fmt, shape, weights, batches, bw, budget_s, dtype, rows):
    if fmt == "mxfp4":
        fns = {"compiled": kernels.mxfp4_linear, "torch": kernels.mxfp4_linear_torch}
    else:
        fns = {"compiled": kernels.fp8_linear, "torch": kernels.fp8_linear_torch}
    q, s = weights[0]
    nbytes = q.numel() + s.numel() * s.element_size()
    in_f = shape[1]
    for m in batches:
        x = torch.randn(m, in_f).to(dtype)
        res = {"compiled": None}
        if kernels.available():
            res["compiled"] = time_pass(fns["compiled"], weights, x, budget_s)
        # The fallback is compute-bound (ms per call): a few weights, one pass, say enough.
        res["torch"] = time_pass(fns["torch"], weights[:3], x, 0)
        c, t = res["compiled"], res["torch"]
        gbs = {k: (nbytes / v / 1e9 if v else None) for k, v in res.items()}
        flops = 2 * m * shape[0] * in_f
        rows.append(
            f"| {fmt} | {shape[0]}x{in_f} x{len(weights)} | {m} | "
            + (
                f"{gbs['compiled']:.1f} | {100 * gbs['compiled'] / bw:.0f} % | {flops / c / 1e9:.0f} | "
                if c
                else "- | - | - | "
            )
            + f"{gbs['torch']:.2f} | {100 * gbs['torch'] / bw:.1f} % | "
            + (f"{t / c:.0f}x |" if c else "- |")
        )
        print(rows[-1], flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer weights, batches 1 and 32, shorter timing")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--mb", type=int, default=None, help="MB of weights per shape (default 640, quick 320)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="dtype of x")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    total_mb = args.mb or (320 if args.quick else 640)
    batches = (1, 32) if args.quick else BATCHES
    budget_s = 0.5 if args.quick else 1.5
    dtype = getattr(torch, args.dtype)

    t0 = time.perf_counter()
    built = kernels.available()
    load = os.getloadavg()[0]
    print(
        f"threads {torch.get_num_threads()}, x {args.dtype}, compiled kernels: {built} "
        f"({time.perf_counter() - t0:.1f} s to load), load average {load:.2f}"
    )
    bw = read_bandwidth(4 if args.quick else 8)
    print(f"memory read bandwidth (sum over 512 MB): {bw:.1f} GB/s\n")
    rows = [
        "| format | weight x count | batch | compiled GB/s | % of bw | compiled GFLOP/s | torch GB/s | % of bw | speedup |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(rows), flush=True)
    for fmt, shapes in (("mxfp4", MXFP4_SHAPES), ("fp8", FP8_SHAPES)):
        for shape in shapes:
            weights = make_weights(fmt, shape, total_mb)
            bench_case(fmt, shape, weights, batches, bw, budget_s, dtype, rows)
            del weights
    bw_end = read_bandwidth(4)
    print(
        f"\nread bandwidth {bw:.1f} GB/s at the start, {bw_end:.1f} at the end; load average "
        f"{load:.2f} -> {os.getloadavg()[0]:.2f} (other work on the machine lowers every figure)"
    )
    print("GB/s counts the weight codes + scales one call reads; % is of the start bandwidth\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
