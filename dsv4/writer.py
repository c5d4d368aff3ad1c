"""Write a DeepSeek V4 checkpoint folder in the official layout, quantized as the release is.

Dense matmul weights become FP8 e4m3 with e8m0 128x128 block scales, routed experts MXFP4, the rest
bf16 (or fp32 where the release keeps fp32); sharded safetensors with an index and config.json.
Tensors not given are drawn in their stored format, shard by shard, so checkpoints far larger than
memory can be written (benchmarks). Training's export, `dsv4 tiny` and the benchmarks use it.

It knows the layout (through `checkpoint.expected_tensors`) and the formats (`quant`), not the model math.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .checkpoint import Spec, expected_tensors
from .config import ModelConfig
from .quant import dequant_fp8_block, dequant_mxfp4, quantize_fp8_block, quantize_mxfp4
from .tiny import draft_kind, random_weights


def write_checkpoint(path: str | Path, raw_cfg: dict[str, Any], weights: dict[str, torch.Tensor] | None = None, *,
                     fp8: bool = True, fp4: bool = True, shards: int = 3, shard_bytes: int | None = None,
                     float_dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                     shared: dict[str, str] | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """Write an official-layout checkpoint; return the given tensors as the file holds them, in fp32.

    Dense matmul weights become FP8 (if fp8), routed experts MXFP4 (if fp4), the rest `float_dtype`
    except the fp32 ones (mHC, sinks, ape, gate bias) and int64 tid2eid. Tensors missing from
    `weights` are drawn directly in their stored format (random FP8 / MXFP4 bytes with sane scales, or
    `random_weights`-style floats), shard by shard, so checkpoints far larger than memory can be
    written. `shard_bytes` (if given) caps a shard's size instead of splitting into `shards` files.
    `shared` maps stored tensor names (scales too) to files that already hold them, relative to `path`
    (e.g. "../demo/model-00001-of-00004.safetensors"): the index lists them there and they are not written.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig.from_dict(raw_cfg)
    with_mtp = any(n.startswith("mtp.") for n in weights) if weights else cfg.n_mtp_layers > 0
    specs = expected_tensors(cfg, **draft_kind(cfg, with_mtp))
    g = torch.Generator().manual_seed(seed)
    shared = shared or {}
    names = sorted(n for n in specs if n not in shared)
    if shard_bytes is None:
        total = sum(_stored_bytes(specs[n], fp8, fp4) for n in names)
        shard_bytes = max(1, -(-total // shards))
    seen: dict[str, torch.Tensor] = {}
    pending: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    files: list[list[str]] = []

    def flush() -> None:
        if pending:
            fname = f"model-{len(files) + 1:05d}.safetensors"
            save_file(pending, str(path / fname), metadata={"format": "pt"})
            files.append(list(pending))
            weight_map.update(dict.fromkeys(pending, fname))
            pending.clear()

    size = 0
    for name in names:
        spec = specs[name]
        given = weights.get(name) if weights else None
        if given is None:
            given = _random_tensor(name, spec, cfg, g) if not _quantized(spec, fp8, fp4) else None
        stored = _store(name, spec, given, fp8, fp4, float_dtype, g)
        if given is not None and weights and name in weights:
            seen[name] = _as_seen(stored, name, spec)
        nbytes = sum(t.numel() * t.element_size() for t in stored.values())
        if pending and size + nbytes > shard_bytes:
            flush()
            size = 0
        pending.update(stored)
        size += nbytes
    flush()
    # name the shards like the release: model-0000i-of-0000n.safetensors
    n = len(files)
    for i in range(n):
        old, new = path / f"model-{i + 1:05d}.safetensors", path / f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        old.rename(new)
        weight_map.update(dict.fromkeys(files[i], new.name))
    weight_map.update(shared)
    total = sum((path / f).stat().st_size for f in set(weight_map.values()))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (path / "config.json").write_text(json.dumps(raw_cfg, indent=1))
    return seen


def _quantized(spec: Spec, fp8: bool, fp4: bool) -> bool:
    return spec.kind == "linear" and ((spec.fp4_ok and fp4) or fp8)


def _stored_bytes(spec: Spec, fp8: bool, fp4: bool) -> int:
    n = math.prod(spec.shape)
    if spec.kind == "linear" and spec.fp4_ok and fp4:
        return n // 2 + n // 32
    if _quantized(spec, fp8, fp4):
        return n
    return n * (8 if spec.kind == "index" else 4)


def _random_tensor(name: str, spec: Spec, cfg: ModelConfig, g: torch.Generator) -> torch.Tensor:
    return random_weights(cfg, generator=g, only={name: spec})[name]


def _store(name, spec, w, fp8, fp4, float_dtype, g) -> dict[str, torch.Tensor]:
    """The tensors written for one weight (with its scale when quantized); random bytes when w is None."""
    scale = spec.scale_name(name)
    if spec.kind == "linear" and spec.fp4_ok and fp4:
        if w is None:
            out_f, in_f = spec.shape
            q = torch.randint(-128, 128, (out_f, in_f // 2), dtype=torch.int8, generator=g)
            # e2m1 codes reach 6: scales near 2^-5 keep |w| ~ 0.1, as trained experts are
            s = torch.randint(121, 124, (out_f, in_f // 32), dtype=torch.uint8, generator=g).view(
                torch.float8_e8m0fnu
            )
            return {name: q, scale: s}
        q, s = quantize_mxfp4(w)
        return {name: q, scale: s}
    if spec.kind == "linear" and fp8:
        if w is None:
            out_f, in_f = spec.shape
            q = (torch.randn(out_f, in_f, generator=g) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
            s = torch.full(
                (-(-out_f // 128), -(-in_f // 128)), 127 - 6 - round(math.log2(in_f) / 2), dtype=torch.uint8
            )
            return {name: q, scale: s.view(torch.float8_e8m0fnu)}
        q, s = quantize_fp8_block(w)
        return {name: q, scale: s}
    if spec.kind in ("f32", "index"):
        return {name: w.contiguous()}
    return {name: w.to(float_dtype).contiguous()}


def _as_seen(stored: dict[str, torch.Tensor], name: str, spec: Spec) -> torch.Tensor:
    t = stored[name]
    if t.dtype == torch.int8:
        return dequant_mxfp4(t, stored[spec.scale_name(name)])
    if t.dtype == torch.float8_e4m3fn:
        return dequant_fp8_block(t, stored[spec.scale_name(name)])
    return t.float() if t.is_floating_point() else t.clone()
