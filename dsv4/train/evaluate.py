"""Evaluation of an exported folder through `dsv4.load`: held-out perplexity and how often the MTP
draft would be accepted, and the report written after training (before and after export)."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .corpus import read_texts
from .export import export

if TYPE_CHECKING:
    from .loop import Run


def eval_windows(tok, files: list[Path], ctx: int, max_tokens: int | None) -> list[list[int]]:
    """Each file as BOS + tokens + EOS, cut into windows of at most ctx tokens, up to max_tokens."""
    out, total = [], 0
    for text in read_texts(files):
        ids = [0, *tok.encode(text), 1]
        for i in range(0, len(ids) - 1, ctx):
            w = ids[i : i + ctx]
            if max_tokens is not None and total + len(w) > max_tokens:
                return out
            out.append(w)
            total += len(w)
    return out


@torch.inference_mode()
def score(model_dir: str | Path, files: list[Path], *, ctx: int = 512, max_tokens: int | None = None,
          dtype: torch.dtype = torch.float32) -> dict:  # fmt: skip
    """Held-out perplexity, and how often the MTP draft at t equals the main model's greedy token
    at t+2 (given the true token t+1), or the true token t+2."""
    import dsv4

    from .tokenizer import Tokenizer

    model = dsv4.load(model_dir, dtype=dtype).model
    tok = Tokenizer.from_dir(model_dir)
    nll, n, accept, mtp_hit, m = 0.0, 0, 0, 0, 0
    for w in eval_windows(tok, files, ctx, max_tokens):
        st = model.new_state()
        batch = model.make_batch([w], [st])
        h = model(batch, [st])
        logits, ids = model.logits_from(h), torch.tensor(w)
        nll += F.cross_entropy(logits[:-1], ids[1:], reduction="sum").item()
        n += len(w) - 1
        if model.mtp and len(w) > 2:
            draft = model.mtp_logits(h, torch.cat([ids[1:], ids[-1:]]), batch, [st]).argmax(-1)[:-2]
            accept += int((draft == logits.argmax(-1)[1:-1]).sum())
            mtp_hit += int((draft == ids[2:]).sum())
            m += len(w) - 2
    return {"perplexity": math.exp(nll / max(n, 1)), "tokens": n,
            "mtp_acceptance": accept / max(m, 1), "mtp_accuracy": mtp_hit / max(m, 1)}  # fmt: skip


def evaluate(model_dir: str | Path, files: list[str | Path], *, ctx: int = 512, max_tokens: int | None = None,
             dtype: torch.dtype = torch.float32) -> float:  # fmt: skip
    """Perplexity of an exported model folder on `files` (BOS + text + EOS, windows of ctx tokens)."""
    result = score(model_dir, [Path(f) for f in files], ctx=ctx, max_tokens=max_tokens, dtype=dtype)
    return result["perplexity"]


def report(run: Run, model_dir: Path) -> dict:
    """Held-out figures before export (plain fp32 weights, fp32 and bf16 compute) and after it."""
    o = run.opts
    out = {"train_seconds": round(run.seconds, 1), "steps": run.step,
           "tokens_seen": run.step * o.batch * o.accum * o.seq_len,
           "held_out_files": len(run.held_out), "ctx": o.seq_len}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        plain = export(run, Path(tmp) / "fp32", quantized=False, shards=1)
        for label, d, dt in (("fp32_weights_fp32", plain, torch.float32), ("fp32_weights_bf16", plain, torch.bfloat16),
                             ("fp8_fp4_fp32", model_dir, torch.float32), ("fp8_fp4_bf16", model_dir, torch.bfloat16)):  # fmt: skip
            out[label] = score(d, run.held_out, ctx=o.seq_len, max_tokens=o.eval_tokens, dtype=dt)
    return out
