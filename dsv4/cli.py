"""The `dsv4` command line: thin adapters over the Python API.

Each subcommand parses its flags, calls the library and prints; errors become one line on stderr and
a non-zero exit status.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_inspect(args: argparse.Namespace) -> int:
    from .checkpoint import Checkpoint
    from .config import ModelConfig
    from .inspect import render

    cfg = ModelConfig.from_file(args.model)
    ckpt = Checkpoint(args.model)
    if not args.no_validate:
        ckpt.validate(cfg)
    print(render(ckpt, cfg))
    return 0


def cmd_tiny(args: argparse.Namespace) -> int:
    from .config import ModelConfig
    from .tiny import random_weights, tiny_config, write_checkpoint

    raw = tiny_config()
    write_checkpoint(args.out, raw, random_weights(ModelConfig.from_dict(raw), seed=args.seed))
    print(f"wrote a random tiny V4 checkpoint (official layout, FP8 + MXFP4) to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsv4", description="Run DeepSeek V4 from the official checkpoints.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sp = sub.add_parser("inspect", help="parameters, formats, layer kinds and placement of a checkpoint")
    sp.add_argument("--model", required=True, type=Path, help="checkpoint folder (config.json + safetensors)")
    sp.add_argument("--no-validate", action="store_true", help="skip the tensor-by-tensor check")
    sp.set_defaults(fn=cmd_inspect)

    sp = sub.add_parser("tiny", help="write a small random checkpoint in the official layout (for trying things)")
    sp.add_argument("out", type=Path, help="folder to write")
    sp.add_argument("--seed", type=int, default=0)
    sp.set_defaults(fn=cmd_tiny)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as e:
        print(f"dsv4 {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
