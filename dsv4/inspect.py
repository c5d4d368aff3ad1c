"""What a checkpoint holds, from its headers alone: parameters (total and active per token), bytes by
storage format, layer kinds, and where each part goes. Reads no tensor data."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from .checkpoint import Checkpoint
from .config import ModelConfig

FORMAT_NAMES = {
    torch.float8_e4m3fn: "FP8 e4m3", torch.int8: "MXFP4 (packed)", torch.uint8: "MXFP4 (packed)",
    torch.float8_e8m0fnu: "e8m0 scales", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
    torch.int64: "int64", torch.int32: "int32",
}  # fmt: skip


@dataclass
class Summary:
    total_params: int = 0
    active_params: int = 0
    expert_params: int = 0
    bytes_by_format: Counter = field(default_factory=Counter)
    expert_bytes: int = 0
    dense_bytes: int = 0
    mtp_bytes: int = 0


def summarize(ckpt: Checkpoint, cfg: ModelConfig) -> Summary:
    s = Summary()
    for name in ckpt.names():
        e, nbytes = ckpt.entries[name], ckpt.nbytes(name)
        numel = nbytes // e.dtype.itemsize
        s.bytes_by_format[FORMAT_NAMES.get(e.dtype, str(e.dtype))] += nbytes
        is_scale = name.endswith(".scale") and e.dtype in (torch.float8_e8m0fnu, torch.uint8, torch.float32)
        params = 0 if is_scale else numel * (2 if e.dtype in (torch.int8, torch.uint8) else 1)
        if name.startswith("mtp."):
            s.mtp_bytes += nbytes
            continue  # the MTP layer / DSpark draft is a draft head, not part of the model's parameter count
        s.total_params += params
        if ".ffn.experts." in name:
            s.expert_params += params
            s.expert_bytes += nbytes
        else:
            s.dense_bytes += nbytes
    routed_active = s.expert_params * cfg.n_activated_experts // max(cfg.n_routed_experts, 1)
    s.active_params = s.total_params - s.expert_params + routed_active
    return s


def human(n: float, unit: str = "B") -> str:
    for prefix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or prefix == "T":
            return f"{n:.1f} {prefix}{unit}" if prefix else f"{n:.0f} {unit}"
        n /= 1000
    return f"{n} {unit}"


def render(ckpt: Checkpoint, cfg: ModelConfig) -> str:
    s = summarize(ckpt, cfg)
    kinds = [cfg.layer_kind(i) for i in range(cfg.n_layers)]
    release = ckpt.release(cfg)
    lines = [
        f"checkpoint   {ckpt.path}",
        f"release      {release.describe()}; chat format {release.chat}",
        f"model        {cfg.n_layers} layers, dim {cfg.dim}, {cfg.n_heads} heads x {cfg.head_dim}, vocab {cfg.vocab_size}",
        f"experts      {cfg.n_routed_experts} routed ({cfg.n_activated_experts} active) + {cfg.n_shared_experts} shared, "
        f"width {cfg.moe_inter_dim}; hash-routed layers: {sum(cfg.hash_layers)}",
        f"parameters   {human(s.total_params, '')} total, {human(s.active_params, '')} active per token"
        + (f" (+ {'DSpark draft' if release.draft == 'dspark' else 'MTP layer'} {human(s.mtp_bytes)})" if s.mtp_bytes else ""),
        "layer kinds  " + ", ".join(f"{k}: {n}" for k, n in Counter(kinds).items())
        + "   [" + "".join({"sliding": "S", "csa": "C", "hca": "H"}[k] for k in kinds) + "]",
        "bytes        " + ", ".join(f"{fmt} {human(b)}" for fmt, b in s.bytes_by_format.most_common()),
        f"placement    dense weights resident: {human(s.dense_bytes)}; routed experts: {human(s.expert_bytes)} "
        f"({human(s.expert_bytes * cfg.n_activated_experts / max(cfg.n_routed_experts, 1))} read per token)",
    ]
    return "\n".join(lines)
