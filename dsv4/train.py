"""Train a small DeepSeek V4 model from scratch with the engine's own network; export it as released.

The network is `dsv4.model.Transformer`, built from `InitSource` (a fresh init per official tensor
name) with its float parameters made trainable, so every piece trains as the engine computes it: mHC,
sliding-window / CSA / HCA attention, hash and routed MoE, the MTP block. On top of the forward pass
this module adds:

- the loss: next-token cross-entropy plus `mtp_weight` x the MTP block's cross-entropy on the token
  after next (the MTP block sees the true next token, as in speculative decoding);
- auxiliary-loss-free load balancing: after each optimizer step every routed layer's `ffn.gate.bias`
  moves by +u for each under-loaded expert and -u for each over-loaded one (it gets no gradient);
- AdamW, warmup then cosine LR, gradient clipping and accumulation, a resumable state file
  (`train_state.pt`: weights, optimizer, step, RNG, data position, tokenizer), a loss curve;
- a byte-level BPE tokenizer trained on the corpus, with the V4 chat markers as added tokens;
- the export through `dsv4.tiny.write_checkpoint` (FP8 dense, MXFP4 experts) plus tokenizer.json,
  and `evaluate`: held-out perplexity of an exported folder through `dsv4.load`.

Limits it inherits from the forward pass: the lightning indexer's top-k pick is not differentiable,
so the indexer's weights (wq_b, weights_proj, its compressor) keep their init. Runs on the CPU in fp32.
It knows nothing of generation, chat templates or serving.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .chat import ASSISTANT, BOS, DSML, EOS, LATEST_REMINDER, TASK_TOKENS, THINK_END, THINK_START, USER
from .checkpoint import expected_tensors
from .config import ModelConfig
from .model import MoE, Numerics, Transformer
from .quant import Dense
from .tiny import tiny_config, write_checkpoint

PAD = "<｜▁pad▁｜>"
SPECIAL_TOKENS = [BOS, EOS, PAD]  # ids 0, 1, 2, as in the release
CHAT_TOKENS = [USER, ASSISTANT, THINK_START, THINK_END, DSML, LATEST_REMINDER, *TASK_TOKENS.values()]
HOLDOUT_EVERY = 50  # one file in ~50 (by a hash of its relative path) is held out for evaluation

# name -> (tokenizer vocab incl. added tokens, overrides of dsv4.tiny.tiny_config)
PRESETS: dict[str, tuple[int, dict]] = {
    "demo": (4096, dict(
        hidden_size=256, num_hidden_layers=6, num_attention_heads=4, head_dim=128, qk_rope_head_dim=64,
        q_lora_rank=128, o_groups=2, o_lora_rank=128, n_routed_experts=16, num_experts_per_tok=2,
        moe_intermediate_size=256, num_hash_layers=2, sliding_window=128, compress_ratios=[0, 4, 128, 4, 128, 4, 0],
        index_n_heads=4, index_head_dim=64, index_topk=16)),
    "toy": (320, dict(sliding_window=16, compress_ratios=[0, 4, 8, 4, 0], index_topk=6)),
}  # fmt: skip


def preset_config(name: str, vocab_size: int) -> dict:
    """The official-dialect config.json dict of a preset with the tokenizer's vocabulary size."""
    if name not in PRESETS:
        raise ValueError(f"unknown --config {name!r}; use one of {sorted(PRESETS)}")
    return tiny_config(vocab_size=vocab_size, **PRESETS[name][1])


# ---------------------------------------------------------------- data


def stdlib_files() -> tuple[list[Path], Path]:
    """The Python standard library's own .py files (not site-packages) and their root."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    return sorted(f for f in root.rglob("*.py") if not skip & set(f.relative_to(root).parts)), root


def gather_files(data: list[str] | None) -> tuple[list[Path], Path]:
    """Files named by --data (folders give their .py files), or the stdlib; plus their common root."""
    if not data:
        return stdlib_files()
    files: list[Path] = []
    for item in map(Path, data):
        if item.is_dir():
            files.extend(sorted(item.rglob("*.py")))
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"--data {item}: no such file or folder")
    if not files:
        raise ValueError(f"--data {data} holds no .py files")
    root = Path(os.path.commonpath([f.resolve().parent for f in files]))
    return sorted(f.resolve() for f in files), root


def is_held_out(rel: str) -> bool:
    return int(hashlib.sha1(rel.encode()).hexdigest(), 16) % HOLDOUT_EVERY == 0


def split_files(files: list[Path], root: Path) -> tuple[list[Path], list[Path]]:
    """(training files, held-out files): a fixed split by relative path, the same on every machine."""
    held = [f for f in files if is_held_out(f.resolve().relative_to(root.resolve()).as_posix())]
    return [f for f in files if f not in set(held)], held


def read_texts(files: list[Path]) -> list[str]:
    """UTF-8 text of each file; files that are not UTF-8 (a few stdlib test inputs) are skipped."""
    texts = []
    for f in files:
        try:
            texts.append(f.read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            continue
    return texts


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE on `texts`: BOS/EOS/pad first (ids 0-2), V4 chat markers as added tokens last."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), behavior="isolated"),  # numbers in groups of 3, as V4
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])  # fmt: skip
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(CHAT_TOKENS), special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in CHAT_TOKENS])
    return tok


def encode_corpus(tok, texts: list[str]) -> torch.Tensor:
    """One int32 stream: every file as BOS + its tokens + EOS."""
    parts = [
        torch.tensor([0, *e.ids, 1], dtype=torch.int32)
        for e in tok.encode_batch(texts, add_special_tokens=False)
    ]
    return torch.cat(parts)


class Windows:
    """Non-overlapping windows of `length` tokens from a stream, in a fresh seeded order each epoch.
    The position (epoch, index) is the data state a resumed run restores."""

    def __init__(self, stream: torch.Tensor, length: int, seed: int):
        self.n = stream.numel() // length
        if self.n == 0:
            raise ValueError(
                f"the corpus has {stream.numel()} tokens, fewer than one window of {length}; lower --seq-len"
            )
        self.windows = stream[: self.n * length].view(self.n, length)
        self.seed, self.epoch, self.index = seed, 0, 0
        self._order = self._shuffle()

    def _shuffle(self) -> torch.Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 7919 + self.epoch))

    def next(self, k: int) -> list[list[int]]:
        out = []
        for _ in range(k):
            if self.index == self.n:
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._shuffle()
            out.append(self.windows[self._order[self.index]].tolist())
            self.index += 1
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, st: dict) -> None:
        self.epoch, self.index = st["epoch"], st["index"]
        self._order = self._shuffle()


# ---------------------------------------------------------------- model


class InitSource:
    """A weight source that draws a training init for every official tensor name, once."""

    def __init__(self, cfg: ModelConfig, seed: int, with_mtp: bool = True):
        self.cfg, self.specs = cfg, expected_tensors(cfg, with_mtp)
        self.gen = torch.Generator().manual_seed(seed)
        self.drawn: dict[str, torch.Tensor] = {}

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self.drawn:
            self.drawn[name] = self._init(name, self.specs[name].shape)
        return self.drawn[name]

    def weight(self, prefix: str, dtype: torch.dtype) -> Dense:
        return Dense(self.tensor(f"{prefix}.weight").to(dtype))

    def _init(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        cfg, g = self.cfg, self.gen
        if name.endswith("tid2eid"):  # each token's fixed hash experts: k distinct ones
            rows = [torch.randperm(cfg.n_routed_experts, generator=g)[: shape[1]] for _ in range(shape[0])]
            return torch.stack(rows).long()
        if name.endswith("norm.weight"):
            return torch.ones(shape)
        if name.endswith(("gate.bias", "attn_sink", ".ape", "hc_head_base")):
            return torch.zeros(shape)
        if name.endswith("_base"):  # mHC: pre 1/2 each, post 1, comb near the identity (a residual)
            base = torch.zeros(shape)
            base[2 * cfg.hc_mult :].view(cfg.hc_mult, cfg.hc_mult).fill_diagonal_(2.0)
            return base
        if name.endswith("_scale"):
            return torch.full(shape, 0.1)
        if name == "embed.weight":
            return torch.randn(shape, generator=g)
        std = shape[-1] ** -0.5  # fan-in; outputs into the residual streams start smaller
        if name.endswith(("wo_b.weight", "w2.weight")):
            std /= math.sqrt(2 * (cfg.n_layers + cfg.n_mtp_layers))
        return torch.randn(shape, generator=g) * std


def build_model(raw_cfg: dict, seed: int) -> tuple[Transformer, dict[str, torch.Tensor]]:
    """A trainable fp32 model and its tensors by official name (the model's own Parameters, and the
    fixed tid2eid tables). Everything but the router biases and tid2eid requires grad."""
    cfg = ModelConfig.from_dict(raw_cfg)
    src = InitSource(cfg, seed)
    model = Transformer(cfg, src, Numerics(dtype=torch.float32))
    params = {p.data_ptr(): p for p in model.parameters()}
    weights: dict[str, torch.Tensor] = {}
    for name, t in src.drawn.items():
        p = params.get(t.data_ptr()) if t.is_floating_point() else t
        if p is None or p.shape != t.shape:
            raise RuntimeError(f"the model did not keep {name} as a parameter; training cannot reach it")
        weights[name] = p
    if len({id(p) for p in weights.values()} & {id(p) for p in params.values()}) != len(params):
        raise RuntimeError("the model holds parameters no official tensor name maps to")
    for name, p in weights.items():
        if isinstance(p, nn.Parameter) and not name.endswith("gate.bias"):
            p.requires_grad_(True)
    return model.train(), weights


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


# ---------------------------------------------------------------- training loop


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


# ---------------------------------------------------------------- export, evaluation, plot


def export(run: Run, path: str | Path, quantized: bool = True, shards: int = 4) -> Path:
    """Write the model in the official layout (FP8 dense + MXFP4 experts, or plain fp32), with
    tokenizer.json and config.json."""
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    raw = dict(run.raw_cfg)
    if not quantized:
        raw.pop("quantization_config", None)
        raw.pop("expert_dtype", None)
        raw["torch_dtype"] = "float32"
    tensors = {n: t.detach().clone() for n, t in run.weights.items()}
    write_checkpoint(path, raw, tensors, fp8=quantized, fp4=quantized, shards=shards,
                     float_dtype=torch.bfloat16 if quantized else torch.float32)  # fmt: skip
    run.tok.save(str(path / "tokenizer.json"))
    return path


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


def plot_loss(history: list[dict], path: Path) -> Path:
    """Loss curve: a PNG through matplotlib when it is installed, else a plain SVG."""
    if not history:
        return path
    steps = [r["step"] for r in history]
    series = {k: [r[k] for r in history] for k in ("loss", "ce", "mtp_ce")}
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _svg_plot(steps, series, path.with_suffix(".svg"))
    fig, ax = plt.subplots(figsize=(7, 4))
    for k, v in series.items():
        ax.plot(steps, v, label=k, lw=1)
    ax.set(xlabel="step", ylabel="cross-entropy (nats)", yscale="log", title="training loss")
    ax.legend()
    fig.savefig(path.with_suffix(".png"), dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path.with_suffix(".png")


def _svg_plot(x: list[int], series: dict[str, list[float]], path: Path, w: int = 640, h: int = 360) -> Path:
    lo = min(min(v) for v in series.values())
    hi = max(max(v) for v in series.values())
    x0, x1 = (x[0], x[-1]) if x and x[-1] > x[0] else (0, 1)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}">',
             '<rect width="100%" height="100%" fill="white"/>']  # fmt: skip
    for (name, v), color in zip(series.items(), ("#1f77b4", "#2ca02c", "#d62728"), strict=False):
        pts = " ".join(f"{40 + (a - x0) / (x1 - x0) * (w - 60):.1f},{h - 30 - (b - lo) / max(hi - lo, 1e-9) * (h - 60):.1f}"
                       for a, b in zip(x, v, strict=True))  # fmt: skip
        parts.append(f'<polyline fill="none" stroke="{color}" points="{pts}"/>')
        parts.append(f'<text x="{w - 120}" y="{20 + 15 * len(parts) // 2}" fill="{color}">{name}</text>')
    parts.append(f'<text x="40" y="{h - 8}">step {x0}..{x1}, loss {lo:.2f}..{hi:.2f}</text></svg>')
    path.write_text("\n".join(parts))
    return path


# ---------------------------------------------------------------- entry points


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


_FLAG_HELP = [
    ("steps", int, "optimizer steps (the length of the LR schedule)"),
    ("stop_at", int, "stop and save after this step; --resume continues"),
    ("seq_len", int, "tokens per training sequence"),
    ("batch", int, "sequences per micro-batch"),
    ("accum", int, "micro-batches per optimizer step (gradient accumulation)"),
    ("warmup", int, "linear warmup steps before the cosine decay"),
    ("seed", int, "seeds the init, the data order and the hash routing table"),
    ("threads", int, "torch (and tokenizer) threads"),
    ("save_every", int, "write OUT/train_state.pt every N steps"),
    ("log_every", int, "print a JSON log line every N steps"),
    ("eval_tokens", int, "held-out tokens to score after training (0: skip)"),
    ("lr", float, "peak learning rate"),
    ("min_lr", float, "learning rate at the end of the cosine"),
    ("weight_decay", float, "AdamW weight decay on matrices"),
    ("clip", float, "gradient-norm clip"),
    ("mtp_weight", float, "weight of the MTP block's cross-entropy in the loss"),
    ("bias_u", float, "router bias step per optimizer step (aux-loss-free balancing)"),
]


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Register the `train` subcommand on an argparse subparsers object."""
    d = TrainOptions()
    sp = subparsers.add_parser(
        "train", help="train a small V4 model from scratch (CPU) and export it as released"
    )
    sp.add_argument("--data", nargs="+", default=None, help="files or folders (.py) to train on; default: "
                    f"the Python standard library's source minus 1 file in {HOLDOUT_EVERY} held out")  # fmt: skip
    sp.add_argument("--out", default=d.out, help="working folder (state file, tokenizer, loss curve, report)")
    sp.add_argument("--export", default=None, help="folder for the exported model (default OUT/model)")
    sp.add_argument("--config", default=d.config, choices=sorted(PRESETS), help="model size preset")
    sp.add_argument(
        "--vocab", type=int, default=None, help="tokenizer vocabulary size (default: the preset's)"
    )
    for name, kind, text in _FLAG_HELP:
        sp.add_argument(f"--{name.replace('_', '-')}", type=kind, default=getattr(d, name), help=text)
    sp.add_argument("--resume", default=None, help="a train_state.pt to continue from")
    sp.set_defaults(fn=cmd_train)
    return sp


def cmd_train(args: argparse.Namespace) -> int:
    opts = TrainOptions(**{k: v for k, v in vars(args).items() if k in _FIELDS})
    rep = train(opts)
    rep.pop("history", None)
    print(json.dumps(rep, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsv4.train")
    sub = p.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv if argv[:1] == ["train"] else ["train", *argv])  # `train` may be left out
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
