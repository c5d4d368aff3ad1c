"""A trainable V4 network: size presets, a fresh init per official tensor name, and the model built on it.

The network is `dsv4.model.Transformer` itself, built from `InitSource` with its float parameters made
trainable, so every piece trains as the engine computes it. `freeze` turns a model into a fixed
backbone (for training a draft on top). It knows nothing of data, losses or files.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..checkpoint import expected_tensors
from ..config import ModelConfig
from ..model import Numerics, Transformer
from ..quant import Dense
from ..tiny import tiny_config

# name -> (tokenizer vocab incl. added tokens, overrides of dsv4.tiny.tiny_config)
PRESETS: dict[str, tuple[int, dict]] = {
    "demo": (4096, dict(
        hidden_size=256, num_hidden_layers=6, num_attention_heads=4, head_dim=128, qk_rope_head_dim=64,
        q_lora_rank=128, o_groups=2, o_lora_rank=128, n_routed_experts=16, num_experts_per_tok=2,
        moe_intermediate_size=256, num_hash_layers=2, sliding_window=128, compress_ratios=[0, 4, 128, 4, 128, 4, 0],
        index_n_heads=4, index_head_dim=64, index_topk=16)),
    "toy": (320, dict(sliding_window=16, compress_ratios=[0, 4, 8, 4, 0], index_topk=6)),
}  # fmt: skip


def preset_config(name: str, vocab_size: int) -> dict:
    """The official-dialect config.json dict of a preset with the tokenizer's vocabulary size."""
    if name not in PRESETS:
        raise ValueError(f"unknown --config {name!r}; use one of {sorted(PRESETS)}")
    return tiny_config(vocab_size=vocab_size, **PRESETS[name][1])


class InitSource:
    """A weight source that draws a training init for every official tensor name, once."""

    def __init__(self, cfg: ModelConfig, seed: int, with_mtp: bool = True, dspark_stages: int = 0):
        self.cfg, self.specs = cfg, expected_tensors(cfg, with_mtp, dspark_stages)
        self.gen = torch.Generator().manual_seed(seed)
        self.drawn: dict[str, torch.Tensor] = {}

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self.drawn:
            self.drawn[name] = self._init(name, self.specs[name].shape)
        return self.drawn[name]

    def weight(self, prefix: str, dtype: torch.dtype) -> Dense:
        return Dense(self.tensor(f"{prefix}.weight").to(dtype))

    def _init(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        cfg, g = self.cfg, self.gen
        if name.endswith("tid2eid"):  # each token's fixed hash experts: k distinct ones
            rows = [torch.randperm(cfg.n_routed_experts, generator=g)[: shape[1]] for _ in range(shape[0])]
            return torch.stack(rows).long()
        if name.endswith("norm.weight"):
            return torch.ones(shape)
        if name.endswith(
            (
                "gate.bias",
                "attn_sink",
                ".ape",
                "hc_head_base",
                "markov_w2.weight",
                "confidence_head.proj.weight",
            )
        ):
            return torch.zeros(shape)
        if name.endswith("_base"):  # mHC: pre 1/2 each, post 1, comb near the identity (a residual)
            base = torch.zeros(shape)
            base[2 * cfg.hc_mult :].view(cfg.hc_mult, cfg.hc_mult).fill_diagonal_(2.0)
            return base
        if name.endswith("_scale"):
            return torch.full(shape, 0.1)
        if name == "embed.weight":
            return torch.randn(shape, generator=g)
        std = shape[-1] ** -0.5  # fan-in; outputs into the residual streams start smaller
        if name.endswith(("wo_b.weight", "w2.weight")):
            std /= math.sqrt(2 * (cfg.n_layers + cfg.n_mtp_layers))
        return torch.randn(shape, generator=g) * std


def build_model(raw_cfg: dict, seed: int) -> tuple[Transformer, dict[str, torch.Tensor]]:
    """A trainable fp32 model and its tensors by official name (the model's own Parameters, and the
    fixed tid2eid tables). Everything but the router biases and tid2eid requires grad."""
    cfg = ModelConfig.from_dict(raw_cfg)
    src = InitSource(cfg, seed)
    model = Transformer(cfg, src, Numerics(dtype=torch.float32))
    return model.train(), trainable(model, src)


def trainable(module: nn.Module, src: InitSource) -> dict[str, torch.Tensor]:
    """`module`'s tensors by the official names `src` drew them under, float ones made trainable (but
    the router biases, which the balancing rule moves); raises if a drawn tensor is not a parameter of
    the module or a parameter has no name."""
    params = {p.data_ptr(): p for p in module.parameters()}
    weights: dict[str, torch.Tensor] = {}
    for name, t in src.drawn.items():
        p = params.get(t.data_ptr()) if t.is_floating_point() else t
        if p is None or p.shape != t.shape:
            raise RuntimeError(f"the model did not keep {name} as a parameter; training cannot reach it")
        weights[name] = p
    if len({id(p) for p in weights.values()} & {id(p) for p in params.values()}) != len(params):
        raise RuntimeError("the model holds parameters no official tensor name maps to")
    for name, p in weights.items():
        if isinstance(p, nn.Parameter) and not name.endswith("gate.bias"):
            p.requires_grad_(True)
    return weights
