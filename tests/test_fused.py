"""The fused per-layer ops (dsv4/kernels/fused.h) against their plain-torch references, per ISA build.

Each fused op must agree with the reference it replaces: fp32 within float rounding of the same math
(1e-5), bf16 within one bf16 rounding step. A whole tiny model must give fp32 logits within 1e-5 of
the reference path's and the same greedy chain in bf16.
"""

from __future__ import annotations

import pytest
import torch
from conftest import CONFIGS, token_ids
from test_kernels import isa  # noqa: F401  (fixture: every build this CPU can run)

import dsv4
from dsv4 import kernels, ops
from dsv4.config import ModelConfig
from dsv4.model import HyperConnection, MoE
from dsv4.tiny import random_weights

needs_compiled = pytest.mark.usefixtures("isa")
DTYPES = [torch.float32, torch.bfloat16]


def agree(y: torch.Tensor, ref: torch.Tensor) -> None:
    assert y.dtype == ref.dtype and y.shape == ref.shape
    if y.dtype == torch.bfloat16:  # one bf16 step at most, where fp32 math rounded differently
        torch.testing.assert_close(y, ref, rtol=2**-7, atol=1e-3)
    else:
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


class Src:
    """A WeightSource over random_weights of a tiny config."""

    def __init__(self, cfg: ModelConfig):
        self.t = random_weights(cfg, seed=3)

    def tensor(self, name: str) -> torch.Tensor:
        return self.t[name]

    def weight(self, prefix: str, dtype: torch.dtype):
        from dsv4.quant import Dense

        return Dense(self.t[prefix + ".weight"].to(dtype))


CFG = ModelConfig.from_dict(CONFIGS["flash"])


def rand(*shape, dtype=torch.float32, seed=0, scale=1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


@needs_compiled
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 5])
def test_hc_pre_post(dtype, T):
    hc = HyperConnection(CFG, Src(CFG), "layers.1.hc_attn")
    h = rand(T, CFG.hc_mult, CFG.dim, dtype=dtype, seed=T)
    x, post, comb = hc.pre(h)
    rx, rpost, rcomb = hc.pre_torch(h)
    agree(x, rx)
    agree(post, rpost)
    agree(comb, rcomb)
    assert comb.sum(-2).sub(1).abs().max() < 1e-3  # Sinkhorn: columns sum to 1
    out = rand(T, CFG.dim, dtype=dtype, seed=9)
    agree(HyperConnection.post(out, h, rpost, rcomb), HyperConnection.post_torch(out, h, rpost, rcomb))


@needs_compiled
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighted", [True, False])
def test_norm_and_rope(dtype, weighted):
    x = rand(3, 4, 96, dtype=dtype, scale=3.0)
    w = rand(96, seed=2) if weighted else None
    cos, sin = torch.cos(rand(3, 16, seed=4)), torch.sin(rand(3, 16, seed=4))
    agree(ops.rms_norm(x, w, 1e-6), ops.rms_norm_torch(x, w, 1e-6))
    agree(ops.rms_norm(x[:, 0], w, 1e-6), ops.rms_norm_torch(x[:, 0], w, 1e-6))  # 2-D, a strided view
    for inverse in (False, True):
        agree(ops.rope(x, cos, sin, inverse), ops.rope_torch(x, cos, sin, inverse))
    agree(ops.norm_rope(x, w, 1e-6, cos, sin), ops.rope_torch(ops.rms_norm_torch(x, w, 1e-6), cos, sin))
    if dtype == torch.bfloat16:  # the norm's bf16 rounding happens before the rotation, as in the reference
        agree(ops.norm_rope(x, w, 1e-6, cos, sin), ops.rope(ops.rms_norm(x, w, 1e-6), cos, sin))


@needs_compiled
@pytest.mark.parametrize("func", ["sqrtsoftplus", "sigmoid", "softmax"])
@pytest.mark.parametrize("hashed", [False, True])
def test_route(func, hashed):
    layer = CFG.hash_layers.index(hashed)
    moe = MoE(CFG, Src(CFG), f"layers.{layer}.ffn", hashed, dsv4.model.Numerics(torch.float32))
    moe.score_func = func
    x = rand(7, CFG.dim, scale=4.0, seed=5)
    tokens = torch.tensor(token_ids(7, CFG.vocab_size))
    w, ids = moe.route(x, tokens)
    rw, rids = moe.route_torch(torch.nn.functional.linear(x, moe.gate), tokens)
    assert torch.equal(ids, rids)
    agree(w, rw)


@needs_compiled
def test_fused_refuses_what_it_cannot_do():
    x = rand(2, 8).requires_grad_()
    assert kernels.fused(x) is None  # autograd must differentiate: the reference takes it
    with torch.no_grad():
        assert kernels.fused(x) is not None
    assert kernels.fused(rand(2, 8, dtype=torch.float16)) is None
    ext = kernels.fused(rand(1))
    with pytest.raises(RuntimeError, match="fn"):
        ext.hc_pre(rand(1, 4, 8), rand(3, 3), rand(3), rand(24), 3, 1e-6, 1e-6)
    with pytest.raises(RuntimeError, match="cos/sin"):
        ext.norm_rope(rand(2, 8), None, 1e-6, rand(3, 2), rand(3, 2), False)


@needs_compiled
def test_model_matches_reference_path(tiny_ckpt, monkeypatch):
    """fp32 logits within 1e-5 of the plain-torch ops'; a bf16 greedy chain unchanged."""
    path = tiny_ckpt("flash").path
    ids = token_ids(40, CFG.vocab_size)
    fused32, fused16 = dsv4.load(path, dtype=torch.float32), dsv4.load(path)
    logits, chain = (
        fused32.logits(ids),
        fused16.generate(ids[:8], max_tokens=12, temperature=0.0, ignore_eos=True),
    )
    monkeypatch.setattr(kernels, "fused", lambda *t: None)
    ref32, ref16 = dsv4.load(path, dtype=torch.float32), dsv4.load(path)
    ref = ref32.logits(ids)
    assert ((logits - ref).norm(dim=-1) / ref.norm(dim=-1)).max() < 1e-5
    assert chain == ref16.generate(ids[:8], max_tokens=12, temperature=0.0, ignore_eos=True)


@needs_compiled
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 9])  # 9: past the GEMV's rows, F.linear takes it
def test_dense_gemv(dtype, rows):
    from dsv4.quant import Dense

    x, w = rand(rows, 200, dtype=dtype), rand(1000, 200, dtype=dtype, seed=7)
    agree(ops.linear(x, Dense(w)), torch.nn.functional.linear(x, w))
    if dtype == torch.bfloat16:  # fp32 math on a bf16 matrix (router, compressors): the same values
        xf = x.float()
        agree(ops.linear(xf, Dense(w)), torch.nn.functional.linear(xf, w.float()))


@needs_compiled
@pytest.mark.parametrize("native", [True, False])
def test_dense_gemv_takes_a_decode_batch_without_native_bf16(monkeypatch, native):
    """16 rows against a bf16 matrix (the head, a server batch) take the GEMV where torch has no
    native bf16 GEMM, F.linear where it has one; the same values either way."""
    from dsv4.quant import Dense

    calls, ext = [], kernels.fused()

    class Counting:  # the extension, counting its GEMV calls, with or without native bf16 GEMMs
        def dense_linear(self, *args):
            calls.append(1)
            return ext.dense_linear(*args)

        def has_bf16_gemm(self):
            return native

    monkeypatch.setattr(kernels, "fused", lambda *t: Counting())
    x, w = rand(ops.DECODE_ROWS, 200, dtype=torch.bfloat16), rand(300, 200, dtype=torch.bfloat16, seed=7)
    agree(ops.linear(x, Dense(w)), torch.nn.functional.linear(x, w))
    assert len(calls) == (0 if native else 1)
    ops.linear(x[: ops.GEMV_ROWS], Dense(w))  # a few rows: the GEMV whatever the CPU
    assert len(calls) == (1 if native else 2)


@needs_compiled
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("fmt", ["fp8", "dense"])
def test_grouped_linear(dtype, rows, fmt, monkeypatch):
    from dsv4.quant import Dense, FP8Block, quantize_fp8_block

    w = FP8Block(*quantize_fp8_block(rand(4 * 128, 96, seed=1)))
    if fmt == "dense":
        w = Dense(w.dequantize(dtype))
    x = rand(rows, 4, 96, dtype=dtype, seed=2)
    y = ops.grouped_linear(x, w, 4)
    monkeypatch.setattr(kernels, "fused", lambda *t: None)  # the per-group products, one call each
    agree(y, ops.grouped_linear(x, w, 4))
    # and what the groups mean: group g is x[:, g] through rows g*128 .. of the dequantized weight
    ref = torch.einsum("tgi,goi->tgo", x.float(), w.dequantize().view(4, 128, 96)).to(dtype)
    agree(y, ref)


@needs_compiled
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("parts", [[5], [120, 1, 16], [0, 1]])  # window, new key, picked entries
def test_decode_attention(dtype, parts):
    q = rand(1, 4, 64, dtype=dtype, seed=1)
    keys = [rand(n, 64, dtype=dtype, seed=2 + i) for i, n in enumerate(parts)]
    sink = rand(4, seed=9)
    ref = ops.sink_attention(q, torch.cat(keys), None, sink, 64**-0.5)
    agree(ops.decode_attention(q, keys, sink, 64**-0.5), ref)


@needs_compiled
@pytest.mark.parametrize("n", [3, 40])  # fewer entries than the top-k, and more
def test_indexer_top(n):
    from dsv4.model import Indexer, Numerics

    ix = Indexer(CFG, Src(CFG), "layers.1.attn.indexer", 4, Numerics(torch.float32))
    q, w = rand(1, CFG.index_n_heads, CFG.index_head_dim, seed=1), rand(1, CFG.index_n_heads, seed=2)
    keys = rand(n, CFG.index_head_dim, seed=3)
    keys[n // 2] = keys[0]  # equal scores: the earlier entry first
    assert ix.top(q, w, keys).tolist() == ix.top_torch(q, w, keys).tolist()
    q.zero_()  # every score 0: the earliest entries, as the stable sort keeps them
    assert ix.top(q, w, keys).tolist() == ix.top_torch(q, w, keys).tolist() == list(range(min(n, ix.topk)))


@needs_compiled
@pytest.mark.parametrize("fmt", ["dense", "fp8", "mxfp4"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 16])  # 16: experts_sum for a batch of decoding sequences
def test_expert_mlp(fmt, dtype, rows):
    from dsv4.quant import MXFP4, Dense, FP8Block, quantize_fp8_block, quantize_mxfp4

    def weight(o, i, seed):
        w = rand(o, i, seed=seed, scale=0.1)
        if fmt == "fp8":
            return FP8Block(*quantize_fp8_block(w))
        if fmt == "mxfp4":
            return MXFP4(*quantize_mxfp4(w))
        return Dense(w.to(dtype))

    w1, w3, w2 = weight(192, 256, 1), weight(192, 256, 2), weight(256, 192, 3)
    x, route = rand(rows, 256, dtype=dtype, seed=4), rand(rows, 1, seed=5).abs()
    tol = dict(rtol=1e-5, atol=2e-2 if dtype == torch.bfloat16 else 1e-5)  # fp32 sums of outputs that agree()
    for limit in (0.0, 0.5):
        y = ops.expert_mlp(x, w1, w2, w3, limit, route)
        agree(y, ops.expert_mlp_torch(x, w1, w2, w3, limit, route))
        acc, ref = rand(rows, 256, seed=6), rand(rows, 256, seed=6)
        out = ops.expert_mlp(x, w1, w2, w3, limit, route, acc=acc)
        assert out is acc  # added in place
        torch.testing.assert_close(acc, ops.expert_mlp_torch(x, w1, w2, w3, limit, route, acc=ref), **tol)
        # several experts summed in list order, one unscaled (the shared one), from zeros or onto acc
        routes, other = rand(rows, 3, seed=7), (w3, w2, w1)
        if fmt == "dense":  # a strided weight: the tensor path inside the fused call
            other = (w3, Dense(w2.weight.t().contiguous().t()), w1)
        experts, slots = [(w1, w2, w3), other, (w1, w2, w3)], [None, 2, 0]
        total = ops.experts_sum(x, experts, limit, routes, slots)
        ref = torch.zeros(rows, 256)
        for (a, b, c), s in zip(experts, slots, strict=True):
            ref += ops.expert_mlp_torch(x, a, b, c, limit, None if s is None else routes[:, s : s + 1]).float()
        torch.testing.assert_close(total, ref, **tol)
        acc = rand(rows, 256, seed=8)
        assert ops.experts_sum(x, experts, limit, routes, slots, acc.clone()).sub(acc).sub(ref).abs().max() < 3e-2


@needs_compiled
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 3, 16])  # 16: a batch of decoding sequences
def test_attention_projections(tmp_path, dtype, T):
    """An attention layer's projections and output projection for a few rows (one fused call each)
    against the reference, for a sliding, a CSA and an HCA layer, in the checkpoint's formats (wo_a
    groups of whole FP8 blocks, as released)."""
    from release_writer import write_release

    write_release(tmp_path, {**CONFIGS["flash"], "o_lora_rank": 128}, draft=None)
    model = dsv4.load(tmp_path, dtype=dtype).model
    x, o = rand(T, CFG.dim, dtype=dtype, seed=1), rand(T, CFG.n_heads, CFG.head_dim, dtype=dtype, seed=2)
    positions = torch.arange(5, 5 + T)
    for i, layer in enumerate(model.layers):
        attn = layer.attn
        # bf16 in the file, fp32 math: held as stored (half the bytes a token reads)
        assert layer.ffn.gate.dtype == torch.bfloat16
        assert attn.compressor is None or attn.compressor.wkv.dtype == attn.compressor.wgate.dtype == torch.bfloat16
        cos_sin = model.ropes[attn.rope_kind](positions)
        got, ref = attn.project(x, positions, cos_sin), attn.project_torch(x, positions, cos_sin)
        assert attn._fused_args(x) is not None, f"layer {i}: the fused ops should take this layer"
        # ... and the decode products take its weights (no silent fall back to the reference)
        ext, args = kernels.fused(x), attn._fused_args(x)
        assert ext.attn_project(x, *cos_sin, positions, *args[0]) and ext.attn_output(o, *cos_sin, *args[1]) is not None
        for g, r in zip(got, ref, strict=True):
            if g is None or r is None:
                assert g is r is None
            elif isinstance(g, tuple):
                for a, b in zip(g, r, strict=True):
                    agree(a, b)
            else:
                agree(g, r)
        agree(attn.output(o, cos_sin), attn.output_torch(o, cos_sin))


@needs_compiled
@pytest.mark.parametrize("dtype", DTYPES)
def test_experts_rows(dtype):
    """A few tokens' routed experts, each on its own rows (one of them on none, one on a row twice):
    the fused call against torch.where-style gather, expert_mlp and index_add per expert."""
    from dsv4.quant import MXFP4, FP8Block, quantize_fp8_block, quantize_mxfp4

    w = [rand(192, 256, seed=1, scale=0.1), rand(256, 192, seed=2, scale=0.1), rand(192, 256, seed=3, scale=0.1)]
    experts = [tuple(MXFP4(*quantize_mxfp4(t)) for t in w), tuple(FP8Block(*quantize_fp8_block(t)) for t in w),
               tuple(MXFP4(*quantize_mxfp4(t * 0.5)) for t in w)]  # fmt: skip
    x = rand(7, 256, dtype=dtype, seed=4)
    rows, scales = [[0, 3, 6], [], [1, 1, 5]], [[0.5, 0.25, 1.0], [], [0.3, 0.2, 0.9]]
    acc = rand(7, 256, seed=5)
    ref = acc.clone()
    for ws, r, sc in zip(experts, rows, scales, strict=True):
        for t, s_ in zip(r, sc, strict=True):  # row by row: the reference's sum, whatever its grouping
            ref[t] += ops.expert_mlp_torch(x[t : t + 1], *ws, 0.5, torch.tensor([[s_]])).float()[0]
    got = ops.experts_rows(x, experts, rows, scales, 0.5, acc)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=2e-2 if dtype == torch.bfloat16 else 1e-5)


@needs_compiled
@pytest.mark.parametrize("dtype", DTYPES)
def test_experts_rows_for_a_prefill_chunk(dtype):
    """A prefill chunk's routed experts: experts with many rows take the GEMM (kernels.PREFILL_ROWS)
    and run one per thread, one with a few rows the decode products; against the row-by-row reference,
    and the same bits with 1 thread and with 2."""
    from dsv4.quant import MXFP4, FP8Block, quantize_fp8_block, quantize_mxfp4

    w = [rand(192, 256, seed=1, scale=0.1), rand(256, 192, seed=2, scale=0.1), rand(192, 256, seed=3, scale=0.1)]
    experts = [tuple(MXFP4(*quantize_mxfp4(t)) for t in w), tuple(FP8Block(*quantize_fp8_block(t)) for t in w),
               tuple(MXFP4(*quantize_mxfp4(t * 0.5)) for t in w), tuple(MXFP4(*quantize_mxfp4(t * 2)) for t in w)]  # fmt: skip
    T = 48
    x = rand(T, 256, dtype=dtype, seed=4)
    g = torch.Generator().manual_seed(6)
    rows = [list(range(0, T, 1)), list(range(1, T, 2)), [3, 7, 40], []]  # 48 and 24 rows: past the thresholds
    scales = [torch.rand(len(r), generator=g).tolist() for r in rows]
    f8_rows, mx_rows = kernels.prefill_rows(dtype)
    assert len(rows[0]) >= mx_rows and len(rows[1]) >= f8_rows and len(rows[2]) < min(f8_rows, mx_rows)
    acc = rand(T, 256, seed=5)
    ref = acc.clone()
    for ws, r, sc in zip(experts, rows, scales, strict=True):
        for t, s_ in zip(r, sc, strict=True):
            ref[t] += ops.expert_mlp_torch(x[t : t + 1], *ws, 0.5, torch.tensor([[s_]])).float()[0]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.experts_rows(x, experts, rows, scales, 0.5, acc.clone())
        torch.set_num_threads(2)
        two = ops.experts_rows(x, experts, rows, scales, 0.5, acc.clone())
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)
    torch.testing.assert_close(two, ref, rtol=1e-5, atol=2e-2 if dtype == torch.bfloat16 else 1e-4)
