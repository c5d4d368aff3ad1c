"""Generation on tiny checkpoints: greedy = argmax chain, seeds, stops, batching, sessions, MTP."""

import pytest
import torch
from conftest import token_ids

import dsv4
from dsv4.sampling import Sampler, SamplingParams
from dsv4.session import ChatSession
from dsv4.speculative import residual


@pytest.fixture(scope="module")
def flash(tiny_ckpt):
    return dsv4.load(tiny_ckpt("flash").path, dtype=torch.float32)


@pytest.fixture(scope="module")
def vocab(tiny_ckpt):
    return dsv4.load(tiny_ckpt("vocab").path, dtype=torch.float32)


def test_greedy_is_the_argmax_chain(flash):
    prompt = token_ids(20, flash.config.vocab_size)
    out = flash.generate(prompt, max_tokens=12, temperature=0.0)
    chain = list(prompt)
    for _ in range(12):
        chain.append(int(flash.logits(chain)[-1].argmax()))
    assert out == chain[len(prompt) :]


def test_seed_reproduces(flash):
    prompt = token_ids(10, flash.config.vocab_size)
    a = flash.generate(prompt, max_tokens=15, temperature=1.0, seed=7)
    b = flash.generate(prompt, max_tokens=15, temperature=1.0, seed=7)
    c = flash.generate(prompt, max_tokens=15, temperature=1.0, seed=8)
    assert a == b and a != c


def test_max_tokens_and_stop_ids(flash):
    prompt = token_ids(10, flash.config.vocab_size, seed=2)
    r = flash.complete(prompt, max_tokens=9, temperature=0.0)
    assert len(r.token_ids) == 9 and r.finish_reason == "length"
    stop_at = r.token_ids[4]
    first = r.token_ids.index(stop_at)
    s = flash.complete(prompt, max_tokens=9, temperature=0.0, stop_token_ids=[stop_at])
    assert s.token_ids == r.token_ids[:first] and s.finish_reason == "stop"
    assert s.stats.prompt_tokens == 10 and s.stats.generated_tokens == first


def test_batch_equals_single(flash):
    prompts = [token_ids(n, flash.config.vocab_size, seed=n) for n in (3, 40, 17)]
    batch = flash.generate(prompts, max_tokens=8, temperature=0.0)
    assert batch == [flash.generate(p, max_tokens=8, temperature=0.0) for p in prompts]


def test_stop_strings_and_streaming(vocab):
    full = vocab.complete("Hello", max_tokens=40, temperature=0.0)
    text = full.text
    assert len(text) > 12
    stop = text[8:11]
    cut = text.index(stop)
    gen = vocab.stream("Hello", max_tokens=40, temperature=0.0, stop=[stop])
    events = list(gen)
    deltas = [e.text for e in events]
    r = gen.result()
    assert r.finish_reason == "stop" and r.text == text[:cut]
    assert "".join(deltas) == text[:cut]
    assert events[-1].finish_reason == "stop"


def test_logprobs_match_the_model(flash):
    prompt = token_ids(12, flash.config.vocab_size)
    r = flash.complete(prompt, max_tokens=3, temperature=0.0, logprobs=3)
    lp = torch.log_softmax(flash.logits(prompt + r.token_ids[:1])[-1], -1)
    second = r.logprobs[1]
    assert second.token_id == r.token_ids[1]
    assert abs(second.logprob - float(lp[second.token_id])) < 1e-4
    assert [t for t, _ in second.top] == lp.topk(3).indices.tolist()


def _fed_tokens(engine, monkeypatch) -> list[int]:
    """Counts the tokens every engine.step call feeds (appended to the returned list)."""
    fed, step = [], engine.step

    def counting(seqs, states, *args, **kwargs):
        fed.append(sum(map(len, seqs)))
        return step(seqs, states, *args, **kwargs)

    monkeypatch.setattr(engine, "step", counting)
    return fed


def test_session_continues_from_cache(vocab, monkeypatch):
    session = ChatSession(vocab, system="You are terse.")
    list(session.send("Hi there", max_tokens=6, temperature=0.0))
    first = vocab.encode(session.messages[:2])  # the first turn's prompt
    fed = _fed_tokens(vocab, monkeypatch)
    list(session.send("And again?", max_tokens=6, temperature=0.0))
    second = session.last_result
    prompt = vocab.encode(session.messages[:-1])
    # the first turn was not recomputed: at least its prompt (but the last token) came from the state,
    # and only the rest of the prompt and the decoded tokens (all but the last) were fed
    assert second.stats.reused_tokens >= len(first) - 1
    assert sum(fed) == len(prompt) - second.stats.reused_tokens + len(second.token_ids) - 1
    # from scratch: the same conversation rendered and generated in a fresh state
    fresh = vocab.complete(session.messages[:-1], max_tokens=6, temperature=0.0)
    assert fresh.token_ids == second.token_ids


@pytest.mark.parametrize("max_tokens", [6, 12])
def test_session_reuses_up_to_where_the_rendering_diverges(vocab, max_tokens):
    """A history whose last reply renders to other ids than the state holds (here: edited) reuses the
    state up to the divergence: rolled back when that is within its rollback room (6 tokens generated),
    else from the snapshot at the end of the previous prompt (12)."""
    session = ChatSession(vocab)
    list(session.send("Hi there", max_tokens=max_tokens, temperature=0.0))
    first = vocab.encode(session.messages[:1])
    assert session.state.pos == len(first) + max_tokens - 1
    session.messages[-1]["content"] = "Something else entirely."
    list(session.send("And again?", max_tokens=4, temperature=0.0))
    prompt = vocab.encode(session.messages[:-1])
    common = next(i for i, (a, b) in enumerate(zip(first + [-1], prompt, strict=False)) if a != b)
    assert common >= len(first) - 1  # the reply's first token at the latest
    within_room = len(first) + max_tokens - 1 - common <= session.state.max_rollback
    assert session.last_result.stats.reused_tokens == (common if within_room else len(first) - 1)
    fresh = vocab.complete(session.messages[:-1], max_tokens=4, temperature=0.0)
    assert fresh.token_ids == session.last_result.token_ids


def test_mtp_greedy_equals_plain_greedy(flash):
    for seed in (1, 2, 3):
        prompt = token_ids(30, flash.config.vocab_size, seed=seed)
        plain = flash.generate(prompt, max_tokens=20, temperature=0.0)
        r = flash.complete(prompt, max_tokens=20, temperature=0.0, speculative=True)
        assert r.token_ids == plain
        assert r.stats.draft_tokens > 0 and 0.0 <= r.stats.acceptance_rate <= 1.0


def test_mtp_sampling_runs_and_reports(flash):
    prompt = token_ids(30, flash.config.vocab_size, seed=4)
    r = flash.complete(prompt, max_tokens=20, temperature=1.0, seed=1, speculative=True)
    assert len(r.token_ids) == 20 and r.stats.acceptance_rate is not None


def test_speculative_rejection_sampling_keeps_the_target_distribution():
    """P(out = x) = q(x) min(1, p/q) + P(reject) * residual(x) equals p(x) exactly."""
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        p = torch.softmax(torch.randn(50, generator=g) * 2, 0)
        q = torch.softmax(torch.randn(50, generator=g) * 2, 0)
        accept = q * torch.minimum(torch.ones(50), p / q)
        out = accept + (1 - accept.sum()) * residual(p, q)
        assert torch.allclose(out, p, atol=1e-6)


def test_sampler_truncation_and_penalties():
    logits = torch.tensor([1.0, 3.0, 2.0, -1.0, 0.5])
    assert Sampler(SamplingParams(top_k=1), [], 5).sample(logits) == 1
    probs = Sampler(SamplingParams(top_p=0.5), [], 5).probs(logits)
    assert probs[1] == 1.0  # the top token alone holds over half the mass
    probs = Sampler(SamplingParams(top_k=2), [], 5).probs(logits)
    assert (probs > 0).sum() == 2
    probs = Sampler(SamplingParams(min_p=0.3), [], 5).probs(logits)
    assert set((probs > 0).nonzero().flatten().tolist()) == {1, 2}
    s = Sampler(SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25), [1], 5)
    s.accept(3)
    s.accept(3)
    adj = s.adjust(logits)
    assert adj[1] == 1.5  # seen in the prompt, positive: divided
    assert adj[3] == pytest.approx(-1.0 * 2 - 0.5 - 0.5)  # seen twice in the output: all three penalties
    # greedy follows the penalties too: token 1 (3.0, seen) falls to 1.5, below token 2 (2.0)
    greedy = Sampler(SamplingParams(temperature=0.0, repetition_penalty=2.0), [1], 5)
    assert greedy.sample(logits) == 2
    assert Sampler(SamplingParams(temperature=0.0), [1], 5).sample(logits) == 1  # no penalty: the raw argmax
    plain = Sampler(SamplingParams(temperature=0.0), [1], 5)
    plain.accept(1)
    assert plain.adjust(logits).equal(logits) and plain.adjust(logits) is not logits


@pytest.mark.parametrize(
    "bad", [{"temperature": -1}, {"top_p": 0}, {"max_tokens": 0}, {"top_k": -2}, {"logprobs": 99}, {"stop": [""]}]
)
def test_bad_sampling_params(bad):
    with pytest.raises(ValueError):
        SamplingParams.of(**bad)


def test_unknown_sampling_param():
    with pytest.raises(ValueError, match="unknown sampling parameter"):
        SamplingParams.of(temprature=1.0)
