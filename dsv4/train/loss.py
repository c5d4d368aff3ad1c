"""The training loss: next-token cross-entropy plus `mtp_weight` x the MTP block's cross-entropy on the
token after next (the MTP block sees the true next token, as in speculative decoding)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model import Transformer


def batch_loss(model: Transformer, seqs: list[list[int]], mtp_weight: float):
    """Windows of L+2 tokens -> (loss, main CE, MTP CE): position t predicts t+1, MTP at t predicts t+2."""
    length = len(seqs[0]) - 2
    states = [model.new_state() for _ in seqs]
    batch = model.make_batch([s[:length] for s in seqs], states)
    h = model(batch, states)
    nxt = torch.tensor([s[1 : length + 1] for s in seqs]).flatten()
    ce = F.cross_entropy(model.logits_from(h), nxt)
    if not model.mtp:
        return ce, ce, ce.new_zeros(())
    after = torch.tensor([s[2 : length + 2] for s in seqs]).flatten()
    mtp_ce = F.cross_entropy(model.mtp_logits(h, nxt, batch, states), after)
    return ce + mtp_weight * mtp_ce, ce, mtp_ce
