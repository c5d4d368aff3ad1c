"""Build a model from a checkpoint folder: config, validation, weights, numerics.

`load_model(path, ...)` is the one place that ties `config`, `checkpoint` and `model` together; the
public `dsv4.load` wraps it in an `Engine`. It knows nothing of tokens or generation.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import Checkpoint
from .config import ModelConfig
from .model import Numerics, Transformer

NUMERICS = ("exact", "released")


def parse_numerics(dtype: torch.dtype | str, numerics: str) -> Numerics:
    if isinstance(dtype, str):
        names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
                 "fp16": torch.float16, "float16": torch.float16}  # fmt: skip
        if dtype not in names:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
        dtype = names[dtype]
    if numerics not in NUMERICS:
        raise ValueError(f"unknown numerics {numerics!r}; use 'exact' (transformers) or 'released' (official)")
    return Numerics(dtype=dtype, released=numerics == "released")


def load_model(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.bfloat16,
               numerics: str = "exact", expert_provider=None, progress: bool = False) -> tuple[Transformer, Checkpoint]:  # fmt: skip
    """Validate the checkpoint against its config, then build the model on `device`.

    progress=True draws a bar (stderr) over the layers as they load.
    """
    cfg = ModelConfig.from_file(path)
    ckpt = Checkpoint(path)
    ckpt.validate(cfg)
    with_mtp = any(n.startswith("mtp.") for n in ckpt.names())
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.n_layers, desc="loading layers", unit="layer", leave=False)
    try:
        with torch.device(device):
            model = Transformer(cfg, ckpt, parse_numerics(dtype, numerics), expert_provider, with_mtp=with_mtp,
                                progress=(lambda i: bar.update(1)) if bar else None)  # fmt: skip
    finally:
        if bar is not None:
            bar.close()
    model.to(device)
    model.eval()
    return model, ckpt
