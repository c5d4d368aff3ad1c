"""The server's prefix cache through the `openai` client: answers at temperature 0 equal those of a server
without it, a shared prefix is reported as cached tokens and only the suffix is prefilled, and a
restarted server with the same --prompt-cache folder reuses the first one's snapshots."""

from pathlib import Path

import httpx
import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
from test_server import LiveServer, samples  # noqa: E402

import dsv4  # noqa: E402
from dsv4.prefix_cache import for_engine  # noqa: E402
from dsv4.server.app import create_app  # noqa: E402

MODEL = "tiny-v4"
SYSTEM = "You are a careful assistant. " * 12 + "Tools follow."


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    return dsv4.load(tiny_ckpt("vocab").path, dtype=torch.float32)


def _serve(engine, cache):
    srv = LiveServer(create_app(engine, model_name=MODEL, max_context=512, prefix_cache=cache))
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    return srv, client


def _count_fed(engine, monkeypatch):
    fed = []
    step = engine.step

    def counting(seqs, states, all_logits=False):
        fed.append(sum(len(s) for s in seqs))
        return step(seqs, states, all_logits)

    monkeypatch.setattr(engine, "step", counting)
    return fed


def _turns(client, n=1):
    """Two turns of one conversation; the second resends the first's prompt and reply."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello there"}]
    first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0, n=n)
    messages += [{"role": "assistant", "content": first.choices[0].message.content or ""},
                 {"role": "user", "content": "And then?"}]  # fmt: skip
    second = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0, n=n)
    return first, second


def test_answers_equal_without_cache_and_a_restarted_server_reuses_the_store(engine, tmp_path):
    plain, client = _serve(engine, None)
    try:
        want = _turns(client, n=2)
    finally:
        plain.stop()
    cache = for_engine(engine, disk_dir=tmp_path, ram="64M", every=32)
    srv, client = _serve(engine, cache)
    try:
        first, second = _turns(client, n=2)
        assert [c.message.content for c in first.choices] == [c.message.content for c in want[0].choices]
        assert [c.message.content for c in second.choices] == [c.message.content for c in want[1].choices]
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        cached = second.usage.prompt_tokens_details.cached_tokens
        assert cached >= first.usage.prompt_tokens - 8  # at least the first prompt, up to its rollback room
        assert cache.summary()["hits"] == 2 and cache.summary()["tokens_saved"] == 2 * cached
    finally:
        srv.stop()
    cache.flush()
    # a restarted server: empty RAM, the same folder
    again = for_engine(engine, disk_dir=tmp_path, ram="64M", every=32)
    srv, client = _serve(engine, again)
    try:
        _, second2 = _turns(client)
        assert second2.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 8
        assert second2.choices[0].message.content == want[1].choices[0].message.content
        m = samples(httpx.get(srv.url + "/metrics").text)
        assert m["dsv4_prefix_cache_hits_total"] == 2 and m['dsv4_prefix_cache_bytes{tier="disk"}'] > 0
    finally:
        srv.stop()


def test_second_request_prefills_only_the_suffix(engine, monkeypatch):
    cache = for_engine(engine, ram="64M", every=32)
    srv, client = _serve(engine, cache)
    fed = _count_fed(engine, monkeypatch)
    try:
        long = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "one"}]
        a = client.chat.completions.create(model=MODEL, messages=long, max_tokens=1, temperature=0)
        before = sum(fed)
        assert before == a.usage.prompt_tokens  # max_tokens 1: only the prompt was fed
        long[1]["content"] = "two, a different question"
        b = client.chat.completions.create(model=MODEL, messages=long, max_tokens=1, temperature=0)
        cached = b.usage.prompt_tokens_details.cached_tokens
        assert cached > 32 and sum(fed) - before == b.usage.prompt_tokens - cached
    finally:
        srv.stop()


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


TOOLS = [{"type": "function", "function": {"name": "read_file", "description": "Read a file.", "parameters": {
    "type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}}]  # fmt: skip


def _agent(client, thinking: bool) -> list:
    """Three turns: a tool call and its result (tools on), or user turns in thinking mode, whose rendering
    drops the earlier turns' reasoning; returns each turn's (messages sent, response)."""
    extra = {"extra_body": {"thinking": {"type": "enabled"}}} if thinking else {"tools": TOOLS}
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Look at main.py"}]
    out = []
    for i in range(3):
        r = client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=6, temperature=0, **extra
        )
        out.append(([dict(m) for m in messages], r))
        if thinking:
            messages += [{"role": "assistant", "content": f"Answer {i}.", "reasoning_content": f"Thought {i}."},
                         {"role": "user", "content": f"And step {i + 1}?"}]  # fmt: skip
        else:
            call = {"id": f"c{i}", "type": "function",
                    "function": {"name": "read_file", "arguments": f'{{"path": "f{i}.py"}}'}}  # fmt: skip
            messages += [{"role": "assistant", "content": "", "tool_calls": [call]},
                         {"role": "tool", "tool_call_id": f"c{i}", "content": f"print({i})"}]  # fmt: skip
    return out


@pytest.mark.parametrize("thinking", [False, True], ids=["tool calls", "thinking"])
def test_agent_turns_reuse_up_to_where_the_prompts_diverge(engine, thinking):
    plain, client = _serve(engine, None)
    try:
        want = [r.choices[0].message for _, r in _agent(client, thinking)]
    finally:
        plain.stop()
    srv, client = _serve(engine, for_engine(engine, ram="64M", every=32))
    try:
        turns = _agent(client, thinking)
    finally:
        srv.stop()
    mode = "thinking" if thinking else "chat"
    ids = [engine.encode(m, thinking_mode=mode, tools=None if thinking else TOOLS) for m, _ in turns]
    for i, (_, r) in enumerate(turns):
        got = r.choices[0].message
        assert (got.content, got.tool_calls) == (want[i].content, want[i].tool_calls)
        assert r.usage.prompt_tokens == len(ids[i])
        cached = r.usage.prompt_tokens_details.cached_tokens
        if i == 0:
            assert cached == 0
            continue
        # the previous prompt's snapshot (with its rollback room) serves every token both prompts share
        # (thinking mode: all but the previous prompt's last token, `<think>`, rendered `</think>` now)
        common = _common(ids[i], ids[i - 1])
        assert common >= len(ids[i - 1]) - (1 if thinking else 0)
        assert cached >= common


def test_concurrent_requests_with_n_answer_as_without_the_cache(engine):
    """Continuous batching: requests sharing the system prompt arrive together (n=2 each), then again."""
    import concurrent.futures

    def wave(client, tag):
        def one(i):
            msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Question {i} {tag}"}]
            return client.chat.completions.create(
                model=MODEL, messages=msgs, max_tokens=5, temperature=0, n=2
            )

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            return list(pool.map(one, range(4)))

    def answers(rs):
        return [[c.message.content for c in r.choices] for r in rs]

    plain, client = _serve(engine, None)
    try:
        want = [answers(wave(client, t)) for t in ("a", "b")]
    finally:
        plain.stop()
    cache = for_engine(engine, ram="64M", every=32)
    srv, client = _serve(engine, cache)
    try:
        first, second = wave(client, "a"), wave(client, "b")
    finally:
        srv.stop()
    assert [answers(first), answers(second)] == want
    shared = len(engine.encode([{"role": "system", "content": SYSTEM}])) // 32 * 32
    assert all(r.usage.prompt_tokens_details.cached_tokens >= shared > 0 for r in second)


def test_a_terminated_server_finishes_writing_its_snapshots(tiny_ckpt, tmp_path):
    """SIGTERM (what service managers send): the server shuts down through its cleanup, which waits for
    the prefix cache's queued writes, instead of dying when uvicorn re-raises the signal."""
    import signal
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from bench_server import start_server

    proc, url = start_server(
        tiny_ckpt("vocab").path, "fp32", 4, ["--prompt-cache", str(tmp_path)], wait_s=300
    )
    try:
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        assert httpx.post(url + "/v1/chat/completions", json=body, timeout=120).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    assert code == 128 + signal.SIGTERM  # left through `finally`, not killed by the signal
    assert list(tmp_path.glob("*/*.safetensors"))
