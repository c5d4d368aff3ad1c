"""The command line: `dsv4 train ...` and `python -m dsv4.train ...`, an adapter over `train`."""

from __future__ import annotations

import argparse
import json
import sys

from .corpus import HOLDOUT_EVERY
from .init import PRESETS
from .loop import _FIELDS, TrainOptions, train

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
