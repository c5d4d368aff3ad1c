"""Build Hugging Face transformers' DeepseekV4ForCausalLM from our official-named tensors (test-only)."""

from __future__ import annotations

import re

import torch

from dsv4.checkpoint import official_name
from dsv4.config import ModelConfig


def hf_config(raw: dict):
    from transformers import DeepseekV4Config

    keys = {k: v for k, v in raw.items() if k not in ("quantization_config", "rope_scaling", "architectures", "model_type",
                                                         "topk_method", "torch_dtype", "expert_dtype")}  # fmt: skip
    rs = raw.get("rope_scaling")
    if rs:
        keys["rope_parameters"] = {"rope_type": rs.get("type", rs.get("rope_type")), **{k: v for k, v in rs.items() if k != "type"}}
    ours = ModelConfig.from_dict(raw)
    kinds = {"sliding": "sliding_attention", "csa": "compressed_sparse_attention", "hca": "heavily_compressed_attention"}
    keys.pop("compress_ratios", None)
    keys["layer_types"] = [kinds[ours.layer_kind(i)] for i in range(ours.n_layers)]
    rates = {kinds[ours.layer_kind(i)]: r for i, r in enumerate(ours.compress_ratios) if r}
    keys["compress_rates"] = {**{"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}, **rates}
    cfg = DeepseekV4Config(**keys)
    cfg._attn_implementation = "eager"
    return cfg


def hf_model(raw: dict, tensors: dict[str, torch.Tensor]):
    """transformers' model in fp32 holding exactly `tensors` (official names, dequantized)."""
    from transformers import DeepseekV4ForCausalLM

    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM(hf_config(raw)).float().eval()
    sd = model.state_dict()
    new = {}
    for key, cur in sd.items():
        m = re.match(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$", key)
        if m:
            p = f"layers.{m.group(1)}.ffn.experts"
            n = cur.shape[0]
            if m.group(2) == "down_proj":
                new[key] = torch.stack([tensors[f"{p}.{e}.w2.weight"] for e in range(n)])
            else:
                new[key] = torch.stack([torch.cat([tensors[f"{p}.{e}.w1.weight"], tensors[f"{p}.{e}.w3.weight"]]) for e in range(n)])
            continue
        name = official_name(key)
        if name not in tensors:
            raise KeyError(f"no tensor for transformers key {key} (official {name})")
        new[key] = tensors[name].to(cur.dtype).reshape(cur.shape)
    model.load_state_dict(new, strict=True)
    return model


@torch.no_grad()
def hf_logits(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0].float()
