"""The DSpark draft of the 0731-style V4 releases (V4-Flash-0731, V4-Pro-0813, the -DSpark repos).

Shape legend as in model.py; B the draft block (dspark_block_size, 5), L the target layers tapped
(dspark_target_layer_ids, the last three), W the context window (window_size, 128), r the Markov rank.

Context: after the tapped target layers run, each one's streams are averaged over the n hc copies and
concatenated, `c [T, L*D]`; `main_x = main_norm(main_proj(c))` is shared by the stages, and each stage s
keeps a ring of `rope(kv_norm_s(wkv_s(main_x)))` (theta 10000, no YaRN) for the W latest committed
positions. The rings live in `SeqState.mtp` (one `LayerState` per stage, its `window`) and are written
by the target's own step, staged and committed with it: a rollback forgets rejected positions the same
way it forgets their sliding-window rows, so only accepted positions are ever read.

Draft: the block `[anchor, noise x (B-1)]` at positions P..P+B-1 (P = committed length), embedded and
repeated over the hc copies, runs through the stages (`mtp.0..`), each a V4 block whose attention sees
the ring plus all B block tokens with no causal mask inside the block; then mtp.<last>'s hc head and norm,
the target's head, and the Markov correction chained along the block (`l_i = z_i + W2 W1[prev]`, prev =
the anchor, then each drafted token). The confidence head estimates each draft's acceptance.

It knows the draft's math, not how drafts are verified (speculative.py) or where weights come from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .config import ModelConfig
from .model import Attention, Batch, Block, HyperHead, Linear, Numerics, Rope, WeightSource, _param
from .state import LayerState, Ring, SeqState


@dataclass
class Proposal:
    """One draft block: the drafted ids, their Markov-corrected logits and the confidence head's output."""

    tokens: list[int]  # d_0 .. d_{B-1}: d_i is the draft for position P + 1 + i
    logits: torch.Tensor  # [B, V] fp32, row i conditioned on the anchor and d_<i
    confidence: torch.Tensor  # [B] fp32 in (0, 1)


class DSparkDraft(nn.Module):
    """The draft's stages and heads; embedding and head are the target's (passed to `propose`)."""

    def __init__(
        self, cfg: ModelConfig, src: WeightSource, numerics: Numerics, stages: int, expert_provider=None
    ):
        super().__init__()
        dt = numerics.dtype
        self.main_proj = Linear(src.weight("mtp.0.main_proj", dt))  # [D, L*D]
        self.main_norm = _param(src.tensor("mtp.0.main_norm.weight"), torch.float32)
        self.stages = nn.ModuleList(
            Block(
                cfg,
                src,
                f"mtp.{s}",
                0,
                False,
                False,
                numerics,
                expert_provider(f"mtp.{s}.ffn.experts") if expert_provider else None,
            )  # fmt: skip
            for s in range(stages)
        )
        last = f"mtp.{stages - 1}"
        self.hc_head = HyperHead(cfg, src, f"{last}.")
        self.norm = _param(src.tensor(f"{last}.norm.weight"), torch.float32)
        self.markov_w1 = _param(src.tensor(f"{last}.markov_head.markov_w1.weight"), dt)  # [V, r]
        self.markov_w2 = _param(src.tensor(f"{last}.markov_head.markov_w2.weight"), dt)  # [V, r]
        self.confidence = _param(
            src.tensor(f"{last}.confidence_head.proj.weight"), torch.float32
        )  # [1, D + r]
        self.target_layer_ids = tuple(cfg.dspark_target_layer_ids)
        self.block_size, self.noise = cfg.dspark_block_size, cfg.dspark_noise_token_id
        self.window, self.hc_mult, self.eps, self.dtype = cfg.window_size, cfg.hc_mult, cfg.norm_eps, dt

    def new_states(self, device, max_rollback: int) -> list[LayerState]:
        """One context ring per stage: the W latest committed positions, plus room to roll back."""
        hd = self.stages[0].attn.hd
        return [
            LayerState(Ring(self.window + max_rollback, hd, self.dtype, device), self.window)
            for _ in self.stages
        ]

    # ---- context ----

    def capture(self, taps: list[torch.Tensor], batch: Batch, states: list[SeqState], rope: Rope) -> None:
        """Stage every sequence's new ring rows from the tapped layers' streams taps[j] [T, n, D].

        Only a segment's last W + max_rollback positions can still be read, so only they are computed."""
        rows, keep = [], []
        for (a, b), st in zip(batch.segments, states, strict=True):
            lo = max(a, b - st.mtp[0].window.cap)
            keep.append((lo - a, lo, b))
            rows.append(torch.arange(lo, b, device=batch.tokens.device))
        idx = torch.cat(rows)
        c = torch.cat([t[idx].float().mean(dim=1) for t in taps], dim=-1).to(self.dtype)  # [T', L*D]
        main_x = ops.rms_norm(self.main_proj(c), self.main_norm, self.eps)
        cos_sin = rope(batch.positions[idx])
        for s, stage in enumerate(self.stages):
            kv = stage.attn.keys(main_x, cos_sin)  # [T', hd]
            at = 0
            for (skip, lo, b), pos0, st in zip(keep, batch.starts, states, strict=True):
                ls = st.mtp[s]
                ls.stage(partial(ls.window.write, pos0 + skip, kv[at : at + b - lo]))
                at += b - lo

    # ---- the draft block ----

    def propose(self, target, state: SeqState, anchor: int, pick: Callable[[torch.Tensor], int]) -> Proposal:
        """Draft the block after `state`'s committed tokens; `anchor` is the target's token at position P.

        `pick(l_i)` chooses d_i from row i's Markov-corrected logits (argmax for greedy, a draw when
        sampling); the chain feeds each choice into the next row's correction. The state is not changed."""
        p, b, dev = state.pos, self.block_size, target.device
        tokens = torch.tensor([anchor] + [self.noise] * (b - 1), dtype=torch.long, device=dev)
        cos_sin = target.ropes["main"](torch.arange(p, p + b, device=dev))
        h = F.embedding(tokens, target.embed).unsqueeze(1).repeat(1, self.hc_mult, 1)  # [B, n, D]
        for stage, ls in zip(self.stages, state.mtp, strict=True):
            ctx = ls.window.read(max(p - self.window, 0), p)  # [<=W, hd]
            h = stage.run(h, partial(_block_attention, stage.attn, cos_sin=cos_sin, ctx=ctx), tokens)
        y = self.hc_head(h)  # [B, D]
        z = F.linear(ops.rms_norm(y, self.norm, self.eps), target.head).float()  # [B, V]
        prev, drafted, rows, embeds = anchor, [], [], []
        for i in range(b):
            e = self.markov_w1[prev]  # [r]
            row = z[i] + F.linear(e, self.markov_w2).float()
            prev = int(pick(row))
            drafted.append(prev)
            rows.append(row)
            embeds.append(e)
        feats = torch.cat([y.float(), torch.stack(embeds).float()], dim=-1)  # [B, D + r]
        confidence = torch.sigmoid(F.linear(feats, self.confidence)).squeeze(-1)
        return Proposal(drafted, torch.stack(rows), confidence)


def _block_attention(attn: Attention, x: torch.Tensor, cos_sin, ctx: torch.Tensor) -> torch.Tensor:
    """A stage's attention: the block's queries see the context ring and every block token (no causal
    mask inside the block), with the per-head sink; keys and values from the block's own `wkv`."""
    _, q = attn.queries(x, cos_sin)
    keys = torch.cat([ctx, attn.keys(x, cos_sin)])
    return attn.output(ops.sink_attention(q, keys, None, attn.attn_sink, attn.hd**-0.5), cos_sin)
