"""Incremental state: chunked prefill, decode steps, prefill after decode and batching all give the
logits of one full forward pass."""

import pytest
import torch
from conftest import rel_err, token_ids

import dsv4

TOL = 1e-4


def assert_same(engine, got, want):
    """Exact numerics: every position within TOL. As released, KV entries are rounded to FP8 and
    indexer vectors to FP4, so a 1-ulp difference from a different matmul shape can flip a rounding
    (and then an indexer pick): almost all positions within 2e-3, none far off."""
    err = rel_err(got, want)
    if engine.model.numerics.released:
        assert err.quantile(0.97) <= 2e-3 and err.max() <= 0.1, (err.quantile(0.97), err.max())
    else:
        assert err.max() <= TOL, err.max()


@pytest.fixture(scope="module", params=["exact", "released"])
def engine(request, tiny_ckpt):
    return dsv4.load(tiny_ckpt("small").path, dtype=torch.float32, numerics=request.param)


@pytest.fixture(scope="module")
def flash(tiny_ckpt):
    return dsv4.load(tiny_ckpt("flash").path, dtype=torch.float32)


def _incremental(engine, ids, cuts):
    """Feed ids in pieces split at `cuts`; return all positions' logits."""
    state, outs, prev = engine.new_state(), [], 0
    for c in [*cuts, len(ids)]:
        outs.append(engine.step([ids[prev:c]], [state], all_logits=True)[0])
        prev = c
    return torch.cat(outs), state


@pytest.mark.parametrize("chunk", [1, 3, 16, 37, 64])
def test_chunked_prefill(engine, chunk):
    ids = token_ids(150, engine.config.vocab_size)
    full = engine.logits(ids)
    chunked, state = _incremental(engine, ids, list(range(chunk, len(ids), chunk)))
    assert state.pos == len(ids)
    assert_same(engine, chunked, full)


def test_prefill_then_decode_then_prefill(engine):
    """Prompt, decode steps, then the next chat turn's prefill (and decode again)."""
    ids = token_ids(160, engine.config.vocab_size, seed=5)
    cuts = [41, *range(42, 70), 121, *range(122, 131)]
    inc, _ = _incremental(engine, ids, cuts)
    assert_same(engine, inc, engine.logits(ids))


def test_long_sequence_in_flash_config(flash):
    """Sliding window (128) wraps and an HCA window (128) closes during decode."""
    ids = token_ids(300, flash.config.vocab_size, seed=7)
    cuts = [100, *range(101, 140), 250, *range(251, 262)]
    inc, _ = _incremental(flash, ids, cuts)
    assert rel_err(inc, flash.logits(ids)).max() <= TOL


def test_batch_of_different_lengths(engine):
    vocab = engine.config.vocab_size
    seqs = [token_ids(n, vocab, seed=n) for n in (5, 70, 33)]
    singles = [engine.logits(s) for s in seqs]
    states = [engine.new_state() for _ in seqs]
    # first step: the three prompts together; then one decode token each, together
    out = engine.step(seqs, states, all_logits=True)
    nxt = [[3], [4], [5]]
    dec = engine.step(nxt, states, all_logits=True)
    for s, single, o, n, d in zip(seqs, singles, out, nxt, dec, strict=True):
        assert_same(engine, o, single)
        assert_same(engine, d, engine.logits(s + n)[-1:])


def test_mtp_block_is_callable_and_incremental(flash):
    """The MTP block drafts from the main streams; incremental drafts equal the full pass."""
    model = flash.model
    ids = token_ids(140, flash.config.vocab_size, seed=9)
    nxt = torch.tensor(ids[1:] + [2])

    def drafts(cuts):
        st, outs, prev = model.new_state(), [], 0
        for c in [*cuts, len(ids)]:
            batch = model.make_batch([ids[prev:c]], [st])
            with torch.no_grad():
                h = model(batch, [st])
                outs.append(model.mtp_logits(h, nxt[prev:c], batch, [st]))
            prev = c
        return torch.cat(outs)

    full = drafts([])
    assert full.shape == (140, flash.config.vocab_size) and torch.isfinite(full).all()
    assert rel_err(drafts([60, 61, 62, 100]), full).max() <= TOL


def test_state_reports_its_memory(engine):
    _, state = engine.prefill(token_ids(64, engine.config.vocab_size))
    assert state.nbytes() > 0


def test_out_of_vocab_token_is_a_clear_error(engine):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.logits([1, engine.config.vocab_size])


# ---------------------------------------------------------------- the state's own operations
# Cut points inside and at the edges of compression windows (ratios 4 and 8 in "small", window 16).


def _continue(engine, state, ids):
    return engine.step([ids], [state], all_logits=True)[0]


@pytest.mark.parametrize("at", [1, 4, 8, 15, 16, 17, 31, 32, 33, 63])
def test_snapshot_restore_and_tensors_continue_exactly(engine, at):
    ids = token_ids(80, engine.config.vocab_size, seed=at)
    want = engine.logits(ids)[at:]
    state = engine.new_state()
    _continue(engine, state, ids[:at])
    snap = state.snapshot()
    saved = {k: v.clone() for k, v in state.tensors().items()}
    assert (
        state.live_nbytes() == sum(t.nbytes for t in saved.values()) and state.nbytes() >= state.live_nbytes()
    )
    assert_same(engine, _continue(engine, state, ids[at:]), want)  # uninterrupted
    state.restore(snap)  # back to `at`, and the snapshot is still intact afterwards
    assert_same(engine, _continue(engine, state, ids[at:]), want)
    state.restore(snap)
    assert_same(engine, _continue(engine, state, ids[at:]), want)
    fresh = engine.new_state()
    fresh.load_tensors(saved)
    assert fresh.pos == at
    assert_same(engine, _continue(engine, fresh, ids[at:]), want)


@pytest.mark.parametrize(
    "at,fed,back", [(30, 6, 6), (30, 6, 2), (14, 3, 3), (31, 2, 1), (7, 8, 8), (60, 5, 4)]
)
def test_rollback_forgets_tokens_exactly(engine, at, fed, back):
    """Feed `fed` wrong tokens after `at`, forget `back` of them, continue: as if never fed."""
    ids = token_ids(90, engine.config.vocab_size, seed=at + fed)
    wrong = token_ids(fed, engine.config.vocab_size, seed=99)
    keep = fed - back
    seq = ids[:at] + wrong[:keep] + ids[at:]
    want = engine.logits(seq)[at + keep :]
    state = engine.new_state()
    _continue(engine, state, ids[:at])
    _continue(engine, state, wrong)
    state.rollback(back)
    assert state.pos == at + keep
    assert_same(engine, _continue(engine, state, ids[at:]), want)


def test_rollback_beyond_its_room_is_refused(engine):
    state = engine.new_state()
    _continue(engine, state, token_ids(20, engine.config.vocab_size))
    with pytest.raises(ValueError, match="cannot roll back 9"):
        state.rollback(9)
    state.rollback(8)
    with pytest.raises(ValueError, match="cannot roll back 1"):
        state.rollback(1)


def test_a_step_that_raises_leaves_the_state_unchanged(engine, monkeypatch):
    ids = token_ids(70, engine.config.vocab_size, seed=4)
    want = engine.logits(ids)[40:]
    state = engine.new_state()
    _continue(engine, state, ids[:40])
    layer = engine.model.layers[-1]
    boom = RuntimeError("injected")

    def fail(*a, **k):
        raise boom

    monkeypatch.setattr(layer.ffn, "forward", fail)
    with pytest.raises(RuntimeError, match="injected"):
        _continue(
            engine, state, token_ids(30, engine.config.vocab_size, seed=8)
        )  # writes every earlier layer
    monkeypatch.undo()
    assert state.pos == 40
    assert_same(engine, _continue(engine, state, ids[40:]), want)


def test_loading_mismatched_state_tensors_is_a_clear_error(engine, tiny_ckpt):
    state = engine.new_state()
    _continue(engine, state, token_ids(20, engine.config.vocab_size))
    saved = state.tensors()
    bad = dict(saved)
    name = next(k for k in bad if k.endswith("window"))
    bad[name] = bad[name][:, :-1]
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        engine.new_state().load_tensors(bad)
    other = dsv4.load(tiny_ckpt("flash").path, dtype=torch.float32)
    with pytest.raises(ValueError, match="expected"):
        other.new_state().load_tensors(saved)


@pytest.mark.parametrize("at,back", [(17, 1), (16, 3), (33, 8), (8, 8), (63, 2), (150, 5)])
def test_saved_tensors_keep_the_rollback_room(engine, at, back):
    """A state loaded from `tensors()` can still forget its last tokens (a prefix cache restores a
    prompt's snapshot and rolls back to where a new prompt diverges)."""
    ids = token_ids(
        at + 20, engine.config.vocab_size, seed=at + back
    )  # 150: more entries than a fresh buffer
    want = engine.logits(ids)[at - back :]
    state = engine.new_state()
    _continue(engine, state, ids[:at])
    saved = state.tensors()
    assert int(saved["room"]) == min(at, state.max_rollback)
    fresh = engine.new_state()
    fresh.load_tensors(saved)
    fresh.rollback(back)
    assert fresh.pos == at - back
    assert_same(engine, _continue(engine, fresh, ids[at - back :]), want)
    bad = {**saved, "room": torch.tensor(at + 1)}
    with pytest.raises(ValueError, match="room"):
        engine.new_state().load_tensors(bad)
