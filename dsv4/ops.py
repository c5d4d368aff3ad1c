"""The compute seam between the model math and the kernels.

`linear` dispatches on the weight's format object (`Dense`, `FP8Block`, `MXFP4` from `quant`); the
quantized formats go to `dsv4.kernels`, which takes its compiled CPU kernels where they apply and
otherwise its plain-torch reference (dequantize in fp32, then matmul): one reference path for both.
RMSNorm and interleaved RoPE take the kernels' fused op where it applies (one call instead of a
dozen tiny ATen ops: the batch-1 step is dominated by such dispatch), their `*_torch` reference
otherwise. A decode step's expert MLP and attention take fused ops too (`expert_mlp`,
`decode_attention`); the `*_torch` / `sink_attention` references are the other paths.

It knows nothing of layers, checkpoints or sequences.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import kernels
from .quant import MXFP4, Dense, FP8Block, Weight

GEMV_ROWS = 4  # up to this many rows of x (decode), the kernels' GEMVs and fused decode ops take a call
# Up to this many rows (a batch of decoding sequences), a layer's projections run as batches of the
# kernels' decode products (one pool loop each) rather than one loop per product.
DECODE_ROWS = 16
KIND = {Dense: 0, FP8Block: 1, MXFP4: 2}  # the fused ops' weight-format codes


def weight_parts(w: Weight) -> tuple[int, torch.Tensor, torch.Tensor]:
    """A weight as the fused ops take it: format code, values, scales (a Dense weight repeats itself)."""
    return KIND[type(w)], w.weight, w.weight if isinstance(w, Dense) else w.scale


def linear(x: torch.Tensor, w: Weight) -> torch.Tensor:
    """y = x @ W^T for any weight format; returns x's dtype (quantized formats accumulate in fp32)."""
    if isinstance(w, Dense):
        if _dense_pair(x.dtype, w.weight.dtype) and x.dim() == 2 and x.shape[0] <= DECODE_ROWS:
            ext = kernels.fused(x, w.weight)
            # decode: stream the matrix once (torch's GEMVs are far slower); a batch of decoding
            # sequences too against a bf16 matrix where the CPU has no native bf16 GEMM (torch
            # emulates it: the 129k-row head, 16 rows, Zen 3, 1 thread: F.linear 167 ms, the GEMV 52)
            if ext is not None and (
                x.shape[0] <= GEMV_ROWS or (w.weight.dtype == torch.bfloat16 and not ext.has_bf16_gemm())
            ):
                return ext.dense_linear(x, w.weight)
        return F.linear(x, w.weight if w.weight.dtype == x.dtype else w.weight.to(x.dtype))
    if isinstance(w, MXFP4):
        return kernels.mxfp4_linear(x, w.weight, w.scale)
    if isinstance(w, FP8Block):
        return kernels.fp8_linear(x, w.weight, w.scale)
    raise TypeError(f"unknown weight format {type(w).__name__}")


def _dense_pair(x: torch.dtype, w: torch.dtype) -> bool:
    """Whether the dense GEMV takes x against w: one dtype (fp32 or bf16), or fp32 x against bf16 w."""
    return x == w or (x == torch.float32 and w == torch.bfloat16)


def grouped_linear(x: torch.Tensor, w: Weight, groups: int) -> torch.Tensor:
    """Block-diagonal projection: x `[T, G, in]`, W `[G*out, in]` -> `[T, G, out]` (group g uses rows g)."""
    fuses = x.shape[0] <= GEMV_ROWS and grouped_fuses(w, x.dtype, groups)
    ext = kernels.fused(x, w.weight if isinstance(w, Dense) else None) if fuses else None
    if ext is not None:  # decode: the per-group products in one call
        return ext.grouped_linear(x, *weight_parts(w), groups)
    if isinstance(w, Dense):
        wg = w.weight.to(x.dtype).view(groups, -1, x.shape[-1])
        return torch.einsum("tgi,goi->tgo", x, wg)
    rows = w.shape[0] // groups
    if isinstance(w, FP8Block) and rows % 128 == 0:  # slice whole scale blocks: no dequantization
        step = rows // 128
        parts = [
            linear(x[:, g], FP8Block(w.weight[g * rows : (g + 1) * rows], w.scale[g * step : (g + 1) * step]))
            for g in range(groups)
        ]
        return torch.stack(parts, dim=1)
    return grouped_linear(x, Dense(w.dequantize(x.dtype)), groups)


def grouped_fuses(w: Weight, dtype: torch.dtype, groups: int) -> bool:
    """Whether `grouped_linear` of a few rows takes the fused op: a Dense weight in x's dtype, or FP8
    groups of whole scale blocks (the formats whose reference is one product per group)."""
    if isinstance(w, Dense):
        return w.weight.dtype == dtype
    return isinstance(w, FP8Block) and (w.shape[0] // groups) % 128 == 0


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm in fp32, cast back to x's dtype; weight None gives the weightless form."""
    ext = kernels.fused(x, weight)
    if ext is not None:
        return ext.norm_rope(x, weight, eps, None, None, False)
    return rms_norm_torch(x, weight, eps)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Interleaved-pair (GPT-J) rotation of the last 2*cos.shape[-1] dims of x.

    x `[T, ..., D]`; cos, sin `[T, R/2]` broadcast over the middle dims. fp32 math, x's dtype out.
    """
    ext = kernels.fused(x, cos, sin)
    if ext is not None:
        return ext.norm_rope(x, None, -1.0, cos, sin, inverse)
    return rope_torch(x, cos, sin, inverse)


def norm_rope(x: torch.Tensor, weight: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor):
    """`rope(rms_norm(x, weight, eps), cos, sin)` in one pass where the fused ops are available."""
    ext = kernels.fused(x, weight, cos, sin)
    if ext is not None:
        return ext.norm_rope(x, weight, eps, cos, sin, False)
    return rope_torch(rms_norm_torch(x, weight, eps), cos, sin)


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """The reference `rms_norm`."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = weight.float() * y
    return y.to(x.dtype)


def rope_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """The reference `rope`."""
    r = cos.shape[-1] * 2
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[-1],)
    c, s = cos.view(shape), sin.view(shape)
    if inverse:
        s = -s
    nope, pe = x[..., :-r], x[..., -r:].float()
    a, b = pe[..., 0::2], pe[..., 1::2]
    out = torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2)
    return torch.cat([nope, out.to(x.dtype)], dim=-1)


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """silu(min(gate, limit)) * clamp(up, -limit, limit), in fp32."""
    gate, up = gate.float(), up.float()
    if limit > 0:
        gate = gate.clamp(max=limit)
        up = up.clamp(-limit, limit)
    return F.silu(gate) * up


def expert_mlp(x: torch.Tensor, w1: Weight, w2: Weight, w3: Weight, limit: float, scale: torch.Tensor | None = None,
               acc: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """One SwiGLU expert, `w2(swiglu(w1 x, w3 x) * scale)`; scale `[T, 1]` is the router weight.
    With `acc` (fp32 `[T, D]`), the output is added into it in place and `acc` is returned."""
    if x.dim() == 2 and x.shape[0] <= GEMV_ROWS:  # decode: one fused call instead of ~30 small ops
        ext = kernels.fused(x, scale, acc)
        if ext is not None and all(type(w) in KIND for w in (w1, w2, w3)):
            return ext.expert_mlp(x, weight_parts(w1), weight_parts(w2), weight_parts(w3), limit, scale, acc)
    return expert_mlp_torch(x, w1, w2, w3, limit, scale, acc)


def experts_sum(x: torch.Tensor, experts: list[tuple[Weight, Weight, Weight]], limit: float, route: torch.Tensor,
                slots: list[int | None], acc: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """`acc` (fp32 `[T, D]`, zeros when None) plus each expert's `expert_mlp` output, in list order,
    expert i scaled by `route[:, slots[i]]` (`route` `[T, K]` fp32; unscaled where the slot is None).
    One fused call (two batches of decode products) for up to DECODE_ROWS tokens where the kernels
    take it: a decode token's experts, or the shared expert of a batch of decoding sequences."""
    if x.dim() == 2 and x.shape[0] <= DECODE_ROWS:
        ext = kernels.fused(x, route, acc)
        if ext is not None and all(type(w) in KIND for ws in experts for w in ws):
            parts = [tuple(weight_parts(w) for w in ws) for ws in experts]
            return ext.experts_sum(x, parts, [-1 if s is None else s for s in slots], route, limit, acc)
    for (w1, w2, w3), s in zip(experts, slots, strict=True):
        scale = None if s is None else route[:, s : s + 1]
        out = expert_mlp_torch(x, w1, w2, w3, limit, scale).float()
        acc = out if acc is None else acc.add_(out)
    return acc


def experts_rows(x: torch.Tensor, experts: list[tuple[Weight, Weight, Weight]], rows: list[list[int]],
                 scales: list[list[float]], limit: float, acc: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """`acc` (fp32 `[T, D]`) plus, for each expert in list order, its `expert_mlp` output on x's rows
    `rows[i]`, scaled by `scales[i]` (a router weight per row), added into those rows. One fused call
    where the kernels take it (it adds in place): up to DECODE_ROWS tokens (a batch of decoding
    sequences) as two batches of decode products; a longer chunk (prefill) switches each expert to the
    GEMM where `linear` would (`kernels.PREFILL_ROWS`) and runs those experts one per thread."""
    if x.dim() == 2:
        ext = kernels.fused(x, acc)
        if ext is not None and all(type(w) in KIND for ws in experts for w in ws):
            parts = [tuple(weight_parts(w) for w in ws) for ws in experts]
            prefill = [] if x.shape[0] <= DECODE_ROWS else kernels.prefill_rows(x.dtype)
            return ext.experts_rows(x, parts, rows, scales, limit, acc, prefill)
    for (w1, w2, w3), r, sc in zip(experts, rows, scales, strict=True):
        if r:
            idx = torch.tensor(r, device=x.device)
            scale = torch.tensor(sc, dtype=torch.float32, device=x.device)[:, None]
            acc = acc.index_add(0, idx, expert_mlp(x[idx], w1, w2, w3, limit, scale).float())
    return acc


def expert_mlp_torch(x: torch.Tensor, w1: Weight, w2: Weight, w3: Weight, limit: float,
                     scale: torch.Tensor | None = None, acc: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The reference `expert_mlp`."""
    h = swiglu(linear(x, w1), linear(x, w3), limit)
    if scale is not None:
        h = h * scale
    out = linear(h.to(x.dtype), w2)
    return out if acc is None else acc.add_(out.float())




def decode_attention(q: torch.Tensor, keys: list[torch.Tensor], sink: torch.Tensor, scale: float) -> torch.Tensor:
    """One query `[1, H, D]` against every row of `keys` (parts `[K_i, D]`, concatenated in order):
    `sink_attention` with all keys visible, in one fused call where the kernels take it."""
    ext = kernels.fused(q, sink, *keys)
    if ext is not None and q.dim() == 3 and q.shape[0] == 1:
        return ext.sink_decode(q, keys, sink, scale)
    return sink_attention(q, torch.cat(keys), None, sink, scale)


def sink_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    valid: torch.Tensor | None,
    sink: torch.Tensor,
    scale: float,
    k_sel: torch.Tensor | None = None,
    valid_sel: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention over one shared K=V head with a per-head sink logit in the denominator only.

    q `[S, H, D]`; k `[K, D]` keys shared by all queries with `valid` `[S, K]` (None: all valid); optionally k_sel
    `[S, Ks, D]` keys chosen per query (CSA's top-k compressed entries) with `valid_sel` `[S, Ks]`.
    Returns `[S, H, D]` in q's dtype; math in fp32.
    """
    qf = q.float()
    scores = torch.einsum("shd,kd->shk", qf, k.float()) * scale
    if valid is not None:  # None: every key is visible to every query
        scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    parts = [scores]
    if k_sel is not None:
        sel = torch.einsum("shd,skd->shk", qf, k_sel.float()) * scale
        parts.append(sel.masked_fill(~valid_sel[:, None, :], float("-inf")))
    parts.append(sink.float().view(1, -1, 1).expand(q.shape[0], -1, 1))
    probs = torch.softmax(torch.cat(parts, dim=-1), dim=-1)
    out = torch.einsum("shk,kd->shd", probs[..., : k.shape[0]], k.float())
    if k_sel is not None:
        out = out + torch.einsum("shk,skd->shd", probs[..., k.shape[0] : -1], k_sel.float())
    return out.to(q.dtype)
