"""Speculative decoding through the server, with the official `openai` client: concurrent greedy requests
verify DSpark blocks inside the shared batch and answer exactly what plain decoding answers; /metrics
reports acceptance; an MTP checkpoint decodes plainly and says why; the 0731 chat format's levels."""

import threading

import httpx
import pytest
import torch
from conftest import token_ids

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
release_writer = pytest.importorskip("release_writer")

from test_server import LiveServer  # noqa: E402

import dsv4  # noqa: E402
from dsv4.dspark import Proposal  # noqa: E402
from dsv4.generate import Scheduler  # noqa: E402
from dsv4.sampling import SamplingParams  # noqa: E402
from dsv4.server.app import create_app  # noqa: E402

MODEL = "tiny-v4"
PROMPTS = [token_ids(n, 20000, seed=s) for n, s in ((3, 1), (20, 2), (33, 3), (9, 4))]
GREEDY = {"max_tokens": 14, "temperature": 0, "extra_body": {"ignore_eos": True}}


def oracle(engine, wrong_at: list[int]):
    """A DSpark stand-in that proposes the target's own greedy continuation (computed on the state, then
    restored) with one token wrong at a block index cycling through `wrong_at` (B: all right)."""
    rounds = []

    def draft(state, anchor, pick):
        snap, toks, tok = state.snapshot(), [], anchor
        for _ in range(engine.model.dspark.block_size):
            tok = int(engine.step([[tok]], [state])[0][-1].argmax())
            toks.append(tok)
        state.restore(snap)
        bad = wrong_at[len(rounds) % len(wrong_at)]
        rounds.append(bad)
        toks = [t if i != bad else (t + 1) % engine.config.vocab_size for i, t in enumerate(toks)]
        return Proposal(toks, torch.zeros(len(toks), engine.config.vocab_size), torch.ones(len(toks)))

    return draft


def complete_all(url: str, prompts: list[list[int]], **extra) -> list[str]:
    """Each prompt in its own thread at once, so that the worker batches them."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="none")
    out = [None] * len(prompts)

    def one(i):
        r = client.completions.create(model=MODEL, prompt=prompts[i], **{**GREEDY, **extra})
        out[i] = r.choices[0].text

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


def metrics(url: str) -> dict[str, float]:
    lines = httpx.get(url + "/metrics").text.splitlines()
    return {k: float(v) for k, v in (ln.rsplit(" ", 1) for ln in lines if ln and not ln.startswith("#"))}


@pytest.fixture(scope="module")
def dspark(tmp_path_factory):
    path = tmp_path_factory.mktemp("server_0731")
    # the official vocabulary, so that the server detokenizes the answers
    release_writer.write_release(
        path, release_writer.dspark_config(sliding_window=16, vocab_size=129280), seed=3
    )
    engine = dsv4.load(path, dtype=torch.float32)
    server = LiveServer(create_app(engine, model_name=MODEL, max_context=256, speculative=True))
    yield engine, server
    server.stop()


def test_batched_dspark_greedy_equals_plain(dspark, monkeypatch):
    engine, server = dspark
    plain = complete_all(server.url, PROMPTS, extra_body={"ignore_eos": True, "speculative": False})
    want = [
        engine.tokenizer.decode(engine.generate(p, max_tokens=14, temperature=0.0, ignore_eos=True))
        for p in PROMPTS
    ]
    assert plain == want
    assert "dsv4_engine_speculative_draft_rounds" not in metrics(server.url)

    # random draft weights: (almost) nothing is accepted, every round corrects
    assert complete_all(server.url, PROMPTS) == want
    # a draft that is right up to a varying index: partial blocks, full blocks with a bonus token
    sizes = []
    real = Scheduler._draft

    def spy(self, plan, room):
        blocks = real(self, plan, room)
        sizes.append(len(blocks))
        return blocks

    monkeypatch.setattr(Scheduler, "_draft", spy)
    monkeypatch.setattr(engine.model, "dspark_draft", oracle(engine, [5, 0, 3, 1, 4, 2]))
    assert complete_all(server.url, PROMPTS) == want
    assert max(sizes) > 1  # several sequences verified their blocks in one forward pass
    m = metrics(server.url)
    assert m["dsv4_engine_speculative_mean_accepted_length"] > 1.5
    assert 0 < m["dsv4_engine_speculative_acceptance_rate"] < 1
    assert engine.stats()["speculative"]["rounds"] == m["dsv4_engine_speculative_rounds"]
    assert not any(k.startswith("dsv4_speculative_fallback_total") for k in m)


def test_chat_stream_with_speculation(dspark, monkeypatch):
    engine, server = dspark
    monkeypatch.setattr(engine.model, "dspark_draft", oracle(engine, [2, 5]))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    ids = PROMPTS[1]
    stream = client.completions.create(model=MODEL, prompt=ids, stream=True, **GREEDY)
    text = "".join(c.choices[0].text for c in stream if c.choices)
    assert text == engine.tokenizer.decode(
        engine.generate(ids, max_tokens=14, temperature=0.0, ignore_eos=True)
    )


def test_mtp_checkpoint_decodes_plainly_and_says_why(tiny_ckpt):
    engine = dsv4.load(tiny_ckpt("flash").path, dtype=torch.float32)
    server = LiveServer(create_app(engine, model_name=MODEL, max_context=256, speculative=True))
    try:
        prompts = [token_ids(n, engine.config.vocab_size, seed=n) for n in (4, 17)]
        want = [
            engine.tokenizer.decode(engine.generate(p, max_tokens=14, temperature=0.0, ignore_eos=True))
            for p in prompts
        ]
        assert complete_all(server.url, prompts) == want
        assert metrics(server.url)['dsv4_speculative_fallback_total{reason="mtp"}'] >= 2 * 13
    finally:
        server.stop()


def test_0731_reasoning_effort_levels_through_the_server(tiny_ckpt):
    """A checkpoint forced to the 0731 format: "max" is the new, longer text; a level 0731 lacks is a 400."""
    engine = dsv4.load(tiny_ckpt("vocab").path, dtype=torch.float32)
    engine.chat_format = "0731"
    server = LiveServer(create_app(engine, model_name=MODEL, max_context=512))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
        hello = [{"role": "user", "content": "Hello"}]
        used = {e: client.chat.completions.create(model=MODEL, messages=hello, max_tokens=1, reasoning_effort=e)
                .usage.prompt_tokens for e in ("low", "high", "max")}  # fmt: skip
        assert used["high"] - used["low"] == 79 and used["max"] - used["low"] == 92
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(
                model=MODEL, messages=hello, max_tokens=1, reasoning_effort="medium"
            )
        assert err.value.body["param"] == "reasoning_effort" and "0731 chat format has low, high, max" in str(
            err.value
        )
    finally:
        server.stop()


def test_scheduler_chunks_prompts_and_budgets_blocks(dspark, monkeypatch):
    """A step budget of 9 tokens: prompts prefill in chunks beside other sequences' blocks, and a decoder
    whose block does not fit decodes plainly that step ("budget"); the answers stay plain greedy, and the
    blocks go round the decoders."""
    engine, _ = dspark
    monkeypatch.setattr(engine.model, "dspark_draft", oracle(engine, [5, 1, 3]))
    params = SamplingParams.of(max_tokens=24, temperature=0.0, ignore_eos=True)
    sched = Scheduler(engine, max_step_tokens=9)
    seqs = [engine.sequence(p, params, speculative=True) for p in PROMPTS]
    for s in seqs:
        sched.add(s)
    for _ in sched.run():
        pass
    assert [s.output for s in seqs] == [
        engine.generate(p, max_tokens=24, temperature=0.0, ignore_eos=True) for p in PROMPTS
    ]
    assert sched.fallbacks["budget"] > 0 and all(s.stats.draft_rounds > 0 for s in seqs)
