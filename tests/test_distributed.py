"""Expert parallelism on one machine: several gloo processes against one process.

Two launches (2 and 3 ranks of tests/dist_rank.py, with the environment torchrun would give them) each
run every case in turn, so the start-up is paid once per rank count; the tests read their results.
One more launch goes through torchrun and the CLI. Tiny checkpoints, few tokens, short timeouts: CI
has 2 cores.
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
from dsv4.checkpoint import Checkpoint
from dsv4.distributed import share
from dsv4.tiny import tiny_config, write_checkpoint

RANK_SCRIPT = Path(__file__).parent / "dist_rank.py"
ROOT = Path(__file__).parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(ranks: int, out: Path, cases: list[dict], dist_timeout: float, timeout: float = 300):
    """Start `ranks` processes of dist_rank.py running `cases` in order; wait for rank 0, kill what is
    left (a fault case leaves a frozen or orphaned rank); return rank 0's (rc, stdout, stderr)."""
    port = free_port()
    procs = []
    for r in range(ranks):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(ranks),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "DSV4_DIST_TIMEOUT": str(dist_timeout), "PYTHONPATH": str(ROOT)}  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, str(RANK_SCRIPT), str(out), json.dumps(cases)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))  # fmt: skip
    try:
        o, e = procs[0].communicate(timeout=timeout)
        return procs[0].returncode, o, e
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()


def rss_ckpt(root: Path) -> Path:
    """Routed experts 134 MB of the checkpoint's 139 (random MXFP4 bytes: written in a blink), so each
    rank's peak RSS shows its share."""
    path = root / "ckpt_rss"
    if not path.exists():
        write_checkpoint(path, tiny_config(moe_intermediate_size=4096, n_routed_experts=64))
    return path


def dspark_ckpt(root: Path) -> Path:
    from release_writer import dspark_config, write_release

    path = root / "ckpt_0731"
    if not path.exists():
        path.mkdir()
        write_release(path, dspark_config())
    return path


IDS = token_ids(40, 320, seed=5)
FAULT_IDS = token_ids(16, 320, seed=7)


class Launch:
    """One launch of N ranks through several cases: rank 0's exit and every case's per-rank results."""

    def __init__(self, ranks: int, out: Path, rc: int, stdout: str, stderr: str):
        self.ranks, self.out, self.rc, self.stdout, self.stderr = ranks, out, rc, stdout, stderr

    def results(self, tag: str) -> list[dict]:
        missing = [r for r in range(self.ranks) if not (self.out / f"{tag}.rank{r}.json").exists()]
        assert not missing, (
            f"case {tag}: no result from rank(s) {missing}; rank 0 said:\n{self.stderr[-3000:]}"
        )
        return [json.loads((self.out / f"{tag}.rank{r}.json").read_text()) for r in range(self.ranks)]


@pytest.fixture(scope="module")
def two(tiny_ckpt, tmp_path_factory) -> Launch:
    """2 ranks: peak RSS, flash and the 0731 release (DSpark stages split too) against one process, then
    rank 1 killed mid-request."""
    root = tmp_path_factory.mktemp("two")
    flash = str(tiny_ckpt("flash").path)
    cases = [{"case": "rss", "tag": "rss", "model": str(rss_ckpt(root.parent)), "ids": IDS[:8]},
             {"case": "match", "tag": "flash", "model": flash, "ids": IDS},
             {"case": "match", "tag": "0731", "model": str(dspark_ckpt(root.parent)), "ids": IDS},
             {"case": "die", "tag": "die", "model": flash, "ids": FAULT_IDS, "rank": 1}]  # fmt: skip
    return Launch(2, root, *launch(2, root, cases, dist_timeout=20))


@pytest.fixture(scope="module")
def three(tiny_ckpt, tmp_path_factory) -> Launch:
    """3 ranks: a rank with another checkpoint refused, peak RSS, flash against one process, then rank 2
    frozen mid-request (the collective timeout, shortened for the whole launch, is what detects it)."""
    root = tmp_path_factory.mktemp("three")
    flash = str(tiny_ckpt("flash").path)
    cases = [{"case": "refuse", "tag": "refuse", "model": flash, "other": str(tiny_ckpt("small").path), "rank": 2},
             {"case": "rss", "tag": "rss", "model": str(rss_ckpt(root.parent)), "ids": IDS[:8]},
             {"case": "match", "tag": "flash", "model": flash, "ids": IDS},
             {"case": "hang", "tag": "hang", "model": flash, "ids": FAULT_IDS, "rank": 2}]  # fmt: skip
    return Launch(3, root, *launch(3, root, cases, dist_timeout=6))


@pytest.mark.parametrize("launched, tag", [("two", "flash"), ("three", "flash"), ("two", "0731")])
def test_ranks_match_one_process(request, tiny_ckpt, tmp_path_factory, launched, tag):
    """Same fp32 logits and greedy chains (plain and speculative: MTP, or the 0731 DSpark draft whose
    stages' experts are split too) as one process, resident and under a RAM budget with constant
    eviction; each rank holds a disjoint ~1/N share of the expert bytes."""
    run: Launch = request.getfixturevalue(launched)
    infos = run.results(tag)
    path = tiny_ckpt("flash").path if tag == "flash" else dspark_ckpt(tmp_path_factory.getbasetemp())
    one = dsv4.load(path, dtype=torch.float32, max_ram="none")
    want = one.logits(IDS)
    chain = one.generate(IDS[:12], max_tokens=6, temperature=0.0)
    got = torch.load(run.out / f"{tag}.pt")
    for mode in ("resident", "budget"):
        assert rel_err(got[f"{mode}_logits"], want).max() <= 1e-5, mode
        assert got[f"{mode}_greedy"] == chain, mode
        assert got[f"{mode}_speculative"] == chain, mode
        comm = got[f"{mode}_comm"]
        assert comm["exchanges"] > 0 and comm["bytes_sent"] > 0 and comm["bytes_received"] > 0
        # a dispatch would send each row only where its experts are: never more than the broadcast
        assert 0 < comm["dispatch_bytes"] <= comm["bytes_sent"] + comm["bytes_received"]

    n, ranks = one.config.n_routed_experts, run.ranks
    assert sorted(e for i in infos for e in i["layer1_ids"]) == list(range(n))  # disjoint, complete
    for i in infos:
        assert i["layer1_ids"] == share(n, i["rank"], ranks)
        assert i["misses"] > 0 and i["evictions"] > 0 and i["cached_owned"]  # the store kept to its share
    total = sum(i["expert_bytes"] for i in infos)
    per_expert = total / n
    for i in infos:  # about 1/N of the bytes: shares differ by at most one expert per layer
        assert abs(i["expert_bytes"] - total / ranks) <= per_expert * i["moe_layers"]


@pytest.mark.parametrize("launched", ["two", "three"])
def test_peak_rss_holds_a_share_of_the_experts(request, tmp_path_factory, launched):
    """Each rank's peak RSS grows by its 1/N of the expert bytes (plus the small dense part), never by
    all of them: no rank reads or keeps another's experts, even transiently."""
    run: Launch = request.getfixturevalue(launched)
    ckpt = Checkpoint(rss_ckpt(tmp_path_factory.getbasetemp()))
    experts = sum(ckpt.nbytes(n) for n in ckpt.names() if ".ffn.experts." in n)
    dense = sum(ckpt.nbytes(n) for n in ckpt.names()) - experts
    ckpt.close()
    slack = 24 << 20  # allocator, gloo and thread buffers
    for i in run.results("rss"):
        assert abs(i["expert_bytes"] - experts / run.ranks) < 0.05 * experts, i
        assert i["expert_bytes"] <= i["load_growth"] <= i["expert_bytes"] + dense + slack, (i, experts, dense)
        if i["rank"]:  # a follower's peak while serving too (rank 0's adds the engine's sequence state)
            assert i["growth"] <= i["expert_bytes"] + dense + slack, (i, experts, dense)


@pytest.mark.parametrize("launched, kind, rank", [("two", "die", 1), ("three", "hang", 2)])
def test_lost_rank_fails_the_request(request, launched, kind, rank):
    """A rank killed (connection drops) or frozen (the collective times out) mid-request: rank 0 fails the
    request with an error naming the rank and exits non-zero, instead of hanging."""
    run: Launch = request.getfixturevalue(launched)
    assert run.rc != 0
    assert "request failed: distributed model broken" in run.stdout, (run.stdout, run.stderr[-2000:])
    assert f"rank {rank} of {run.ranks} stopped answering" in run.stdout


def test_different_checkpoints_refuse_to_start(three):
    for i in three.results("refuse"):
        assert (
            i["error"] and "rank 2's config.json" in i["error"] and "differs from rank 0's" in i["error"]
        ), i


def run_args(path, *extra: str) -> list[str]:
    return ["run", "--model", str(path), "--raw", *extra, "--dtype", "fp32", "--max-ram", "none", "--temperature",
            "0", "--max-tokens", "5", "--quiet", "hello"]  # fmt: skip


def torchrun(args: list[str], dist_timeout: float) -> str:
    """`torchrun --nproc-per-node 2 -m dsv4 ARGS`'s stdout (it must succeed)."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
        "DSV4_DIST_TIMEOUT": str(dist_timeout),
    }
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
         "-m", "dsv4", *args],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    return two.stdout


def test_torchrun_cli_matches_one_process(tiny_ckpt, capsys):
    """`torchrun --nproc-per-node 2 -m dsv4 run` prints what `dsv4 run` prints."""
    from dsv4.cli import main

    args = run_args(tiny_ckpt("vocab").path)
    assert main(args) == 0
    assert torchrun(args, dist_timeout=20) == capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs two CUDA devices (one per rank)")
def test_nccl_ranks_match_one_process(tiny_ckpt, capsys):
    """`--device cuda` under torchrun: NCCL between two GPUs, the same output as one process."""
    from dsv4.cli import main

    args = run_args(tiny_ckpt("vocab").path, "--device", "cuda")
    assert main(args) == 0
    assert torchrun(args, dist_timeout=60) == capsys.readouterr().out


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
