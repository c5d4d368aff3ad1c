"""Benchmark the HTTP server: aggregate tokens/s with 1, 4 and 16 concurrent streaming clients.

Starts `python -m dsv4.server` in a subprocess (a random tiny checkpoint with the official vocabulary
unless --model is given), warms it up, then for each concurrency level opens that many streaming
/v1/chat/completions requests at once (greedy, ignore_eos, a fixed max_tokens, distinct prompts) and
measures wall time from the first request to the last token, time to first token and per-stream rates.
--baseline also runs the same batches straight through the engine's Scheduler in this process (after
the server has stopped, from a second thread as the server's worker does), to show what HTTP and
streaming cost. Prints a markdown table. A script, not a
test: nothing here asserts a time.

    python3 bench/bench_server.py [--model DIR] [--streams 1 4 16] [--max-tokens 64] [--baseline]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def tiny_checkpoint(out: Path) -> Path:
    """The tests' "vocab" tiny config: the official 129,280-token vocabulary, so the chat format works."""
    from dsv4.config import ModelConfig
    from dsv4.tiny import random_weights, tiny_config
    from dsv4.writer import write_checkpoint

    raw = tiny_config(
        vocab_size=129280, num_hidden_layers=3, compress_ratios=[0, 4, 128, 0], num_hash_layers=1
    )
    write_checkpoint(out, raw, random_weights(ModelConfig.from_dict(raw), seed=0))
    return out


def start_server(model: Path, dtype: str, max_running: int, extra: Sequence[str] = (),
                 wait_s: float = 60.0) -> tuple[subprocess.Popen, str]:  # fmt: skip
    """`python -m dsv4.server` on a free port (`extra`: more server flags), once /health answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "dsv4.server", "--model", str(model), "--dtype", dtype, "--port", str(port),
           "--max-running", str(max_running), "--log-level", "warning", *extra]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(int(wait_s * 10)):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}")
        time.sleep(0.1)
    proc.terminate()
    raise RuntimeError(f"the server did not become healthy within {wait_s:.0f} s")


async def one_stream(
    client: httpx.AsyncClient, url: str, model: str, i: int, max_tokens: int, t0: float
) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": f"Tell story number {i}."}], "stream": True,
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream_options": {"include_usage": True}}  # fmt: skip
    first = last = None
    tokens = 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif any(
                c["delta"].get("content") or c["delta"].get("reasoning_content") for c in chunk["choices"]
            ):
                last = time.perf_counter()
                first = first or last
    return {"tokens": tokens, "ttft": (first or t0) - t0, "first": first or t0, "last": last or t0}


async def run_level(url: str, model: str, streams: int, max_tokens: int) -> dict:
    async with httpx.AsyncClient(timeout=600) as client:
        t0 = time.perf_counter()
        outs = await asyncio.gather(
            *(one_stream(client, url, model, i, max_tokens, t0) for i in range(streams))
        )
    wall = max(o["last"] for o in outs) - t0
    total = sum(o["tokens"] for o in outs)
    per = [(o["tokens"] - 1) / (o["last"] - o["first"]) for o in outs if o["last"] > o["first"]]
    return {"streams": streams, "tokens": total, "wall": wall, "agg": total / wall,
            "per": sum(per) / max(len(per), 1), "ttft": sum(o["ttft"] for o in outs) / streams}  # fmt: skip


def engine_baseline(model: Path, dtype: str, levels: list[int], max_tokens: int) -> dict[int, float]:
    """Tokens/s of the same batches through the engine's scheduler directly (no HTTP), after a warm-up."""
    import dsv4  # noqa: I001  (before torch: it sets OMP_WAIT_POLICY for torch's OpenMP, as the CLI does)
    import torch
    from dsv4.generate import Scheduler
    from dsv4.sampling import SamplingParams

    engine = dsv4.load(model, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])

    def run(streams: int, tokens: int) -> float:
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        sched = Scheduler(engine, max_running=streams)
        for i in range(streams):
            ids = engine.encode([{"role": "user", "content": f"Tell story number {i}."}])
            sched.add(engine.sequence(ids, params))
        t0 = time.perf_counter()
        n = sum(1 for ev in sched.run() if ev.token_id is not None)
        return n / (time.perf_counter() - t0)

    def measure() -> None:
        run(2, 8)
        out.update({n: run(n, max_tokens) for n in levels})

    # on the server's terms: from a second thread, as its worker runs (on a busy machine torch's OpenMP
    # team in the main thread can be many times slower than in another thread)
    out: dict[int, float] = {}
    thread = threading.Thread(target=measure)
    thread.start()
    thread.join()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: a random tiny one)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--baseline", action="store_true", help="also time the engine alone on the same batches")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or tiny_checkpoint(Path(tmp) / "tiny")
        proc, url = start_server(model, args.dtype, max(args.streams))
        try:
            name = httpx.get(url + "/v1/models").json()["data"][0]["id"]
            asyncio.run(run_level(url, name, 2, 8))  # warm-up
            rows = [asyncio.run(run_level(url, name, n, args.max_tokens)) for n in args.streams]
        finally:
            proc.terminate()
            proc.wait(30)
        base = engine_baseline(model, args.dtype, args.streams, args.max_tokens) if args.baseline else {}
    print(f"\nserver: {name}, {args.dtype}, {args.max_tokens} tokens per stream, greedy, torch threads "
          f"{os.environ.get('OMP_NUM_THREADS', 'default')}\n")  # fmt: skip
    head = "| streams | tokens | wall s | aggregate tok/s | per-stream tok/s | mean TTFT s |"
    print(head + (" engine alone tok/s |" if base else ""))
    print("|---:" * (6 + bool(base)) + "|")
    for r in rows:
        line = (f"| {r['streams']} | {r['tokens']} | {r['wall']:.2f} | {r['agg']:.1f} | {r['per']:.1f} | "
                f"{r['ttft']:.3f} |")  # fmt: skip
        print(line + (f" {base[r['streams']]:.1f} |" if base else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
