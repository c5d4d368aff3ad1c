"""Both config.json dialects parse to the same model description."""

import pytest

from dsv4.config import ModelConfig

FLASH = {
    "vocab_size": 129280, "hidden_size": 4096, "num_hidden_layers": 43, "num_attention_heads": 64,
    "num_key_value_heads": 1, "head_dim": 512, "qk_rope_head_dim": 64, "q_lora_rank": 1024, "o_groups": 8,
    "o_lora_rank": 1024, "n_routed_experts": 256, "num_experts_per_tok": 6, "n_shared_experts": 1,
    "moe_intermediate_size": 2048, "routed_scaling_factor": 1.5, "scoring_func": "sqrtsoftplus",
    "topk_method": "noaux_tc", "norm_topk_prob": True, "swiglu_limit": 10.0, "num_hash_layers": 3,
    "sliding_window": 128, "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0], "rms_norm_eps": 1e-6,
    "rope_theta": 10000, "compress_rope_theta": 160000,
    "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32, "beta_slow": 1},
    "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512, "hc_mult": 4, "hc_sinkhorn_iters": 20,
    "hc_eps": 1e-6, "num_nextn_predict_layers": 1, "max_position_embeddings": 1048576, "bos_token_id": 0,
    "eos_token_id": 1, "expert_dtype": "fp4",
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0", "weight_block_size": [128, 128]},
}  # fmt: skip
PRO = {
    **FLASH, "hidden_size": 7168, "num_hidden_layers": 61, "num_attention_heads": 128, "q_lora_rank": 1536,
    "o_groups": 16, "n_routed_experts": 384, "moe_intermediate_size": 3072, "routed_scaling_factor": 2.5,
    "index_topk": 1024, "compress_ratios": [128, 128] + [4, 128] * 29 + [4, 0],
}  # fmt: skip


def _transformers_dialect(official: dict) -> dict:
    """The same model in transformers' own keys."""
    kinds = {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}
    n = official["num_hidden_layers"]
    out = {k: v for k, v in official.items() if k not in ("compress_ratios", "num_hash_layers", "qk_rope_head_dim", "rope_scaling")}
    out["layer_types"] = [kinds[r] for r in official["compress_ratios"][:n]]
    out["compress_rates"] = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
    out["mlp_layer_types"] = ["hash_moe"] * 3 + ["moe"] * (n - 3)
    out["partial_rotary_factor"] = 64 / 512
    rs = official["rope_scaling"]
    out["rope_parameters"] = {
        "main": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.125},
        "compress": {"rope_type": "yarn", "rope_theta": 160000.0, "factor": rs["factor"], "partial_rotary_factor": 0.125,
                     "original_max_position_embeddings": rs["original_max_position_embeddings"],
                     "beta_fast": 32, "beta_slow": 1, "attention_factor": 1.0},
    }  # fmt: skip
    return out


@pytest.mark.parametrize("official", [FLASH, PRO], ids=["flash", "pro"])
def test_dialects_agree(official):
    a = ModelConfig.from_dict(official)
    b = ModelConfig.from_dict(_transformers_dialect(official))
    assert a.to_dict() == {**b.to_dict(), "mtp_compress_ratio": 0, "draft_compress_ratios": (0,)}
    assert a.rope_head_dim == 64 and a.original_seq_len == 65536 and a.rope_factor == 16
    assert a.hash_layers[:4] == (True, True, True, False)


def test_flash_and_pro_values():
    f, p = ModelConfig.from_dict(FLASH), ModelConfig.from_dict(PRO)
    assert (f.n_layers, f.dim, f.n_heads, f.n_routed_experts, f.index_topk) == (43, 4096, 64, 256, 512)
    assert (p.n_layers, p.dim, p.n_heads, p.n_routed_experts, p.index_topk) == (61, 7168, 128, 384, 1024)
    assert [f.layer_kind(i) for i in range(4)] == ["sliding", "sliding", "csa", "hca"]
    assert [p.layer_kind(i) for i in range(4)] == ["hca", "hca", "csa", "hca"]
    assert f.expert_dtype == "fp4" and f.mtp_compress_ratio == 0


def test_transformers_config_class_round_trip():
    """transformers' own DeepseekV4Config, serialized, parses to the same model as the official keys."""
    transformers = pytest.importorskip("transformers")
    keys = {k: v for k, v in FLASH.items() if k not in ("quantization_config", "rope_scaling", "topk_method", "expert_dtype")}
    keys["rope_parameters"] = {"rope_type": "yarn", **{k: v for k, v in FLASH["rope_scaling"].items() if k != "type"}}
    hf = transformers.DeepseekV4Config(**keys).to_dict()
    a, b = ModelConfig.from_dict(FLASH).to_dict(), ModelConfig.from_dict(hf).to_dict()
    # transformers' layer_types drop the MTP layer's trailing compress ratio
    assert {k: v for k, v in a.items() if a[k] != b[k]} == {"quantized": True, "expert_dtype": "fp4", "draft_compress_ratios": (0,)}


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"num_hidden_layers": "four"}, "must be an integer"),
        ({"compress_ratios": [0, 4]}, "compress_ratios has 2 entries"),
        ({"layer_types": ["nope"] * 43, "compress_ratios": None}, "unknown layer type"),
        ({"head_dim": 512, "qk_rope_head_dim": 600}, "rope_head_dim"),
        ({"norm_topk_prob": False}, "'norm_topk_prob' is False: DeepSeek V4 renormalizes"),
        ({"scoring_func": "tanh"}, "'scoring_func' is 'tanh'"),
    ],
)
def test_bad_configs(bad, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_dict({**FLASH, **bad})


def test_references_renormalize_the_router_weights_whatever_norm_topk_prob_says():
    """Why a config with norm_topk_prob false is refused rather than honoured: transformers' router
    divides by the chosen weights' sum regardless (as the official code does), so no reference computes
    what such a config would ask for. If this starts failing, transformers honours the key: follow it."""
    transformers = pytest.importorskip("transformers")
    import torch
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4TopKRouter

    hf = transformers.DeepseekV4Config(hidden_size=16, n_routed_experts=8, num_experts_per_tok=2, num_hidden_layers=2,
                                       norm_topk_prob=False)  # fmt: skip
    router = DeepseekV4TopKRouter(hf)
    torch.nn.init.normal_(router.weight, generator=torch.Generator().manual_seed(0))
    _, weights, _ = router(torch.randn(5, 16, generator=torch.Generator().manual_seed(1)))
    assert torch.allclose(weights.sum(-1), torch.full((5,), hf.routed_scaling_factor))
    assert ModelConfig.from_dict({**FLASH, "norm_topk_prob": True}) == ModelConfig.from_dict(FLASH)
