"""`dsv4 serve`: an OpenAI-compatible HTTP server with continuous batching and a web chat page.

`add_serve_parser(subparsers, common_parent)` declares the subcommand and its server flags (the parent
brings the model flags; the CLI adds the sampling flags, which become the server's defaults for requests
that leave them out); `serve(args)` loads the model and runs uvicorn. The app itself is
`dsv4.server.app.create_app`. FastAPI and uvicorn are imported only when serving.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading


def add_serve_parser(subparsers, common_parent: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Register `serve` on a subparsers object; returns its parser."""
    sp = subparsers.add_parser("serve", parents=[common_parent],
                               help="OpenAI-compatible API server with a web chat page at /")  # fmt: skip
    g = sp.add_argument_group("server")
    g.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)"
    )
    g.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    g.add_argument("--api-key", default=os.environ.get("DSV4_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $DSV4_API_KEY, else none)")  # fmt: skip
    g.add_argument(
        "--model-name", default=None, help="name clients ask for (default: the model folder's name)"
    )
    g.add_argument("--max-running", type=int, default=16, help="sequences decoded together (default: 16)")
    g.add_argument("--max-queue", type=int, default=64,
                   help="sequences waiting beyond --max-running before requests get 429 (default: 64)")  # fmt: skip
    g.add_argument("--max-context", type=int, default=None,
                   help="prompt + completion token limit (default: the model's max_seq_len)")  # fmt: skip
    g.add_argument("--max-step-tokens", type=int, default=256,
                   help="tokens per forward pass; long prompts are prefilled in chunks (default: 256)")  # fmt: skip
    g.add_argument(
        "--max-body-bytes", type=int, default=4 << 20, help="largest request body (default: 4 MiB)"
    )
    g.add_argument("--prompt-cache-ram", default="auto",
                   help="RAM for prompt snapshots reused across requests; 0 turns the prefix cache off "
                        "(default: auto, 1/16 of --max-ram or of the free memory, at most 4G)")  # fmt: skip
    g.add_argument("--speculative", action="store_true",
                   help="requests decode with the checkpoint's draft unless they send \"speculative\": false; "
                        "DSpark blocks are verified inside the shared batch, an MTP checkpoint decodes plainly "
                        "(counted in /metrics as dsv4_speculative_fallback_total)")  # fmt: skip
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    sp.set_defaults(fn=serve)
    return sp


def _sampling_defaults(args: argparse.Namespace) -> dict:
    names = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")
    out = {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
    if getattr(args, "stop", None):
        out["stop"] = list(args.stop)
    return out


def serve(args: argparse.Namespace) -> int:
    """Load the model and serve it until interrupted."""
    import uvicorn

    import dsv4

    from ..loader import model_dir
    from ..prefix_cache import for_engine
    from .app import create_app

    for flag in ("max_running", "max_queue", "max_step_tokens", "max_body_bytes"):
        if getattr(args, flag) < (0 if flag == "max_queue" else 1):
            raise ValueError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be positive, got {args.max_tokens}")
    if args.threads is not None:  # for loading; the generation thread sets it for itself (create_app)
        import torch

        torch.set_num_threads(args.threads)
    path = model_dir(args.model)
    budgets = {k: getattr(args, k) for k in ("max_ram", "max_vram", "cache_policy") if getattr(args, k, None) is not None}
    engine = dsv4.load(path, device=args.device, dtype=args.dtype, numerics=args.numerics, prompt_cache=True,
                       **budgets)  # fmt: skip
    engine.chat_format = None if args.chat_format == "auto" else args.chat_format
    cache = for_engine(engine, disk_dir=getattr(args, "prompt_cache", None), ram=args.prompt_cache_ram,
                       disk=getattr(args, "prompt_cache_size", None))  # fmt: skip
    name = args.model_name or path.resolve().name
    app = create_app(engine, model_name=name, api_key=args.api_key, max_queue=args.max_queue,
                     max_running=args.max_running, max_body_bytes=args.max_body_bytes,
                     max_context=args.max_context, max_step_tokens=args.max_step_tokens,
                     default_max_tokens=args.max_tokens, sampling_defaults=_sampling_defaults(args),
                     prefix_cache=cache, speculative=args.speculative, threads=args.threads)  # fmt: skip
    print(f"dsv4 serve: {name} on http://{args.host}:{args.port}/ (API at /v1, metrics at /metrics), "
          f"{app.state.server.worker.threads} CPU threads",
          file=sys.stderr, flush=True)  # fmt: skip
    # uvicorn shuts down gracefully on SIGTERM, then raises it again: with the default action the process
    # would die there, before the prefix cache's queued writes are flushed; exit through `finally` instead
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if main else None
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        app.state.server.worker.close()
        if cache is not None:
            cache.flush(timeout=30)  # snapshots still being written
        if main:
            signal.signal(signal.SIGTERM, previous)
    return 0


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)
