"""Tiny random DeepSeek V4 checkpoints in the official layout, for tests, demos and benchmarks.

`tiny_config()` gives an official-dialect config.json dict with every layer type (sliding, CSA, HCA),
hash and top-k routed MoE layers, and an MTP layer. `random_weights()` draws every tensor the config
implies (by official name, fp32). `write_checkpoint()` quantizes them as the release does (FP8 e4m3
with e8m0 128x128 block scales for the dense matmuls, MXFP4 for routed experts), writes sharded
safetensors with an index, and returns the dequantized tensors: what any faithful engine must see.

It knows the layout (through `checkpoint.expected_tensors`), not the model math.
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


def tiny_config(**overrides: Any) -> dict[str, Any]:
    """A small official-style config.json dict; keyword arguments replace keys."""
    cfg: dict[str, Any] = {
        "architectures": ["DeepseekV4ForCausalLM"],
        "model_type": "deepseek_v4",
        "vocab_size": 320,
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 96,
        "qk_rope_head_dim": 32,
        "q_lora_rank": 64,
        "o_groups": 2,
        "o_lora_rank": 32,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "n_shared_experts": 1,
        "moe_intermediate_size": 64,
        "routed_scaling_factor": 1.5,
        "scoring_func": "sqrtsoftplus",
        "topk_method": "noaux_tc",
        "norm_topk_prob": True,
        "swiglu_limit": 10.0,
        "num_hash_layers": 2,
        "sliding_window": 128,
        "compress_ratios": [0, 4, 128, 4, 0],
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "compress_rope_theta": 160000.0,
        "rope_scaling": {
            "type": "yarn",
            "factor": 16,
            "original_max_position_embeddings": 65536,
            "beta_fast": 32,
            "beta_slow": 1,
        },  # fmt: skip
        "index_n_heads": 4,
        "index_head_dim": 64,
        "index_topk": 8,
        "hc_mult": 4,
        "hc_sinkhorn_iters": 20,
        "hc_eps": 1e-6,
        "num_nextn_predict_layers": 1,
        "max_position_embeddings": 1048576,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "quantization_config": {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "scale_fmt": "ue8m0",
            "weight_block_size": [128, 128],
        },  # fmt: skip
        "expert_dtype": "fp4",
        "torch_dtype": "bfloat16",
    }
    cfg.update(overrides)
    return cfg


def random_weights(cfg: ModelConfig, seed: int = 0, with_mtp: bool = True, *, generator: torch.Generator | None = None,
                   only: dict[str, Spec] | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """Every tensor of the config (or those in `only`), drawn so activations stay O(1) (fp32)."""
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    specs = only if only is not None else expected_tensors(cfg, **_draft_kind(cfg, with_mtp))
    for name, spec in specs.items():
        shape = spec.shape
        if name.endswith("tid2eid"):
            rows = [torch.randperm(cfg.n_routed_experts, generator=g)[: shape[1]] for _ in range(shape[0])]
            out[name] = torch.stack(rows).long()
        elif spec.kind == "linear" or name.endswith(("wkv.weight", "wgate.weight", "weights_proj.weight")):
            out[name] = torch.randn(shape, generator=g) / math.sqrt(shape[1])
        elif name.endswith(("gate.weight", "markov_w1.weight", "markov_w2.weight", "confidence_head.proj.weight")):
            out[name] = torch.randn(shape, generator=g) / math.sqrt(shape[1])
        elif name.endswith(("norm.weight",)):
            out[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith("embed.weight") or name.endswith("head.weight"):
            out[name] = torch.randn(shape, generator=g) * (
                1.0 if "embed" in name else 1 / math.sqrt(shape[1])
            )
        elif name.endswith("_fn"):
            out[name] = torch.randn(shape, generator=g) * 0.5
        elif name.endswith(("_scale", "_base", "attn_sink", "ape", "gate.bias")):
            out[name] = torch.randn(shape, generator=g) * 0.5
        else:
            raise AssertionError(f"no initializer for {name}")
    return out


def write_checkpoint(path: str | Path, raw_cfg: dict[str, Any], weights: dict[str, torch.Tensor] | None = None, *,
                     fp8: bool = True, fp4: bool = True, shards: int = 3, shard_bytes: int | None = None,
                     float_dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> dict[str, torch.Tensor]:  # fmt: skip
    """Write an official-layout checkpoint; return the given tensors as the file holds them, in fp32.

    Dense matmul weights become FP8 (if fp8), routed experts MXFP4 (if fp4), the rest `float_dtype`
    except the fp32 ones (mHC, sinks, ape, gate bias) and int64 tid2eid. Tensors missing from
    `weights` are drawn directly in their stored format (random FP8 / MXFP4 bytes with sane scales, or
    `random_weights`-style floats), shard by shard, so checkpoints far larger than memory can be
    written. `shard_bytes` (if given) caps a shard's size instead of splitting into `shards` files.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig.from_dict(raw_cfg)
    with_mtp = any(n.startswith("mtp.") for n in weights) if weights else cfg.n_mtp_layers > 0
    specs = expected_tensors(cfg, **_draft_kind(cfg, with_mtp))
    g = torch.Generator().manual_seed(seed)
    names = sorted(specs)
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
    total = sum((path / f).stat().st_size for f in set(weight_map.values()))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (path / "config.json").write_text(json.dumps(raw_cfg, indent=1))
    return seen


def _draft_kind(cfg: ModelConfig, with_draft: bool) -> dict[str, Any]:
    """expected_tensors' draft arguments: a DSpark config gets its stages (3 unless compress_ratios lists
    them), any other the preview's MTP layer."""
    if not cfg.dspark:
        return {"with_mtp": with_draft}
    stages = len(cfg.draft_compress_ratios) if len(cfg.draft_compress_ratios) > 1 else 3
    return {"with_mtp": False, "dspark_stages": stages if with_draft else 0}


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
