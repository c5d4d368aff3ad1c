"""Expert parallelism on one machine: several gloo processes against one process.

Each test starts its ranks as subprocesses (tests/dist_rank.py, or torchrun for the CLI) with the
environment torchrun would give them. Tiny checkpoints, few tokens, short timeouts: CI has 2 cores.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import rel_err, token_ids

import dsv4
from dsv4.distributed import share

RANK_SCRIPT = Path(__file__).parent / "dist_rank.py"
ROOT = Path(__file__).parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(ranks: int, args_of, timeout: float = 240, dist_timeout: float = 20, wait_for=None):
    """Start `ranks` processes of dist_rank.py (args_of(rank) -> argv); return their (rc, stdout, stderr)."""
    port = free_port()
    procs = []
    for r in range(ranks):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(ranks),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "DSV4_DIST_TIMEOUT": str(dist_timeout), "PYTHONPATH": str(ROOT)}  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, str(RANK_SCRIPT), *args_of(r)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))  # fmt: skip
    out = []
    try:
        for i, p in enumerate(procs):
            if wait_for is not None and i not in wait_for:
                continue
            o, e = p.communicate(timeout=timeout)
            out.append((p.returncode, o, e))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return out


@pytest.mark.parametrize("name, ranks", [("flash", 2), ("flash", 3), ("0731", 2)])
def test_ranks_match_one_process(tiny_ckpt, tmp_path, name, ranks):
    """Same fp32 logits and greedy chains (plain and speculative: MTP, or the 0731 DSpark draft whose
    stages' experts are split too) as one process, resident and under a RAM budget with constant
    eviction; each rank holds a disjoint ~1/N share of the expert bytes."""
    if name == "0731":
        from release_writer import dspark_config, write_release

        path = tmp_path / "ckpt_0731"
        path.mkdir()
        write_release(path, dspark_config())
    else:
        path = tiny_ckpt(name).path
    ids = token_ids(40, 320, seed=5)
    out = tmp_path / "out"
    out.mkdir()
    results = launch(ranks, lambda r: ["match", str(path), str(out), json.dumps(ids)])
    for rc, _, err in results:
        assert rc == 0, err[-3000:]

    one = dsv4.load(path, dtype=torch.float32, max_ram="none")
    want = one.logits(ids)
    chain = one.generate(ids[:12], max_tokens=6, temperature=0.0)
    got = torch.load(out / "rank0.pt")
    for mode in ("resident", "budget"):
        assert rel_err(got[f"{mode}_logits"], want).max() <= 1e-5, mode
        assert got[f"{mode}_greedy"] == chain, mode
        assert got[f"{mode}_speculative"] == chain, mode
        comm = got[f"{mode}_comm"]
        assert comm["exchanges"] > 0 and comm["bytes_sent"] > 0 and comm["bytes_received"] > 0

    infos = [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]
    n = one.config.n_routed_experts
    assert sorted(e for i in infos for e in i["layer1_ids"]) == list(range(n))  # disjoint, complete
    for i in infos:
        assert i["layer1_ids"] == share(n, i["rank"], ranks)
        assert i["misses"] > 0 and i["evictions"] > 0 and i["cached_owned"]  # the store kept to its share
    total = sum(i["expert_bytes"] for i in infos)
    per_expert = total / n
    for i in infos:  # about 1/N of the bytes: shares differ by at most one expert per layer
        assert abs(i["expert_bytes"] - total / ranks) <= per_expert * (
            len(one.model.layers) + len(one.model.mtp)
        )


@pytest.mark.parametrize("kind", ["die", "hang"])
def test_lost_rank_fails_the_request(tiny_ckpt, tmp_path, kind):
    """A rank killed (connection drops) or frozen (the collective times out) mid-request: rank 0 fails the
    request with an error naming the rank, instead of hanging."""
    tiny = tiny_ckpt("flash")
    ids = token_ids(16, 320, seed=7)
    results = launch(2, lambda r: [kind, str(tiny.path), str(tmp_path), json.dumps(ids)], timeout=120,
                     dist_timeout=4, wait_for={0})  # fmt: skip
    rc, out, err = results[0]
    assert rc != 0
    assert "request failed: distributed model broken" in out, (out, err[-2000:])
    assert "rank 1 of 2 stopped answering" in out


def test_different_checkpoints_refuse_to_start(tiny_ckpt, tmp_path):
    a, b = tiny_ckpt("flash").path, tiny_ckpt("small").path
    results = launch(2, lambda r: ["load", str(a if r == 0 else b)])
    for rc, _, err in results:
        assert rc == 2
        assert "rank 1's config.json" in err and "differs from rank 0's" in err, err[-2000:]


def test_torchrun_cli_matches_one_process(tiny_ckpt):
    """`torchrun --nproc-per-node 2 -m dsv4 run` prints what `dsv4 run` prints."""
    path = str(tiny_ckpt("vocab").path)
    args = ["run", "--model", path, "--raw", "--dtype", "fp32", "--max-ram", "none", "--temperature", "0",
            "--max-tokens", "5", "--quiet", "hello"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "DSV4_DIST_TIMEOUT": "20"}
    one = subprocess.run(
        [sys.executable, "-m", "dsv4", *args], capture_output=True, text=True, env=env, timeout=120
    )
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
         "-m", "dsv4", *args],
        capture_output=True, text=True, env=env, timeout=240,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout == one.stdout


def test_plan_ranks_prints_each_share_and_network_time(tiny_ckpt, capsys):
    from dsv4.cli import main
    from dsv4.config import ModelConfig
    from dsv4.plan import Link, exchange_bytes, network_seconds_per_token

    cfg = ModelConfig.from_file(tiny_ckpt("flash").path)
    sent, got = exchange_bytes(cfg)
    assert sent == 24 + 12 * cfg.n_activated_experts + 8 + 2 * cfg.dim and got == 4 * cfg.dim
    slow, fast = Link(100e-6, 10e9 / 8), Link(100e-6, 25e9 / 8)
    assert network_seconds_per_token(cfg, 1, slow) == 0.0
    assert network_seconds_per_token(cfg, 4, slow) > network_seconds_per_token(cfg, 2, slow)
    assert network_seconds_per_token(cfg, 2, fast) < network_seconds_per_token(cfg, 2, slow)
    assert network_seconds_per_token(cfg, 2, Link(100e-6, 1e30)) == pytest.approx(cfg.n_layers * 3 * 100e-6)
    assert main(["plan", "--model", str(tiny_ckpt("flash").path), "--ranks", "3", "--link-gbps", "25"]) == 0
    out = capsys.readouterr().out
    n = cfg.n_routed_experts
    for r in range(3):
        assert f"| {r} | {len(share(n, r, 3))} of {n} |" in out
    assert "25.0 Gbit/s" in out and "network" in out and "over 3 ranks" in out
