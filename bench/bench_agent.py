"""Benchmark the prefix cache on an agent loop through the HTTP server.

An agent sends the whole conversation every turn: a long system prompt with tool definitions, the task,
then per turn the assistant's tool call and the tool's result. The assistant turns are forced (fixed tool
calls appended to the conversation, whatever the model answered), so the prompt grows the same way on a
random-weight checkpoint; each request generates only `--max-tokens` tokens (greedy, ignore_eos). Each
mode runs the same loop on a fresh `python -m dsv4.server` process (after a short unrelated warm-up
request) and records, per turn, the prompt and cached tokens (usage.prompt_tokens_details), the time to
the first streamed token and the request's total time:

| mode | server |
|---|---|
| `off` | `--prompt-cache-ram 0`: every prompt prefilled from scratch |
| `ram` | the default RAM prefix cache, no folder |
| `ram+disk` | RAM cache plus `--prompt-cache DIR` (a fresh folder; the writes run in the background) |
| `restart` | a new server on the folder `ram+disk` filled: empty RAM, snapshots read from disk |

`--granularity` also measures, in this process, what a snapshot inside a prompt costs (bytes, at several
prompt lengths) against what it saves (prefill time), which is how `prefix_cache.DEFAULT_EVERY` was chosen.
Results of each `--label` go into bench/results/agent.json; bench/results/agent.md (tables) and
agent.png (time to first token per turn, if matplotlib is installed) are redrawn from all labels.
A script, not a test: nothing here asserts a time.

    python3 bench/bench_agent.py --granularity                          # the demo model, 10 turns
    flock /tmp/bigmem.lock python3 bench/bench_agent.py --model /tmp/dsv4-flash-slice \\
        --label "V4-Flash slice (12 layers, random weights)" --turns 5 --system-tokens 1000 \\
        --modes off ram+disk restart --granularity
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_server import start_server  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MODES = ("off", "ram", "ram+disk", "restart")

TOOLS = [
    {"type": "function", "function": {"name": name, "description": desc, "parameters": {
        "type": "object", "properties": {k: {"type": "string", "description": v} for k, v in props.items()},
        "required": list(props)}}}
    for name, desc, props in [
        ("read_file", "Read a file of the repository and return its text.", {"path": "file path, relative to the root"}),
        ("write_file", "Replace a file's text.", {"path": "file path", "text": "the new content"}),
        ("run_tests", "Run the test suite (or one file of it) and return the summary.", {"target": "a test file or ''"}),
        ("search", "Search the repository for a regular expression.", {"pattern": "a Python regular expression"}),
        ("list_dir", "List a folder's entries.", {"path": "folder path"}),
        ("shell", "Run a shell command in a sandbox and return its output.", {"command": "the command line"}),
    ]
]  # fmt: skip

RULES = [
    "Read the files a change touches before editing them",
    "run the tests that cover a change after making it",
    "keep each change small and explain it in one sentence",
    "never delete data the user did not ask to delete",
    "prefer the standard library to new dependencies",
    "report failures with the exact command and its output",
    "ask before running commands that reach the network",
    "keep functions short and name them after what they do",
    "write a test that fails before the fix and passes after it",
    "quote file paths relative to the repository root",
]


def system_prompt(tokenizer, target: int) -> str:
    """Instructions numbered rule by rule until the text and the tools' schemas reach ~`target` tokens."""
    from dsv4.chat import render_tools

    tools = len(tokenizer.encode(render_tools(TOOLS)))
    lines = ["You are a coding agent working in a Python repository. Follow these rules."]
    i = 0
    while len(tokenizer.encode("\n".join(lines))) + tools < target:
        lines.append(f"Rule {i + 1}: {RULES[i % len(RULES)]} (case {i // len(RULES) + 1}).")
        i += 1
    return "\n".join(lines)


def tool_turn(i: int) -> list[dict]:
    """Turn i's forced assistant tool call and the tool's result (~120 tokens of file text)."""
    call = {"id": f"call_{i}", "type": "function",
            "function": {"name": "read_file", "arguments": json.dumps({"path": f"src/module_{i}.py"})}}  # fmt: skip
    body = "\n".join(f"def helper_{i}_{k}(x):\n    return x * {k} + {i}" for k in range(8))
    return [{"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": f"call_{i}", "content": body}]  # fmt: skip


def request(client: httpx.Client, url: str, model: str, messages: list[dict], max_tokens: int) -> dict:
    """One streamed chat completion: time to the first token, total time, prompt and cached tokens."""
    body = {"model": model, "messages": messages, "tools": TOOLS, "stream": True, "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream_options": {"include_usage": True}}  # fmt: skip
    t0 = time.perf_counter()
    first, usage = None, None
    with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            # the first chunk after the role chunk carries the first sampled token (its text may be empty)
            if first is None and any(c["delta"].get("content") is not None or c["delta"].get("reasoning_content")
                                     or c["delta"].get("tool_calls") or c.get("finish_reason")
                                     for c in chunk.get("choices", []) if c["delta"].get("role") is None):  # fmt: skip
                first = time.perf_counter()
    total = time.perf_counter() - t0
    return {"ttft": (first or time.perf_counter()) - t0, "total": total, "prompt": usage["prompt_tokens"],
            "cached": usage["prompt_tokens_details"]["cached_tokens"]}  # fmt: skip


def agent_loop(url: str, model: str, system: str, turns: int, max_tokens: int) -> list[dict]:
    messages = [{"role": "system", "content": system},
                {"role": "user", "content": "The tests in tests/test_parser.py fail; find out why and fix it."}]  # fmt: skip
    rows = []
    with httpx.Client(timeout=3600) as client:
        request(client, url, model, [{"role": "user", "content": "warm-up"}], 2)
        for i in range(turns):
            rows.append(request(client, url, model, messages, max_tokens))
            r = rows[-1]
            print(f"  turn {i + 1}: {r['prompt']} prompt tokens, {r['cached']} cached, "
                  f"TTFT {r['ttft']:.2f} s, total {r['total']:.2f} s", flush=True)  # fmt: skip
            messages += tool_turn(i)
    return rows


def run_modes(args, system: str) -> dict[str, list[dict]]:
    out = {}
    folder = Path(tempfile.mkdtemp(prefix="dsv4-agent-cache-"))
    flags = {"off": ["--prompt-cache-ram", "0"], "ram": [], "ram+disk": ["--prompt-cache", str(folder)],
             "restart": ["--prompt-cache", str(folder)]}  # fmt: skip
    try:
        for mode in args.modes:
            print(f"{args.label}: mode {mode}", flush=True)
            proc, url = start_server(args.model, "bf16", 16, [*flags[mode], *args.server_args], wait_s=900)
            try:
                name = httpx.get(url + "/v1/models").json()["data"][0]["id"]
                out[mode] = agent_loop(url, name, system, args.turns, args.max_tokens)
            finally:
                proc.terminate()  # SIGTERM: uvicorn shuts down, the server flushes its snapshots
                proc.wait(120)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return out


def granularity(model: Path, tokenizer, system: str, turns: int) -> dict:
    """Bytes of a snapshot at several prompt lengths, and the prefill speed: what one snapshot costs in
    RAM against the tokens (and seconds) it saves."""
    import dsv4  # noqa: I001  (before torch: it sets OMP_WAIT_POLICY for torch's OpenMP, as the CLI does)
    import torch

    engine = dsv4.load(model, dtype=torch.bfloat16)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Fix the tests."}]
    for i in range(turns):
        messages += tool_turn(i)
    ids = engine.encode(messages, tools=TOOLS)
    state, sizes, t0 = engine.new_state(), {}, time.perf_counter()
    marks = [n for n in (128, 256, 512, 1024, 2048, 4096, 8192) if n <= len(ids)]
    done = 0
    for n in marks:
        engine.step([ids[done:n]], [state])
        done = n
        snap = state.snapshot()
        sizes[n] = {"ram": snap.nbytes(), "disk": snap.live_nbytes()}
    tps = done / (time.perf_counter() - t0)
    return {"tokens_per_s": tps, "sizes": sizes, "prompt_tokens": len(ids)}


def render(results: dict) -> str:
    out = ["# Agent loop through the server: prefix cache off, in RAM, on disk after a restart", "",
           "Written by `bench/bench_agent.py` (see its docstring for the modes); greedy, `ignore_eos`, forced "
           "assistant tool calls. TTFT: time to the first streamed token; total: the whole request.", ""]  # fmt: skip
    for label, res in results.items():
        out += [f"## {label}", "", f"`{res['command']}`", "", res["setting"], ""]
        modes = [m for m in MODES if m in res["modes"]]
        out.append("| turn | prompt tokens | " + " | ".join(f"{m}: cached / TTFT s" for m in modes) + " |")
        out.append("|---:|---:|" + "---:|" * len(modes))
        turns = len(res["modes"][modes[0]])
        for i in range(turns):
            cells = [f"{res['modes'][m][i]['cached']} / {res['modes'][m][i]['ttft']:.2f}" for m in modes]
            out.append(f"| {i + 1} | {res['modes'][modes[0]][i]['prompt']} | " + " | ".join(cells) + " |")
        totals = [sum(r["total"] for r in res["modes"][m]) for m in modes]
        out.append("| **total s** | | " + " | ".join(f"**{t:.1f}**" for t in totals) + " |")
        g = res.get("granularity")
        if g:
            out += ["", f"Snapshot size against prompt length (prefill {g['tokens_per_s']:.1f} tok/s in-process, "
                    f"bf16; a snapshot restored instead of prefilling n tokens saves n / that many seconds):", "",
                    "| tokens held | snapshot in RAM | on disk | per token | prefill time it saves |",
                    "|---:|---:|---:|---:|---:|"]  # fmt: skip
            for n, s in g["sizes"].items():
                out.append(f"| {n} | {s['ram'] / 2**20:.2f} MiB | {s['disk'] / 2**20:.2f} MiB | "
                           f"{s['ram'] / int(n) / 1024:.1f} KiB | {int(n) / g['tokens_per_s']:.1f} s |")  # fmt: skip
        out.append("")
    return "\n".join(out)


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (label, res) in zip(axes[0], results.items(), strict=True):
        for mode, rows in res["modes"].items():
            ax.plot(range(1, len(rows) + 1), [r["ttft"] for r in rows], marker="o", label=mode)
        ax.set(title=label, xlabel="turn", ylabel="time to first token (s)", yscale="log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", type=Path, default=ROOT / "dsv4" / "demo", help="checkpoint (default: the demo model)"
    )
    p.add_argument("--label", default="demo model")
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--system-tokens", type=int, default=2000, help="system prompt + tool schemas, in tokens")
    p.add_argument("--max-tokens", type=int, default=4, help="tokens generated per turn")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument(
        "--granularity", action="store_true", help="also measure snapshot bytes against prefill saved"
    )
    p.add_argument("--server-args", nargs=argparse.REMAINDER, default=[], help="passed to the server (last)")
    args = p.parse_args()
    if "restart" in args.modes and "ram+disk" not in args.modes:
        p.error("restart reuses the folder that ram+disk fills: give both")
    from dsv4.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(args.model)
    system = system_prompt(tokenizer, args.system_tokens)
    res = {"command": "python3 bench/bench_agent.py " + shlex.join(sys.argv[1:]),
           "setting": f"{args.turns} turns, ~{args.system_tokens}-token system prompt with {len(TOOLS)} tools, "
           f"{args.max_tokens} tokens generated per turn, server flags {shlex.join(args.server_args) or '(defaults)'}; "
           f"{os.cpu_count()} cores, shared machine (noisy)",
           "modes": run_modes(args, system)}  # fmt: skip
    if args.granularity:
        res["granularity"] = granularity(args.model, tokenizer, system, args.turns)
    RESULTS.mkdir(parents=True, exist_ok=True)
    store = RESULTS / "agent.json"
    results = json.loads(store.read_text()) if store.exists() else {}
    results[args.label] = res
    store.write_text(json.dumps(results, indent=1))
    (RESULTS / "agent.md").write_text(render(results))
    plot(results, RESULTS / "agent.png")
    print(render({args.label: res}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
