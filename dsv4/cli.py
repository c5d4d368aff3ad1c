"""The `dsv4` command line: thin adapters over the Python API.

Each subcommand parses its flags, calls the library and prints; errors become one line on stderr and
a non-zero exit status.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .loader import model_dir


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


def cmd_plan(args: argparse.Namespace) -> int:
    from .checkpoint import Checkpoint
    from .config import ModelConfig
    from .memory import parse_size
    from .plan import make_plan, render

    model = model_dir(args.model)
    cfg, ckpt = ModelConfig.from_file(model), Checkpoint(model)
    plan = make_plan(ckpt, cfg, parse_size(args.ram), parse_size(args.vram))
    print(render(plan, ckpt, cfg))
    if args.ranks > 1:
        from .plan import Link, render_ranks

        print(render_ranks(plan, cfg, args.ranks, Link(args.link_latency * 1e-6, args.link_gbps * 1e9 / 8)))
    return 0


def cmd_tiny(args: argparse.Namespace) -> int:
    from .config import ModelConfig
    from .tiny import random_weights, tiny_config
    from .writer import write_checkpoint

    raw = tiny_config()
    write_checkpoint(args.out, raw, random_weights(ModelConfig.from_dict(raw), seed=args.seed))
    print(f"wrote a random tiny V4 checkpoint (official layout, FP8 + MXFP4) to {args.out}")
    return 0


OFFICIAL_VOCAB = 129280


def add_prompt_cache_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("prompt cache")
    g.add_argument("--prompt-cache", type=Path, default=None, metavar="DIR",
                   help="keep prompt state snapshots in DIR, reused across requests and restarts")  # fmt: skip
    g.add_argument("--prompt-cache-size", default="8G",
                   help="disk cap of --prompt-cache DIR; least recently used files go first (default: 8G)")  # fmt: skip


def _load(args: argparse.Namespace):
    import dsv4

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    engine = dsv4.load(model_dir(args.model), device=args.device, dtype=args.dtype, numerics=args.numerics,
                       max_ram=args.max_ram, max_vram=args.max_vram, cache_policy=args.cache_policy,
                       progress=sys.stderr.isatty(), prompt_cache=args.prompt_cache is not None)  # fmt: skip
    set_chat_format(engine, args)
    return engine


def set_chat_format(engine, args: argparse.Namespace) -> None:
    """--chat-format: the release's (auto) or a forced one."""
    engine.chat_format = None if args.chat_format == "auto" else args.chat_format


def _thinking_mode(args: argparse.Namespace) -> str:
    """--think, or a --reasoning-effort (it only means something in thinking mode)."""
    return "thinking" if args.think or args.reasoning_effort is not None else "chat"


def _prompt_cache(args: argparse.Namespace, engine):
    if args.prompt_cache is None:
        return None
    from .prefix_cache import for_engine

    return for_engine(engine, disk_dir=args.prompt_cache, disk=args.prompt_cache_size)


def _sampling(args: argparse.Namespace) -> dict:
    out = {
        "max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
        "min_p": args.min_p, "repetition_penalty": args.repetition_penalty, "seed": args.seed,
    }  # fmt: skip
    if args.stop:
        out["stop"] = args.stop
    return out


def _stats_line(result) -> str:
    st = result.stats
    reused = f" ({st.reused_tokens} reused from cached state)" if st.reused_tokens else ""
    prefill = (st.prompt_tokens - st.reused_tokens) / st.prefill_seconds if st.prefill_seconds else 0.0
    line = (f"[{st.prompt_tokens} prompt tokens{reused}, {st.generated_tokens} generated; prefill {prefill:.1f} tok/s, "
            f"decode {st.decode_tps:.1f} tok/s; finish: {result.finish_reason}")  # fmt: skip
    if st.acceptance_rate is not None:
        line += f"; draft acceptance {st.acceptance_rate:.0%}, mean accepted length {st.mean_accepted_length:.2f}"
    return line + "]"


def cmd_run(args: argparse.Namespace) -> int:
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt:
        raise ValueError("empty prompt: give PROMPT or pipe text on stdin")
    engine = _load(args)
    mode = _thinking_mode(args)
    chat = args.chat or mode == "thinking" or (not args.raw and engine.config.vocab_size == OFFICIAL_VOCAB)
    request = [{"role": "user", "content": prompt}] if chat else prompt
    if not chat:
        print(prompt, end="", flush=True)
    cache, state, reused, restored, t0 = _prompt_cache(args, engine), None, 0, 0, time.perf_counter()
    if cache is not None:  # restore the longest cached prefix, prefill the rest keeping snapshots on the way
        from .prefix_cache import prefill

        request = engine.encode(request, thinking_mode=mode, reasoning_effort=args.reasoning_effort)
        state, restored = prefill(engine, cache, request)
        reused = len(request) - 1
    prefill_seconds = time.perf_counter() - t0
    try:
        gen = engine.stream(request, thinking_mode=mode, reasoning_effort=args.reasoning_effort,
                            speculative=args.speculative, state=state, reused=reused, **_sampling(args))  # fmt: skip
        for ev in gen:
            print(ev.text, end="", flush=True)
    except KeyboardInterrupt:
        print("\n[stopped]", file=sys.stderr)
        return 130
    print()
    result = gen.result()
    if cache is not None:
        seq = gen.sequence
        cache.insert((seq.prompt_ids + seq.output)[: seq.state.pos], seq.state)
        cache.flush()
        result.stats.reused_tokens = restored
        result.stats.prefill_seconds += prefill_seconds
    if not args.quiet:
        print(_stats_line(result), file=sys.stderr)
    if args.speculative and engine.stats().get("speculation_declined"):
        print(f"[plain decoding: {engine.stats()['speculation_declined']}]", file=sys.stderr)
    return 0


CHAT_HELP = """commands:
  /reset          start a new conversation
  /think on|off   thinking mode (reasoning before the answer)
  /save FILE      save the conversation as JSON
  /stats          token counts and speeds of the last reply
  /help           this text
  /exit           leave (or Ctrl-D); Ctrl-C stops a reply"""


def cmd_chat(args: argparse.Namespace) -> int:
    from .session import ChatSession

    engine = _load(args)
    session = ChatSession(engine, thinking_mode=_thinking_mode(args), reasoning_effort=args.reasoning_effort,
                          system=args.system, prefix_cache=_prompt_cache(args, engine))  # fmt: skip
    if args.resume is not None:
        session.load(args.resume)
        print(f"[resumed {len(session.messages)} messages from {args.resume}]")
    params = _sampling(args)
    print("dsv4 chat: type a message, /help for commands, Ctrl-D to leave.", flush=True)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print()
            session.close()
            return 0
        except KeyboardInterrupt:
            print()
            continue
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if _chat_command(session, line):
                session.close()
                return 0
            continue
        try:
            for ev in session.send(line, **params):
                print(ev.text, end="", flush=True)
            print()
        except KeyboardInterrupt:
            print("\n[stopped]", flush=True)


def _chat_command(session, line: str) -> bool:
    """Handle a /command; True means leave."""
    cmd, _, arg = line.partition(" ")
    arg = arg.strip()
    if cmd in ("/exit", "/quit"):
        return True
    if cmd == "/reset":
        session.reset()
        print("[new conversation]")
    elif cmd == "/think" and arg in ("on", "off"):
        session.thinking_mode = "thinking" if arg == "on" else "chat"
        session.reset_state()
        print(f"[thinking {arg}]")
    elif cmd == "/save" and arg:
        session.save(arg)
        print(f"[saved {len(session.messages)} messages to {arg}]")
    elif cmd == "/stats":
        last = getattr(session, "last_result", None)
        print(_stats_line(last) if last is not None else "[no reply yet]")
    elif cmd == "/help":
        print(CHAT_HELP)
    else:
        print(f"[unknown command {line!r}; /help lists them]")
    return False


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value!r}")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsv4", description="Run DeepSeek V4 from the official checkpoints.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sp = sub.add_parser("inspect", help="parameters, formats, layer kinds and placement of a checkpoint")
    sp.add_argument("--model", required=True, type=Path, help="checkpoint folder (config.json + safetensors)")
    sp.add_argument("--no-validate", action="store_true", help="skip the tensor-by-tensor check")
    sp.set_defaults(fn=cmd_inspect)

    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("model")
    g.add_argument(
        "--model", type=Path, default=None, help="checkpoint folder (default: the bundled demo model)"
    )
    g.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    g.add_argument(
        "--dtype", default="bf16", choices=["bf16", "fp32", "fp16"], help="compute dtype (default: bf16)"
    )
    g.add_argument("--numerics", default="exact", choices=["exact", "released"],
                   help="exact = transformers' math; released = official FP8 KV / FP4 indexer rounding")  # fmt: skip
    g.add_argument("--max-ram", default="auto",
                   help="RAM budget (12G, 512M): experts beyond it are read from disk on demand; "
                        "'auto' (default) plans from the free memory, 'none' loads everything")  # fmt: skip
    g.add_argument("--max-vram", default=None, help="GPU memory budget for the expert cache (CUDA only)")
    g.add_argument("--cache-policy", default="lfu", choices=["lfu", "lru"],
                   help="which cached experts make room for new ones (default: lfu, frequency with aging)")  # fmt: skip
    g.add_argument("--threads", type=_positive, default=None,
                   help="CPU threads for the math (default: torch's, one per core)")  # fmt: skip
    g.add_argument("--chat-format", default="auto", choices=["auto", "preview", "0731"],
                   help="chat format (reasoning-effort texts): the release's (auto, default), the April "
                        "preview's (low/high = no text, max) or 0731's (low = no text, high, max)")  # fmt: skip
    add_prompt_cache_flags(common)

    sp = sub.add_parser("run", parents=[common], help="generate from a prompt, streaming the text")
    sp.add_argument("prompt", nargs="?", help="prompt text (default: read stdin)")
    sp.add_argument("--think", action="store_true", help="chat in thinking mode (reasoning, then the answer)")
    mode = sp.add_mutually_exclusive_group()
    mode.add_argument("--chat", action="store_true", help="wrap the prompt as a chat user turn")
    mode.add_argument(
        "--raw", action="store_true", help="plain text completion (default for non-V4 vocabularies)"
    )
    sp.add_argument("--quiet", action="store_true", help="no statistics line on stderr")
    _effort_flag(sp)
    _sampling_flags(sp)
    sp.set_defaults(fn=cmd_run)

    sp = sub.add_parser("chat", parents=[common], help="interactive chat (/help inside for commands)")
    sp.add_argument("--think", action="store_true", help="start in thinking mode")
    sp.add_argument("--system", default=None, help="system prompt")
    _effort_flag(sp)
    sp.add_argument("--resume", type=Path, default=None, metavar="FILE",
                    help="continue a conversation saved with /save (with --prompt-cache, without prefilling it again)")  # fmt: skip
    _sampling_flags(sp)
    sp.set_defaults(fn=cmd_chat)

    sp = sub.add_parser("plan", help="where each part goes under memory budgets, and the expected speed")
    sp.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: the bundled demo model)")
    sp.add_argument("--ram", default=None, help="RAM budget (default: the available memory)")
    sp.add_argument("--vram", default=None, help="GPU memory budget")
    sp.add_argument("--ranks", type=int, default=1, help="machines (torchrun ranks) sharing the experts; --ram is per rank")
    sp.add_argument("--link-latency", type=float, default=50.0, help="one-way network latency in us (default 50)")
    sp.add_argument("--link-gbps", type=float, default=10.0, help="network bandwidth in Gbit/s (default 10)")
    sp.set_defaults(fn=cmd_plan)

    from .server import add_serve_parser
    from .train import add_train_parser

    _sampling_flags(add_serve_parser(sub, common), server=True)
    add_train_parser(sub)

    sp = sub.add_parser(
        "tiny", help="write a small random checkpoint in the official layout (for trying things)"
    )
    sp.add_argument("out", type=Path, help="folder to write")
    sp.add_argument("--seed", type=int, default=0)
    sp.set_defaults(fn=cmd_tiny)
    return p


def _effort_flag(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--reasoning-effort", default=None, choices=["low", "medium", "high", "max"],
                    help="thinking effort (implies --think); the levels and their texts follow --chat-format: "
                         "0731 has low/high/max, the preview only max adds text")  # fmt: skip


def _sampling_flags(sp: argparse.ArgumentParser, server: bool = False) -> None:
    """The sampling flags: run's and chat's settings, or serve's defaults for requests that leave them out
    (unset ones leave the request's own defaults alone)."""
    g = sp.add_argument_group("sampling defaults for requests" if server else "sampling")
    if server:
        g.add_argument("--max-tokens", type=int, default=None,
                       help="cap on the completion of a request without max_tokens (default: none, up to "
                            "the context, as OpenAI-compatible servers do)")  # fmt: skip
    else:
        g.add_argument("--max-tokens", type=int, default=256, help="tokens to generate at most (default: 256)")
    g.add_argument("--temperature", type=float, default=None if server else 1.0,
                   help="0 = greedy (default: 1.0, the release's advice)")  # fmt: skip
    g.add_argument("--top-p", type=float, default=None if server else 1.0)
    g.add_argument("--top-k", type=int, default=None if server else 0)
    g.add_argument("--min-p", type=float, default=None if server else 0.0)
    g.add_argument("--repetition-penalty", type=float, default=None if server else 1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    if not server:
        g.add_argument("--speculative", action="store_true",
                       help="speculative decoding with the checkpoint's draft: DSpark (0731-style releases) or "
                            "MTP (preview); one sequence. Drafts only with every expert resident: under a RAM budget it "
                            "decodes plainly (why: bench/results/speculative.md)")  # fmt: skip


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
