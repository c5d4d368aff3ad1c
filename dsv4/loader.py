"""Build a model from a checkpoint folder: config, validation, weights, numerics.

`load_model(path, ...)` is the one place that ties `config`, `checkpoint` and `model` together; the
public `dsv4.load` wraps it in an `Engine`. It knows nothing of tokens or generation.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from .checkpoint import Checkpoint
from .config import ModelConfig
from .experts import ExpertStore
from .memory import available_bytes, parse_size, return_freed_memory, rss_bytes
from .model import Numerics, ResidentExperts, Transformer
from .plan import RamLayout, ram_layout
from .prefix_cache import ram_share

NUMERICS = ("exact", "released")
DEMO_DIR = Path(__file__).parent / "demo"  # the bundled tiny model that `dsv4 run/chat/serve` use by default


def model_dir(path: str | Path | None) -> Path:
    """The checkpoint folder to load: `path`, or the bundled demo model when none is given."""
    if path is not None:
        return Path(path)
    if (DEMO_DIR / "config.json").exists():
        return DEMO_DIR
    raise FileNotFoundError("no --model given and no bundled demo model in this install: pass --model DIR")


def parse_numerics(dtype: torch.dtype | str, numerics: str) -> Numerics:
    if isinstance(dtype, str):
        names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
                 "fp16": torch.float16, "float16": torch.float16}  # fmt: skip
        if dtype not in names:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
        dtype = names[dtype]
    if numerics not in NUMERICS:
        raise ValueError(
            f"unknown numerics {numerics!r}; use 'exact' (transformers) or 'released' (official)"
        )
    return Numerics(dtype=dtype, released=numerics == "released")


def load_model(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.bfloat16,
               numerics: str = "exact", max_ram: str | int | None = None, max_vram: str | int | None = None,
               cache_policy: str = "lfu", progress: bool = False,
               prompt_cache: bool = False, expert_ids: list[int] | None = None,
               build=Transformer) -> tuple[Transformer, Checkpoint]:  # fmt: skip
    """Validate the checkpoint against its config, then build the model on `device`.

    Without budgets every routed expert is loaded into memory. With `max_ram` (bytes or "12G") the
    experts are served by an `ExpertStore`: whatever the dense weights, KV and runtime leave of the
    budget caches experts, the rest is read from the checkpoint files on demand. `max_vram` adds a
    GPU-memory tier in front when `device` is CUDA. progress=True draws a bar (stderr) over the layers.
    prompt_cache=True sets `prefix_cache.ram_share` of the budget aside for prompt snapshots
    (`model.prompt_cache_bytes`) before the expert cache is sized.
    `expert_ids`: the routed experts (of every MoE layer) this process holds and reads; None: all of
    them (expert parallelism gives each rank a disjoint share, see `dsv4.distributed`).
    `build`: the module built, with Transformer's constructor arguments (a follower rank of
    `dsv4.distributed` builds only its experts and routers).
    """
    cfg = ModelConfig.from_file(path)
    ckpt = Checkpoint(path)
    release = ckpt.validate(cfg)
    device = torch.device(device)
    ram, vram = _ram_budget(max_ram, ckpt, cfg, expert_ids), parse_size(max_vram)
    share = ram_share(ram, available_bytes()) if prompt_cache else 0
    owned = frozenset(expert_ids) if expert_ids is not None else None
    store = None
    if ram is not None or vram is not None:
        return_freed_memory()  # evicted experts' buffers must go back to the OS for the budget to hold
        store = ExpertStore(
            ckpt, budget_bytes=0, dtype=parse_numerics(dtype, numerics).dtype, policy=cache_policy, owned=owned
        )
        if device.type == "cuda":
            store = ExpertStore(ckpt, budget_bytes=vram or 0, device=device, policy=cache_policy, lower=store,
                                owned=owned)  # fmt: skip
    if device.type == "cpu":
        from . import kernels

        kernels.available()  # build (first use) or load the compiled kernels now, not inside the first prefill
    nums = parse_numerics(dtype, numerics)
    if store is not None:
        provider = store.layer
    elif expert_ids is not None:
        provider = partial(_resident_share, ckpt, cfg.n_routed_experts, nums.dtype, list(expert_ids))
    else:
        provider = None
    model = _build(build, cfg, ckpt, device, nums, provider, progress, release.draft == "mtp")
    # What the folder is (checkpoint.Release): a DSpark draft's mtp.* tensors were validated but are not
    # part of the Transformer; the draft builds them from `ckpt` (official names, its stages' experts
    # through `model.store`) when speculation asks for it.
    model.release = release
    ckpt.close()  # the header maps and descriptors: weights were copied into memory of their own
    model.ram_layout = None
    if store is not None:
        model.ram_layout = _size_ram_tier(store, ram, share, cfg)
    model.store = store
    model.prompt_cache_bytes = share if prompt_cache else None
    return model, ckpt


def _resident_share(ckpt: Checkpoint, n: int, dtype: torch.dtype, ids: list[int], prefix: str) -> ResidentExperts:
    return ResidentExperts(ckpt, prefix, n, dtype, ids)


def _ram_budget(max_ram, ckpt: Checkpoint, cfg: ModelConfig, expert_ids: list[int] | None = None) -> int | None:
    """'auto': everything resident if the checkpoint (this process's share of the experts) fits in 85 %
    of the free memory, else that budget."""
    if max_ram is None or (isinstance(max_ram, str) and max_ram.lower() == "none"):
        return None
    if isinstance(max_ram, str) and max_ram.lower() == "auto":
        total = sum(ckpt.nbytes(n) for n in ckpt.names())
        if expert_ids is not None:
            experts = sum(ckpt.nbytes(n) for n in ckpt.names() if ".ffn.experts." in n)
            total -= experts - experts * len(expert_ids) // max(cfg.n_routed_experts, 1)
        free = int(available_bytes() * 0.85)
        return None if total + rss_bytes() < free else free
    return parse_size(max_ram)


def _build(build, cfg, ckpt, device, numerics, provider, progress, with_mtp: bool) -> Transformer:
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.n_layers, desc="loading layers", unit="layer", leave=False)
    try:
        with torch.device(device):
            model = build(cfg, ckpt, numerics, provider, with_mtp=with_mtp,
                          progress=(lambda i: bar.update(1)) if bar else None)  # fmt: skip
    finally:
        if bar is not None:
            bar.close()
    model.to(device)
    model.eval()
    return model


def _size_ram_tier(store: ExpertStore, ram: int | None, prompts: int, cfg: ModelConfig) -> RamLayout | None:
    """Give the RAM tier what the budget leaves after the process as loaded (runtime, dense weights) by
    the planner's rule (`plan.ram_layout`); refuse a budget that cannot hold one layer's experts."""
    ram_tier = store.lower if store.lower is not None else store
    if ram is None:
        ram_tier.set_budget(1 << 62)  # no RAM limit: cache everything that gets read
        return None
    one = ram_tier.expert_bytes("layers.0.ffn.experts", 0)
    layout = ram_layout(ram, rss_bytes(), prompts, one, cfg.n_activated_experts)
    layout.check()
    ram_tier.group_bytes = ram_tier.prefetch_bytes = layout.working
    ram_tier.set_budget(layout.cache)
    return layout
