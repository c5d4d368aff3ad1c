"""The engine: a loaded model plus the per-sequence state bookkeeping that callers need.

`Engine.logits(ids)` is the simplest entry point (one sequence from position 0). `Engine.prefill` /
`Engine.step` advance `SeqState`s by any number of tokens, several sequences per step, and return
the logits asked for. Generation (sampling, stop rules, speculation) builds on these.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import Checkpoint
from .config import ModelConfig
from .model import SeqState, Transformer


class Engine:
    def __init__(self, model: Transformer, checkpoint: Checkpoint | None = None, tokenizer=None):
        self.model = model
        self.checkpoint = checkpoint
        self.tokenizer = tokenizer

    @property
    def config(self) -> ModelConfig:
        return self.model.cfg

    def new_state(self) -> SeqState:
        return self.model.new_state()

    @torch.inference_mode()
    def step(self, seqs: list[list[int]], states: list[SeqState], all_logits: bool = False) -> list[torch.Tensor]:
        """Feed new tokens to each sequence; return per sequence its logits [S, V] (or [1, V], the last)."""
        batch = self.model.make_batch(seqs, states)
        h = self.model(batch, states)
        if all_logits:
            logits = self.model.logits_from(h)
            return [logits[a:b] for a, b in batch.segments]
        last = torch.tensor([b - 1 for _, b in batch.segments], device=h.device)
        logits = self.model.logits_from(h[last])
        return [logits[i : i + 1] for i in range(len(seqs))]

    def prefill(self, ids: list[int], state: SeqState | None = None, chunk: int | None = None,
                all_logits: bool = False) -> tuple[torch.Tensor, SeqState]:  # fmt: skip
        """Feed `ids` (in chunks of `chunk` tokens if given) to one sequence; returns logits and state."""
        state = state if state is not None else self.new_state()
        if not ids:
            raise ValueError("prefill needs at least one token")
        chunk = chunk or len(ids)
        outs = [self.step([ids[i : i + chunk]], [state], all_logits)[0] for i in range(0, len(ids), chunk)]
        return (torch.cat(outs) if all_logits else outs[-1]), state

    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """float32 logits [len(token_ids), vocab] for one sequence from position 0."""
        return self.prefill(list(token_ids), all_logits=True)[0].float()


def load(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.bfloat16,
         numerics: str = "exact", **kwargs) -> Engine:  # fmt: skip
    """Load a checkpoint folder (official or transformers layout) into an Engine.

    dtype is the compute dtype (bf16 default, fp32 for checks); numerics 'exact' computes what
    transformers computes, 'released' adds the official FP8 KV / FP4 indexer roundings.
    """
    from .loader import load_model

    model, ckpt = load_model(path, device=device, dtype=dtype, numerics=numerics, **kwargs)
    return Engine(model, ckpt)
