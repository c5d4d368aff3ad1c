"""Benchmark expert offload on a V4-Flash-dimension slice: dsv4 against llama.cpp, in RAM and under a budget.

Writes (once, cached in --dir) a slice of V4-Flash in the official layout with random weights (FP8
dense, MXFP4 experts, the real vocabulary and tokenizer.json), measures this machine's RAM and disk
read bandwidth, then runs each engine in a fresh process:

  ram      everything resident, files read into the page cache first (dsv4 `max_ram=None`;
           llama.cpp mmap); CPU-bound and short, so the best of --repeat tries, engines taking turns
  budget   a RAM budget: the dense weights + a quarter of the routed-expert bytes + a runtime
           allowance (--budget overrides). dsv4 gets `max_ram=<budget>`; both engines run inside a
           memory cgroup of that size, page cache dropped first. dsv4 runs it with both cache
           policies (lfu, the default, and lru), then once more without the cgroup (is max_ram alone
           kept?), then both policies with `max_ram` sized so its expert cache holds a quarter of the
           experts (no cgroup: only expert misses reach the disk).

Per run: prefill tok/s (a 128-token prompt of English text), greedy decode tok/s, achieved GB/s
(bytes a decoded token must read, from the checkpoint: dense weights less the embedding, plus the
active experts, times decode tok/s) against the measured RAM bandwidth, peak RSS (VmHWM of the
worker), expert-cache hit rate and disk bytes read per decoded token. llama.cpp (the PyPI package
llama-cpp-python) runs a GGUF made by the converter its own source distribution ships. Prints a
markdown table, writes it to bench/results/offload.md and a plot to bench/results/offload.png.

A script, not a test. Needs root for the page-cache drop and the cgroup (skipped with a note otherwise).

    python3 bench/bench_offload.py [--dir DIR] [--layers 12] [--experts 32] [--decode-tokens 64]
                                   [--budget 6G] [--repeat 3] [--skip-llama] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(RESULTS.parent.parent))  # run from a checkout: dsv4 is the folder next to bench/
GB = 1e9

# Our own prose (not from any dataset), long enough for 128 tokens with room to spare.
PROMPT_TEXT = (
    "The lighthouse keeper had kept a logbook for thirty years, and every entry began the same way: the "
    "date, the direction of the wind, and the colour of the sea at dawn. Most mornings the sea was grey. "
    "On a few it was the green of bottle glass, and once, after a storm that took the roof off the boat "
    "shed, it was almost black. When the harbour office finally replaced the lamp with an automatic "
    "beacon, they asked him what he wanted to do with the books. He said he would keep them, because a "
    "record of ordinary weather is only boring until the weather stops being ordinary. Then he packed "
    "the volumes into four wooden crates, labelled each one with the years it held, and carried them "
    "down the spiral stairs one at a time, resting on every landing to look out of the narrow windows "
    "at the water he had watched for most of his life."
)
WARMUP_TEXT = "Warm-up: the quick brown fox jumps over the lazy dog while the kettle boils on the stove."


# ---- the slice ----


def slice_config(layers: int, experts: int, quick: bool) -> dict:
    """Official config.json of the slice: V4-Flash dimensions (or much smaller ones for --quick)."""
    from dsv4.tiny import tiny_config

    ratios = ([0, 0] + [4, 128] * layers)[:layers] + [0]  # Flash's pattern, the last entry the MTP layer's
    dims = dict(hidden_size=4096, num_attention_heads=64, head_dim=512, q_lora_rank=1024, o_groups=8,
                o_lora_rank=1024, moe_intermediate_size=2048, index_n_heads=64, index_head_dim=128,
                index_topk=512)  # fmt: skip
    if quick:
        dims = dict(hidden_size=1024, num_attention_heads=16, head_dim=512, q_lora_rank=512, o_groups=4,
                    o_lora_rank=512, moe_intermediate_size=2048, index_n_heads=16, index_head_dim=128,
                    index_topk=64)  # fmt: skip
    return tiny_config(vocab_size=129280, num_hidden_layers=layers, qk_rope_head_dim=64,
                       n_routed_experts=experts, num_experts_per_tok=6, n_shared_experts=1,
                       num_hash_layers=3, sliding_window=128, compress_ratios=ratios,
                       num_nextn_predict_layers=0, **dims)  # fmt: skip


def ensure_checkpoint(path: Path, cfg: dict) -> None:
    """Write the slice unless `path` already holds one with this exact config."""
    done = path / "model.safetensors.index.json"
    if done.exists() and json.loads((path / "config.json").read_text()) == cfg:
        print(f"slice: reusing {path}", flush=True)
        return
    from dsv4.tokenizer import official_tokenizer_file
    from dsv4.writer import write_checkpoint

    if path.exists():
        shutil.rmtree(path)
    t = time.perf_counter()
    print(f"slice: writing {path} (random FP8/MXFP4 bytes, streamed shard by shard) ...", flush=True)
    write_checkpoint(path, cfg, None, shard_bytes=2 << 30)
    shutil.copy(official_tokenizer_file(), path / "tokenizer.json")
    # The release ships one too; transformers' AutoTokenizer (llama.cpp's converter) wants it.
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<｜begin▁of▁sentence｜>",
        "eos_token": "<｜end▁of▁sentence｜>", "add_bos_token": False, "model_max_length": 1048576}))  # fmt: skip
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    print(f"slice: {size / GB:.2f} GB in {time.perf_counter() - t:.0f} s", flush=True)


@dataclass
class Shape:
    """What the checkpoint implies for one decoded token, and the budget derived from it."""

    total_bytes: int
    dense_bytes: int  # everything but routed experts (embedding included)
    expert_bytes: int  # all routed experts
    read_per_token: int  # dense less the embedding (one row is read), plus the active experts
    budget: int  # bytes for the budget case
    ram_gbs: float = 0.0  # the best of the measurements before and after the runs
    ram_gbs_seen: list[float] = field(default_factory=list)
    disk_gbs: float = 0.0


def measure(path: Path, budget: int | None, allowance: int) -> Shape:

    from dsv4.checkpoint import Checkpoint
    from dsv4.config import ModelConfig
    from dsv4.inspect import summarize
    from dsv4.plan import measure_disk_gbs

    cfg, ckpt = ModelConfig.from_file(path), Checkpoint(path)
    s = summarize(ckpt, cfg)
    active = s.expert_bytes * cfg.n_activated_experts // cfg.n_routed_experts
    per_token = s.dense_bytes - ckpt.nbytes("embed.weight") + active
    budget = budget or s.dense_bytes + s.expert_bytes // 4 + allowance
    shape = Shape(s.dense_bytes + s.expert_bytes, s.dense_bytes, s.expert_bytes, per_token, budget)
    shape.ram_gbs = ram_bandwidth(shape)
    shape.disk_gbs = measure_disk_gbs(ckpt, nbytes=1 << 30)
    ckpt.close()
    return shape


def ram_bandwidth(shape: Shape) -> float:
    """Measure the RAM read bandwidth (all cores, best of 15 sums over 512 MB) and keep the best so far:
    on a shared machine other tenants only ever lower a measurement."""
    import torch

    from dsv4.plan import measure_ram_gbs

    torch.set_num_threads(os.cpu_count() or 1)
    shape.ram_gbs_seen.append(max(measure_ram_gbs(512 << 20, repeats=5) for _ in range(3)))
    return max(shape.ram_gbs_seen)


def prompt_ids(path: Path, n: int) -> tuple[list[int], list[int]]:
    """BOS + the first n-1 tokens of the prompt text, and a short warm-up prompt (different text)."""
    from dsv4.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(path)
    ids = [tok.bos_id, *tok.encode(PROMPT_TEXT)][:n]
    if len(ids) < n:
        raise ValueError(f"the prompt text gives {len(ids)} tokens, fewer than --prompt-tokens {n}")
    return ids, [tok.bos_id, *tok.encode(WARMUP_TEXT)]


# ---- the machine: page cache, memory cgroup, load ----


def drop_page_cache() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError as e:
        print(f"note: cannot drop the page cache ({e}); budget runs start with a warm cache", flush=True)
        return False


class MemoryCgroup:
    """A memory cgroup (v1 if mounted, else v2) limiting the processes started inside it."""

    def __init__(self, name: str, limit: int):
        v1, v2 = Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup")
        self.v1 = (v1 / "memory.limit_in_bytes").exists()
        if not self.v1 and "memory" not in (v2 / "cgroup.controllers").read_text():
            raise OSError("no memory cgroup controller (neither v1 nor v2)")
        self.path = (v1 if self.v1 else v2) / name
        self.path.mkdir(exist_ok=True)
        (self.path / ("memory.limit_in_bytes" if self.v1 else "memory.max")).write_text(str(limit))
        if self.v1:
            (self.path / "memory.max_usage_in_bytes").write_text("0")

    def enter(self) -> None:
        """Move the calling process in (used as a subprocess's preexec_fn)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak(self) -> int:
        f = "memory.max_usage_in_bytes" if self.v1 else "memory.peak"
        return int((self.path / f).read_text().split()[0])

    def close(self) -> None:
        for _ in range(20):  # the kernel may still be tearing the last process down
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.25)


def loadavg() -> float:
    return os.getloadavg()[0]


# ---- one run, in a fresh worker process ----


@dataclass
class Run:
    engine: str
    case: str
    prefill_tps: float = 0.0
    decode_tps: float = 0.0
    peak_rss: int = 0
    cgroup_peak: int = 0
    hit_rate: float | None = None  # decode phase
    hit_rate_all: float | None = None  # prefill + decode
    disk_per_token: int = 0  # bytes read from disk per decoded token
    load_seconds: float = 0.0
    cache_budget: int | None = None
    max_ram: int | None = None
    loadavg: float = 0.0
    error: str = ""
    extra: dict = field(default_factory=dict)


def run_worker(spec: dict, cgroup: MemoryCgroup | None) -> Run:
    """Run one case in a fresh interpreter (inside `cgroup` if given); its last output line is the Run."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=cgroup.enter if cgroup else None)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        why = (
            "killed by the kernel (out of memory in the cgroup?)"
            if p.returncode == -9
            else f"exit {p.returncode}"
        )
        tail = " | ".join((p.stderr or p.stdout).strip().splitlines()[-3:])
        run = Run(spec["engine"], spec["case"], error=f"{why}: {tail}"[:400])
    else:
        run = Run(**json.loads(lines[-1][len("RESULT ") :]))
    run.max_ram = spec["max_ram"]
    if cgroup is not None:
        run.cgroup_peak = cgroup.peak()
    if spec["engine"] == "dsv4-size":
        return run
    print(f"  {run.engine} {run.case}: {time.perf_counter() - t:.0f} s "
          + (f"ERROR {run.error}" if run.error else f"prefill {run.prefill_tps:.2f} tok/s, decode {run.decode_tps:.2f} tok/s, "
             f"peak RSS {run.peak_rss / GB:.2f} GB"), flush=True)  # fmt: skip
    return run


def _read_bytes() -> int:
    """Bytes this process caused to be read from storage (page faults on mmap included)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def worker_dsv4(spec: dict) -> Run:
    import dsv4  # noqa: I001  (before torch: it sets OMP_WAIT_POLICY for torch's OpenMP, as the CLI does)
    import torch
    from dsv4.memory import peak_rss_bytes, rss_bytes

    torch.set_num_threads(spec["threads"])
    t = time.perf_counter()
    eng = dsv4.load(spec["dir"], max_ram=spec["max_ram"], cache_policy=spec.get("policy", "lfu"))
    run = Run("dsv4", spec["case"], load_seconds=time.perf_counter() - t)
    rss_loaded = rss_bytes()
    store = eng.model.store
    if store is not None and spec.get("min_guess_accuracy") is not None:  # early-routing prefetch on/off
        store.min_guess_accuracy = spec["min_guess_accuracy"]
    eng.complete(spec["warmup"], max_tokens=4, temperature=0.0, ignore_eos=True)
    snap = lambda: (store.stats.hits, store.stats.misses) if store else (0, 0)  # noqa: E731
    start = snap()
    events = eng.stream(spec["ids"], max_tokens=spec["decode_tokens"], temperature=0.0, ignore_eos=True)
    next(events)  # the first token: the prefill is done
    mid, disk = snap(), _read_bytes()
    for _ in events:
        pass
    end, stats = snap(), events.result().stats
    run.prefill_tps, run.decode_tps = stats.prefill_tps, stats.decode_tps
    run.peak_rss = peak_rss_bytes()
    # all storage reads in decode: expert misses and prefetches, and page faults on mmap'd weights
    run.disk_per_token = (_read_bytes() - disk) // max(stats.generated_tokens - 1, 1)
    if store is not None:
        h, m = end[0] - mid[0], end[1] - mid[1]
        ha, ma = end[0] - start[0], end[1] - start[1]
        run.hit_rate, run.hit_rate_all = h / max(h + m, 1), ha / max(ha + ma, 1)
        run.cache_budget = store.budget_bytes
    run.extra = {"kernels": _kernels_backend(), "rss_after_load": rss_loaded,
                 "store": store.stats.as_dict() if store else None}  # fmt: skip
    return run


def _kernels_backend() -> str:
    from dsv4 import kernels

    return kernels.backend()


def worker_llama(spec: dict) -> Run:
    import ctypes

    import llama_cpp
    import numpy as np

    from dsv4.memory import peak_rss_bytes

    note = _llama_buffer_types(llama_cpp, spec["llama_extra_bufts"])
    t = time.perf_counter()
    llm = llama_cpp.Llama(model_path=spec["gguf"], n_ctx=1024, n_batch=512, n_ubatch=512, n_threads=spec["threads"],
                          n_threads_batch=spec["threads"], use_mmap=True, verbose=False)  # fmt: skip
    run = Run("llama.cpp", spec["case"], load_seconds=time.perf_counter() - t)
    n_vocab = llm.n_vocab()

    def greedy() -> int:
        ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        return int(
            np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(n_vocab,)).argmax()
        )

    def generate(ids: list[int], n: int) -> tuple[float, float, int]:
        """Prefill seconds, decode seconds (n-1 tokens after the prefill's), disk bytes read in decode."""
        llm.reset()  # the next eval overwrites the KV cache from position 0
        t0 = time.perf_counter()
        llm.eval(ids)
        tok, t1, disk = greedy(), time.perf_counter(), _read_bytes()
        for _ in range(n - 1):
            llm.eval([tok])
            tok = greedy()
        return t1 - t0, time.perf_counter() - t1, _read_bytes() - disk

    generate(spec["warmup"], 4)
    n = spec["decode_tokens"]
    prefill_s, decode_s, disk = generate(spec["ids"], n)
    run.prefill_tps, run.decode_tps = len(spec["ids"]) / prefill_s, (n - 1) / decode_s
    run.disk_per_token = disk // max(n - 1, 1)
    run.peak_rss = peak_rss_bytes()
    run.extra = {"llama_cpp_python": llama_cpp.__version__, "buffer_types": note}
    return run


def _llama_buffer_types(llama_cpp, mode: str) -> str:
    """Turn llama.cpp's extra weight buffer types (AMX, CPU_REPACK) off when asked, or by default on
    an AMX CPU: there, 0.3.36 puts DeepSeek-V4 weights in the AMX buffer and then aborts building
    the graph (GGML_ASSERT(*cur_backend_id != -1) in ggml_backend_sched_split_graph)."""
    amx = "amx_int8" in Path("/proc/cpuinfo").read_text()
    off = mode == "off" or (mode == "auto" and amx)
    if not off:
        return "default (extra buffer types on: repacked weights)"
    import llama_cpp.llama as module

    default = module.llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    module.llama_cpp.llama_model_default_params = params
    return "use_extra_bufts=false (plain mmap'd CPU buffers, no repack)" + (" - AMX CPU" if amx else "")


def worker_main(spec: dict) -> None:
    if spec["engine"] == "dsv4-size":
        import dsv4

        eng = dsv4.load(spec["dir"], max_ram=spec["max_ram"], cache_policy=spec["policy"])
        run = Run("dsv4", "size", cache_budget=eng.model.store.budget_bytes)
    else:
        run = worker_dsv4(spec) if spec["engine"] == "dsv4" else worker_llama(spec)
    run.loadavg = loadavg()
    print("RESULT " + json.dumps(asdict(run)), flush=True)


# ---- llama.cpp: the converter and the GGUF ----


def convert_gguf(ckpt: Path, gguf: Path, src_root: Path) -> str:
    """Convert the slice with the converter of llama-cpp-python's own sdist; '' or the reason it failed."""
    if gguf.exists() and gguf.stat().st_mtime > (ckpt / "model.safetensors.index.json").stat().st_mtime:
        print(f"llama.cpp: reusing {gguf}", flush=True)
        return ""
    try:
        import llama_cpp
    except ImportError as e:
        return f"llama-cpp-python is not installed ({e}); pip install llama-cpp-python==0.3.36"
    version = llama_cpp.__version__
    tree = src_root / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if not (tree / "convert_hf_to_gguf.py").exists():
        src_root.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                        f"llama-cpp-python=={version}", "-d", str(src_root)], check=True)  # fmt: skip
        with tarfile.open(src_root / f"llama_cpp_python-{version}.tar.gz") as tar:
            tar.extractall(src_root, filter="data")
    print(f"llama.cpp: converting with {tree / 'convert_hf_to_gguf.py'} ...", flush=True)
    t = time.perf_counter()
    tmp = gguf.with_suffix(".partial")
    cmd = [
        sys.executable,
        str(tree / "convert_hf_to_gguf.py"),
        str(ckpt),
        "--outfile",
        str(tmp),
        "--outtype",
        "q8_0",
    ]
    p = subprocess.run(
        cmd, capture_output=True, text=True
    )  # uses its own gguf-py (put on sys.path by the script)
    gguf.with_suffix(".convert.log").write_text(p.stdout + p.stderr)
    if p.returncode != 0:
        lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
        return f"convert_hf_to_gguf.py failed (exit {p.returncode}): {' | '.join(lines[-3:])}"
    tmp.rename(gguf)
    print(
        f"llama.cpp: {gguf} {gguf.stat().st_size / GB:.2f} GB in {time.perf_counter() - t:.0f} s", flush=True
    )
    return ""


# ---- the report ----


def table(runs: list[Run], shape: Shape) -> str:
    head = ("| engine | case | RAM limit | prefill tok/s | decode tok/s | achieved GB/s | % of RAM bw | peak RSS "
            "| expert cache | hit rate (decode) | guesses right | disk read / token |")  # fmt: skip
    rows = [head, "|" + "---|" * 12]
    for r in runs:
        limit = (
            "-" if r.max_ram is None else f"{r.max_ram / GB:.2f} GB" + (" (cgroup)" if r.cgroup_peak else "")
        )
        if r.error:
            rows.append(f"| {r.engine} | {r.case} | {limit} | failed: {r.error} |||||||||")
            continue
        gbs = shape.read_per_token * r.decode_tps / GB
        hit = "-" if r.hit_rate is None else f"{r.hit_rate:.1%}"
        store = r.extra.get("store") or {}
        guess = f"{store['guess_accuracy']:.0%}" if store.get("guessed") else "-"
        cache = (
            "-"
            if not r.cache_budget
            else f"{r.cache_budget / GB:.2f} GB ({r.cache_budget / shape.expert_bytes:.0%})"
        )
        rows.append(f"| {r.engine} | {r.case} | {limit} | {r.prefill_tps:.2f} | {r.decode_tps:.2f} | {gbs:.2f} | "
                    f"{gbs / shape.ram_gbs:.0%} | {r.peak_rss / GB:.2f} GB | {cache} | {hit} | {guess} | "
                    f"{r.disk_per_token / GB:.3f} GB |")  # fmt: skip
    return "\n".join(rows)


def plot(runs: list[Run], shape: Shape, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in runs if not r.error]
    labels = [f"{r.engine}\n{r.case}" for r in ok]
    colors = ["tab:blue" if r.engine == "dsv4" else "tab:orange" for r in ok]
    panels = [("decode tok/s", [r.decode_tps for r in ok], GB / shape.read_per_token * shape.ram_gbs),
              ("prefill tok/s", [r.prefill_tps for r in ok], None),
              ("peak RSS (GB)", [r.peak_rss / GB for r in ok], shape.budget / GB)]  # fmt: skip
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    for ax, (title, values, line) in zip(axes, panels, strict=True):
        ax.bar(range(len(ok)), values, color=colors)
        ax.set_xticks(range(len(ok)), labels, fontsize=7, rotation=30, ha="right")
        ax.set_title(title)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
        if line:
            what = "RAM-bandwidth bound" if "decode" in title else "budget"
            ax.axhline(line, color="gray", ls="--", lw=1, label=f"{what} {line:.2f}")
            ax.legend(fontsize=7)
    fig.suptitle(f"V4-Flash-dimension slice ({shape.total_bytes / GB:.1f} GB), budget {shape.budget / GB:.2f} GB, "
                 f"RAM {shape.ram_gbs:.1f} GB/s, disk {shape.disk_gbs:.2f} GB/s")  # fmt: skip
    fig.tight_layout()
    fig.savefig(out, dpi=110)


# ---- main ----


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--dir", type=Path, default=None, help="slice folder (default /tmp/dsv4-flash-slice[-quick])"
    )
    p.add_argument("--layers", type=int, default=None, help="layers (default 12; 4 with --quick)")
    p.add_argument("--experts", type=int, default=None, help="routed experts per layer (default 32)")
    p.add_argument(
        "--decode-tokens",
        type=int,
        default=None,
        help="greedy tokens generated (default 64; 16 with --quick)",
    )
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument(
        "--budget",
        default=None,
        help="RAM budget for the budget case (default: dense + experts/4 + allowance)",
    )
    p.add_argument(
        "--allowance", default=None, help="runtime allowance in the default budget (1G; 0.5G with --quick)"
    )
    p.add_argument("--repeat", type=int, default=3, help="tries of each resident case (the best is kept)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--skip-llama", action="store_true", help="only dsv4")
    p.add_argument(
        "--gguf", type=Path, default=None, help="where the converted GGUF goes (default <dir>.gguf)"
    )
    p.add_argument("--llama-src", type=Path, default=Path("/tmp/llama-cpp-python-src"),
                   help="where llama-cpp-python's sdist is unpacked (for its converter)")  # fmt: skip
    p.add_argument("--llama-extra-bufts", choices=("auto", "on", "off"), default="auto",
                   help="llama.cpp's AMX/repack weight buffers (auto: off on AMX CPUs, where 0.3.36 aborts)")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="a much smaller slice: a smoke run")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.layers = a.layers or (4 if a.quick else 12)
    a.experts = a.experts or 32
    a.decode_tokens = a.decode_tokens or (16 if a.quick else 64)
    a.allowance = a.allowance or ("0.5G" if a.quick else "1G")
    a.dir = a.dir or Path("/tmp/dsv4-flash-slice" + ("-quick" if a.quick else ""))
    a.gguf = a.gguf or a.dir.with_name(a.dir.name + ".gguf")
    return a


def run_cases(
    a: argparse.Namespace, shape: Shape, ids: list[int], warm: list[int], llama_ok: bool
) -> list[Run]:
    base = {"dir": str(a.dir), "gguf": str(a.gguf), "ids": ids, "warmup": warm, "decode_tokens": a.decode_tokens,
            "threads": a.threads, "llama_extra_bufts": a.llama_extra_bufts}  # fmt: skip
    shards = sorted(a.dir.glob("*.safetensors"))
    # The resident cases are CPU-bound and short: on a shared machine, the best of a few tries, the
    # engines taking turns. The budget cases are long and bound by the disk: one try each.
    tries: dict[str, list[Run]] = {"dsv4": [], "llama.cpp": []}
    for _ in range(a.repeat):
        tries["dsv4"].append(run_case(base, "dsv4", "ram", None, "lfu", page_cache=shards))
        if llama_ok:
            tries["llama.cpp"].append(run_case(base, "llama.cpp", "ram", None, None, page_cache=[a.gguf]))
    runs = [best(t, a.repeat) for t in tries.values() if t]
    for policy in ("lfu", "lru"):
        runs.append(run_case(base, "dsv4", f"budget {policy}", shape.budget, policy, confine=True))
    # early-routing guesses prefetched whatever their accuracy (by default only while >= 90 % right)
    guessing = {**base, "min_guess_accuracy": 0.0}
    runs.append(run_case(guessing, "dsv4", "budget lfu, guesses prefetched", shape.budget, "lfu", confine=True))
    if llama_ok:
        runs.append(run_case(base, "llama.cpp", "budget", shape.budget, None, confine=True))
    # the same budget without the cgroup: does max_ram alone keep the process inside it?
    runs.append(first := run_case(base, "dsv4", "budget lfu, no cgroup", shape.budget, "lfu"))
    if first.cache_budget:
        # the policies again with an expert cache of a quarter of the experts, outside the cgroup so that
        # only expert misses go to the disk
        ram = size_for_cache(base, shape.expert_bytes // 4, shape.budget, first.cache_budget)
        for policy in ("lfu", "lru"):
            runs.append(run_case(base, "dsv4", f"cache 1/4 {policy}, no cgroup", ram, policy))
    return runs


def best(tries: list[Run], n: int) -> Run:
    """The try with the fastest decode (its case renamed to say so); all tries kept in `extra`."""
    ok = [r for r in tries if not r.error] or tries
    run = max(ok, key=lambda r: r.decode_tps)
    run.extra["tries"] = [(r.prefill_tps, r.decode_tps, r.loadavg) for r in tries]
    if n > 1:
        run.case = f"{run.case} (best of {n})"
    return run


def size_for_cache(base: dict, target: int, ram: int, cache: int) -> int:
    """The max_ram for which dsv4 sizes its expert cache at ~`target` bytes, found by loading it with
    candidate budgets (a load maps the files and reads nothing much: seconds). A byte of max_ram is
    worth ~0.72 byte of cache (10 % reserve, 2 x 10 % of the rest for experts in flight)."""
    for _ in range(8):
        if abs(cache - target) <= 0.03 * target:
            break
        ram = max(int(ram - (cache - target) / 0.72), 1 << 20)
        probe = run_worker(
            {**base, "engine": "dsv4-size", "case": "size", "max_ram": ram, "policy": "lfu"}, None
        )
        cache = probe.cache_budget or 0  # too small a budget fails to load: grow
    return ram


def run_case(base: dict, engine: str, case: str, max_ram: int | None, policy: str | None, *, confine: bool = False,
             page_cache: list[Path] = ()) -> Run:  # fmt: skip
    """One case in a fresh worker: budgets start from a dropped page cache (inside a memory cgroup of
    max_ram bytes when `confine`); `page_cache` files are read first so that the worker maps warm pages."""
    spec = {**base, "engine": engine, "case": case, "max_ram": max_ram, "policy": policy}
    cgroup = None
    if max_ram is not None:
        drop_page_cache()
    for f in page_cache:
        _cat(f)
    if confine:
        try:
            cgroup = MemoryCgroup(f"dsv4-bench-{os.getpid()}-{int(time.time())}", max_ram)
        except OSError as e:
            print(f"note: no memory cgroup ({e}); {engine} runs without one", flush=True)
    try:
        return run_worker(spec, cgroup)
    finally:
        if cgroup is not None:
            cgroup.close()


def _cat(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    if a.worker:
        return worker_main(json.loads(a.worker))
    from dsv4.memory import parse_size

    RESULTS.mkdir(parents=True, exist_ok=True)
    cfg = slice_config(a.layers, a.experts, a.quick)
    ensure_checkpoint(a.dir, cfg)
    shape = measure(a.dir, parse_size(a.budget), parse_size(a.allowance))
    ids, warm = prompt_ids(a.dir, a.prompt_tokens)
    print(f"machine: RAM read {shape.ram_gbs:.1f} GB/s, disk read {shape.disk_gbs:.2f} GB/s, load {loadavg():.1f}; "
          f"slice {shape.total_bytes / GB:.2f} GB (dense {shape.dense_bytes / GB:.2f}, experts {shape.expert_bytes / GB:.2f}); "
          f"read per token {shape.read_per_token / GB:.2f} GB; budget {shape.budget / GB:.2f} GB", flush=True)  # fmt: skip
    why_not = "skipped (--skip-llama)" if a.skip_llama else convert_gguf(a.dir, a.gguf, a.llama_src)
    if why_not:
        print(f"llama.cpp: {why_not}", flush=True)
    runs = run_cases(a, shape, ids, warm, llama_ok=not why_not)
    shape.ram_gbs = ram_bandwidth(shape)
    report = render(a, shape, runs, why_not, len(ids))
    print("\n" + report)
    (RESULTS / "offload.md").write_text(report + "\n")
    (RESULTS / "offload.json").write_text(
        json.dumps({"shape": asdict(shape), "runs": [asdict(r) for r in runs]}, indent=1)
    )
    try:
        plot(runs, shape, RESULTS / "offload.png")
    except ImportError as e:
        print(f"no plot: {e} (pip install matplotlib)")


def render(a: argparse.Namespace, shape: Shape, runs: list[Run], why_not: str, n_prompt: int) -> str:
    kern = next((r.extra.get("kernels") for r in runs if r.engine == "dsv4" and not r.error), "?")
    bound = shape.ram_gbs * GB / shape.read_per_token
    lines = [
        f"# Expert offload: V4-Flash-dimension slice, {a.layers} layers x {a.experts} experts (top-6 + 1 shared)",
        "",
        f"Slice: {shape.total_bytes / GB:.2f} GB in the official layout (FP8 dense, MXFP4 experts, random weights, "
        f"real vocabulary): dense {shape.dense_bytes / GB:.2f} GB, routed experts {shape.expert_bytes / GB:.2f} GB. "
        f"A decoded token reads {shape.read_per_token / GB:.2f} GB (dense less the embedding, plus 6 experts x "
        f"{a.layers} layers), so the measured RAM bandwidth bounds decode at {bound:.2f} tok/s.",
        "",
        f"Machine: {os.cpu_count()} cores, RAM read {shape.ram_gbs:.1f} GB/s (`measure_ram_gbs`, best of the "
        f"measurements before and after the runs: {', '.join(f'{g:.1f}' for g in shape.ram_gbs_seen)}), disk read "
        f"{shape.disk_gbs:.2f} GB/s (`measure_disk_gbs`, 1 GB cold); 1-minute load average at the end of each run: "
        + ", ".join(f"{r.loadavg:.1f}" for r in runs if not r.error)
        + " (a shared machine).",
        "",
        "Cases: `ram` = everything resident, the files read into the page cache first. `budget` = "
        f"{shape.budget / GB:.2f} GB (dense + a quarter of the experts + {parse_size_text(a.allowance)} runtime "
        "allowance): page cache dropped first, the worker inside a memory cgroup of that size, dsv4 with `max_ram` = "
        "the budget (lfu is its default cache policy). `guesses prefetched`: early routing's guesses of the next "
        "layer's experts are prefetched whatever their measured accuracy (by default only while at least 90 % are "
        "right; hash layers' experts, known from the token ids, are always prefetched). `no cgroup`: the same `max_ram` without the cgroup. `cache 1/4`: "
        "`max_ram` chosen so that dsv4's expert cache holds a quarter of the experts, no cgroup, to compare the "
        f"policies on expert misses alone. Prompt {n_prompt} tokens, {a.decode_tokens} greedy tokens, {a.threads} "
        f"threads, after a short warm-up; dsv4 kernels: {kern}. Expert cache = dsv4's cache budget (share of all "
        "experts); hit rate = its hits in decode (prefetched experts count as hits); guesses right = share of early "
        "routing's guessed experts the layer then used, whole run; disk read / token = bytes the worker read from storage per decoded "
        "token (`/proc/self/io`: expert reads, prefetches and page faults on mapped files). Achieved GB/s counts the "
        "same bytes per token for both engines (the official files'; Q8_0 is 6 % larger than FP8).",
        "",
        table(runs, shape),
    ]
    notes = {f"llama.cpp {r.extra['llama_cpp_python']}: {r.extra['buffer_types']}"
              for r in runs if r.extra.get("buffer_types")}  # fmt: skip
    notes |= {f"llama.cpp: {why_not}"} if why_not else set()
    lines += ["", *sorted(f"- {n}" for n in notes)] if notes else []
    lines += ["", f"Command: `{' '.join(['python3 bench/bench_offload.py', *sys.argv[1:]])}`"]
    return "\n".join(lines)


def parse_size_text(text: str) -> str:
    return text if text[-1].isalpha() else f"{int(text) / GB:.2f} GB"


if __name__ == "__main__":
    main()
