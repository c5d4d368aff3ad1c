"""The model configuration: one frozen description of a DeepSeek V4 network.

`ModelConfig.from_dict` reads either config.json dialect and gives the same object for both:
the official release keys (`compress_ratios`, `num_hash_layers`, `qk_rope_head_dim`, `rope_scaling`,
`quantization_config`, `expert_dtype`; also the `inference/` ModelArgs names such as `dim`,
`n_layers`) and transformers' keys (`layer_types`, `compress_rates`, `mlp_layer_types`,
`rope_parameters`). Field names follow the official reference (`dim`, `n_heads`, `window_size`...).

It knows nothing of weights, files or devices; runtime choices (dtype, numerics, memory budgets) live
elsewhere.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

LAYER_TYPE_TO_RATIO_NAME = {
    "sliding_attention": None,
    "compressed_sparse_attention": "compressed_sparse_attention",
    "heavily_compressed_attention": "heavily_compressed_attention",
}
DEFAULT_COMPRESS_RATES = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}


CSA_RATIO = 4  # official configs give only ratios: the official code makes ratio-4 layers CSA, others HCA
SCORE_FUNCS = ("sqrtsoftplus", "sigmoid", "softmax")  # router scores: V4's, and V3's two (model.MoE.route)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 129280
    dim: int = 4096
    n_layers: int = 43
    n_heads: int = 64
    head_dim: int = 512
    rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    # MoE
    n_routed_experts: int = 256
    n_activated_experts: int = 6
    n_shared_experts: int = 1
    moe_inter_dim: int = 2048
    route_scale: float = 1.5
    score_func: str = "sqrtsoftplus"  # one of SCORE_FUNCS
    swiglu_limit: float = 10.0
    hash_layers: tuple[bool, ...] = ()  # per layer: routed by tid2eid[token] instead of top-k
    # attention
    window_size: int = 128
    compress_ratios: tuple[int, ...] = ()  # per layer: 0 sliding only, else tokens per compressed entry
    csa_layers: tuple[bool, ...] = ()  # per layer: overlapping compressor + lightning indexer (CSA)
    mtp_compress_ratio: int = 0
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_factor: float = 16.0
    original_seq_len: int = 65536  # 0 disables YaRN on the compressed layers
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    # manifold-constrained hyper-connections
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    # draft heads: the preview's MTP layer, or the 0731-style DSpark draft (dspark_block_size > 0)
    n_mtp_layers: int = 1  # num_nextn_predict_layers; DSpark checkpoints still say 1 (count mtp.N instead)
    draft_compress_ratios: tuple[int, ...] = ()  # compress_ratios past the layers: one per MTP layer / stage
    dspark_block_size: int = 0  # tokens per draft block: the anchor then noise tokens
    dspark_noise_token_id: int = -1
    dspark_target_layer_ids: tuple[int, ...] = ()  # target layers whose outputs feed main_proj
    dspark_markov_rank: int = 0  # width of markov_head.markov_w1/w2
    # extras
    max_seq_len: int = 1048576
    bos_token_id: int = 0
    eos_token_id: int = 1
    quantized: bool = False  # dense weights shipped as FP8 with block scales
    expert_dtype: str | None = None  # "fp4" when the routed experts ship as MXFP4
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        lens = {len(self.compress_ratios), len(self.csa_layers), len(self.hash_layers)}
        if lens != {self.n_layers}:
            raise ValueError(
                f"config lists {len(self.compress_ratios)} compress ratios and {len(self.hash_layers)} "
                f"router kinds for {self.n_layers} layers; each needs one entry per layer"
            )
        if self.score_func not in SCORE_FUNCS:
            raise ValueError(f"config key 'scoring_func' is {self.score_func!r}; dsv4 implements {list(SCORE_FUNCS)}")
        bad = [r for r in self.compress_ratios if r < 0 or r == 1]
        if bad:
            raise ValueError(f"compress ratios must be 0 (sliding window) or > 1, got {bad}")
        if self.head_dim % 2 or self.rope_head_dim % 2 or self.rope_head_dim > self.head_dim:
            raise ValueError(f"rope_head_dim {self.rope_head_dim} must be even and <= head_dim {self.head_dim}")
        if self.n_heads % self.o_groups:
            raise ValueError(f"n_heads {self.n_heads} must be a multiple of o_groups {self.o_groups}")
        if self.dspark_block_size:
            self._check_dspark()

    def _check_dspark(self) -> None:
        bad = [i for i in self.dspark_target_layer_ids if not 0 <= i < self.n_layers]
        if not self.dspark_target_layer_ids or bad:
            raise ValueError(
                f"dspark_target_layer_ids {list(self.dspark_target_layer_ids)} must name layers in [0, {self.n_layers})"
            )
        if self.dspark_block_size < 2:
            raise ValueError(f"dspark_block_size must be >= 2 (anchor + noise tokens), got {self.dspark_block_size}")
        if not 0 <= self.dspark_noise_token_id < self.vocab_size:
            raise ValueError(f"dspark_noise_token_id {self.dspark_noise_token_id} is outside the vocabulary [0, {self.vocab_size})")
        if self.dspark_markov_rank < 1:
            raise ValueError(f"dspark_markov_rank must be >= 1, got {self.dspark_markov_rank}")

    # ---- derived ----

    @property
    def n_mix(self) -> int:
        """Width of an mHC projection: pre (n) + post (n) + comb (n x n)."""
        return (2 + self.hc_mult) * self.hc_mult

    @property
    def dspark(self) -> bool:
        """The config declares a DSpark draft (0731-style releases and the DSpark repos)."""
        return self.dspark_block_size > 0

    @property
    def mtp_csa(self) -> bool:
        """The MTP layer attends with CSA (the overlapping compressor and the indexer)."""
        return self.mtp_compress_ratio == CSA_RATIO

    def layer_kind(self, layer: int) -> str:
        """'sliding', 'csa' or 'hca'."""
        if self.compress_ratios[layer] == 0:
            return "sliding"
        return "csa" if self.csa_layers[layer] else "hca"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        return d

    # ---- parsing ----

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no config.json at {path}: point --model at a checkpoint folder") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Parse an official, inference/ModelArgs or transformers config.json dict."""
        g = _Getter(raw)
        n_layers = g.int("num_hidden_layers", "n_layers", default=43)
        head_dim = g.int("head_dim", default=512)
        rope = _parse_rope(raw, g)
        partial = rope.pop("partial_rotary_factor", 64 / 512)
        rope_head_dim = g.int("qk_rope_head_dim", "rope_head_dim", default=0) or int(round(head_dim * partial))
        ratios, csa, draft_ratios = _parse_compress_ratios(raw, n_layers)
        quant = raw.get("quantization_config") or {}
        expert_dtype = raw.get("expert_dtype") or quant.get("expert_dtype")
        eos = raw.get("eos_token_id", 1)
        if raw.get("norm_topk_prob") not in (None, True):
            # The official code and transformers (5.23) both divide the chosen experts' router weights by
            # their sum, whatever this key says; a config asking for raw weights describes another model.
            raise ValueError(
                f"config key 'norm_topk_prob' is {raw['norm_topk_prob']!r}: DeepSeek V4 renormalizes the top-k "
                "router weights (the official code and transformers ignore the key), and dsv4 implements only "
                "that; set it to true or remove it"
            )
        return cls(
            vocab_size=g.int("vocab_size", default=129280),
            dim=g.int("hidden_size", "dim", default=4096),
            n_layers=n_layers,
            n_heads=g.int("num_attention_heads", "n_heads", default=64),
            head_dim=head_dim,
            rope_head_dim=rope_head_dim,
            q_lora_rank=g.int("q_lora_rank", default=1024),
            o_groups=g.int("o_groups", default=8),
            o_lora_rank=g.int("o_lora_rank", default=1024),
            n_routed_experts=g.int("n_routed_experts", "num_local_experts", default=256),
            n_activated_experts=g.int("num_experts_per_tok", "n_activated_experts", default=6),
            n_shared_experts=g.int("n_shared_experts", default=1),
            moe_inter_dim=g.int("moe_intermediate_size", "moe_inter_dim", default=2048),
            route_scale=g.float("routed_scaling_factor", "route_scale", default=1.5),
            score_func=str(raw.get("scoring_func", raw.get("score_func", "sqrtsoftplus"))),
            swiglu_limit=g.float("swiglu_limit", default=10.0),
            hash_layers=_parse_hash_layers(raw, n_layers),
            window_size=g.int("sliding_window", "window_size", default=128),
            compress_ratios=ratios,
            csa_layers=csa,
            mtp_compress_ratio=draft_ratios[0] if draft_ratios else 0,
            draft_compress_ratios=draft_ratios,
            norm_eps=g.float("rms_norm_eps", "norm_eps", default=1e-6),
            index_n_heads=g.int("index_n_heads", default=64),
            index_head_dim=g.int("index_head_dim", default=128),
            index_topk=g.int("index_topk", default=512),
            hc_mult=g.int("hc_mult", default=4),
            hc_sinkhorn_iters=g.int("hc_sinkhorn_iters", default=20),
            hc_eps=g.float("hc_eps", default=1e-6),
            n_mtp_layers=g.int("num_nextn_predict_layers", "n_mtp_layers", default=1),
            dspark_block_size=g.int("dspark_block_size", default=0),
            dspark_noise_token_id=g.int("dspark_noise_token_id", default=-1),
            dspark_target_layer_ids=_int_tuple(raw, "dspark_target_layer_ids"),
            dspark_markov_rank=g.int("dspark_markov_rank", default=0),
            max_seq_len=g.int("max_position_embeddings", "max_seq_len", default=1048576),
            bos_token_id=int(raw.get("bos_token_id", 0) or 0),
            eos_token_id=int(eos[0] if isinstance(eos, list) else (eos if eos is not None else 1)),
            quantized=quant.get("quant_method") == "fp8" or raw.get("dtype") == "fp8",
            expert_dtype=expert_dtype,
            extra={k: v for k, v in raw.items() if k not in _KNOWN_KEYS},
            **rope,
        )


class _Getter:
    """Reads the first present key of several aliases, with a type check."""

    def __init__(self, raw: dict[str, Any]):
        self.raw = raw

    def _first(self, names: tuple[str, ...], default: Any) -> tuple[str | None, Any]:
        for n in names:
            if self.raw.get(n) is not None:
                return n, self.raw[n]
        return None, default

    def int(self, *names: str, default: int) -> int:
        name, v = self._first(names, default)
        if isinstance(v, bool) or not isinstance(v, int | float) or int(v) != v:
            raise ValueError(f"config key {name!r} must be an integer, got {v!r}")
        return int(v)

    def float(self, *names: str, default: float) -> float:
        name, v = self._first(names, default)
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ValueError(f"config key {name!r} must be a number, got {v!r}")
        return float(v)


def _int_tuple(raw: dict[str, Any], key: str) -> tuple[int, ...]:
    v = raw.get(key)
    if v is None:
        return ()
    if not isinstance(v, list | tuple) or any(isinstance(x, bool) or not isinstance(x, int) for x in v):
        raise ValueError(f"config key {key!r} must be a list of integers, got {v!r}")
    return tuple(v)


def _parse_compress_ratios(raw: dict[str, Any], n_layers: int) -> tuple[tuple[int, ...], tuple[bool, ...], tuple[int, ...]]:
    """Per-layer compress ratios and CSA flags, plus the draft's entries that official configs list after
    the layers: one for the preview's MTP layer, one per stage (n_layers + 3 entries) for a DSpark draft."""
    if raw.get("compress_ratios") is not None:
        ratios = [int(r) for r in raw["compress_ratios"]]
        if len(ratios) < n_layers:
            raise ValueError(f"compress_ratios has {len(ratios)} entries for {n_layers} layers")
        csa = tuple(r == CSA_RATIO for r in ratios[:n_layers])
        return tuple(ratios[:n_layers]), csa, tuple(ratios[n_layers:])
    rates = dict(DEFAULT_COMPRESS_RATES)
    rates.update(raw.get("compress_rates") or {})
    for legacy, key in (("compress_rate_csa", "compressed_sparse_attention"), ("compress_rate_hca", "heavily_compressed_attention")):
        if raw.get(legacy) is not None:
            rates[key] = int(raw[legacy])
    types = raw.get("layer_types")
    if types is None:  # transformers' default: two HCA layers, then CSA/HCA alternating
        types = ["heavily_compressed_attention"] * min(n_layers, 2) + [
            "compressed_sparse_attention" if i % 2 else "heavily_compressed_attention" for i in range(max(n_layers - 2, 0))
        ]
    if len(types) < n_layers:
        raise ValueError(f"layer_types has {len(types)} entries for {n_layers} layers")
    out = []
    for t in types[:n_layers]:
        if t not in LAYER_TYPE_TO_RATIO_NAME:
            raise ValueError(f"unknown layer type {t!r}; expected one of {sorted(LAYER_TYPE_TO_RATIO_NAME)}")
        out.append(0 if t == "sliding_attention" else int(rates[t]))
    csa = tuple(t == "compressed_sparse_attention" for t in types[:n_layers])
    return tuple(out), csa, ()


def _parse_hash_layers(raw: dict[str, Any], n_layers: int) -> tuple[bool, ...]:
    types = raw.get("mlp_layer_types")
    if types is not None:
        bad = [t for t in types if t not in ("hash_moe", "moe")]
        if bad or len(types) < n_layers:
            raise ValueError(f"mlp_layer_types must list 'hash_moe'/'moe' for each of {n_layers} layers, got {types}")
        return tuple(t == "hash_moe" for t in types[:n_layers])
    n_hash = raw.get("num_hash_layers", raw.get("n_hash_layers", 3))
    return tuple(i < int(n_hash) for i in range(n_layers))


def _parse_rope(raw: dict[str, Any], g: _Getter) -> dict[str, Any]:
    """RoPE fields from `rope_scaling` (official), `rope_parameters` (transformers) or ModelArgs keys."""
    out: dict[str, Any] = {
        "rope_theta": g.float("rope_theta", default=10000.0),
        "compress_rope_theta": g.float("compress_rope_theta", default=160000.0),
    }
    params = raw.get("rope_parameters") or {}
    main, comp = params.get("main"), params.get("compress")
    if isinstance(main, dict) and isinstance(comp, dict):
        out["rope_theta"] = float(main.get("rope_theta", out["rope_theta"]))
        out["compress_rope_theta"] = float(comp.get("rope_theta", out["compress_rope_theta"]))
        yarn = comp
        if "partial_rotary_factor" in comp:
            out["partial_rotary_factor"] = float(comp["partial_rotary_factor"])
    else:
        yarn = raw.get("rope_scaling") or params or {}
    if raw.get("partial_rotary_factor") is not None:
        out["partial_rotary_factor"] = float(raw["partial_rotary_factor"])
    kind = yarn.get("rope_type", yarn.get("type"))
    if kind == "yarn":
        out["rope_factor"] = float(yarn.get("factor", 16.0))
        out["original_seq_len"] = int(yarn.get("original_max_position_embeddings", 65536))
        out["beta_fast"] = float(yarn.get("beta_fast") or 32)
        out["beta_slow"] = float(yarn.get("beta_slow") or 1)
    elif raw.get("original_seq_len") is not None:  # inference/ModelArgs
        out["original_seq_len"] = int(raw["original_seq_len"])
        out["rope_factor"] = float(raw.get("rope_factor", 16.0))
        out["beta_fast"] = float(raw.get("beta_fast", 32))
        out["beta_slow"] = float(raw.get("beta_slow", 1))
    else:  # no scaling given: plain RoPE on the compressed layers too
        out["original_seq_len"] = 0
    return out


_KNOWN_KEYS = {
    "vocab_size", "hidden_size", "dim", "num_hidden_layers", "n_layers", "num_attention_heads", "n_heads",
    "head_dim", "qk_rope_head_dim", "rope_head_dim", "q_lora_rank", "o_groups", "o_lora_rank",
    "n_routed_experts", "num_local_experts", "num_experts_per_tok", "n_activated_experts", "n_shared_experts",
    "moe_intermediate_size", "moe_inter_dim", "routed_scaling_factor", "route_scale", "scoring_func",
    "score_func", "norm_topk_prob", "swiglu_limit", "mlp_layer_types", "num_hash_layers", "n_hash_layers",
    "sliding_window", "window_size", "compress_ratios", "compress_rates", "layer_types", "rms_norm_eps",
    "norm_eps", "rope_theta", "compress_rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor",
    "index_n_heads", "index_head_dim", "index_topk", "hc_mult", "hc_sinkhorn_iters", "hc_eps",
    "num_nextn_predict_layers", "n_mtp_layers", "max_position_embeddings", "max_seq_len", "bos_token_id",
    "eos_token_id", "quantization_config", "expert_dtype", "original_seq_len", "rope_factor", "beta_fast",
    "beta_slow", "dspark_block_size", "dspark_noise_token_id", "dspark_target_layer_ids", "dspark_markov_rank",
}  # fmt: skip
