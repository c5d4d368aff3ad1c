"""The prefix cache: a restored prefix continues exactly (in RAM, from disk, after a divergence inside the
rollback room), bad files are skipped and never change an answer, the RAM and disk caps hold."""

import json
import logging
import os
import re
import subprocess
import sys
import time

import pytest
import torch
from conftest import rel_err, token_ids

import dsv4
from dsv4 import prefix_cache
from dsv4.prefix_cache import DEFAULT_EVERY, PrefixCache, for_engine, model_identity, prefill

TOL = 1e-4


@pytest.fixture(scope="module", params=["small", "flash"])
def engine(request, tiny_ckpt):
    return dsv4.load(tiny_ckpt(request.param).path, dtype=torch.float32)


def _cache(engine, tmp_path, **kw):
    kw.setdefault("ram_bytes", 1 << 30)
    return PrefixCache(
        model_identity(engine), engine.new_state, disk_dir=tmp_path, every=kw.pop("every", 16), **kw
    )


def _fed(engine, ids):
    state = engine.new_state()
    engine.step([ids], [state])
    return state


def _continue_from(engine, state, ids, n):
    """Logits of positions n.. of ids, continuing `state` (which holds ids[:n])."""
    assert state.pos == n
    return engine.step([ids[n:]], [state], all_logits=True)[0]


# "small": windows of 16, compression ratios 4 and 8; "flash": window 128, ratios 4 and 128
@pytest.mark.parametrize("at", [4, 7, 8, 9, 16, 17, 31, 33])
def test_restored_prefix_continues_exactly_from_ram_and_disk(engine, tmp_path, at):
    ids = token_ids(48, engine.config.vocab_size, seed=at)
    want = engine.logits(ids)
    cache = _cache(engine, tmp_path)
    cache.insert(ids[:at], _fed(engine, ids[:at]))
    state, n = cache.lookup(ids)
    assert n == at
    assert rel_err(_continue_from(engine, state, ids, n), want[n:]).max() <= TOL
    cache.flush()
    restarted = _cache(engine, tmp_path)  # empty RAM: the snapshot comes from its file
    state, n = restarted.lookup(ids)
    assert n == at and restarted.stats.hits == 1 and restarted.stats.skipped_files == 0
    assert rel_err(_continue_from(engine, state, ids, n), want[n:]).max() <= TOL


@pytest.fixture(scope="module")
def flash(tiny_ckpt):
    return dsv4.load(tiny_ckpt("flash").path, dtype=torch.float32)


# Flash's layers: window-only, CSA (ratio 4), HCA (ratio 128), CSA, with a 128-token sliding window: the
# HCA window closes and the sliding window first wraps at 128
@pytest.mark.parametrize("at", [127, 128, 129, 132])
def test_restored_prefix_continues_exactly_at_the_edges_of_the_128_windows(flash, tmp_path, at):
    ids = token_ids(140, flash.config.vocab_size, seed=at)
    want = flash.logits(ids)
    cache = _cache(flash, tmp_path)
    cache.insert(ids[:at], _fed(flash, ids[:at]))
    cache.flush()
    for c in (cache, _cache(flash, tmp_path)):  # from RAM, then from the file
        state, n = c.lookup(ids)
        assert n == at
        assert rel_err(_continue_from(flash, state, ids, n), want[n:]).max() <= TOL


def test_a_rollback_from_a_snapshot_across_a_closed_128_window_is_exact(flash, tmp_path):
    """A snapshot of 132 tokens serves a prompt diverging at 126: HCA's entry closed at 128 is forgotten."""
    vocab = flash.config.vocab_size
    first = token_ids(132, vocab, seed=40)
    second = first[:126] + token_ids(10, vocab, seed=41)
    cache = _cache(flash, tmp_path)
    cache.insert(first, _fed(flash, first))
    cache.flush()
    for c in (cache, _cache(flash, tmp_path)):
        state, n = c.lookup(second)
        assert (n, state.pos) == (126, 126)
        assert rel_err(_continue_from(flash, state, second, n), flash.logits(second)[n:]).max() <= TOL


def test_a_write_cut_short_leaves_no_file_that_is_read(flash, tmp_path, monkeypatch):
    """Files are written under a temporary name and renamed: a crash before the rename leaves no
    `.safetensors` file; a restart ignores the temporary one and deletes it once it is stale."""
    ids = token_ids(30, flash.config.vocab_size, seed=42)
    cache = _cache(flash, tmp_path)

    def crash(src, dst):
        raise OSError("killed mid-write")

    monkeypatch.setattr(prefix_cache.os, "replace", crash)
    cache.insert(ids, _fed(flash, ids))
    cache.flush()
    monkeypatch.undo()
    assert _files(tmp_path) == []
    (tmp,) = cache.dir.glob(".tmp-*")
    tmp.write_bytes(tmp.read_bytes()[:100])  # and cut short, as a crash mid-write leaves it
    restarted = _cache(flash, tmp_path)
    assert restarted.lookup(ids) is None and restarted.stats.skipped_files == 0
    assert tmp.exists()  # recent: perhaps another process's write in progress
    old = time.time() - 3600
    os.utime(tmp, (old, old))
    _cache(flash, tmp_path)
    assert not tmp.exists()


def test_ram_only_entries_keep_no_token_list(flash):
    ids = token_ids(30, flash.config.vocab_size, seed=43)
    cache = PrefixCache(model_identity(flash), flash.new_state, ram_bytes=1 << 30)
    cache.insert(ids, _fed(flash, ids))
    (e,) = cache._entries.values()
    assert e.tokens is None and len(e.tail) == e.room and e.nbytes == e.snap.nbytes() > 0


@pytest.mark.parametrize("diverge", [1, 3, 8])
def test_a_prompt_diverging_inside_the_rollback_room_reuses_up_to_the_divergence(engine, tmp_path, diverge):
    """Thinking mode renders the last prompt token differently in the next turn: reuse all before it."""
    vocab = engine.config.vocab_size
    first = token_ids(40, vocab, seed=2)
    second = first[: 40 - diverge] + token_ids(12, vocab, seed=3)
    cache = _cache(engine, tmp_path)
    cache.insert(first, _fed(engine, first))
    cache.flush()
    for c in (cache, _cache(engine, tmp_path)):  # from RAM, then from the file
        state, n = c.lookup(second)
        assert n == 40 - diverge
        assert rel_err(_continue_from(engine, state, second, n), engine.logits(second)[n:]).max() <= TOL


def test_lookup_leaves_a_token_to_feed_and_misses_cleanly(engine, tmp_path):
    vocab = engine.config.vocab_size
    ids = token_ids(20, vocab, seed=4)
    cache = _cache(engine, tmp_path)
    cache.insert(ids, _fed(engine, ids))
    state, n = cache.lookup(ids)  # the same prompt again: all but its last token
    assert n == 19 and state.pos == 19
    assert cache.lookup(token_ids(20, vocab, seed=5)) is None
    assert cache.lookup(ids[:1]) is None
    s = cache.summary()
    assert (s["lookups"], s["hits"], s["tokens_saved"]) == (3, 1, 19)


def test_prefill_keeps_snapshots_at_boundaries(engine, tmp_path):
    vocab = engine.config.vocab_size
    shared = token_ids(37, vocab, seed=6)
    a, b = shared + token_ids(5, vocab, seed=7), shared + token_ids(6, vocab, seed=8)
    cache = _cache(engine, tmp_path, every=16)
    state, restored = prefill(engine, cache, a)
    assert (restored, state.pos) == (0, 41)
    assert cache.summary()["entries"] == 3  # 16, 32, 41
    state, restored = prefill(engine, cache, b)  # restores 41 rolled back to 37 (its room reaches back to 33)
    assert (restored, state.pos) == (37, 42) and cache.stats.tokens_saved == 37
    n = 42
    assert rel_err(_continue_from(engine, state, b, n), engine.logits(b)[n:]).max() <= TOL


def _files(tmp_path):
    return sorted(tmp_path.glob("*/*.safetensors"))


def test_corrupt_truncated_and_foreign_files_are_skipped(engine, tmp_path, tiny_ckpt, caplog):
    vocab = engine.config.vocab_size
    ids = token_ids(40, vocab, seed=9)
    want = engine.logits(ids)
    cache = _cache(engine, tmp_path, every=8)
    prefill(engine, cache, ids)  # snapshots at 8, 16, 24, 32, 39
    cache.flush()
    files = {int(f.stat().st_size): f for f in _files(tmp_path)}
    by_size = [files[k] for k in sorted(files)]
    assert len(by_size) == 5
    longest, second, third = by_size[-1], by_size[-2], by_size[-3]
    raw = bytearray(longest.read_bytes())
    raw[-5] ^= 0x40  # one flipped bit in the data
    longest.write_bytes(bytes(raw))
    second.write_bytes(second.read_bytes()[:-100])  # cut short
    third.write_bytes(b"not a safetensors file")
    other = dsv4.load(tiny_ckpt("pro").path, dtype=torch.float32)  # another model writes into the same folder
    foreign = PrefixCache(
        model_identity(other), other.new_state, ram_bytes=1 << 30, disk_dir=tmp_path, every=8
    )
    foreign.insert(ids[:20], _fed(other, ids[:20]))
    foreign.flush()
    ours = {f.parent for f in by_size}.pop()
    theirs = next(foreign.dir.glob("*.safetensors"))
    stray = ours / theirs.name
    stray.write_bytes(theirs.read_bytes())  # its file, in our folder
    with caplog.at_level(logging.WARNING, logger="dsv4.prefix_cache"):
        restarted = _cache(engine, tmp_path, every=8)
        state, n = restarted.lookup(ids)
    assert n == 16  # 39 corrupt, 32 truncated, 24 unreadable: the next best
    assert rel_err(_continue_from(engine, state, ids, n), want[n:]).max() <= TOL
    assert restarted.stats.skipped_files == 4
    text = caplog.text
    assert "checksum" in text and "another model" in text and "unreadable manifest" in text
    assert stray.exists() and not longest.exists()  # foreign files stay, damaged ones of ours go
    assert (foreign.lookup(ids[:21]) or (None, 0))[1] == 20  # the other model's own cache is untouched


def test_disk_cap_evicts_least_recently_used(engine, tmp_path):
    vocab = engine.config.vocab_size
    prompts = [token_ids(24, vocab, seed=20 + i) for i in range(5)]
    probe = _cache(engine, tmp_path / "probe")
    probe.insert(prompts[0], _fed(engine, prompts[0]))
    probe.flush()
    size = _files(tmp_path / "probe")[0].stat().st_size
    root = tmp_path / "capped"
    cache = _cache(engine, root, ram_bytes=0, disk_bytes=int(2.5 * size))
    for p in prompts:
        cache.insert(p, _fed(engine, p))
        cache.flush()
        assert sum(f.stat().st_size for f in _files(root)) <= 2.5 * size
    assert len(_files(root)) == 2 and cache.summary()["disk_bytes"] <= 2.5 * size
    assert cache.lookup(prompts[0]) is None and cache.lookup(prompts[4])[1] == 23


def test_ram_budget_drops_least_recently_used(engine):
    vocab = engine.config.vocab_size
    prompts = [token_ids(24, vocab, seed=30 + i) for i in range(4)]
    one = _fed(engine, prompts[0]).snapshot().nbytes()
    cache = PrefixCache(model_identity(engine), engine.new_state, ram_bytes=int(2.5 * one))
    for p in prompts[:3]:
        cache.insert(p, _fed(engine, p))
    assert cache.lookup(prompts[1]) is not None  # used: now the most recent
    cache.insert(prompts[3], _fed(engine, prompts[3]))
    assert cache.summary()["ram_bytes"] <= 2.5 * one
    assert cache.lookup(prompts[0]) is None and cache.lookup(prompts[2]) is None
    assert cache.lookup(prompts[1]) is not None and cache.lookup(prompts[3]) is not None


def test_identity_covers_numerics_and_dtype(tiny_ckpt):
    path = tiny_ckpt("small").path
    ids = {model_identity(dsv4.load(path, dtype=d, numerics=n)) for d in (torch.float32, torch.bfloat16)
           for n in ("exact", "released")}  # fmt: skip
    assert len(ids) == 4
    assert for_engine(dsv4.load(path, dtype=torch.float32), ram=0) is None


# ---- the command line: `dsv4 run` and `dsv4 chat` with --prompt-cache DIR


def _dsv4(*args, input=None):
    r = subprocess.run([sys.executable, "-m", "dsv4", *map(str, args)], capture_output=True, text=True,
                       input=input, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return r


def _reused(text: str) -> int:
    m = re.search(r"\[(\d+) prompt tokens(?: \((\d+) reused from cached state\))?,", text)
    assert m, text
    return int(m.group(2) or 0)


def test_run_reuses_a_long_shared_prefix_across_invocations(tiny_ckpt, tmp_path):
    model = tiny_ckpt("vocab").path
    shared = " ".join(f"Fact {i}: item {i} weighs {7 * i} grams." for i in range(90))
    tail = " Answer with its number and its weight, in one short sentence."  # past the end snapshot's room
    prompts = [shared + f" Which item is {w}?" + tail for w in ("heaviest", "lightest")]
    base = ("run", "--model", model, "--temperature", "0", "--max-tokens", "4")
    first = _dsv4(*base, "--prompt-cache", tmp_path, prompts[0])
    assert _reused(first.stderr) == 0
    second = _dsv4(*base, "--prompt-cache", tmp_path, prompts[1])
    engine = dsv4.load(model)
    a, b = (engine.encode([{"role": "user", "content": p}]) for p in prompts)
    common = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    assert 1024 < common < len(a) - 8
    assert _reused(second.stderr) == common // DEFAULT_EVERY * DEFAULT_EVERY  # the last snapshot boundary
    assert second.stdout == _dsv4(*base, prompts[1]).stdout  # the same answer as without the cache


def test_chat_session_in_thinking_mode_reuses_the_previous_prompt(tiny_ckpt):
    """Thinking mode renders the previous turn without its reasoning: the snapshot kept at the end of the
    previous prompt (by the cache, or by the session without one) serves all of it but its last token
    (`<think>`, now `</think>`)."""
    from dsv4.session import ChatSession

    engine = dsv4.load(tiny_ckpt("vocab").path, dtype=torch.float32)

    def talk(cache):
        session, out = ChatSession(engine, thinking_mode="thinking", prefix_cache=cache), []
        for q in ("Hello there", "And then?", "Why?"):
            list(session.send(q, max_tokens=4, temperature=0))
            out.append((session.messages[-1], session.last_result.stats))
        return out

    plain, cached = talk(None), talk(for_engine(engine, ram="64M"))
    assert [m for m, _ in cached] == [m for m, _ in plain]  # the same replies
    for turns in (plain, cached):  # without a cache the session keeps that snapshot itself
        assert turns[0][1].reused_tokens == 0
        for (_, before), (_, st) in zip(turns, turns[1:], strict=False):
            assert st.reused_tokens == before.prompt_tokens - 1


def test_chat_resumes_a_saved_conversation_without_prefilling_it_again(tiny_ckpt, tmp_path):
    model, saved = tiny_ckpt("vocab").path, tmp_path / "chat.json"
    base = ("chat", "--model", model, "--temperature", "0", "--max-tokens", "4")
    _dsv4(
        *base,
        "--prompt-cache",
        tmp_path / "cache",
        input=f"Hello there\nTell me more\n/save {saved}\n/exit\n",
    )
    resumed = _dsv4(
        *base, "--prompt-cache", tmp_path / "cache", "--resume", saved, input="And then?\n/stats\n/exit\n"
    )
    plain = _dsv4(*base, "--resume", saved, input="And then?\n/stats\n/exit\n")
    messages = json.loads(saved.read_text())["messages"]
    before = dsv4.load(model).encode(messages[:-1])  # the last prompt of the first session
    assert _reused(resumed.stdout) >= len(before) and _reused(plain.stdout) == 0
    stats = re.compile(r"\[\d+ prompt tokens.*\]")
    assert stats.sub("", resumed.stdout) == stats.sub("", plain.stdout)  # the same reply


# ---- the RAM budget: what `dsv4 plan` prints is what load and serve set aside


def test_plan_prompt_share_is_what_load_and_serve_use(tiny_ckpt, monkeypatch):
    pytest.importorskip("fastapi")
    import uvicorn

    from dsv4 import loader, plan
    from dsv4.checkpoint import Checkpoint
    from dsv4.cli import build_parser
    from dsv4.config import ModelConfig
    from dsv4.memory import parse_size

    path = tiny_ckpt("small").path
    monkeypatch.setattr(plan, "measure_ram_gbs", lambda: 10.0)
    monkeypatch.setattr(plan, "measure_disk_gbs", lambda ckpt: 1.0)
    budget = parse_size("2G")
    p = plan.make_plan(Checkpoint(path), ModelConfig.from_file(path), budget)
    assert p.prompt_cache_bytes == budget // prefix_cache.RAM_SHARE
    text = plan.render(p, Checkpoint(path), ModelConfig.from_file(path))
    assert "prompt snapshots" in text and "RAM rule: the prefix cache holds 1/16 of the budget" in text
    expert_budgets = []  # what the expert cache is sized from
    monkeypatch.setattr(
        loader, "_size_ram_tier", lambda store, ram, prompts, cfg: expert_budgets.append((ram, prompts))
    )
    engine = dsv4.load(path, max_ram="2G", prompt_cache=True)
    assert engine.model.prompt_cache_bytes == p.prompt_cache_bytes == p.ram.prompts
    assert expert_budgets == [(budget, p.prompt_cache_bytes)]  # the expert cache gets what the share leaves
    assert for_engine(engine).ram_bytes == p.prompt_cache_bytes  # the snapshots' RAM cap
    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: apps.append(app))
    args = build_parser().parse_args(["serve", "--model", str(path), "--max-ram", "2G"])
    assert args.fn(args) == 0
    assert apps[0].state.server.worker.prefix_cache.ram_bytes == p.prompt_cache_bytes
    assert expert_budgets[-1] == (budget, p.prompt_cache_bytes)
