"""`dsv4 plan` and `load` divide a RAM budget by one rule: the planner's figures are what loading does."""

import re

import pytest

import dsv4
from dsv4.checkpoint import Checkpoint
from dsv4.cli import main
from dsv4.config import ModelConfig
from dsv4.plan import make_plan, one_expert_bytes, ram_layout

MIB = 1 << 20
BUDGET = 1536 * MIB


def figures(text: str) -> dict[str, int]:
    """The plan's RAM line, in MiB."""
    m = re.search(r"RAM (\d+) MiB = process with dense weights (\d+) MiB \+ prompt snapshots (\d+) MiB \+ "
                  r"reserve (\d+) MiB \+ 2 x experts in use / in flight (\d+) MiB \+ expert cache (\d+) MiB", text)  # fmt: skip
    assert m, text
    return dict(
        zip(
            ["budget", "resident", "prompts", "reserve", "working", "cache"],
            map(int, m.groups()),
            strict=True,
        )
    )


def test_plan_figures_are_what_load_does(tiny_ckpt, capsys):
    """`dsv4 plan` plans for `dsv4 serve` (prefix cache on), so load with the prompt cache."""
    path = tiny_ckpt("flash").path
    assert main(["plan", "--model", str(path), "--ram", f"{BUDGET // MIB}M"]) == 0
    planned = figures(capsys.readouterr().out)
    e = dsv4.load(path, max_ram=BUDGET, prompt_cache=True)
    got, store = e.model.ram_layout, e.model.store
    assert store.budget_bytes == got.cache and store.group_bytes == store.prefetch_bytes == got.working
    assert [planned[k] for k in ("budget", "prompts", "reserve")] == [
        round(x / MIB) for x in (got.budget, got.prompts, got.reserve)
    ]
    assert got.prompts == e.model.prompt_cache_bytes > 0
    # The planner estimates the process it has not loaded (this one plus the dense bytes); load measures
    # it. That estimate's error is the only difference allowed, carried one for one into the cache.
    err = got.resident - planned["resident"] * MIB
    assert abs(err) < 64 * MIB, (
        f"planned resident {planned['resident']} MiB, loaded {got.resident // MIB} MiB"
    )
    expect_cache = planned["cache"] * MIB - err * 0.8  # left // 10 goes to each of the two working sets
    assert abs(got.cache - expect_cache) <= 4 * MIB, (planned, got)
    # and given the same inputs the rule gives load's layout to the byte
    one, k = store.expert_bytes("layers.0.ffn.experts", 0), e.config.n_activated_experts
    assert one == one_expert_bytes(Checkpoint(path))
    assert ram_layout(BUDGET, got.resident, got.prompts, one, k) == got


def test_too_small_a_budget_is_refused_by_both(tiny_ckpt):
    path = tiny_ckpt("flash").path
    cfg, ck = ModelConfig.from_file(path), Checkpoint(path)
    plan = make_plan(ck, cfg, ram=10 * MIB)
    assert not plan.ram.fits and plan.cache_bytes == 0
    with pytest.raises(ValueError, match="--max-ram 0.01 GiB is too small"):
        dsv4.load(path, max_ram=10 * MIB)
