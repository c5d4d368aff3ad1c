"""Tiny random DeepSeek V4 checkpoints in the official layout, for tests, demos and benchmarks.

`tiny_config()` gives an official-dialect config.json dict with every layer type (sliding, CSA, HCA),
hash and top-k routed MoE layers, and an MTP layer. `random_weights()` draws every tensor the config
implies (by official name, fp32). `dsv4.writer.write_checkpoint()` writes them in the release's layout
and formats.

It knows the layout (through `checkpoint.expected_tensors`), not the model math.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .checkpoint import Spec, expected_tensors
from .config import ModelConfig


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
    specs = only if only is not None else expected_tensors(cfg, **draft_kind(cfg, with_mtp))
    for name, spec in specs.items():
        shape = spec.shape
        if name.endswith("tid2eid"):
            rows = [torch.randperm(cfg.n_routed_experts, generator=g)[: shape[1]] for _ in range(shape[0])]
            out[name] = torch.stack(rows).long()
        elif spec.kind == "linear" or name.endswith(("wkv.weight", "wgate.weight", "weights_proj.weight")):
            out[name] = torch.randn(shape, generator=g) / math.sqrt(shape[1])
        elif name.endswith(
            ("gate.weight", "markov_w1.weight", "markov_w2.weight", "confidence_head.proj.weight")
        ):
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


def draft_kind(cfg: ModelConfig, with_draft: bool) -> dict[str, Any]:
    """expected_tensors' draft arguments: a DSpark config gets its stages (3 unless compress_ratios lists
    them), any other the preview's MTP layer."""
    if not cfg.dspark:
        return {"with_mtp": with_draft}
    stages = len(cfg.draft_compress_ratios) if len(cfg.draft_compress_ratios) > 1 else 3
    return {"with_mtp": False, "dspark_stages": stages if with_draft else 0}


def __getattr__(name: str):
    """`write_checkpoint` moved to dsv4.writer; imports written before the move keep working."""
    if name == "write_checkpoint":
        from .writer import write_checkpoint

        return write_checkpoint
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
