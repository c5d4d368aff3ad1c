"""Auxiliary-loss-free load balancing: count tokens per routed expert during forward, then nudge every
routed layer's `ffn.gate.bias` by +u for each under-loaded expert and -u for each over-loaded one (the
bias gets no gradient). It knows the MoE's routing, not the loss or the optimizer.
"""

from __future__ import annotations

import torch

from ..model import MoE, Transformer


class LoadMeter:
    """Counts tokens per routed expert in every top-k MoE (main layers and MTP) during forward."""

    def __init__(self, model: Transformer):
        self.moes = [m for m in model.modules() if isinstance(m, MoE) and m.bias is not None]
        self.counts = [torch.zeros_like(m.bias) for m in self.moes]
        for i, m in enumerate(self.moes):
            m.register_forward_hook(self._hook(i))

    def _hook(self, i: int):
        def hook(moe: MoE, inputs, _out) -> None:
            x, tokens = inputs
            with torch.no_grad():
                _, ids = moe.route(x.detach(), tokens)  # the same pick the forward made
                self.counts[i] += torch.bincount(ids.flatten(), minlength=self.counts[i].numel())

        return hook

    def update_biases(self, u: float) -> None:
        """The aux-loss-free rule: bias += u * sign(mean load - load); then reset the counts."""
        update_router_bias([m.bias for m in self.moes], self.counts, u)
        for c in self.counts:
            c.zero_()


def update_router_bias(biases: list[torch.Tensor], loads: list[torch.Tensor], u: float) -> None:
    with torch.no_grad():
        for b, load in zip(biases, loads, strict=True):
            b += u * torch.sign(load.float().mean() - load.float())
