"""`python -m dsv4.server --model DIR`: the serve command on its own, with the model and sampling flags.

Only for running the server before `dsv4 serve` is wired into the main CLI; it declares a copy of
the CLI's common flags that `serve` reads.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..cli import add_prompt_cache_flags
from . import add_serve_parser


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("model")
    g.add_argument("--model", type=Path, default=None, help="checkpoint folder")
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16"])
    g.add_argument("--numerics", default="exact", choices=["exact", "released"])
    g.add_argument("--max-ram", default="auto", help="RAM budget for routed experts (12G, auto, none)")
    g.add_argument("--max-vram", default=None, help="GPU memory budget for the expert cache")
    g.add_argument("--cache-policy", default="lfu", choices=["lfu", "lru"], help="expert cache policy")
    add_prompt_cache_flags(common)
    g = common.add_argument_group("sampling defaults")
    g.add_argument("--max-tokens", type=int, default=None)
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--min-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[])
    return common


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsv4.server")
    sub = parser.add_subparsers(dest="command")
    add_serve_parser(sub, _common())
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as e:
        print(f"dsv4 serve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
