"""Export a trained model in the released layout (FP8 dense, MXFP4 experts, through `dsv4.writer`) with
its tokenizer.json and config.json, or in plain fp32 for before/after comparisons."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..writer import write_checkpoint

if TYPE_CHECKING:
    from .loop import Run


def export(run: Run, path: str | Path, quantized: bool = True, shards: int = 4) -> Path:
    """Write the model in the official layout (FP8 dense + MXFP4 experts, or plain fp32), with
    tokenizer.json and config.json."""
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    raw = dict(run.raw_cfg)
    if not quantized:
        raw.pop("quantization_config", None)
        raw.pop("expert_dtype", None)
        raw["torch_dtype"] = "float32"
    tensors = {n: t.detach().clone() for n, t in run.weights.items()}
    write_checkpoint(path, raw, tensors, fp8=quantized, fp4=quantized, shards=shards,
                     float_dtype=torch.bfloat16 if quantized else torch.float32)  # fmt: skip
    run.tok.save(str(path / "tokenizer.json"))
    return path
