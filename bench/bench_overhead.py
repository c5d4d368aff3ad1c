"""Benchmark the per-token fixed cost: dsv4 against llama.cpp on checkpoints where weights hardly matter.

Models (official layout, random weights, written once under --dir with the repo's writer):
  demo   the bundled dsv4/demo (6 layers, dim 256, 4k vocabulary; no GGUF: its tokenizer is not the release's)
  tiny   6 layers, dim 256, 8 experts, the real 129k vocabulary and tokenizer.json
  small  8 layers, dim 1024, 16 experts, the real vocabulary
  flash  the V4-Flash-dimension slice of bench_offload.py (/tmp/dsv4-flash-slice), run under
         `flock /tmp/bigmem.lock`; llama.cpp on it only with --flash-llama (its GGUF is large)

Per model, engine (dsv4; llama.cpp through llama-cpp-python on a q8_0 GGUF made by the converter of
its own source distribution, as bench_offload.py does), thread count and load (quiet, or next to a
busy-looping process): prefill tok/s of a 64-token prompt and greedy decode tok/s, each case in a
fresh process. For dsv4 also the ATen ops one decode step dispatches (torch.profiler, nested ops
included) and ms per layer per decoded token (1000 / decode tok/s / layers: on tiny models nearly
all of it is fixed cost); with --batch N also tok/s of N sequences decoding together (one token each
per step, as the server batches them). Prints a markdown table, writes bench/results/overhead.md and
overhead.png.

A script, not a test.

    python3 bench/bench_overhead.py [--models demo,tiny,small,flash] [--threads 1,2] [--loads quiet,busy]
                                    [--decode-tokens 48] [--skip-llama] [--flash-llama] [--batch 16] [--out NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))  # run from a checkout: dsv4 is the folder next to bench/
sys.path.insert(0, str(BENCH))
import bench_offload  # noqa: E402  (the slice's config, the GGUF conversion, the llama.cpp worker)

DEMO = BENCH.parent / "dsv4" / "demo"
FLASH = Path("/tmp/dsv4-flash-slice")
PROMPT_TOKENS = 64


def model_configs() -> dict[str, dict]:
    """config.json of the written models (flash: bench_offload's slice, 12 layers x 32 experts)."""
    from dsv4.tiny import tiny_config

    common = dict(vocab_size=129280, qk_rope_head_dim=64, num_experts_per_tok=6, n_shared_experts=1,
                  num_hash_layers=3, sliding_window=128, num_nextn_predict_layers=0)  # fmt: skip
    tiny = tiny_config(num_hidden_layers=6, hidden_size=256, num_attention_heads=4, head_dim=128, q_lora_rank=128,
                       o_groups=2, o_lora_rank=128, n_routed_experts=8, moe_intermediate_size=256, index_n_heads=4,
                       index_head_dim=64, index_topk=16, compress_ratios=[0, 0, 4, 128, 4, 128, 0], **common)  # fmt: skip
    small = tiny_config(num_hidden_layers=8, hidden_size=1024, num_attention_heads=16, head_dim=512,
                        q_lora_rank=512, o_groups=4, o_lora_rank=512, n_routed_experts=16, moe_intermediate_size=1024,
                        index_n_heads=16, index_head_dim=128, index_topk=64,
                        compress_ratios=[0, 0, 4, 128, 4, 128, 4, 128, 0], **common)  # fmt: skip
    return {"tiny": tiny, "small": small, "flash": bench_offload.slice_config(12, 32, False)}


@dataclass
class Case:
    model: str
    engine: str
    threads: int
    load: str  # quiet | busy
    prefill_tps: float = 0.0
    decode_tps: float = 0.0
    aten_ops: int = 0  # per decode step (dsv4)
    batch_tps: float = 0.0  # dsv4: --batch sequences decoding together, tokens/s of all of them
    layers: int = 0
    loadavg: float = 0.0
    error: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def ms_per_layer(self) -> float:
        return 1000 / self.decode_tps / self.layers if self.decode_tps and self.layers else 0.0


# ---- workers (fresh processes) ----


def count_aten_ops(model, state, token: int) -> int:
    """ATen ops (nested ones included) that one decode step and its logits dispatch."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as p:
        batch = model.make_batch([[token]], [state])
        model.logits_from(model(batch, [state])[-1:])
    return sum(e.count for e in p.key_averages() if e.key.startswith("aten::"))


def worker_dsv4(spec: dict) -> dict:
    import dsv4  # noqa: I001  (before torch: it sets OMP_WAIT_POLICY for torch's OpenMP, as the CLI does)
    import torch

    torch.set_num_threads(spec["threads"])
    eng = dsv4.load(spec["dir"])
    eng.complete(spec["warmup"], max_tokens=4, temperature=0.0, ignore_eos=True)
    events = eng.stream(spec["ids"], max_tokens=spec["decode_tokens"], temperature=0.0, ignore_eos=True)
    for _ in events:
        pass
    stats = events.result().stats
    state = eng.new_state()
    with torch.inference_mode():
        eng.model(eng.model.make_batch([spec["ids"]], [state]), [state])
    ops = count_aten_ops(eng.model, state, spec["ids"][-1])
    from dsv4 import kernels

    return dict(prefill_tps=stats.prefill_tps, decode_tps=stats.decode_tps, aten_ops=ops,
                batch_tps=batched_decode_tps(eng, spec["ids"], spec.get("batch", 0)),
                extra={"kernels": kernels.isa() or "torch"})  # fmt: skip


def batched_decode_tps(eng, ids: list[int], batch: int, steps: int = 8, repeats: int = 5) -> float:
    """Tokens/s of `batch` sequences (the prompt, each shifted by one more token) decoding one token
    each per step, as the server's scheduler steps them (best of `repeats` runs of `steps` steps; the
    sampled tokens are fixed, so this times the model's step and its logits only); 0 when batch < 2."""
    import torch

    if batch < 2:
        return 0.0
    model = eng.model
    states = [eng.new_state() for _ in range(batch)]
    best = float("inf")
    with torch.inference_mode():
        for i, st in enumerate(states):
            model(model.make_batch([ids[i % len(ids) :] + ids[: i % len(ids)]], [st]), [st])
        for _ in range(repeats):
            t = time.perf_counter()
            for k in range(steps):
                step = [[ids[(i + k) % len(ids)]] for i in range(batch)]
                model.logits_from(model(model.make_batch(step, states), states))
            best = min(best, (time.perf_counter() - t) / steps)
    return batch / best


def worker_llama(spec: dict) -> dict:
    run = bench_offload.worker_llama({**spec, "case": spec["load"], "llama_extra_bufts": "auto"})
    return dict(prefill_tps=run.prefill_tps, decode_tps=run.decode_tps, extra=run.extra)


def worker_main(spec: dict) -> None:
    out = worker_dsv4(spec) if spec["engine"] == "dsv4" else worker_llama(spec)
    out["loadavg"] = os.getloadavg()[0]
    print("RESULT " + json.dumps(out), flush=True)


def run_case(spec: dict, n_layers: int, flock: bool) -> Case:
    """One case in a fresh interpreter, next to a busy-looping process when load is 'busy'."""
    case = Case(spec["model"], spec["engine"], spec["threads"], spec["load"], layers=n_layers)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    if flock:  # the Flash slice is 9 GB: never two such runs at once on a shared machine
        cmd = ["flock", "/tmp/bigmem.lock", *cmd]
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if spec["load"] == "busy" else None
    try:
        p = subprocess.run(cmd, capture_output=True, text=True)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        case.error = (
            f"exit {p.returncode}: " + " | ".join((p.stderr or p.stdout).strip().splitlines()[-3:])[:300]
        )
    else:
        for k, v in json.loads(lines[-1][len("RESULT ") :]).items():
            setattr(case, k, v)
    print(f"  {case.model} {case.engine} {case.threads}t {case.load}: "
          + (f"ERROR {case.error}" if case.error else f"prefill {case.prefill_tps:.1f} tok/s, decode "
             f"{case.decode_tps:.1f} tok/s, {case.ms_per_layer:.2f} ms/layer, {case.aten_ops} ATen ops/step"),
          flush=True)  # fmt: skip
    return case


# ---- the report ----


def table(cases: list[Case], batch: int = 0) -> str:
    rows = ["| model | threads | load | dsv4 prefill tok/s | dsv4 decode tok/s | ms / layer / token | ATen ops / step "
            "| llama.cpp prefill tok/s | llama.cpp decode tok/s | decode dsv4 / llama.cpp |"
            + (f" dsv4 decode, {batch} sequences, tok/s |" if batch else ""),
            "|" + "---|" * (11 if batch else 10)]  # fmt: skip
    keys = sorted(
        {(c.model, c.threads, c.load) for c in cases},
        key=lambda k: (MODELS.index(k[0]), k[1], k[2] != "quiet"),
    )
    for key in keys:
        d = next((c for c in cases if (c.model, c.threads, c.load) == key and c.engine == "dsv4"), None)
        ll = next((c for c in cases if (c.model, c.threads, c.load) == key and c.engine == "llama.cpp"), None)
        cells = [*map(str, key)]
        cells += (["failed: " + d.error, "", "", ""] if d and d.error else
                  [f"{d.prefill_tps:.1f}", f"{d.decode_tps:.1f}", f"{d.ms_per_layer:.2f}", f"{d.aten_ops:,}"] if d
                  else ["-"] * 4)  # fmt: skip
        cells += (["failed: " + ll.error, ""] if ll and ll.error else
                  [f"{ll.prefill_tps:.1f}", f"{ll.decode_tps:.1f}"] if ll else ["-", "-"])  # fmt: skip
        ratio = d.decode_tps / ll.decode_tps if d and ll and d.decode_tps and ll.decode_tps else None
        cells.append(f"{ratio:.2f}x" if ratio else "-")
        if batch:
            cells.append(f"{d.batch_tps:.1f}" if d and d.batch_tps else "-")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot(cases: list[Case], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [c for c in cases if not c.error]
    labels = sorted(
        {(c.model, c.threads, c.load) for c in ok}, key=lambda k: (MODELS.index(k[0]), k[1], k[2])
    )
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.8))
    for ax, metric in zip(axes, ("decode_tps", "prefill_tps"), strict=True):
        for j, engine in enumerate(("dsv4", "llama.cpp")):
            vals = [next((getattr(c, metric) for c in ok if (c.model, c.threads, c.load) == k and c.engine == engine), 0)
                    for k in labels]  # fmt: skip
            ax.bar([i + 0.4 * j for i in range(len(labels))], vals, width=0.4, label=engine)
        ax.set_yscale("log")
        ax.set_xticks(
            [i + 0.2 for i in range(len(labels))], [f"{m}\n{t}t {ld}" for m, t, ld in labels], fontsize=7
        )
        ax.set_title(metric.replace("_tps", " tok/s"))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


# ---- main ----

MODELS = ["demo", "tiny", "small", "flash"]


def prepare(name: str, a: argparse.Namespace) -> tuple[Path, Path | None, str]:
    """The model's folder, its GGUF (None: llama.cpp skipped) and why llama.cpp is skipped."""
    if name == "demo":
        return DEMO, None, "demo: no GGUF (its own 4k tokenizer)"
    if name == "flash":
        path = FLASH
        if not (path / "model.safetensors.index.json").exists():
            raise SystemExit(f"{path} is missing: write it with bench/bench_offload.py first")
        if not a.flash_llama or a.skip_llama:
            return path, None, "flash: llama.cpp skipped (--flash-llama; see offload.md)"
    else:
        path = a.dir / name
        bench_offload.ensure_checkpoint(path, model_configs()[name])
        if a.skip_llama:
            return path, None, ""
    gguf = path.with_name(path.name + ".gguf") if name != "flash" else a.dir / "flash.gguf"
    why = bench_offload.convert_gguf(path, gguf, a.llama_src)
    return path, (None if why else gguf), why


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="demo,tiny,small,flash")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--loads", default="quiet,busy")
    p.add_argument("--decode-tokens", type=int, default=48)
    p.add_argument(
        "--dir", type=Path, default=Path("/tmp/dsv4-overhead"), help="where tiny/small and GGUFs go"
    )
    p.add_argument("--skip-llama", action="store_true")
    p.add_argument("--batch", type=int, default=0,
                   help="also time dsv4 decoding this many sequences together (the server's batched steps)")  # fmt: skip
    p.add_argument(
        "--flash-llama", action="store_true", help="convert the Flash slice to GGUF and run llama.cpp"
    )
    p.add_argument("--llama-src", type=Path, default=Path("/tmp/llama-cpp-python-src"))
    p.add_argument("--out", default="overhead", help="results file stem under bench/results/")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    if a.worker:
        return worker_main(json.loads(a.worker))
    from dsv4.config import ModelConfig

    a.dir.mkdir(parents=True, exist_ok=True)
    cases, notes = [], []
    for name in a.models.split(","):
        path, gguf, why = prepare(name, a)
        if why:
            notes.append(why)
        n_layers = ModelConfig.from_file(path).n_layers
        ids, warm = bench_offload.prompt_ids(path, PROMPT_TOKENS)
        for threads in map(int, a.threads.split(",")):
            for load in a.loads.split(","):
                spec = dict(model=name, dir=str(path), gguf=str(gguf), ids=ids, warmup=warm, threads=threads,
                            load=load, decode_tokens=a.decode_tokens, batch=a.batch)  # fmt: skip
                cases.append(run_case({**spec, "engine": "dsv4"}, n_layers, flock=name == "flash"))
                if gguf is not None:
                    cases.append(run_case({**spec, "engine": "llama.cpp"}, n_layers, flock=name == "flash"))
    md = table(cases, a.batch)
    print(md)
    out = BENCH / "results"
    head = (f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: `python3 bench/bench_overhead.py "
            f"{' '.join(argv if argv is not None else sys.argv[1:])}`; {PROMPT_TOKENS}-token prompt, "
            f"{a.decode_tokens} greedy tokens, busy = next to a `while True: pass` process. {os.cpu_count()} CPUs.\n")  # fmt: skip
    (out / f"{a.out}.md").write_text(head + "\n" + md + "\n" + "".join(f"\n- {n}" for n in notes) + "\n")
    (out / f"{a.out}.json").write_text(json.dumps([asdict(c) for c in cases], indent=1))
    plot(cases, out / f"{a.out}.png")


if __name__ == "__main__":
    main()
