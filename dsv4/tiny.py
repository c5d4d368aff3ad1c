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

from .checkpoint import expected_tensors
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
            "type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32, "beta_slow": 1,
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
            "quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0", "weight_block_size": [128, 128],
        },  # fmt: skip
        "expert_dtype": "fp4",
        "torch_dtype": "bfloat16",
    }
    cfg.update(overrides)
    return cfg


def random_weights(cfg: ModelConfig, seed: int = 0, with_mtp: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor of the config, drawn so activations stay O(1) through the network (fp32)."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, spec in expected_tensors(cfg, with_mtp=with_mtp).items():
        shape = spec.shape
        if name.endswith("tid2eid"):
            rows = [torch.randperm(cfg.n_routed_experts, generator=g)[: shape[1]] for _ in range(shape[0])]
            out[name] = torch.stack(rows).long()
        elif spec.kind == "linear" or name.endswith(("wkv.weight", "wgate.weight", "weights_proj.weight")):
            out[name] = torch.randn(shape, generator=g) / math.sqrt(shape[1])
        elif name.endswith("gate.weight"):
            out[name] = torch.randn(shape, generator=g) / math.sqrt(shape[1])
        elif name.endswith(("norm.weight",)):
            out[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith("embed.weight") or name.endswith("head.weight"):
            out[name] = torch.randn(shape, generator=g) * (1.0 if "embed" in name else 1 / math.sqrt(shape[1]))
        elif name.endswith("_fn"):
            out[name] = torch.randn(shape, generator=g) * 0.5
        elif name.endswith(("_scale", "_base", "attn_sink", "ape", "gate.bias")):
            out[name] = torch.randn(shape, generator=g) * 0.5
        else:
            raise AssertionError(f"no initializer for {name}")
    return out


def write_checkpoint(path: str | Path, raw_cfg: dict[str, Any], weights: dict[str, torch.Tensor], *,
                     fp8: bool = True, fp4: bool = True, shards: int = 3,
                     float_dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:  # fmt: skip
    """Write an official-layout checkpoint; return the tensors as the file holds them, in fp32.

    Dense matmul weights become FP8 (if fp8), routed experts MXFP4 (if fp4), the rest `float_dtype`
    except the fp32 ones (mHC, sinks, ape, gate bias) and int64 tid2eid.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig.from_dict(raw_cfg)
    specs = expected_tensors(cfg, with_mtp=any(n.startswith("mtp.") for n in weights))
    stored: dict[str, torch.Tensor] = {}
    seen: dict[str, torch.Tensor] = {}
    for name, w in weights.items():
        spec = specs[name]
        if spec.kind == "linear" and spec.fp4_ok and fp4:
            q, s = quantize_mxfp4(w)
            stored[name], stored[spec.scale_name(name)] = q, s
            seen[name] = dequant_mxfp4(q, s)
        elif spec.kind == "linear" and fp8:
            q, s = quantize_fp8_block(w)
            stored[name], stored[spec.scale_name(name)] = q, s
            seen[name] = dequant_fp8_block(q, s)
        elif spec.kind in ("f32", "index"):
            stored[name] = w.contiguous()
            seen[name] = w.clone()
        else:
            stored[name] = w.to(float_dtype).contiguous()
            seen[name] = stored[name].float()
    names = sorted(stored)
    weight_map = {}
    per = -(-len(names) // shards)
    for i in range(shards):
        chunk = names[i * per : (i + 1) * per]
        if not chunk:
            continue
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: stored[n] for n in chunk}, str(path / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, fname))
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in stored.values())}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (path / "config.json").write_text(json.dumps(raw_cfg, indent=1))
    return seen
