"""Benchmark the quantized-weight matmuls against the machine's memory read bandwidth.

Measures the read bandwidth (`tensor.sum()` over 512 MB, best of several, at the start and at the
end), then the GB/s of weight bytes (codes + scales) that `dsv4.kernels.mxfp4_linear` /
`fp8_linear` stream for batches of 1, 4, 32 and 128 rows of x, compiled kernels against the
plain-torch fallback, cycling through enough distinct weights that they do not sit in cache.
Prints a markdown table; "% of bw" is of the better of the two bandwidth measurements. Timings
are medians over calls, each call on a weight not read since the previous pass. A script, not a
test: nothing here asserts a time.

    python3 bench/bench_kernels.py [--quick] [--threads N] [--mb MB] [--dtype bfloat16] [--batches 1,4]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from dsv4 import kernels
from dsv4.plan import measure_ram_gbs
from dsv4.quant import quantize_fp8_block, quantize_mxfp4

BATCHES = (1, 4, 32, 128)
MXFP4_SHAPES = ((4096, 2048), (2048, 4096))  # expert w1/w3 and w2 of V4-Flash width
FP8_SHAPES = ((4096, 4096), (1024, 4096), (32768, 1024))
HEADER = [
    "| format | weight x count | batch | compiled GB/s | % of bw | compiled GFLOP/s | torch GB/s | % of bw | speedup |",
    "|---|---|---|---|---|---|---|---|---|",
]


def read_bandwidth(reps: int) -> float:
    return measure_ram_gbs(512 << 20, reps)  # the planner's probe, over 512 MB


def make_weights(fmt: str, shape: tuple[int, int], total_mb: int) -> list[tuple]:
    """Distinct weights of one shape totalling ~total_mb; copies of one random weight are enough."""
    w = torch.randn(shape) * 0.02
    q, s = quantize_mxfp4(w) if fmt == "mxfp4" else quantize_fp8_block(w)
    n = max(2, total_mb * 2**20 // (q.numel() + s.numel() * s.element_size()))
    return [(q.clone(), s.clone()) for _ in range(n)]


def time_calls(fn, weights, x, budget_s: float) -> float:
    """Median seconds per call, cycling through `weights` until budget_s is spent (3 calls at least).

    Per call and the median, not a pass and the mean: on a shared machine a call that waits out
    another process's time slice costs milliseconds, and a few of those swamp a pass.
    """
    fn(x, *weights[0])  # first call: build, allocator warm-up
    times, start = [], time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < budget_s:
        q, s = weights[len(times) % len(weights)]
        t0 = time.perf_counter()
        fn(x, q, s)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def bench_case(fmt: str, shape, weights, batches, budget_s: float, dtype) -> list[dict]:
    fns = {
        "mxfp4": (kernels.mxfp4_linear, kernels.mxfp4_linear_torch),
        "fp8": (kernels.fp8_linear, kernels.fp8_linear_torch),
    }[fmt]
    q, s = weights[0]
    out = []
    for m in batches:
        x = torch.randn(m, shape[1]).to(dtype)
        r = {"fmt": fmt, "shape": shape, "count": len(weights), "batch": m}
        r["bytes"] = q.numel() + s.numel() * s.element_size()
        r["flops"] = 2 * m * shape[0] * shape[1]
        r["compiled"] = time_calls(fns[0], weights, x, budget_s) if kernels.available() else None
        # The fallback is compute-bound (ms per call): three calls say enough.
        r["torch"] = time_calls(fns[1], weights, x, 0)
        c = f"{r['bytes'] / r['compiled'] / 1e9:.1f} GB/s" if r["compiled"] else "-"
        print(
            f"{fmt} {shape[0]}x{shape[1]} batch {m}: compiled {c}, torch {r['bytes'] / r['torch'] / 1e9:.2f} GB/s"
        )
        out.append(r)
    return out


def table(results: list[dict], bw: float) -> list[str]:
    rows = list(HEADER)
    for r in results:
        c, t = r["compiled"], r["torch"]
        gb_t = r["bytes"] / t / 1e9
        comp = "- | - | - | "
        if c:
            gb_c = r["bytes"] / c / 1e9
            comp = f"{gb_c:.1f} | {100 * gb_c / bw:.0f} % | {r['flops'] / c / 1e9:.0f} | "
        rows.append(
            f"| {r['fmt']} | {r['shape'][0]}x{r['shape'][1]} x{r['count']} | {r['batch']} | {comp}"
            f"{gb_t:.2f} | {100 * gb_t / bw:.1f} % | " + (f"{t / c:.0f}x |" if c else "- |")
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer weights, batches 1 and 32, shorter timing")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--mb", type=int, default=None, help="MB of weights per shape (default 640, quick 320)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="dtype of x")
    ap.add_argument(
        "--batches", type=str, default=None, help="comma-separated rows of x (default 1,4,32,128)"
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    total_mb = args.mb or (320 if args.quick else 640)
    batches = (1, 32) if args.quick else BATCHES
    if args.batches:
        batches = tuple(int(b) for b in args.batches.split(","))
    budget_s = 0.5 if args.quick else 1.5
    dtype = getattr(torch, args.dtype)

    t0 = time.perf_counter()
    built = kernels.available()
    load = os.getloadavg()[0]
    print(
        f"threads {torch.get_num_threads()}, x {args.dtype}, compiled kernels: {built} "
        f"({time.perf_counter() - t0:.1f} s to load), load average {load:.2f}"
    )
    bw_start = read_bandwidth(4 if args.quick else 8)
    print(f"memory read bandwidth (sum over 512 MB): {bw_start:.1f} GB/s")
    results = []
    for fmt, shapes in (("mxfp4", MXFP4_SHAPES), ("fp8", FP8_SHAPES)):
        for shape in shapes:
            weights = make_weights(fmt, shape, total_mb)
            results += bench_case(fmt, shape, weights, batches, budget_s, dtype)
            del weights
    bw_end = read_bandwidth(4 if args.quick else 8)
    bw = max(bw_start, bw_end)
    print(
        f"\nread bandwidth {bw_start:.1f} GB/s at the start, {bw_end:.1f} at the end; load average "
        f"{load:.2f} -> {os.getloadavg()[0]:.2f} (other work on the machine lowers every figure)"
    )
    print(f"GB/s counts the weight codes + scales one call reads; % is of {bw:.1f} GB/s\n")
    print("\n".join(table(results, bw)))


if __name__ == "__main__":
    main()
