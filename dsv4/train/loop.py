"""The training run: options, AdamW with warmup then cosine LR, gradient clipping and accumulation, the
router-bias update after each step, a resumable state file (`train_state.pt`: weights, optimizer, step,
RNG, data position, tokenizer), and `train`, the whole job (train or resume, plot, export, report).

Runs on the CPU in fp32. The lightning indexer's top-k pick is not differentiable, so the indexer's
weights keep their init. It knows nothing of generation, chat templates or serving.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from ..model import Transformer
from .balance import LoadMeter
from .corpus import Windows, encode_corpus, gather_files, read_texts, split_files, train_tokenizer
from .evaluate import report
from .export import export
from .init import PRESETS, build_model, preset_config
from .loss import batch_loss
from .plot import plot_loss


@dataclass
class TrainOptions:
    data: list[str] | None = None  # files or folders; None: the stdlib's .py source
    out: str = "out/train"  # working folder: train_state.pt, tokenizer, loss curve, report
    export: str | None = None  # exported model folder (default <out>/model)
    config: str = "demo"
    vocab: int | None = None  # tokenizer size incl. added tokens (default: the preset's)
    steps: int = 550  # length of the LR schedule
    stop_at: int | None = None  # stop (and save) after this step, to resume later
    seq_len: int = 512
    batch: int = 4  # sequences per micro-batch (4 x 512 tokens keeps the mHC streams in cache)
    accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 50
    weight_decay: float = 0.1
    clip: float = 1.0
    mtp_weight: float = 0.3
    bias_u: float = 2e-3  # router bias step per optimizer step
    seed: int = 0
    threads: int = 1
    resume: str | None = None
    save_every: int = 100
    log_every: int = 10
    eval_tokens: int = 32768  # held-out tokens scored after training (0: skip the evaluation)


# options a resumed run takes from its command line; all others come from the state file
RUNTIME_OPTIONS = "out export steps stop_at threads resume save_every log_every eval_tokens".split()


def lr_at(step: int, o: TrainOptions) -> float:
    if step < o.warmup:
        return o.lr * (step + 1) / o.warmup
    frac = min((step - o.warmup) / max(o.steps - o.warmup, 1), 1.0)
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * frac))


def make_optimizer(weights: dict[str, torch.Tensor], o: TrainOptions) -> torch.optim.AdamW:
    trainable = [
        (n, p) for n, p in sorted(weights.items()) if isinstance(p, nn.Parameter) and p.requires_grad
    ]
    decay = [p for n, p in trainable if p.dim() >= 2]
    other = [p for n, p in trainable if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o.lr, betas=(0.9, 0.95), eps=1e-8)


@dataclass
class Run:
    """Everything a training run holds; `state()` / `restore()` make it resumable."""

    opts: TrainOptions
    tok: object  # tokenizers.Tokenizer
    raw_cfg: dict
    model: Transformer
    weights: dict[str, torch.Tensor]
    optimizer: torch.optim.AdamW
    windows: Windows
    meter: LoadMeter
    held_out: list[Path]
    step: int = 0
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list)

    def state(self) -> dict:
        return {
            "options": asdict(self.opts),
            "history": self.history,
            "tokenizer": self.tok.to_str(),
            "raw_cfg": self.raw_cfg,
            "weights": {n: t.detach().clone() for n, t in self.weights.items()},
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "seconds": self.seconds,
            "data": {**self.windows.state(), "tokens": self.windows.windows.numel()},
            "rng": torch.get_rng_state(),
        }

    def restore(self, st: dict) -> None:
        with torch.no_grad():
            for n, t in st["weights"].items():
                self.weights[n].copy_(t)
        self.optimizer.load_state_dict(st["optimizer"])
        if st["data"]["tokens"] != self.windows.windows.numel():
            raise ValueError(
                "the corpus differs from the one the state file was trained on; pass the same --data"
            )
        self.windows.load_state(st["data"])
        self.step, self.seconds, self.history = st["step"], st["seconds"], st["history"]
        torch.set_rng_state(st["rng"])


def prepare(opts: TrainOptions) -> Run:
    """Options (merged with the state file on --resume), data, tokenizer and model: a run at its start."""
    from tokenizers import Tokenizer

    saved = torch.load(opts.resume, weights_only=True) if opts.resume else None
    if saved:
        keep = {k: getattr(opts, k) for k in RUNTIME_OPTIONS}
        opts = TrainOptions(**{**{k: v for k, v in saved["options"].items() if k in _FIELDS}, **keep})
    torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    files, root = gather_files(opts.data)
    train_files, held_out = split_files(files, root)
    texts = read_texts(train_files)
    if opts.config not in PRESETS:
        raise ValueError(f"unknown --config {opts.config!r}; use one of {sorted(PRESETS)}")
    vocab = opts.vocab or PRESETS[opts.config][0]
    tok = Tokenizer.from_str(saved["tokenizer"]) if saved else train_tokenizer(texts, vocab)
    raw_cfg = (
        saved["raw_cfg"] if saved else preset_config(opts.config, tok.get_vocab_size(with_added_tokens=True))
    )
    stream = encode_corpus(tok, texts)
    model, weights = build_model(raw_cfg, opts.seed)
    run = Run(opts, tok, raw_cfg, model, weights, make_optimizer(weights, opts),
              Windows(stream, opts.seq_len + 2, opts.seed), LoadMeter(model), held_out)  # fmt: skip
    if saved:
        run.restore(saved)
    return run


_FIELDS = {f.name for f in fields(TrainOptions)}


def train_step(run: Run) -> dict:
    """One optimizer step over `accum` micro-batches; then the router bias update."""
    o, opt = run.opts, run.optimizer
    for g in opt.param_groups:
        g["lr"] = lr_at(run.step, o)
    opt.zero_grad(set_to_none=True)
    totals = torch.zeros(3)
    for _ in range(o.accum):
        loss, ce, mtp_ce = batch_loss(run.model, run.windows.next(o.batch), o.mtp_weight)
        (loss / o.accum).backward()
        totals += torch.stack([loss, ce, mtp_ce]).detach() / o.accum
    params = [p for g in opt.param_groups for p in g["params"]]
    gnorm = torch.nn.utils.clip_grad_norm_(params, o.clip)
    opt.step()
    run.meter.update_biases(o.bias_u)
    run.step += 1
    loss, ce, mtp_ce = totals.tolist()
    return {"step": run.step, "loss": loss, "ce": ce, "mtp_ce": mtp_ce, "lr": opt.param_groups[0]["lr"],
            "grad_norm": float(gnorm)}  # fmt: skip


def save_state(run: Run) -> Path:
    path = Path(run.opts.out) / "train_state.pt"
    tmp = path.with_suffix(".tmp")
    torch.save(run.state(), tmp)
    tmp.replace(path)  # a crash mid-write never leaves a torn state file
    return path


def loop(run: Run) -> None:
    """Steps until --steps (or --stop-at), with a progress bar, a log line every --log-every steps
    and a state file every --save-every steps and at the end (also on Ctrl-C)."""
    from tqdm import tqdm

    o = run.opts
    last = min(o.steps, o.stop_at or o.steps)
    tokens_per_step = o.batch * o.accum * o.seq_len
    tty = sys.stderr.isatty()  # into a log file: a bar line every 30 s, not every step
    bar = tqdm(total=last, initial=run.step, unit="step", file=sys.stderr, dynamic_ncols=tty,
               mininterval=0.1 if tty else 30)  # fmt: skip
    try:
        while run.step < last:
            t0 = time.perf_counter()
            rec = train_step(run)
            dt = time.perf_counter() - t0
            run.seconds += dt
            rec["tok_s"] = tokens_per_step / dt
            run.history.append(rec)
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tok_s']:.0f}")
            if run.step % o.log_every == 0 or run.step == last:
                bar.write(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in rec.items()}))
            if run.step % o.save_every == 0:
                save_state(run)
    finally:
        bar.close()
        save_state(run)


def train(opts: TrainOptions) -> dict:
    """Train (or resume), export, plot and report; returns the report (also `<out>/report.json`)."""
    for var in ("RAYON_NUM_THREADS", "RAYON_RS_NUM_CPUS"):  # the tokenizers library's thread pool
        os.environ.setdefault(var, str(opts.threads))
    Path(opts.out).mkdir(parents=True, exist_ok=True)
    run = prepare(opts)
    loop(run)
    o = run.opts
    plot_loss(run.history, Path(o.out) / "loss")
    if run.step < o.steps:  # stopped early by --stop-at: resume later
        return {"steps": run.step, "train_seconds": run.seconds, "history": run.history}
    model_dir = export(run, o.export or Path(o.out) / "model")
    rep = {"model": str(model_dir), **(report(run, model_dir) if o.eval_tokens and run.held_out else {})}
    (Path(o.out) / "report.json").write_text(json.dumps(rep, indent=1))
    return {**rep, "history": run.history}
