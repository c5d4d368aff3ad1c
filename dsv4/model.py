"""The DeepSeek V4 network, top to bottom, in the checkpoint's own vocabulary.

Shape legend: T tokens of a step (all sequences of a batch, flattened), S tokens of one sequence,
n residual streams (hc_mult), D model dim, H heads, hd head dim, R rope dims, N compressed entries,
E experts, K experts per token, C compressor channels.

Every step takes a flat batch (`Batch`: token ids, absolute positions, one segment per sequence) and
one `SeqState` per sequence. Dense work (projections, MoE) runs on all T tokens at once; attention
and the compressors run per sequence against that sequence's state, so one prefill, a prefill cut
into chunks of any size, decode steps, and prefill after decode all compute the same thing.

Weights come from a `source` (a `Checkpoint`, or an initializer for training) by official name;
routed experts come from an expert provider the MoE asks for "experts [ids]". Numerics: `exact`
computes what transformers computes; `released` adds the official code's FP8 rounding of KV entries
and the Hadamard-rotated FP4 rounding of the indexer path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels, ops
from .config import ModelConfig
from .quant import Dense, Weight, hadamard, simulate_fp4, simulate_fp8
from .state import DEFAULT_MAX_ROLLBACK, CompressorState, Entries, LayerState, Ring, SeqState


class WeightSource(Protocol):
    def tensor(self, name: str) -> torch.Tensor: ...
    def weight(self, prefix: str, dtype: torch.dtype) -> Weight: ...


class ExpertProvider(Protocol):
    """Where one MoE layer's routed experts come from: held in memory (`ResidentExperts`), or an expert
    store with tiers, a budget and prefetch (`experts.LayerExperts`), for all experts or a rank's share."""

    @property
    def group(self) -> int: ...  # the most experts one `get` hands out (and holds) at once

    def get(self, ids: list[int]) -> dict[int, tuple[Weight, Weight, Weight]]: ...

    def prefetch(self, ids: list[int]) -> None: ...  # these will be asked for soon

    def prefetch_next(self, x: torch.Tensor, tokens: torch.Tensor, used: list[int], nxt: MoE | None) -> None:
        """This layer uses `used`; `nxt` is the next layer's MoE (its router guesses what it will use)."""


@dataclass(frozen=True)
class Numerics:
    dtype: torch.dtype = torch.bfloat16
    released: bool = False  # as-released roundings (FP8 KV, Hadamard + FP4 indexer)


# ---------------------------------------------------------------- step


@dataclass
class Batch:
    """One step's tokens, flattened over sequences."""

    tokens: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64 absolute positions
    segments: list[tuple[int, int]]  # [start, end) of each sequence in T
    starts: list[int]  # each sequence's first position (its state's length before the step)
    rope: dict[str, tuple[torch.Tensor, torch.Tensor]]  # "main" / "compress" -> cos, sin [T, R/2]

    def first_token(self) -> Batch:
        """The step cut to its first token (one sequence)."""
        if len(self.segments) != 1:
            raise ValueError("first_token needs a one-sequence step")
        return Batch(self.tokens[:1], self.positions[:1], [(0, 1)], self.starts,
                     {k: (c[:1], s[:1]) for k, (c, s) in self.rope.items()})  # fmt: skip


# ---------------------------------------------------------------- rope


class Rope:
    """Interleaved RoPE frequencies; YaRN-scaled when original_seq_len > 0 (no attention scaling)."""

    def __init__(self, dim: int, theta: float, factor: float = 1.0, original_seq_len: int = 0,
                 beta_fast: float = 32.0, beta_slow: float = 1.0):  # fmt: skip
        inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        if original_seq_len > 0:
            def corr(rot: float) -> float:
                return dim * math.log(original_seq_len / (rot * 2 * math.pi)) / (2 * math.log(theta))

            lo, hi = max(math.floor(corr(beta_fast)), 0), min(math.ceil(corr(beta_slow)), dim - 1)
            ramp = ((torch.arange(dim // 2, dtype=torch.float32) - lo) / max(hi - lo, 0.001)).clamp(0, 1)
            inv = inv / factor * ramp + inv * (1 - ramp)
        self.inv_freq = inv

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq.to(positions.device)[None]
        return freqs.cos(), freqs.sin()


# ---------------------------------------------------------------- building blocks


class Linear(nn.Module):
    """A matmul weight in any format; dense weights are Parameters (trainable), others packed."""

    def __init__(self, w: Weight):
        super().__init__()
        self.packed = None if isinstance(w, Dense) else w
        self.weight = nn.Parameter(w.weight, requires_grad=False) if isinstance(w, Dense) else None

    @property
    def w(self) -> Weight:
        return self.packed if self.packed is not None else Dense(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.w)


def _param(t: torch.Tensor, dtype: torch.dtype | None = None) -> nn.Parameter:
    return nn.Parameter(t.to(dtype) if dtype is not None else t, requires_grad=False)


def _fp32_math(t: torch.Tensor) -> nn.Parameter:
    """A matrix used in fp32 math, kept as stored when that is bf16 (as released: half the bytes read
    per token, the same values) or fp32 (training); anything else becomes fp32."""
    return _param(t, None if t.dtype in (torch.float32, torch.bfloat16) else torch.float32)


class HyperConnection(nn.Module):
    """mHC around one sub-block: collapse n streams into the block input, expand the output back."""

    def __init__(self, cfg: ModelConfig, src: WeightSource, prefix: str):
        super().__init__()
        self.fn = _param(src.tensor(f"{prefix}_fn"), torch.float32)  # [(2+n)*n, n*D]
        self.base = _param(src.tensor(f"{prefix}_base"), torch.float32)
        self.scale = _param(src.tensor(f"{prefix}_scale"), torch.float32)
        self.n, self.iters, self.eps, self.norm_eps = cfg.hc_mult, cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.norm_eps

    def pre(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h [T, n, D] -> block input [T, D], post [T, n], comb [T, n, n] (fp32)."""
        fn, base, scale = self.fn, self.base, self.scale
        ext = kernels.fused(h, fn, base, scale)
        if ext is not None:  # one call instead of ~100 tiny ops (the Sinkhorn iterations)
            return tuple(ext.hc_pre(h, fn, scale, base, self.iters, self.eps, self.norm_eps))
        return self.pre_torch(h)

    def pre_torch(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The reference `pre`."""
        n, eps = self.n, self.eps
        flat = h.flatten(1).float()
        mixes = F.linear(flat, self.fn) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + self.norm_eps)
        pre = torch.sigmoid(mixes[:, :n] * self.scale[0] + self.base[:n]) + eps
        post = 2 * torch.sigmoid(mixes[:, n : 2 * n] * self.scale[1] + self.base[n : 2 * n])
        comb = mixes[:, 2 * n :].view(-1, n, n) * self.scale[2] + self.base[2 * n :].view(n, n)
        comb = torch.softmax(comb, dim=-1) + eps
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)  # Sinkhorn: columns, then rows/columns
        for _ in range(self.iters - 1):
            comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
            comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
        x = (pre.unsqueeze(-1) * h.float()).sum(dim=1)
        return x.to(h.dtype), post, comb

    @staticmethod
    def post(out: torch.Tensor, h: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        """New stream k = post_k * out + sum_j comb[j, k] * h_j."""
        ext = kernels.fused(out, h, post, comb)
        if ext is not None and out.dtype == h.dtype:
            return ext.hc_post(out, h, post, comb)
        return HyperConnection.post_torch(out, h, post, comb)

    @staticmethod
    def post_torch(
        out: torch.Tensor, h: torch.Tensor, post: torch.Tensor, comb: torch.Tensor
    ) -> torch.Tensor:
        """The reference `post`."""
        mixed = torch.einsum("tjk,tjd->tkd", comb, h.float())
        return (post.unsqueeze(-1) * out.float().unsqueeze(1) + mixed).to(h.dtype)


class HyperHead(nn.Module):
    """Collapse the n streams for the head: sigmoid pre-weights only, no Sinkhorn."""

    def __init__(self, cfg: ModelConfig, src: WeightSource, prefix: str):
        super().__init__()
        self.fn = _param(src.tensor(f"{prefix}hc_head_fn"), torch.float32)
        self.base = _param(src.tensor(f"{prefix}hc_head_base"), torch.float32)
        self.scale = _param(src.tensor(f"{prefix}hc_head_scale"), torch.float32)
        self.eps, self.norm_eps = cfg.hc_eps, cfg.norm_eps

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        flat = h.flatten(1).float()
        mixes = F.linear(flat, self.fn) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + self.norm_eps)
        pre = torch.sigmoid(mixes * self.scale + self.base) + self.eps
        return (pre.unsqueeze(-1) * h.float()).sum(dim=1).to(h.dtype)


class Compressor(nn.Module):
    """Gated pooling of `ratio` tokens into one KV entry (HCA), or with CSA's overlap of the previous
    window's Ca half (2*ratio slots). `rotate` marks the indexer's compressor (Hadamard + FP4 when
    as-released); otherwise as-released rounds the entry's non-RoPE dims through FP8."""

    def __init__(self, cfg: ModelConfig, src: WeightSource, prefix: str, ratio: int, head_dim: int,
                 overlap: bool, rotate: bool, numerics: Numerics):  # fmt: skip
        super().__init__()
        self.wkv = _fp32_math(src.tensor(f"{prefix}.wkv.weight"))  # [C, D], C = (1+overlap)*hd
        self.wgate = _fp32_math(src.tensor(f"{prefix}.wgate.weight"))
        self.ape = _param(src.tensor(f"{prefix}.ape"), torch.float32)  # [ratio, C]
        self.norm = _param(src.tensor(f"{prefix}.norm.weight"), torch.float32)
        self.ratio, self.hd, self.overlap, self.rotate = ratio, head_dim, overlap, rotate
        self.rd, self.eps, self.numerics = cfg.rope_head_dim, cfg.norm_eps, numerics

    def new_state(self, device, max_rollback: int) -> CompressorState:
        r = self.ratio
        rows = Ring(r * (1 + self.overlap) + max_rollback, 2 * self.wkv.shape[0], torch.float32, device)
        return CompressorState(r, self.overlap, rows, Entries(self.hd, self.numerics.dtype, device))

    def project(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [T, D] -> rows [T, 2C] = [kv | gate + ape] in fp32 (the official code compresses in fp32)."""
        xf = x.float()
        kv, gate = ops.linear(xf, Dense(self.wkv)), ops.linear(xf, Dense(self.wgate))
        return torch.cat([kv, gate + self.ape[positions % self.ratio]], -1)

    def update(self, st: CompressorState, rows: torch.Tensor, pos: int, rope: Rope, layer: LayerState) -> torch.Tensor:
        """One sequence's new rows [S, 2C] at positions pos.. : emit an entry per window they close and
        stage the rows' storage; return the entries visible after the step [N, hd]."""
        r, d = self.ratio, self.hd
        layer.stage(partial(st.rows.write, pos, rows))
        first, end = pos // r, (pos + rows.shape[0]) // r
        if end == first:
            return st.entries.view(first)
        start = st.start(pos)
        rows = torch.cat([st.rows.read(start, pos), rows])  # positions start ..
        c = rows.shape[1] // 2
        base = first * r - start  # the first closing window's offset; `base` rows before it when overlapping
        win = rows[base : base + (end - first) * r].view(end - first, r, 2 * c)
        kv, gate = win[..., :c], win[..., c:]
        if self.overlap:  # slots: previous window's Ca (first d channels), then this window's Cb
            if base:
                prev_kv, prev_gate = rows[:base, :d], rows[:base, c : c + d]
            else:
                prev_kv, prev_gate = kv.new_zeros(r, d), gate.new_full((r, d), float("-inf"))
            ca_kv = torch.cat([prev_kv[None], kv[:-1, :, :d]])
            ca_gate = torch.cat([prev_gate[None], gate[:-1, :, :d]])
            kv, gate = torch.cat([ca_kv, kv[..., d:]], dim=1), torch.cat([ca_gate, gate[..., d:]], dim=1)
        pooled = (kv * torch.softmax(gate, dim=1)).sum(dim=1).to(self.numerics.dtype)  # [end - first, hd]
        pooled = ops.rms_norm(pooled, self.norm, self.eps)
        pooled = ops.rope(pooled, *rope(torch.arange(first, end, device=pooled.device) * r))
        if self.numerics.released:
            pooled = _round_indexer(pooled) if self.rotate else _round_kv(pooled, self.rd)
        # entries past pos // ratio are not part of the state yet, so they can be written now
        st.entries.write(first, pooled)
        return st.entries.view(end)


def _round_kv(kv: torch.Tensor, rd: int) -> torch.Tensor:
    """As released: FP8-simulate the non-RoPE dims (block 64, ue8m0); RoPE dims keep full precision."""
    return torch.cat([simulate_fp8(kv[..., :-rd], 64), kv[..., -rd:]], dim=-1)


def _round_indexer(x: torch.Tensor) -> torch.Tensor:
    """As released: Hadamard-rotate, then FP4-simulate (block 32) an indexer query or key."""
    return simulate_fp4(hadamard(x), 32)


class Indexer(nn.Module):
    """CSA's lightning indexer: scores compressed entries per query and keeps the top `index_topk`."""

    def __init__(self, cfg: ModelConfig, src: WeightSource, prefix: str, ratio: int, numerics: Numerics):
        super().__init__()
        self.wq_b = Linear(src.weight(f"{prefix}.wq_b", numerics.dtype))
        self.weights_proj = _param(src.tensor(f"{prefix}.weights_proj.weight"), numerics.dtype)
        self.compressor = Compressor(cfg, src, f"{prefix}.compressor", ratio, cfg.index_head_dim, True, True, numerics)
        self.n_heads, self.hd, self.topk, self.ratio = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk, ratio
        self.numerics = numerics

    def queries(self, x: torch.Tensor, qr: torch.Tensor, cos_sin) -> tuple[torch.Tensor, torch.Tensor]:
        """All tokens' indexer queries [T, Hi, hdi] and head weights [T, Hi] (fp32, scales folded in)."""
        q = ops.rope(self.wq_b(qr).unflatten(-1, (self.n_heads, self.hd)), *cos_sin)
        if self.numerics.released:
            q = _round_indexer(q)
        w = ops.linear(x, Dense(self.weights_proj)).float() * (self.hd**-0.5 * self.n_heads**-0.5)
        return q, w

    @staticmethod
    def scores(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Index scores [S, N] of queries q [S, Hi, hdi] (head weights w [S, Hi]) against keys [N, hdi]."""
        scores = torch.einsum("shd,nd->shn", q.float(), keys.float()).relu()
        return (scores * w.unsqueeze(-1)).sum(dim=1)

    def top(self, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """One query that sees every entry: the indices [k] of its top-k (earliest first among ties)."""
        ext = kernels.fused(q, w, keys)
        if ext is not None:
            return ext.index_top(q, w, keys, self.topk)
        return self.top_torch(q, w, keys)

    def top_torch(self, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """The reference `top`."""
        return self.scores(q, w, keys)[0].sort(descending=True, stable=True).indices[: self.topk]

    def select(self, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor):
        """Top-k visible entries per query: indices [S, k] and their validity [S, k]."""
        scores = self.scores(q, w, keys)  # [S, N]
        n_visible = (positions + 1) // self.ratio  # entry j is visible iff j < n_visible
        visible = torch.arange(keys.shape[0], device=keys.device)[None] < n_visible[:, None]
        k = min(self.topk, keys.shape[0])
        # Scores tie exactly when every head's ReLU is 0; a stable sort keeps the earliest entries, so
        # the choice does not depend on how many entries exist yet (chunking cannot change it).
        order = scores.masked_fill(~visible, float("-inf")).sort(dim=-1, descending=True, stable=True).indices
        idx = order[:, :k]
        return idx, idx < n_visible[:, None]


class Attention(nn.Module):
    """Shared-KV attention: sliding window of `window_size` tokens, plus compressed entries (all visible
    ones for HCA, the indexer's top-k for CSA), a sink per head, and the grouped output projection."""

    def __init__(self, cfg: ModelConfig, src: WeightSource, p: str, ratio: int, csa: bool, numerics: Numerics):
        super().__init__()
        dt = numerics.dtype
        self.wq_a = Linear(src.weight(f"{p}.wq_a", dt))
        self.q_norm = _param(src.tensor(f"{p}.q_norm.weight"), torch.float32)
        self.wq_b = Linear(src.weight(f"{p}.wq_b", dt))
        self.wkv = Linear(src.weight(f"{p}.wkv", dt))
        self.kv_norm = _param(src.tensor(f"{p}.kv_norm.weight"), torch.float32)
        self.wo_a = Linear(src.weight(f"{p}.wo_a", dt))
        self.wo_b = Linear(src.weight(f"{p}.wo_b", dt))
        self.attn_sink = _param(src.tensor(f"{p}.attn_sink"), torch.float32)
        self.compressor = (
            Compressor(cfg, src, f"{p}.compressor", ratio, cfg.head_dim, csa, False, numerics) if ratio else None
        )
        self.indexer = Indexer(cfg, src, f"{p}.indexer", ratio, numerics) if ratio and csa else None
        self.rope_kind = "compress" if ratio else "main"
        self.n_heads, self.hd, self.rd, self.window = cfg.n_heads, cfg.head_dim, cfg.rope_head_dim, cfg.window_size
        self.groups, self.eps, self.numerics, self.ratio = cfg.o_groups, cfg.norm_eps, numerics, ratio
        self._fused = None  # the fused decode ops' arguments, once built (`_fused_args`)

    def new_state(self, device, max_rollback: int = DEFAULT_MAX_ROLLBACK) -> LayerState:
        span = self.window - 1  # window positions a query sees besides its own
        st = LayerState(Ring(span + max_rollback, self.hd, self.numerics.dtype, device), span)
        if self.compressor is not None:
            st.comp = self.compressor.new_state(device, max_rollback)
        if self.indexer is not None:
            st.index = self.indexer.compressor.new_state(device, max_rollback)
        return st

    def project(self, x: torch.Tensor, positions: torch.Tensor, cos_sin):
        """Every token's projections: x [T, D] -> q [T, H, hd], kv [T, hd], the compressor's rows
        (None without one), the indexer's (queries, head weights, compressor rows) (None without one)."""
        args = self._fused_args(x)
        out = kernels.fused(x).attn_project(x, *cos_sin, positions, *args[0]) if args is not None else None
        if not out:  # not fused here (or a weight the decode products do not take)
            return self.project_torch(x, positions, cos_sin)
        qr, q, kv, comp, iq, iw, irows = out
        return q, kv, comp if self.compressor is not None else None, (iq, iw, irows) if self.indexer is not None else None

    def project_torch(self, x: torch.Tensor, positions: torch.Tensor, cos_sin):
        """The reference `project`."""
        qr, q = self.queries(x, cos_sin)
        kv = self.keys(x, cos_sin)
        comp = self.compressor.project(x, positions) if self.compressor is not None else None
        index = None
        if self.indexer is not None:
            index = (*self.indexer.queries(x, qr, cos_sin), self.indexer.compressor.project(x, positions))
        return q, kv, comp, index

    def _fused_args(self, x: torch.Tensor):
        """The layer's weights as the fused decode ops take them ((project args), (output args)), when
        they take x [T, ...] (up to DECODE_ROWS rows, exact numerics, weight formats they know); else None."""
        if x.shape[0] > ops.DECODE_ROWS or self.numerics.released or kernels.fused(x) is None:
            return None
        if self._fused is None:  # built once; `_apply` (.to(), .float(), ...) drops it
            lins = [self.wq_a.w, self.wq_b.w, self.wkv.w] + ([self.indexer.wq_b.w] if self.indexer is not None else [])
            ok = all(type(w) in ops.KIND for w in [*lins, self.wo_b.w]) and ops.grouped_fuses(self.wo_a.w, x.dtype, self.groups)
            vec = [self.q_norm, self.kv_norm]
            for c in (self.compressor, self.indexer):
                if c is self.indexer and c is not None:
                    vec.append(c.weights_proj)
                    c = c.compressor
                if c is not None:
                    vec += [c.wkv, c.wgate, c.ape]
            ok = ok and all(not t.requires_grad for t in vec)
            scale = self.indexer.hd**-0.5 * self.indexer.n_heads**-0.5 if self.indexer is not None else 1.0
            dims = [self.n_heads, self.indexer.n_heads, self.indexer.hd] if self.indexer is not None else [self.n_heads, 0, 0]
            self._fused = (([ops.weight_parts(w) for w in lins], vec, dims, self.eps, scale),
                           (ops.weight_parts(self.wo_a.w), ops.weight_parts(self.wo_b.w), self.groups)) if ok else False  # fmt: skip
        return self._fused or None

    def _apply(self, fn, recurse=True):
        self._fused = None
        return super()._apply(fn, recurse)

    def queries(self, x: torch.Tensor, cos_sin) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> the low-rank query qr [T, q_lora_rank] and the heads q [T, H, hd] (normed, RoPE'd)."""
        qr = ops.rms_norm(self.wq_a(x), self.q_norm, self.eps)
        q = self.wq_b(qr).unflatten(-1, (self.n_heads, self.hd))
        return qr, ops.norm_rope(q, None, self.eps, *cos_sin)

    def keys(self, x: torch.Tensor, cos_sin) -> torch.Tensor:
        """x [T, D] -> the shared K=V head [T, hd] (normed, RoPE'd; FP8-rounded as released)."""
        kv = ops.norm_rope(self.wkv(x), self.kv_norm, self.eps, *cos_sin)
        return _round_kv(kv, self.rd) if self.numerics.released else kv

    def output(self, o: torch.Tensor, cos_sin) -> torch.Tensor:
        """Attention output o [T, H, hd] -> [T, D]: undo the values' RoPE at the query position, then the
        grouped wo_a and wo_b."""
        args = self._fused_args(o)
        out = kernels.fused(o).attn_output(o, *cos_sin, *args[1]) if args is not None else None
        return out if out is not None else self.output_torch(o, cos_sin)

    def output_torch(self, o: torch.Tensor, cos_sin) -> torch.Tensor:
        """The reference `output`."""
        o = ops.rope(o, *cos_sin, inverse=True)
        o = ops.grouped_linear(o.flatten(1).unflatten(1, (self.groups, -1)), self.wo_a.w, self.groups)
        return self.wo_b(o.flatten(1))

    def forward(self, x: torch.Tensor, batch: Batch, states: list[LayerState], rope: Rope) -> torch.Tensor:
        cos_sin = batch.rope[self.rope_kind]
        q, kv, comp, index = self.project(x, batch.positions, cos_sin)
        outs = []
        for (a, b), pos, st in zip(batch.segments, batch.starts, states, strict=True):
            seg = slice(a, b)
            entries = self.compressor.update(st.comp, comp[seg], pos, rope, st) if comp is not None else None
            sel = None
            if index is not None:
                keys = self.indexer.compressor.update(st.index, index[2][seg], pos, rope, st)
                sel = (index[0][seg], index[1][seg], keys)
            outs.append(self._attend(q[seg], kv[seg], batch.positions[seg], pos, st, entries, sel))
        return self.output(torch.cat(outs), cos_sin)

    def _attend(self, q, kv, positions, pos0: int, st: LayerState, entries, sel, block: int = 128) -> torch.Tensor:
        """One sequence: q [S, H, hd], new kv [S, hd] at positions pos0..; stages the window's update."""
        first = max(pos0 - st.span, 0)
        st.stage(partial(st.window.write, pos0, kv))
        if q.shape[0] == 1:  # decode: the one query sees every key of the window and every entry
            keys = [st.window.read(first, pos0), kv]
            if entries is not None and entries.shape[0]:
                keys.append(entries if sel is None else entries[self.indexer.top(*sel)])
            return ops.decode_attention(q, keys, self.attn_sink, self.hd**-0.5)
        keys = torch.cat([st.window.read(first, pos0), kv])  # positions first ... pos0 + S - 1
        out = []
        for i in range(0, q.shape[0], block):  # query blocks bound the score matrix to block x (block+window)
            pos = positions[i : i + block]
            lo = max(int(pos[0]) - self.window + 1 - first, 0)
            hi = int(pos[-1]) + 1 - first
            kpos = torch.arange(first + lo, first + hi, device=q.device)
            diff = pos[:, None] - kpos[None]
            valid = (diff >= 0) & (diff < self.window)
            k = keys[lo:hi]
            k_sel = valid_sel = None
            if entries is not None and entries.shape[0] and sel is None:  # HCA: every visible entry
                k = torch.cat([k, entries])
                vis = torch.arange(entries.shape[0], device=q.device)[None] < ((pos + 1) // self.ratio)[:, None]
                valid = torch.cat([valid, vis], dim=1)
            elif entries is not None and entries.shape[0]:  # CSA: the indexer's choice
                iq, iw, ikeys = sel
                idx, valid_sel = self.indexer.select(iq[i : i + block], iw[i : i + block], ikeys, pos)
                k_sel = entries[idx]
            out.append(ops.sink_attention(q[i : i + block], k, valid, self.attn_sink, self.hd**-0.5, k_sel, valid_sel))
        return torch.cat(out)


class Expert(nn.Module):
    def __init__(self, src: WeightSource, prefix: str, dtype: torch.dtype):
        super().__init__()
        self.w1 = Linear(src.weight(f"{prefix}.w1", dtype))
        self.w2 = Linear(src.weight(f"{prefix}.w2", dtype))
        self.w3 = Linear(src.weight(f"{prefix}.w3", dtype))

        self._weights = None  # (w1, w2, w3) once asked for; `_apply` (.to(), .float(), ...) drops it

    def weights(self) -> tuple[Weight, Weight, Weight]:
        if self._weights is None:  # a decode step asks ~10 times per layer; nn.Module lookups add up
            self._weights = (self.w1.w, self.w2.w, self.w3.w)
        return self._weights

    def _apply(self, fn, recurse=True):
        self._weights = None
        return super()._apply(fn, recurse)


class ResidentExperts(nn.Module):
    """The simplest expert provider: a layer's routed experts held in memory (all, or the `ids` given)."""

    def __init__(self, src: WeightSource, prefix: str, n: int, dtype: torch.dtype, ids: list[int] | None = None):
        super().__init__()
        self.experts = nn.ModuleDict({str(e): Expert(src, f"{prefix}.{e}", dtype) for e in (ids if ids is not None else range(n))})

    @property
    def group(self) -> int:
        return max(len(self.experts), 1)

    def get(self, ids: list[int]) -> dict[int, tuple[Weight, Weight, Weight]]:
        return {e: self.experts[str(e)].weights() for e in ids}

    def prefetch(self, ids: list[int]) -> None:
        pass  # in memory already

    def prefetch_next(self, x: torch.Tensor, tokens: torch.Tensor, used: list[int], nxt: MoE | None) -> None:
        pass


class MoE(nn.Module):
    """Router (hash or sqrtsoftplus top-k with selection bias), routed experts and one shared expert."""

    # the next layer's MoE, for early-routing prefetch: a reference set by `link_layers`, not a submodule
    next_moe: MoE | None = None

    def __init__(self, cfg: ModelConfig, src: WeightSource, p: str, hashed: bool, numerics: Numerics,
                 experts: ExpertProvider | None = None):  # fmt: skip
        super().__init__()
        self.gate = _fp32_math(src.tensor(f"{p}.gate.weight"))
        self.register_buffer("tid2eid", src.tensor(f"{p}.gate.tid2eid").long() if hashed else None, persistent=False)
        self.bias = None if hashed else _param(src.tensor(f"{p}.gate.bias"), torch.float32)
        self.shared = Expert(src, f"{p}.shared_experts", numerics.dtype)
        self.experts = experts if experts is not None else ResidentExperts(src, f"{p}.experts", cfg.n_routed_experts, numerics.dtype)
        self.k, self.score_func, self.route_scale, self.limit = (
            cfg.n_activated_experts, cfg.score_func, cfg.route_scale, cfg.swiglu_limit)  # fmt: skip

    def route(self, x: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router weights [T, K] (fp32) and expert ids [T, K]."""
        logits = ops.linear(x.float(), Dense(self.gate))
        ext = kernels.fused(logits)
        if ext is not None:
            hashed = self.tid2eid[tokens] if self.tid2eid is not None else None
            func = {"softmax": 0, "sigmoid": 1}.get(self.score_func, 2)  # else sqrt(softplus)
            return tuple(ext.route(logits, self.bias, hashed, self.k, func, self.route_scale))
        return self.route_torch(logits, tokens)

    def route_torch(self, logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference `route`, from the router logits [T, E] (fp32)."""
        if self.score_func == "softmax":
            scores = logits.softmax(dim=-1)
        elif self.score_func == "sigmoid":
            scores = logits.sigmoid()
        else:
            scores = F.softplus(logits).sqrt()
        if self.tid2eid is not None:
            ids = self.tid2eid[tokens]
        else:
            ids = (scores + self.bias).topk(self.k, dim=-1).indices
        weights = scores.gather(1, ids)
        if self.score_func != "softmax":
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.route_scale, ids

    def prefetch_hashed(self, tokens: torch.Tensor) -> None:
        """A hash layer knows its experts from the token ids alone: a store can start reading them now."""
        if self.tid2eid is not None:
            self.experts.prefetch(torch.unique(self.tid2eid[tokens]).tolist())

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route(x, tokens)
        used = sorted(set(ids.flatten().tolist()))
        # start reading the next layer's likely experts while this one computes
        self.experts.prefetch_next(x, tokens, used, self.next_moe)
        return self.add_routed(None, x, weights, ids, used, lead=[self.shared.weights()]).to(x.dtype)

    def add_routed(self, y: torch.Tensor | None, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                   used: list[int], lead: list = ()) -> torch.Tensor:  # fmt: skip
        """y [T, D] fp32 (None: zeros) plus `lead`'s experts (the shared one: unscaled, first) and the
        routed experts `used`' contributions (x [T, D], weights/ids [T, K]), in that order."""
        group = self.experts.group  # a store bounds how many it hands out at once
        # decode (one token, K distinct experts): no gather/scatter, y + out is what index_add computes
        slot_of = {e: k for k, e in enumerate(ids[0].tolist())} if ids.shape[0] == 1 else {}
        one = len(slot_of) == ids.shape[1]
        # several tokens, where the fused ops take them: each expert's tokens (ascending) and router weights
        pairs = _expert_rows(ids, weights, used) if not one and kernels.fused(x, y) is not None else {}
        lead = list(lead)
        if lead and not (one and used):  # the lead experts alone: a decode token takes them with its first chunk
            y, lead = ops.experts_sum(x, lead, self.limit, weights, [None] * len(lead), y), []
        for i in range(0, len(used), group):
            chunk = used[i : i + group]
            got = self.experts.get(chunk)
            # a fixed order: the sum must not depend on where experts came from
            if one:  # the chunk in one fused call (with the lead experts, the first time)
                slots = [None] * len(lead) + [slot_of[e] for e in chunk]
                y, lead = ops.experts_sum(x, lead + [got[e] for e in chunk], self.limit, weights, slots, y), []
            elif pairs:  # the chunk in one fused call
                rows = [pairs[e][0] for e in chunk]
                scales = [pairs[e][1] for e in chunk]
                y = ops.experts_rows(x, [got[e] for e in chunk], rows, scales, self.limit, y)
            else:
                for e in chunk:
                    w1, w2, w3 = got[e]
                    rows, slot = torch.where(ids == e)
                    out = ops.expert_mlp(x[rows], w1, w2, w3, self.limit, weights[rows, slot, None])
                    y = y.index_add(0, rows, out.float())
            del got
        return y


def _expert_rows(ids: torch.Tensor, weights: torch.Tensor, used: list[int]) -> dict[int, tuple[list[int], list[float]]]:
    """Each used expert's (token rows ascending, their router weights), from ids / weights [T, K]
    (`used` may be a subset of the experts in ids: a rank's share)."""
    flat = ids.flatten()
    order = torch.argsort(flat, stable=True)  # by expert, then by token: ids are distinct per token
    counts = torch.bincount(flat)
    starts, counts = (counts.cumsum(0) - counts).tolist(), counts.tolist()
    toks, ws = (order // ids.shape[1]).tolist(), weights.flatten()[order].tolist()
    return {e: (toks[starts[e] : starts[e] + counts[e]], ws[starts[e] : starts[e] + counts[e]]) for e in used}


class Block(nn.Module):
    """One layer (or the MTP block): mHC-wrapped attention, then mHC-wrapped MoE."""

    def __init__(self, cfg: ModelConfig, src: WeightSource, p: str, ratio: int, csa: bool, hashed: bool,
                 numerics: Numerics, experts=None):  # fmt: skip
        super().__init__()
        self.hc_attn = HyperConnection(cfg, src, f"{p}.hc_attn")
        self.attn_norm = _param(src.tensor(f"{p}.attn_norm.weight"), torch.float32)
        self.attn = Attention(cfg, src, f"{p}.attn", ratio, csa, numerics)
        self.hc_ffn = HyperConnection(cfg, src, f"{p}.hc_ffn")
        self.ffn_norm = _param(src.tensor(f"{p}.ffn_norm.weight"), torch.float32)
        self.ffn = MoE(cfg, src, f"{p}.ffn", hashed, numerics, experts)
        self.eps = cfg.norm_eps

    def forward(self, h: torch.Tensor, batch: Batch, states: list[LayerState], rope: Rope) -> torch.Tensor:
        return self.run(h, lambda x: self.attn(x, batch, states, rope), batch.tokens)

    def run(self, h: torch.Tensor, attend, tokens: torch.Tensor) -> torch.Tensor:
        """The block around any attention `attend(x [T, D]) -> [T, D]` (the DSpark draft brings its own)."""
        x, post, comb = self.hc_attn.pre(h)
        x = attend(ops.rms_norm(x, self.attn_norm, self.eps))
        h = HyperConnection.post(x, h, post, comb)
        x, post, comb = self.hc_ffn.pre(h)
        x = self.ffn(ops.rms_norm(x, self.ffn_norm, self.eps), tokens)
        return HyperConnection.post(x, h, post, comb)


class MTPBlock(nn.Module):
    """Multi-token prediction: from the main model's last streams at t and the token at t+1, a block
    of its own drafts the token at t+2. Shares `embed` and `head` with the main model."""

    def __init__(self, cfg: ModelConfig, src: WeightSource, p: str, numerics: Numerics, experts=None):
        super().__init__()
        dt = numerics.dtype
        self.e_proj = Linear(src.weight(f"{p}.e_proj", dt))
        self.h_proj = Linear(src.weight(f"{p}.h_proj", dt))
        self.enorm = _param(src.tensor(f"{p}.enorm.weight"), torch.float32)
        self.hnorm = _param(src.tensor(f"{p}.hnorm.weight"), torch.float32)
        self.norm = _param(src.tensor(f"{p}.norm.weight"), torch.float32)
        ratio = cfg.mtp_compress_ratio
        self.block = Block(cfg, src, p, ratio, cfg.mtp_csa, False, numerics, experts)
        self.hc_head = HyperHead(cfg, src, f"{p}.")
        self.eps = cfg.norm_eps

    def forward(self, h: torch.Tensor, next_embed: torch.Tensor, batch: Batch, states, rope: Rope):
        """h [T, n, D] main streams, next_embed [T, D] -> (normed hidden [T, D], this block's streams)."""
        e = self.e_proj(ops.rms_norm(next_embed, self.enorm, self.eps))
        x = e.unsqueeze(1) + self.h_proj(ops.rms_norm(h, self.hnorm, self.eps))
        x = self.block(x, batch, states, rope)
        return ops.rms_norm(self.hc_head(x), self.norm, self.eps), x


class Transformer(nn.Module):
    """Embedding -> n streams -> blocks -> hc_head -> norm -> head, plus the optional MTP block."""

    def __init__(self, cfg: ModelConfig, src: WeightSource, numerics: Numerics = Numerics(),
                 expert_provider=None, with_mtp: bool = True, progress=None, dspark_stages: int = 0):  # fmt: skip
        super().__init__()
        self.cfg, self.numerics = cfg, numerics
        dt = numerics.dtype
        self.embed = _param(src.tensor("embed.weight"), dt)
        self.layers = nn.ModuleList()
        for i in range(cfg.n_layers):
            experts = expert_provider(f"layers.{i}.ffn.experts") if expert_provider else None
            self.layers.append(Block(cfg, src, f"layers.{i}", cfg.compress_ratios[i], cfg.csa_layers[i],
                                     cfg.hash_layers[i], numerics, experts))  # fmt: skip
            if progress is not None:
                progress(i)
        link_layers(self)
        self.hc_head = HyperHead(cfg, src, "")
        self.norm = _param(src.tensor("norm.weight"), torch.float32)
        self.head = _param(src.tensor("head.weight"), dt)
        self.mtp = nn.ModuleList(
            MTPBlock(cfg, src, f"mtp.{j}", numerics, expert_provider(f"mtp.{j}.ffn.experts") if expert_provider else None)
            for j in range(cfg.n_mtp_layers if with_mtp else 0)
        )
        self.dspark = None  # the 0731-style DSpark draft (dsv4/dspark.py), when the checkpoint has one
        if not dspark_stages and getattr(cfg, "dspark", False) and hasattr(src, "names"):
            dspark_stages = len({n.split(".")[1] for n in src.names() if n.startswith("mtp.")})
        if dspark_stages:
            from .dspark import DSparkDraft  # the draft is built from this module's blocks

            self.dspark = DSparkDraft(cfg, src, numerics, dspark_stages, expert_provider)
        rd = cfg.rope_head_dim
        self.ropes = {
            "main": Rope(rd, cfg.rope_theta),
            "compress": Rope(rd, cfg.compress_rope_theta, cfg.rope_factor, cfg.original_seq_len, cfg.beta_fast, cfg.beta_slow),
        }

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def new_state(self, max_rollback: int = DEFAULT_MAX_ROLLBACK) -> SeqState:
        dev = self.device
        return SeqState(
            layers=[layer.attn.new_state(dev, max_rollback) for layer in self.layers],
            mtp=[m.block.attn.new_state(dev, max_rollback) for m in self.mtp]
            + (self.dspark.new_states(dev, max_rollback) if self.dspark is not None else []),
            max_rollback=max_rollback,
        )

    def make_batch(self, seqs: list[list[int]], states: list[SeqState]) -> Batch:
        """Flatten new tokens of several sequences, each continuing its own state."""
        if len(seqs) != len(states):
            raise ValueError(f"{len(seqs)} token lists for {len(states)} states")
        tokens, positions, segments, t = [], [], [], 0
        for ids, st in zip(seqs, states, strict=True):
            if not ids:
                raise ValueError("every sequence in a step needs at least one new token")
            bad = [i for i in ids if not 0 <= i < self.cfg.vocab_size]
            if bad:
                raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.cfg.vocab_size})")
            tokens.extend(ids)
            positions.extend(range(st.pos, st.pos + len(ids)))
            segments.append((t, t + len(ids)))
            t += len(ids)
        dev = self.device
        pos = torch.tensor(positions, dtype=torch.long, device=dev)
        return Batch(
            tokens=torch.tensor(tokens, dtype=torch.long, device=dev),
            positions=pos,
            segments=segments,
            starts=[st.pos for st in states],
            rope={k: r(pos) for k, r in self.ropes.items()},
        )

    def forward(self, batch: Batch, states: list[SeqState]) -> torch.Tensor:
        """Run one step; advance every state; return the last streams h [T, n, D].

        Atomic: layers stage their state writes, committed once all have run; a step that raises
        leaves every state as it was."""
        for layer in self.layers:
            layer.ffn.prefetch_hashed(batch.tokens)
        h = F.embedding(batch.tokens, self.embed).unsqueeze(1).repeat(1, self.cfg.hc_mult, 1)
        taps = self.dspark.target_layer_ids if self.dspark is not None else ()
        captured = {}
        try:
            for i, layer in enumerate(self.layers):
                h = layer(h, batch, [st.layers[i] for st in states], self.ropes["compress"])
                if i in taps:  # the DSpark draft's context: these layers' outputs
                    captured[i] = h
            if captured:
                self.dspark.capture([captured[i] for i in taps], batch, states, self.ropes["main"])
        except BaseException:
            for st in states:
                st.discard()
            raise
        for (a, b), st in zip(batch.segments, states, strict=True):
            st.advance(b - a)
        return h

    def logits_from(self, h: torch.Tensor) -> torch.Tensor:
        """Streams [T, n, D] -> float32 logits [T, V]."""
        x = ops.rms_norm(self.hc_head(h), self.norm, self.cfg.norm_eps)
        return ops.linear(x, Dense(self.head)).float()

    def dspark_draft(self, state: SeqState, anchor: int, pick):
        """The DSpark draft block after `state` (see `DSparkDraft.propose`)."""
        if self.dspark is None:
            raise RuntimeError("this checkpoint has no DSpark draft (no mtp.*.main_proj tensors)")
        return self.dspark.propose(self, state, anchor, pick)

    def mtp_logits(self, h: torch.Tensor, next_tokens: torch.Tensor, batch: Batch, states: list[SeqState]):
        """Draft logits [T, V] for the token after `next_tokens`, from main streams h at `batch` positions.

        The MTP block keeps its own window state per sequence (`SeqState.mtp`); `batch` must be the
        step that produced h (its positions), and `next_tokens` [T] the tokens that follow each one.
        """
        if not self.mtp:
            raise RuntimeError("this checkpoint has no MTP layer (no mtp.* tensors)")
        e = F.embedding(next_tokens, self.embed)
        mtp_states = [st.mtp[0] for st in states]
        try:
            x, _ = self.mtp[0](h, e, batch, mtp_states, self.ropes["compress"])
        except BaseException:
            for ls in mtp_states:
                ls.discard()
            raise
        for ls in mtp_states:
            ls.commit()
        return F.linear(x, self.head).float()


def link_layers(model: nn.Module) -> None:
    """Give each layer's MoE a reference to the next layer's (early-routing prefetch guesses with its
    router). Set around nn.Module's attribute hook: a reference, not a submodule (no second copy of the
    next layer in `state_dict` or `modules()`)."""
    layers = list(model.layers)
    for cur, nxt in zip(layers, layers[1:], strict=False):
        object.__setattr__(cur.ffn, "next_moe", nxt.ffn)
