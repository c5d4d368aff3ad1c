"""The DSpark draft and DSpark speculative decoding on tiny 0731-layout checkpoints."""

import pytest
import torch
from conftest import token_ids

import dsv4
from dsv4.dspark import Proposal
from dsv4.speculative import accept_probability, residual

release_writer = pytest.importorskip("release_writer")  # the 0731-layout writer (tests/release_writer.py)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = tmp_path_factory.mktemp("dspark_0731")
    # a window of 16 so that prompts of a few dozen tokens wrap the draft's context rings
    release_writer.write_release(path, release_writer.dspark_config(sliding_window=16), seed=3)
    return dsv4.load(path, dtype=torch.float32)


def _oracle(engine, prompt, plain, wrong_at):
    """A draft that proposes the true greedy continuation, except at block index wrong_at[round]."""
    rounds = []

    def draft(state, anchor, pick):
        k = state.pos - len(prompt) + 1  # index in `plain` of the token after the anchor
        want = (plain + [0] * 8)[k : k + engine.model.dspark.block_size]
        bad = wrong_at[len(rounds) % len(wrong_at)]
        tokens = [t if i != bad else (t + 1) % engine.config.vocab_size for i, t in enumerate(want)]
        rounds.append(min(bad, len(tokens)))
        return Proposal(tokens, torch.zeros(len(tokens), engine.config.vocab_size), torch.ones(len(tokens)))

    return draft, rounds


def test_greedy_equals_plain_greedy(engine):
    vocab = engine.config.vocab_size
    for n, seed in ((1, 1), (30, 3)):
        prompt = token_ids(n, vocab, seed=seed)
        plain = engine.generate(prompt, max_tokens=12, temperature=0.0, ignore_eos=True)
        r = engine.complete(prompt, max_tokens=12, temperature=0.0, ignore_eos=True, speculative=True)
        assert r.token_ids == plain
        assert r.stats.draft_rounds > 0 and r.stats.draft_tokens == 5 * r.stats.draft_rounds


def test_accepted_drafts_are_kept_and_the_state_forgets_the_rest(engine, monkeypatch):
    """A draft right up to a chosen index: the output is still plain greedy, exactly the right drafts
    are accepted, and the final state (target layers and draft rings) equals a fresh prefill of the
    committed tokens, as if the rejected tokens had never been fed."""
    vocab = engine.config.vocab_size
    prompt = token_ids(21, vocab, seed=11)
    plain = engine.generate(prompt, max_tokens=24, temperature=0.0, ignore_eos=True)
    draft, rounds = _oracle(engine, prompt, plain, wrong_at=[5, 0, 3, 1, 5, 4, 2])
    monkeypatch.setattr(engine.model, "dspark_draft", draft)
    gen = engine.stream(prompt, max_tokens=24, temperature=0.0, ignore_eos=True, speculative=True)
    for _ in gen:
        pass
    r = gen.result()
    assert r.token_ids == plain
    assert sum(rounds[:-1]) <= r.stats.accepted_tokens <= sum(rounds)  # the last round may end it early
    assert r.stats.mean_accepted_length > 2
    state = gen.sequence.state
    committed = (prompt + r.token_ids)[: state.pos]
    assert state.pos == len(prompt) + len(r.token_ids) - 1  # the last token is sampled, not yet fed
    _, fresh = engine.prefill(committed)
    got, want = state.tensors(), fresh.tensors()
    assert set(got) == set(want) and any(k.startswith("mtp.2.") for k in got)
    for k in set(want) - {"room"}:  # how far each may still roll back differs, not what they hold
        a, b = got[k].float(), want[k].float()
        n = min(a.shape[0], b.shape[0]) if a.dim() else None  # rows end at pos; rollback room adds older ones
        if n is not None:
            a, b = a[a.shape[0] - n :], b[b.shape[0] - n :]
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), k
        assert not (k.startswith("mtp.") and n == 0), k  # the draft's rings hold the committed positions


def test_chunked_prefill_fills_the_rings_like_one_prefill(engine):
    ids = token_ids(30, engine.config.vocab_size, seed=5)
    whole = engine.draft_logits(ids)
    for chunk in (3, 16):
        state = engine.new_state()
        for i in range(0, len(ids), chunk):
            last = engine.step([ids[i : i + chunk]], [state])[0][-1]
        prop = engine.model.dspark_draft(state, int(last.argmax()), lambda row: int(row.argmax()))
        assert torch.allclose(prop.logits, whole, atol=1e-4, rtol=1e-4), chunk


def test_draft_api(engine):
    ids = token_ids(12, engine.config.vocab_size, seed=6)
    logits = engine.draft_logits(ids)
    assert logits.shape == (5, engine.config.vocab_size) and logits.dtype == torch.float32
    assert engine.draft_tokens(ids) == logits.argmax(-1).tolist()
    # the Markov correction chains along the block: row i depends on d_{i-1}
    _, state = engine.prefill(ids)
    anchor = int(engine.logits(ids)[-1].argmax())
    first = engine.model.dspark_draft(state, anchor, lambda row: int(row.argmax()))
    other = engine.model.dspark_draft(state, anchor, lambda row: (int(row.argmax()) + 1) % 320)
    assert torch.equal(first.logits[0], other.logits[0]) and not torch.allclose(
        first.logits[1], other.logits[1]
    )
    assert ((first.confidence > 0) & (first.confidence < 1)).all()


def test_block_attention_is_not_causal(engine, monkeypatch):
    """Row 0 (the anchor) sees the noise tokens after it: changing them changes row 0."""
    ids = token_ids(10, engine.config.vocab_size, seed=8)
    before = engine.draft_logits(ids)
    monkeypatch.setattr(engine.model.dspark, "noise", 17)
    after = engine.draft_logits(ids)
    assert not torch.allclose(before[0], after[0])


def test_acceptance_math_reproduces_the_target_distribution(engine):
    """Each block position: P(out = x) = q(x) min(1, p(x)/q(x)) + P(reject) residual(x) = p(x), with q the
    draft's own (Markov-corrected, tempered) rows and p the target's at the same positions."""
    from dsv4.sampling import Sampler, SamplingParams

    ids = token_ids(14, engine.config.vocab_size, seed=9)
    sampler = Sampler(SamplingParams(temperature=0.8), ids, engine.config.vocab_size)
    drafts = engine.draft_tokens(ids)
    anchor = int(engine.logits(ids)[-1].argmax())
    target = engine.logits(ids + [anchor] + drafts)[len(ids) :]
    for i, row in enumerate(engine.draft_logits(ids)):
        p, q = sampler.probs(target[i]), sampler.probs(row)
        accept = torch.tensor([q[x] * accept_probability(p, q, x) for x in range(len(q))])
        out = accept + (1 - accept.sum()) * residual(p, q)
        assert torch.allclose(out, p, atol=1e-6)


def test_sampling_runs_and_reports(engine):
    prompt = token_ids(20, engine.config.vocab_size, seed=4)
    r = engine.complete(prompt, max_tokens=10, temperature=1.0, seed=1, ignore_eos=True, speculative=True)
    assert len(r.token_ids) == 10 and r.stats.acceptance_rate is not None
    spec = engine.stats()["speculative"]
    assert spec["rounds"] >= r.stats.draft_rounds and 1.0 <= spec["mean_accepted_length"] <= 6.0


def test_no_draft_is_a_clear_error(tiny_ckpt):
    e = dsv4.load(tiny_ckpt("flash").path, dtype=torch.float32)
    with pytest.raises(ValueError, match="no DSpark draft"):
        e.draft_logits([3, 4, 5])
