"""Tiny checkpoints in the layouts of the later V4 releases, written without any dsv4 code.

`dspark_config()` is a small config.json dict of a 0731-style release (V4-Flash-0731, V4-Pro-0813, the
-DSpark repos): the dspark_* keys and n_layers + 3 compress ratios. `write_release()` draws every tensor
the layout holds -- the backbone under the official names, plus a DSpark draft (`mtp.0..S-1`) or the
preview's MTP layer -- stores dense matmuls as FP8 e4m3 with e8m0 128x128 block scales (as the release
does) and the rest as bf16 / fp32 / int64, and returns the tensors as stored, dequantized to fp32.

Its shape table is written from the spec (V4_SPEC.md sections 2 and 7), independently of
`dsv4.checkpoint`, so that a test loading these files checks dsv4's layout knowledge against it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file


def dspark_config(**overrides) -> dict:
    """A 0731-style config: 4 layers (sliding, CSA, HCA, CSA), 3 window-only draft stages."""
    cfg = {
        "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "vocab_size": 320,
        "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 1,
        "head_dim": 96, "qk_rope_head_dim": 32, "q_lora_rank": 64, "o_groups": 2, "o_lora_rank": 32,
        "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1, "moe_intermediate_size": 64,
        "routed_scaling_factor": 1.5, "scoring_func": "sqrtsoftplus", "topk_method": "noaux_tc",
        "norm_topk_prob": True, "swiglu_limit": 10.0, "num_hash_layers": 2, "sliding_window": 128,
        "compress_ratios": [0, 4, 128, 4, 0, 0, 0], "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "compress_rope_theta": 160000.0,
        "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32,
                         "beta_slow": 1},
        "index_n_heads": 16, "index_head_dim": 64, "index_topk": 8, "hc_mult": 4, "hc_sinkhorn_iters": 20,
        "hc_eps": 1e-6, "num_nextn_predict_layers": 1, "max_position_embeddings": 1048576, "bos_token_id": 0,
        "eos_token_id": 1,
        "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0", "weight_block_size": [128, 128]},
        "expert_dtype": "fp4", "torch_dtype": "bfloat16",
        "dspark_block_size": 5, "dspark_noise_token_id": 300, "dspark_target_layer_ids": [1, 2, 3],
        "dspark_markov_rank": 16,
    }  # fmt: skip
    cfg.update(overrides)
    return cfg


def _block(raw: dict, p: str, ratio: int, hashed: bool) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, kind) of one V4 block; kinds: lin (matmul), fp4 (routed experts when the config
    says expert_dtype "fp4"; else bf16), bf16, f32, idx."""
    d, hd, h, q = raw["hidden_size"], raw["head_dim"], raw["num_attention_heads"], raw["q_lora_rank"]
    og, olr, n = raw["o_groups"], raw["o_lora_rank"], raw["hc_mult"]
    e, inter, mix = raw["n_routed_experts"], raw["moe_intermediate_size"], (2 + n) * n
    t = {
        f"{p}.attn_norm.weight": ((d,), "bf16"), f"{p}.ffn_norm.weight": ((d,), "bf16"),
        f"{p}.attn.wq_a.weight": ((q, d), "lin"), f"{p}.attn.q_norm.weight": ((q,), "bf16"),
        f"{p}.attn.wq_b.weight": ((h * hd, q), "lin"), f"{p}.attn.wkv.weight": ((hd, d), "lin"),
        f"{p}.attn.kv_norm.weight": ((hd,), "bf16"), f"{p}.attn.wo_a.weight": ((og * olr, h * hd // og), "lin"),
        f"{p}.attn.wo_b.weight": ((d, og * olr), "lin"), f"{p}.attn.attn_sink": ((h,), "f32"),
        f"{p}.ffn.gate.weight": ((e, d), "bf16"),
    }  # fmt: skip
    for which in ("attn", "ffn"):
        t[f"{p}.hc_{which}_fn"] = ((mix, n * d), "f32")
        t[f"{p}.hc_{which}_base"] = ((mix,), "f32")
        t[f"{p}.hc_{which}_scale"] = ((3,), "f32")
    comps = [(f"{p}.attn.compressor", hd)] if ratio else []
    if ratio == 4:  # CSA: overlapping compressor and the lightning indexer
        ih, ihd = raw["index_n_heads"], raw["index_head_dim"]
        t[f"{p}.attn.indexer.wq_b.weight"] = ((ih * ihd, q), "lin")
        t[f"{p}.attn.indexer.weights_proj.weight"] = ((ih, d), "bf16")
        comps.append((f"{p}.attn.indexer.compressor", ihd))
    for c, width in comps:
        coff = 2 if ratio == 4 else 1
        t[f"{c}.wkv.weight"] = ((coff * width, d), "bf16")
        t[f"{c}.wgate.weight"] = ((coff * width, d), "bf16")
        t[f"{c}.ape"] = ((ratio, coff * width), "f32")
        t[f"{c}.norm.weight"] = ((width,), "bf16")
    if hashed:
        t[f"{p}.ffn.gate.tid2eid"] = ((raw["vocab_size"], raw["num_experts_per_tok"]), "idx")
    else:
        t[f"{p}.ffn.gate.bias"] = ((e,), "f32")
    ek = "fp4" if raw.get("expert_dtype") == "fp4" else "bf16"
    for x in range(e):
        t[f"{p}.ffn.experts.{x}.w1.weight"] = ((inter, d), ek)
        t[f"{p}.ffn.experts.{x}.w3.weight"] = ((inter, d), ek)
        t[f"{p}.ffn.experts.{x}.w2.weight"] = ((d, inter), ek)
    shared = inter * raw["n_shared_experts"]
    t[f"{p}.ffn.shared_experts.w1.weight"] = ((shared, d), "lin")
    t[f"{p}.ffn.shared_experts.w3.weight"] = ((shared, d), "lin")
    t[f"{p}.ffn.shared_experts.w2.weight"] = ((d, shared), "lin")
    return t


def layout(raw: dict, draft: str | None = "dspark", stages: int = 3) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every tensor of the release: backbone, then the draft ("dspark", "mtp" or None)."""
    d, v, n, layers = raw["hidden_size"], raw["vocab_size"], raw["hc_mult"], raw["num_hidden_layers"]
    head = {"hc_head_fn": ((n, n * d), "f32"), "hc_head_base": ((n,), "f32"), "hc_head_scale": ((1,), "f32")}
    t = {"embed.weight": ((v, d), "bf16"), "head.weight": ((v, d), "bf16"), "norm.weight": ((d,), "bf16"), **head}
    for i in range(layers):
        t.update(_block(raw, f"layers.{i}", raw["compress_ratios"][i], i < raw["num_hash_layers"]))
    if draft == "dspark":
        rank, last = raw["dspark_markov_rank"], f"mtp.{stages - 1}"
        for s in range(stages):
            t.update(_block(raw, f"mtp.{s}", 0, False))
        t["mtp.0.main_proj.weight"] = ((d, len(raw["dspark_target_layer_ids"]) * d), "lin")
        t["mtp.0.main_norm.weight"] = ((d,), "bf16")
        t[f"{last}.norm.weight"] = ((d,), "bf16")
        t.update({f"{last}.{k}": v for k, v in head.items()})
        t[f"{last}.markov_head.markov_w1.weight"] = ((v, rank), "bf16")
        t[f"{last}.markov_head.markov_w2.weight"] = ((v, rank), "bf16")
        t[f"{last}.confidence_head.proj.weight"] = ((1, d + rank), "bf16")
    elif draft == "mtp":
        t.update(_block(raw, "mtp.0", raw["compress_ratios"][layers], False))
        t.update({f"mtp.0.{k}": v for k, v in head.items()})
        t["mtp.0.e_proj.weight"] = ((d, d), "lin")
        t["mtp.0.h_proj.weight"] = ((d, d), "lin")
        for norm in ("enorm", "hnorm", "norm"):
            t[f"mtp.0.{norm}.weight"] = ((d,), "bf16")
    return t


def _draw(name: str, shape: tuple[int, ...], kind: str, raw: dict, g: torch.Generator) -> torch.Tensor:
    if kind == "idx":
        return torch.stack([torch.randperm(raw["n_routed_experts"], generator=g)[: shape[1]] for _ in range(shape[0])])
    x = torch.randn(shape, generator=g)
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * x
    if name == "embed.weight":
        return x
    if len(shape) == 2 and not name.endswith("_fn"):
        return x / math.sqrt(shape[1])
    return 0.5 * x


def _fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 e4m3 with one power-of-two (e8m0) scale per 128x128 block."""
    rows, cols = w.shape
    br, bc = -(-rows // 128), -(-cols // 128)
    padded = torch.zeros(br * 128, bc * 128)
    padded[:rows, :cols] = w
    amax = padded.reshape(br, 128, bc, 128).abs().amax(dim=(1, 3)).clamp(min=1e-30)
    exp = torch.ceil(torch.log2(amax / 448.0))
    scale = torch.exp2(exp).repeat_interleave(128, 0).repeat_interleave(128, 1)[:rows, :cols]
    q = (w / scale).to(torch.float8_e4m3fn)
    return q, (exp + 127).to(torch.uint8).view(torch.float8_e8m0fnu)


# OCP MX v1.0, E2M1: sign bit, 2 exponent bits (bias 1), 1 mantissa bit; codes 0..7 are these magnitudes
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def _mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MXFP4 as the release stores experts: blocks of 32 inputs share an e8m0 scale 2^(ceil(log2(amax/6)))
    (so every scaled value fits in E2M1's +-6), each value is its nearest E2M1 code, two codes per byte
    with the even input in the low nibble. Returns (int8 [out, in/2], e8m0 [out, in/32], decoded fp32)."""
    rows, cols = w.shape
    blocks = w.reshape(rows, cols // 32, 32)
    exp = torch.ceil(torch.log2(blocks.abs().amax(dim=2).clamp(min=1e-30) / 6.0))
    scaled = blocks / torch.exp2(exp)[..., None]
    table = torch.tensor(E2M1)
    mag = (scaled.abs()[..., None] - table).abs().argmin(dim=-1)  # nearest magnitude code 0..7
    codes = (mag | ((scaled < 0).long() << 3)).reshape(rows, cols)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8).view(torch.int8)
    values = table[mag] * torch.where(scaled < 0, -1.0, 1.0)
    decoded = (values * torch.exp2(exp)[..., None]).reshape(rows, cols)
    return packed, (exp + 127).to(torch.uint8).view(torch.float8_e8m0fnu), decoded


def write_release(path: Path, raw: dict, draft: str | None = "dspark", stages: int = 3, seed: int = 0,
                  edit=None) -> dict[str, torch.Tensor]:  # fmt: skip
    """Write config.json, two shards and the index; return the tensors as stored, in fp32.
    `edit(stored)` may change the stored dict (name -> tensor) before it is written."""
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    stored, seen = {}, {}
    for name, (shape, kind) in layout(raw, draft, stages).items():
        w = _draw(name, shape, kind, raw, g)
        if kind == "lin":
            q, s = _fp8(w)
            stored[name], stored[name[: -len("weight")] + "scale"] = q, s
            seen[name] = q.float() * torch.exp2(s.view(torch.uint8).float() - 127).repeat_interleave(128, 0).repeat_interleave(128, 1)[: shape[0], : shape[1]]  # fmt: skip
        elif kind == "fp4":
            q, sc, seen[name] = _mxfp4(w)
            stored[name], stored[name[: -len("weight")] + "scale"] = q, sc
        elif kind == "bf16":
            stored[name] = w.to(torch.bfloat16)
            seen[name] = stored[name].float()
        else:
            stored[name] = w.contiguous()
            seen[name] = w
    if edit is not None:
        edit(stored)
    names = sorted(stored)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for fname, part in halves.items():
        save_file({k: stored[k] for k in part}, str(path / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(raw, indent=1))
    return seen
