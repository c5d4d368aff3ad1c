"""Train the 0731 releases' DSpark draft on a frozen backbone (the bundled demo model's, by default).

The backbone runs without gradients on windows of the corpus; forward hooks on its target layers
(`dspark_target_layer_ids`) capture their streams. For K anchor positions P per window the draft sees
what `DSparkDraft.propose` sees at decode time: the context keys of the committed positions
max(0, P-W)..P-1 (from `main_proj` of the captures) and the block [x_P, noise x (B-1)] at positions
P..P+B-1, attended with no causal mask inside the block. The K blocks of a window run as one batch,
a mask keeping each block to its own context and tokens; the draft's own math (stages, hc head, head,
Markov rows) is `dspark.py`'s modules, so what trains here is what the engine runs.

Loss: row i of a block drafts position P+1+i. Its target is the backbone's distribution there given
the true prefix (distillation: a draft is kept when it matches the target, not the data); its Markov
correction is teacher-forced with the true token at P+i (the anchor for row 0). The confidence head
learns, on detached features, whether row i's argmax equals the backbone's. Router biases of the
stages' MoEs are balanced as in the backbone's training.

The export is a 0731-layout folder whose index lists the backbone's tensors in the backbone's own
shard files (`../demo/...`), so only the draft (a few MB) is written. It knows nothing of decoding.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..config import ModelConfig
from ..dspark import DSparkDraft
from ..model import Numerics, Transformer
from ..writer import write_checkpoint
from .balance import LoadMeter
from .corpus import PAD, SPECIAL_TOKENS, Windows, encode_corpus, gather_files, read_texts, split_files
from .init import InitSource, trainable
from .loop import lr_at, make_optimizer
from .plot import plot_loss

DEMO = Path(__file__).resolve().parent.parent / "demo"


def dspark_config(raw_cfg: dict, *, stages: int = 3, block: int = 5, rank: int = 64) -> dict:
    """The backbone's config.json dict turned 0731-style: a `stages`-stage draft tapping the last three
    layers, blocks of `block` tokens whose noise token is the pad token (never in the data)."""
    n = raw_cfg["num_hidden_layers"]
    raw = dict(raw_cfg)
    raw["compress_ratios"] = list(raw_cfg["compress_ratios"][:n]) + [0] * stages
    raw.update(dspark_block_size=block, dspark_noise_token_id=SPECIAL_TOKENS.index(PAD),
               dspark_target_layer_ids=list(range(max(n - 3, 0), n)), dspark_markov_rank=rank)  # fmt: skip
    return raw


def build_draft(raw_cfg: dict, seed: int, stages: int = 3) -> tuple[DSparkDraft, dict[str, torch.Tensor]]:
    """A trainable fp32 DSpark draft for a 0731-style config, and its tensors by official name."""
    cfg = ModelConfig.from_dict(raw_cfg)
    src = InitSource(cfg, seed, with_mtp=False, dspark_stages=stages)
    draft = DSparkDraft(cfg, src, Numerics(dtype=torch.float32), stages)
    return draft.train(), {n: t for n, t in trainable(draft, src).items() if n.startswith("mtp.")}


class Taps:
    """The backbone's target layers' streams [N*T, n, D] from its latest forward pass."""

    def __init__(self, target: Transformer, layer_ids: tuple[int, ...]):
        self.out: dict[int, torch.Tensor] = {}
        for i in layer_ids:
            target.layers[i].register_forward_hook(self._hook(i))
        self.ids = layer_ids

    def _hook(self, i: int):
        def hook(_module, _inputs, out: torch.Tensor) -> None:
            self.out[i] = out

        return hook

    def context(self) -> torch.Tensor:
        """c [N*T, L*D]: each target layer's streams averaged over the hc copies, concatenated."""
        return torch.cat([self.out[i].float().mean(dim=1) for i in self.ids], dim=-1)


@dataclass
class Blocks:
    """K anchors in each of N windows of T tokens, flattened: the draft's training batch."""

    tokens: torch.Tensor  # [Q = N*K*B] block tokens: the anchor, then noise
    positions: torch.Tensor  # [Q] P + i
    prev: torch.Tensor  # [Q] the Markov row's previous token: x[P + i]
    target: torch.Tensor  # [Q, V] the backbone's logits for position P + 1 + i
    valid: torch.Tensor  # [Q, N*T + Q]: the context keys and block keys each row sees


def make_blocks(
    seqs: torch.Tensor, logits: torch.Tensor, anchors: torch.Tensor, b: int, w: int, noise: int
) -> Blocks:
    """seqs [N, T] tokens, logits [N*T, V] the backbone's, anchors [N, K] positions P (1 <= P < T-b)."""
    n, t = seqs.shape
    k = anchors.shape[1]
    pos = (anchors[..., None] + torch.arange(b)).reshape(-1)  # [Q]
    win = torch.arange(n)[:, None, None].expand(n, k, b).reshape(-1)  # the window of each row
    tokens = torch.full((n, k, b), noise, dtype=torch.long)
    tokens[..., 0] = seqs.gather(1, anchors)
    anchor = anchors[..., None].expand(n, k, b).reshape(-1)  # [Q] P
    key_pos = torch.arange(t).repeat(n)  # context keys: every position of every window
    key_win = torch.arange(n).repeat_interleave(t)
    ctx = (
        (key_win[None] == win[:, None])
        & (key_pos[None] < anchor[:, None])
        & (key_pos[None] >= anchor[:, None] - w)
    )
    blk = torch.arange(n * k).repeat_interleave(b)
    return Blocks(tokens.reshape(-1), pos, seqs.reshape(-1)[win * t + pos], logits[win * t + pos],
                  torch.cat([ctx, blk[:, None] == blk[None]], dim=1))  # fmt: skip


def draft_forward(
    draft: DSparkDraft, target: Transformer, c: torch.Tensor, positions: torch.Tensor, blocks: Blocks
):
    """The draft on every block at once -> (Markov-corrected logits l [Q, V], features [Q, D + r]).

    c [N*T, L*D] the captures at context positions `positions` [N*T]."""
    main_x = ops.rms_norm(draft.main_proj(c), draft.main_norm, draft.eps)
    rope = target.ropes["main"]
    ctx_rope, blk_rope = rope(positions), rope(blocks.positions)
    h = F.embedding(blocks.tokens, target.embed).unsqueeze(1).repeat(1, draft.hc_mult, 1)  # [Q, n, D]
    for stage in draft.stages:
        ctx = stage.attn.keys(main_x, ctx_rope)

        def attend(x, attn=stage.attn, ctx=ctx):
            _, q = attn.queries(x, blk_rope)
            keys = torch.cat([ctx, attn.keys(x, blk_rope)])
            return attn.output(
                ops.sink_attention(q, keys, blocks.valid, attn.attn_sink, attn.hd**-0.5), blk_rope
            )

        h = stage.run(h, attend, blocks.tokens)
    y = draft.hc_head(h)  # [Q, D]
    z = F.linear(ops.rms_norm(y, draft.norm, draft.eps), target.head).float()
    e = draft.markov_w1[blocks.prev]  # [Q, r]
    return z + F.linear(e, draft.markov_w2).float(), torch.cat([y, e], dim=-1).float()


def draft_loss(draft: DSparkDraft, target: Transformer, taps: Taps, seqs: torch.Tensor, k: int,
               gen: torch.Generator) -> tuple[torch.Tensor, dict]:  # fmt: skip
    """Distillation cross-entropy + the confidence head's BCE on k random anchors per window of `seqs`
    [N, T]; plus figures: per-row agreement with the backbone's argmax."""
    n, t = seqs.shape
    b = draft.block_size
    with torch.no_grad():
        states = [target.new_state() for _ in range(n)]
        batch = target.make_batch(seqs.tolist(), states)
        logits = target.logits_from(target(batch, states))  # [N*T, V]; fills taps.out
        c = taps.context()
    anchors = (
        torch.stack([torch.randperm(t - b - 1, generator=gen)[:k] + 1 for _ in range(n)]).sort(-1).values
    )
    blocks = make_blocks(seqs, logits, anchors, b, draft.window, draft.noise)
    lg, feats = draft_forward(draft, target, c, batch.positions, blocks)
    p = torch.softmax(blocks.target, dim=-1)
    ce = -(p * torch.log_softmax(lg, dim=-1)).sum(-1).mean()
    hit = (lg.argmax(-1) == blocks.target.argmax(-1)).float()
    conf = F.linear(feats.detach(), draft.confidence).squeeze(-1)
    bce = F.binary_cross_entropy_with_logits(conf, hit)
    rows = hit.view(-1, b)
    accepted = rows.cumprod(dim=1).sum(dim=1).mean()  # greedy accepted drafts per block (teacher-forced)
    figures = {"ce": ce.item(), "bce": bce.item(), "agree": float(rows.mean()), "agree0": float(rows[:, 0].mean()),
               "accepted": float(accepted)}  # fmt: skip
    return ce + 0.1 * bce, figures


@dataclass
class DSparkOptions:
    backbone: str = str(DEMO)  # a trained model folder (config.json, tokenizer.json, weights)
    out: str = "out/train-dspark"  # working folder: loss curve, report
    export: str | None = None  # the 0731-layout folder (default <out>/model)
    data: list[str] | None = None  # as dsv4.train's --data (default: the stdlib's .py source)
    steps: int = 300
    seq_len: int = 256
    batch: int = 2  # windows per step
    anchors: int = 48  # draft blocks per window
    stages: int = 3
    rank: int = 64  # Markov rank
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup: int = 20
    weight_decay: float = 0.1
    clip: float = 1.0
    bias_u: float = 2e-3
    seed: int = 0
    threads: int = 1
    log_every: int = 10
    eval_windows: int = 16  # held-out windows scored after training (0: skip)


def train_dspark(o: DSparkOptions) -> dict:
    """Train a draft on the frozen backbone, export it next to the backbone, and report."""
    from tokenizers import Tokenizer

    import dsv4

    torch.set_num_threads(o.threads)
    torch.manual_seed(o.seed)
    backbone = Path(o.backbone)
    raw = dspark_config(json.loads((backbone / "config.json").read_text()), stages=o.stages, rank=o.rank)
    target = dsv4.load(backbone, dtype=torch.float32).model.requires_grad_(False)
    draft, weights = build_draft(raw, o.seed, o.stages)
    taps = Taps(target, draft.target_layer_ids)
    tok = Tokenizer.from_file(str(backbone / "tokenizer.json"))
    train_files, held_out = split_files(*gather_files(o.data))
    windows = Windows(encode_corpus(tok, read_texts(train_files)), o.seq_len, o.seed)
    optimizer, meter = make_optimizer(weights, o), LoadMeter(draft)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    gen, history, seconds = torch.Generator().manual_seed(o.seed), [], 0.0
    for step in range(o.steps):
        t0 = time.perf_counter()
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, o)
        optimizer.zero_grad(set_to_none=True)
        loss, figures = draft_loss(draft, target, taps, torch.tensor(windows.next(o.batch)), o.anchors, gen)
        loss.backward()
        nn.utils.clip_grad_norm_(params, o.clip)
        optimizer.step()
        meter.update_biases(o.bias_u)
        seconds += time.perf_counter() - t0
        history.append({"step": step + 1, "loss": loss.item(), **figures})
        if (step + 1) % o.log_every == 0 or step + 1 == o.steps:
            print(json.dumps({k: round(v, 4) for k, v in history[-1].items()}), file=sys.stderr, flush=True)
    Path(o.out).mkdir(parents=True, exist_ok=True)
    plot_loss(history, Path(o.out) / "loss", keys=("ce", "bce"))
    model_dir = export_dspark(Path(o.export or Path(o.out) / "model"), backbone, raw, weights)
    rep = {"model": str(model_dir), "steps": o.steps, "train_seconds": round(seconds, 1),
           "blocks_seen": o.steps * o.batch * o.anchors, "options": asdict(o),
           "last10": {k: sum(r[k] for r in history[-10:]) / len(history[-10:]) for k in history[-1] if k != "step"}}  # fmt: skip
    if o.eval_windows and held_out:
        rep["held_out"] = held_out_figures(draft, target, taps, tok, held_out, o)
    (Path(o.out) / "report.json").write_text(json.dumps(rep, indent=1))
    return {**rep, "history": history}


@torch.no_grad()
def held_out_figures(draft, target, taps, tok, files, o: DSparkOptions) -> dict:
    """The teacher-forced figures of `draft_loss` on held-out windows (mean over them)."""
    stream = encode_corpus(tok, read_texts(files))
    windows = Windows(stream, o.seq_len, o.seed)
    gen = torch.Generator().manual_seed(o.seed + 1)
    rows = [draft_loss(draft, target, taps, torch.tensor(windows.next(1)), o.anchors, gen)[1]
            for _ in range(min(o.eval_windows, windows.n))]  # fmt: skip
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]} | {"windows": len(rows)}


def export_dspark(path: Path, backbone: Path, raw_cfg: dict, weights: dict[str, torch.Tensor]) -> Path:
    """A 0731-layout folder: the draft's tensors written here, the backbone's listed in its own shards
    (relative paths from `path`) and config.json; the tokenizer is the backbone's, found through the
    index (`Tokenizer.from_dir`), so it is not copied."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    rel = os.path.relpath(backbone.resolve(), path.resolve())
    index = json.loads((backbone / "model.safetensors.index.json").read_text())["weight_map"]
    shared = {name: f"{rel}/{fname}" for name, fname in index.items() if not name.startswith("mtp.")}
    tensors = {n: t.detach().clone() for n, t in weights.items()}
    write_checkpoint(path, raw_cfg, tensors, shards=1, shared=shared)
    return path


def main(argv: list[str] | None = None) -> int:
    d = DSparkOptions()
    p = argparse.ArgumentParser(prog="python -m dsv4.train.dspark", description=__doc__.split("\n\n")[0])
    for name, value in asdict(d).items():
        flag = f"--{name.replace('_', '-')}"
        if name == "data":
            p.add_argument(flag, nargs="+", default=None, help="files or folders (.py); default: the stdlib")
        elif name == "export":
            p.add_argument(flag, default=None, help="the exported folder (default OUT/model)")
        else:
            p.add_argument(flag, type=type(value), default=value)
    rep = train_dspark(DSparkOptions(**vars(p.parse_args(argv))))
    rep.pop("history")
    print(json.dumps(rep, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
