"""The expert store: eviction order, budgets, prefetch, identical logits under every layout, and a
real RAM budget on a checkpoint whose experts are 4x that budget."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import token_ids

import dsv4
from dsv4.checkpoint import Checkpoint
from dsv4.experts import ExpertStore
from dsv4.tiny import tiny_config
from dsv4.writer import write_checkpoint

L1 = "layers.1.ffn.experts"


@pytest.fixture
def store(tiny_ckpt):
    def make(policy, n_experts_room):
        ck = Checkpoint(tiny_ckpt("flash").path)
        s = ExpertStore(ck, budget_bytes=0, policy=policy, dtype=torch.float32)
        s.budget_bytes = n_experts_room * s.expert_bytes(L1, 0)
        return s

    return make


def cached(s):
    return sorted(e for (_, e) in s._cache)


def test_lru_evicts_the_least_recent(store):
    s = store("lru", 2)
    s.get(L1, [0])
    s.get(L1, [1])
    s.get(L1, [0])  # 0 is now the most recent
    s.get(L1, [2])
    assert cached(s) == [0, 2] and s.stats.evictions == 1 and s.stats.hits == 1


def test_lfu_evicts_the_least_used(store):
    s = store("lfu", 2)
    for _ in range(3):
        s.get(L1, [1])
    s.get(L1, [0])  # 0 is the most recent but used once
    s.get(L1, [2])
    assert cached(s) == [1, 2]


def test_budget_is_never_exceeded(store):
    s = store("lfu", 3)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        layer = f"layers.{int(torch.randint(0, 4, (1,), generator=g))}.ffn.experts"
        ids = torch.randperm(8, generator=g)[:2].tolist()
        got = s.get(layer, ids)
        assert set(got) == set(ids)
        assert s.used_bytes <= s.budget_bytes
    assert s.stats.evictions > 0


def test_prefetched_experts_are_the_right_bytes(store, tiny_ckpt):
    s = store("lru", 8)
    s.prefetch(L1, [3, 5])
    s.wait()  # let the reads finish
    assert s.stats.prefetched == 2
    got = s.get(L1, [3, 5])
    assert s.stats.hits == 2 and s.stats.misses == 0
    ck = Checkpoint(tiny_ckpt("flash").path)
    for e in (3, 5):
        for w, name in zip(got[e], ("w1", "w2", "w3"), strict=True):
            assert torch.equal(w.weight, ck.tensor(f"{L1}.{e}.{name}.weight"))
            assert torch.equal(
                w.scale.view(torch.uint8), ck.tensor(f"{L1}.{e}.{name}.scale").view(torch.uint8)
            )


def test_early_routing_guesses_are_scored_and_prefetched_only_while_accurate(store):
    s = store("lru", 64)
    s.min_guess_accuracy = 0.75
    def rounds(n, guess, used):
        for _ in range(n):
            s.guess(L1, guess)
            s.score_guess(L1, used)

    rounds(12, [0, 1, 2, 3], [0, 1, 2, 9])  # 3 in 4 right, but too few guesses yet to trust
    assert (s.stats.guessed, s.stats.guessed_right) == (48, 36) and s.stats.guess_prefetches == 0
    rounds(20, [0, 1, 2, 3], [0, 1, 2, 9])
    assert (s.stats.guessed, s.stats.guessed_right) == (128, 96) and s.stats.guess_prefetches > 0
    before = s.stats.guess_prefetches
    s.guess(L1, [4, 5])
    s.wait()
    assert s.stats.guess_prefetches == before + 2 and {(L1, 4), (L1, 5)} <= set(s._cache)
    s.score_guess(L1, [4, 5])
    s.score_guess(L1, [4, 5])  # a layer that ran without a guess made for it scores nothing
    assert s.stats.guessed == 130
    rounds(30, [6], [7])  # the guesses turn bad: the gate closes on the recent accuracy
    before = s.stats.guess_prefetches
    s.guess(L1, [8])
    assert s.stats.guess_prefetches == before and (L1, 8) not in s._cache and (L1, 8) not in s._inflight


def test_hash_layers_prefetch_from_the_token_ids(tiny_ckpt):
    e = dsv4.load(tiny_ckpt("flash").path, max_ram="1G")
    store, moe = e.model.store, e.model.layers[0].ffn
    assert moe.tid2eid is not None
    tokens = torch.tensor([5, 6, 7])
    want = {("layers.0.ffn.experts", int(x)) for x in moe.tid2eid[tokens].unique()}
    moe.prefetch_hashed(tokens)
    store.wait()
    assert want <= set(store._cache) and store.stats.prefetched == len(want)


@pytest.mark.parametrize("name", ["flash", "small"])
def test_identical_logits_under_every_layout(tiny_ckpt, name):
    path = tiny_ckpt(name).path
    ids = token_ids(150, 320, seed=11)
    resident = dsv4.load(path, dtype=torch.float32, max_ram="none").logits(ids)
    for policy in ("lru", "lfu"):
        e = dsv4.load(path, dtype=torch.float32, max_ram="4G", cache_policy=policy)
        assert torch.equal(e.logits(ids), resident)
        store = e.model.store
        store.set_budget(3 * store.expert_bytes(L1, 0))  # almost nothing fits: constant eviction
        assert torch.equal(e.logits(ids), resident)
        assert (
            store.stats.evictions > 0
            and store.stats.prefetched > 0
            and store.used_bytes <= store.budget_bytes
        )
        assert e.stats()["expert_cache"]["misses"] > 0


def test_too_small_budget_is_a_clear_error(tiny_ckpt):
    with pytest.raises(ValueError, match="--max-ram .* too small"):
        dsv4.load(tiny_ckpt("flash").path, max_ram="10M")


def test_loaded_weights_are_not_file_backed(tiny_ckpt):
    """Weights are copied into memory of their own: once loaded, no shard stays mapped, so the dense bytes
    count in RSS when the expert cache is sized and are never paged back in from the file under a budget."""
    path = tiny_ckpt("flash").path
    e = dsv4.load(path, max_ram="1G")
    maps = Path("/proc/self/maps").read_text()
    assert e.generate([2, 3, 4], max_tokens=2, temperature=0.0)
    assert str(path.resolve()) not in maps and str(path.resolve()) not in Path("/proc/self/maps").read_text()
    assert e.model.store.stats.misses > 0  # experts were read (positioned reads, no map) as well


BUDGET = 640 << 20


@pytest.fixture(scope="module")
def big_experts(tmp_path_factory):
    """Experts of 4x BUDGET on disk (random MXFP4 bytes), small dense part."""
    raw = tiny_config(
        vocab_size=1024, hidden_size=1024, num_hidden_layers=8, compress_ratios=[0, 4, 128, 4, 128, 4, 128, 4, 0],
        num_attention_heads=4, head_dim=128, qk_rope_head_dim=64, q_lora_rank=128, o_groups=2, o_lora_rank=64,
        index_n_heads=4, index_head_dim=64, moe_intermediate_size=2048, n_routed_experts=100, num_experts_per_tok=4,
        num_nextn_predict_layers=0,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("big_experts")
    write_checkpoint(path, raw, None, shard_bytes=512 << 20)
    return path


def test_decode_stays_within_the_ram_budget(big_experts):
    """Peak RSS of a fresh process stays within budget + 10 % while decoding."""
    code = textwrap.dedent(f"""
        import json, torch, dsv4
        from dsv4.memory import peak_rss_bytes
        torch.set_num_threads(2)
        e = dsv4.load({str(big_experts)!r}, max_ram={BUDGET})
        ids = e.generate(list(range(2, 40)), max_tokens=24, temperature=0.0)
        s = e.stats()
        print(json.dumps({{"peak": peak_rss_bytes(), **s["expert_cache"]}}))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    expert_bytes = sum(f.stat().st_size for f in big_experts.glob("*.safetensors"))
    assert expert_bytes > 4 * BUDGET
    print(
        f"peak RSS {out['peak'] / 2**20:.0f} MiB for a {BUDGET / 2**20:.0f} MiB budget; hit rate {out['hit_rate']:.2f}"
    )
    assert out["peak"] <= 1.1 * BUDGET
    assert out["misses"] > 0 and out["evictions"] > 0


def test_two_tiers_read_through(tiny_ckpt):
    """A fast tier (GPU memory on CUDA machines; here both on the CPU) reads its misses from RAM."""
    ck = Checkpoint(tiny_ckpt("flash").path)
    ram = ExpertStore(ck, budget_bytes=1 << 30, dtype=torch.float32)
    fast = ExpertStore(ck, budget_bytes=0, lower=ram, dtype=torch.float32)
    fast.set_budget(2 * fast.expert_bytes(L1, 0))
    a = fast.get(L1, [1, 2, 3])
    b = ram.get(L1, [1, 2, 3])
    assert all(torch.equal(x.weight, y.weight) for e in (1, 2, 3) for x, y in zip(a[e], b[e], strict=True))
    assert fast.used_bytes <= fast.budget_bytes and ram.stats.hits == 3 and ram.stats.misses == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_tier_matches_cpu(tiny_ckpt):
    path = tiny_ckpt("flash").path
    ids = token_ids(60, 320)
    cpu = dsv4.load(path, dtype=torch.float32, max_ram="none").logits(ids)
    gpu = dsv4.load(path, device="cuda", dtype=torch.float32, max_ram="4G", max_vram="64M").logits(ids)
    assert torch.allclose(gpu.cpu(), cpu, rtol=1e-4, atol=1e-4)
