"""The HTTP server on a live port: the official `openai` client against it, answers equal to the engine's,
every bad input with its status, disconnects, a full queue, an engine failure, 16 concurrent streams.

The model is random (its text is gibberish), so tool calls and reasoning/content splitting are checked
on fixed completion texts through the response builders; everything else runs end to end.
"""

import json
import socket
import threading
import time

import httpx
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
import uvicorn  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

import dsv4  # noqa: E402
from dsv4.chat import parse_completion  # noqa: E402
from dsv4.server.app import create_app  # noqa: E402
from dsv4.server.metrics import engine_figures, rss_bytes  # noqa: E402
from dsv4.server.responses import ReplySplitter, chat_message, envelope, finish_reason  # noqa: E402

MODEL = "tiny-v4"
CONTEXT = 512
HELLO = [{"role": "user", "content": "Hello"}]
NO_LOGPROBS = openai.types.chat.chat_completion_chunk.ChoiceLogprobs(content=[])


class LiveServer:
    """A uvicorn server for `app` on a free 127.0.0.1 port, in a background thread."""

    def __init__(self, app):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.app = app
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                return
            time.sleep(0.05)
        raise RuntimeError("the test server did not start within 10 s")

    @property
    def worker(self):
        return self.app.state.server.worker

    def wait_idle(self, timeout: float = 30.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            w = self.worker
            if not w.scheduler.busy and w.in_flight == 0:
                return
            time.sleep(0.05)
        raise AssertionError(f"still busy: {self.worker.running} running, {self.worker.waiting} waiting")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    return dsv4.load(tiny_ckpt("vocab").path, dtype=torch.float32)


@pytest.fixture(scope="module")
def server(engine):
    srv = LiveServer(create_app(engine, model_name=MODEL, max_context=CONTEXT, max_running=16, max_queue=8,
                                max_body_bytes=64 << 10))  # fmt: skip
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def ref(engine, prompt, mode="chat", **params):
    """What the engine itself generates, split as the chat parser splits it."""
    r = engine.complete(prompt, thinking_mode=mode, temperature=0.0, **params)
    return r, parse_completion(r.text, thinking_mode=mode)


# ---------------------------------------------------------------------------- answers equal the engine's


def test_chat_matches_engine(client, engine):
    r, want = ref(engine, HELLO, max_tokens=8, logprobs=2)
    got = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=0,
                                         logprobs=True, top_logprobs=2)  # fmt: skip
    choice = got.choices[0]
    assert choice.message.content == want.content and choice.message.role == "assistant"
    assert choice.finish_reason == r.finish_reason
    assert (
        got.usage.completion_tokens == len(r.token_ids) and got.usage.prompt_tokens == r.stats.prompt_tokens
    )
    lps = choice.logprobs.content
    assert [bytes(e.bytes) for e in lps] == [engine.tokenizer.token_bytes(t) for t in r.token_ids]
    for e, lp in zip(lps, r.logprobs, strict=True):
        assert abs(e.logprob - lp.logprob) < 1e-3 and len(e.top_logprobs) == 2


def test_chat_stream_matches_engine(client, engine):
    r, want = ref(engine, HELLO, max_tokens=10)
    stream = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(r.token_ids)


def test_thinking_streams_reasoning(client, engine):
    r, want = ref(engine, HELLO, mode="thinking", max_tokens=8)
    plain = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=0,
                                           extra_body={"thinking": {"type": "enabled"}})  # fmt: skip
    assert plain.choices[0].message.reasoning_content == want.reasoning
    assert plain.choices[0].message.content == want.content
    stream = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=0, stream=True,
                                            extra_body={"chat_template_kwargs": {"thinking": True}})  # fmt: skip
    deltas = [c.choices[0].delta for c in stream if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == want.reasoning
    assert "".join(d.content or "" for d in deltas) == want.content
    assert plain.usage.prompt_tokens == len(engine.encode(HELLO, thinking_mode="thinking"))


def test_tools_reach_the_prompt(client, engine):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]  # fmt: skip
    got = client.chat.completions.create(
        model=MODEL, messages=HELLO, tools=tools, max_tokens=2, temperature=0
    )
    assert got.usage.prompt_tokens == len(engine.encode(HELLO, tools=tools))
    none = client.chat.completions.create(model=MODEL, messages=HELLO, tools=tools, tool_choice="none",
                                          max_tokens=2, temperature=0)  # fmt: skip
    assert none.usage.prompt_tokens == len(engine.encode(HELLO))
    named = client.chat.completions.create(model=MODEL, messages=HELLO, tools=tools, max_tokens=2, temperature=0,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})  # fmt: skip
    assert named.usage.prompt_tokens == got.usage.prompt_tokens


def test_completions_text_and_ids(client, engine):
    r = engine.complete("Once upon a time", max_tokens=6, temperature=0.0)
    got = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0)
    assert got.choices[0].text == r.text and got.usage.prompt_tokens == r.stats.prompt_tokens
    ids = engine.encode("Once upon a time")
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in by_ids if c.choices) == r.text
    two = client.completions.create(model=MODEL, prompt="Once", max_tokens=4, n=2, temperature=1, seed=5)
    assert [c.index for c in two.choices] == [0, 1] and two.usage.completion_tokens <= 8


def test_models_health_metrics(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["running"] == 0
    text = httpx.get(server.url + "/metrics").text
    for name in ("dsv4_requests_total{", "dsv4_prompt_tokens_total", "dsv4_generated_tokens_total",
                 "dsv4_generation_tokens_per_second", "dsv4_queue_depth", "dsv4_running_sequences",
                 "dsv4_process_resident_memory_bytes", "# TYPE dsv4_requests_total counter"):  # fmt: skip
        assert name in text, name
    assert 'route="/v1/chat/completions",status="200"' in text
    httpx.post(server.url + "/v1/completions", json={"model": "nope", "prompt": "x"})
    assert 'route="/v1/completions",status="404"' in httpx.get(server.url + "/metrics").text
    assert samples(text)["dsv4_generated_tokens_total"] > 0


def samples(text: str) -> dict[str, float]:
    """A /metrics page as {sample name with its labels: value}, read by prometheus_client's parser."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in s.labels.items())
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


def test_latency_and_length_histograms(engine, server):
    """A second app in the same process (its own registry beside `server`'s): one histogram entry per
    request, lengths that add up to the usage the client saw, times that fit in the time it waited."""
    fresh = LiveServer(create_app(engine, model_name=MODEL, max_context=CONTEXT))
    try:
        client = openai.OpenAI(base_url=fresh.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        t0 = time.monotonic()
        chat = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5, temperature=0,
                                              extra_body={"ignore_eos": True})  # fmt: skip
        chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=3, temperature=0,
                                                stream=True, stream_options={"include_usage": True},
                                                extra_body={"ignore_eos": True}))  # fmt: skip
        waited = time.monotonic() - t0
        reply = httpx.get(fresh.url + "/metrics")
        m = samples(reply.text)
    finally:
        fresh.stop()
    assert reply.headers["content-type"].startswith("text/plain")
    usage = [chat.usage, chunks[-1].usage]
    assert [u.completion_tokens for u in usage] == [5, 3]
    for name in ("time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds",
                 "request_prompt_tokens", "request_generation_tokens"):  # fmt: skip
        assert m[f"dsv4_{name}_count"] == 2 == m[f'dsv4_{name}_bucket{{le="+Inf"}}'], name
    assert m["dsv4_request_prompt_tokens_sum"] == sum(u.prompt_tokens for u in usage)
    assert m["dsv4_request_generation_tokens_sum"] == 8 == m["dsv4_generated_tokens_total"]
    buckets = {le: m[f'dsv4_request_generation_tokens_bucket{{le="{le}"}}'] for le in ("2.0", "5.0")}
    assert buckets == {"2.0": 0, "5.0": 2}
    ttft, e2e = m["dsv4_time_to_first_token_seconds_sum"], m["dsv4_e2e_request_latency_seconds_sum"]
    assert 0 < ttft < e2e < waited
    # each sequence's mean gap between tokens times its gaps (4 and 2) fits in its time after the first token
    assert 0 < m["dsv4_time_per_output_token_seconds_sum"] * 2 <= e2e - ttft + 1e-6
    assert m['dsv4_requests_total{route="/v1/chat/completions",status="200"}'] == 1
    assert m['dsv4_sequences_finished_total{reason="length"}'] == 2


def test_engine_stats_become_metrics():
    class WithStats:
        def stats(self):
            return {
                "rss_bytes": 5,
                "expert_cache": {"hits": 3, "misses": 1, "hit_rate": 0.75, "policy": "lfu"},
            }

    figures = engine_figures(WithStats())
    assert figures == {"dsv4_engine_rss_bytes": 5, "dsv4_engine_expert_cache_hits": 3,
                       "dsv4_engine_expert_cache_misses": 1, "dsv4_engine_expert_cache_hit_rate": 0.75}  # fmt: skip
    assert engine_figures(object()) == {}


# ---------------------------------------------------------------------------- bad input


BAD = [
    ("malformed json", b'{"model": "tiny-v4", "messages": [', 400, None),
    ("messages not a list", {"messages": "hi"}, 400, None),
    ("no messages", {"messages": []}, 400, None),
    ("bad role", {"messages": [{"role": "robot", "content": "x"}]}, 400, None),
    ("unknown model", {"model": "gpt-9"}, 404, "model_not_found"),
    (
        "prompt too long",
        {"messages": [{"role": "user", "content": "hello " * 700}]},
        400,
        "context_length_exceeded",
    ),
    ("too many tokens", {"max_tokens": 100000}, 400, "context_length_exceeded"),
    ("temperature", {"temperature": 500}, 400, None),
    ("top_p", {"top_p": 0}, 400, None),
    ("presence_penalty", {"presence_penalty": 3}, 400, None),
    ("min_p", {"min_p": 2}, 400, None),
    ("repetition_penalty tiny", {"repetition_penalty": 1e-300}, 400, None),
    ("temperature tiny is greedy", {"temperature": 1e-300}, 200, None),
    ("top_logprobs", {"logprobs": True, "top_logprobs": 99}, 400, None),
    ("top_logprobs alone", {"top_logprobs": 2}, 400, None),
    ("n", {"n": 0}, 400, None),
    ("stop", {"stop": [""]}, 400, None),
    ("max_tokens type", {"max_tokens": "many"}, 400, None),
    ("seed range", {"seed": 2**70}, 400, None),
    ("named tool missing", {"tool_choice": {"type": "function", "function": {"name": "nope"}}}, 400, None),
    ("thinking type", {"chat_template_kwargs": {"thinking": "yes"}}, 400, None),
    ("oversized body", {"messages": [{"role": "user", "content": "x" * (70 << 10)}]}, 413, None),
]


@pytest.mark.parametrize("name,body,status,code", BAD, ids=[b[0] for b in BAD])
def test_bad_chat_requests(server, name, body, status, code):
    if isinstance(body, dict):
        body = json.dumps({"model": MODEL, "messages": HELLO, "max_tokens": 2, **body}).encode()
    r = httpx.post(
        server.url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    assert r.status_code == status, r.text
    if status == 200:
        return
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code


def test_oversized_chunked_body(server):
    def body():  # no Content-Length: the limit applies to the bytes as they arrive
        yield b'{"model": "tiny-v4", "messages": [{"role": "user", "content": "'
        for _ in range(80):
            yield b"x" * 1024
        yield b'"}]}'

    r = httpx.post(
        server.url + "/v1/chat/completions", content=body(), headers={"content-type": "application/json"}
    )
    assert r.status_code == 413 and r.json()["error"]["message"]


@pytest.mark.parametrize("prompt", [[0, 10**9], [], [[0, 1], []], 5, "x" * 5000, None])
def test_bad_completion_requests(server, prompt):
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["message"]


def test_unknown_routes(server):
    assert httpx.get(server.url + "/v1/nothing").status_code == 404
    r = httpx.get(server.url + "/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_api_key(engine):
    srv = LiveServer(create_app(engine, model_name=MODEL, api_key="sekret", max_running=1, max_queue=0))
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).models.list()
        r = httpx.post(srv.url + "/v1/chat/completions", content=b"{not json")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="sekret", max_retries=0)
        assert good.models.list().data[0].id == MODEL
        assert httpx.get(srv.url + "/health").status_code == 200  # health needs no key
        # a full queue answers 429 instead of growing
        long = {"max_tokens": 200, "stream": True, "extra_body": {"ignore_eos": True}}
        with good.chat.completions.create(model=MODEL, messages=HELLO, **long) as stream:
            next(iter(stream))
            with pytest.raises(openai.RateLimitError):
                good.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
        srv.wait_idle()
    finally:
        srv.stop()


# ---------------------------------------------------------------------------- disconnects and failures


def test_disconnect_cancels(server):
    body = {"model": MODEL, "messages": HELLO, "max_tokens": CONTEXT - 10, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=body, timeout=1.0)
    server.wait_idle(10)
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**body, "stream": True}) as r:
        next(r.iter_lines())
    server.wait_idle(10)


def test_engine_failure_fails_only_its_request(server, engine, monkeypatch):
    poison = 77777
    real_step = engine.step

    def step(seqs, states, all_logits=False):
        if any(poison in toks for toks in seqs):
            raise RuntimeError("injected failure")
        return real_step(seqs, states, all_logits)

    r, want = ref(engine, HELLO, max_tokens=12)
    monkeypatch.setattr(engine, "step", step)
    errors = lambda: samples(httpx.get(server.url + "/metrics").text).get(  # noqa: E731
        'dsv4_sequences_finished_total{reason="error"}', 0
    )
    before = errors()
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 12, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as s:
        lines = s.iter_lines()
        first = [next(lines), next(lines)]
        bad = httpx.post(
            server.url + "/v1/completions", json={"model": MODEL, "prompt": [0, poison], "max_tokens": 3}
        )
        rest = list(lines)
    assert bad.status_code == 500 and bad.json()["error"]["code"] == "engine_error", bad.text
    assert bad.json()["error"]["message"].endswith(": RuntimeError: injected failure"), bad.text  # its own
    chunks = [json.loads(x[6:]) for x in first + rest if x.startswith("data: {")]
    assert all("choices" in c for c in chunks), chunks
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == want.content
    bad_stream = httpx.post(server.url + "/v1/completions",
                            json={"model": MODEL, "prompt": [0, poison], "max_tokens": 3, "stream": True})  # fmt: skip
    assert '"engine_error"' in bad_stream.text and bad_stream.text.endswith("data: [DONE]\n\n")
    assert "RuntimeError: injected failure" in bad_stream.text and "Traceback" not in bad_stream.text
    server.wait_idle()
    assert errors() == before + 2


def greedy_up_to_ties(
    engine, prompt_ids: list[int], served: list[bytes], max_tokens: int, tol: float = 1e-3
) -> bool:
    """Whether the served tokens (by their bytes) are the model's greedy choices, allowing near-ties: a
    batch computes with other row counts than a lone sequence, so an argmax within `tol` may flip."""
    tok = engine.tokenizer
    logits, state = engine.prefill(list(prompt_ids))
    for b in served:
        lg = logits[-1].float()
        near = [t for t in (lg >= lg.max() - tol).nonzero().flatten().tolist() if tok.token_bytes(t) == b]
        if not near:
            return False
        logits, state = engine.prefill([near[0]], state)
    lg = logits[-1].float()  # a reply shorter than max_tokens ended at end-of-sentence
    return len(served) == max_tokens or bool(lg[engine.config.eos_token_id] >= lg.max() - tol)


def test_sixteen_streams_some_leaving(server, engine):
    prompts = [[{"role": "user", "content": f"Count to {k}"}] for k in range(4)]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)  # warm
    server.wait_idle()
    rss0 = rss_bytes()
    results: dict[int, object] = {}
    start = threading.Barrier(16)

    def run(i: int) -> None:
        leave = i % 4 == 3
        try:
            start.wait(30)
            stream = client.chat.completions.create(model=MODEL, messages=prompts[i % 4], temperature=0, stream=True,
                                                    max_tokens=CONTEXT - 20 if leave else 6, logprobs=True)  # fmt: skip
            text, served = [], []
            for k, chunk in enumerate(stream):
                if chunk.choices:
                    text.append(chunk.choices[0].delta.content or "")
                    served += [
                        bytes(e.bytes) for e in (chunk.choices[0].logprobs or NO_LOGPROBS).content or []
                    ]
                if leave and k >= 2:
                    stream.close()  # disconnect mid-stream
                    break
            results[i] = "left" if leave else ("".join(text), served)
        except Exception as e:  # noqa: BLE001 - reported below
            results[i] = e

    peak, done = [0], threading.Event()

    def watch() -> None:  # how many sequences shared a step at most
        while not done.is_set():
            peak[0] = max(peak[0], server.worker.running)
            time.sleep(0.005)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    watcher = threading.Thread(target=watch)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    done.set()
    watcher.join()
    assert peak[0] > 1, f"at most {peak[0]} sequence(s) ran at once: requests were not batched"
    for i in range(16):
        got = results.get(i)
        if i % 4 == 3:
            assert got == "left", (i, got)
            continue
        assert isinstance(got, tuple), (i, got)
        text, served = got
        ids = engine.encode(prompts[i % 4])
        assert greedy_up_to_ties(engine, ids, served, 6), (i, got)
        assert text == parse_completion(b"".join(served).decode("utf-8", "replace")).content, (i, got)
    server.wait_idle(30)
    assert server.worker.in_flight == 0 and not server.worker.scheduler.running
    grown = rss_bytes() - rss0
    assert grown < 300 << 20, f"RSS grew by {grown >> 20} MiB after all streams ended"


# ---------------------------------------------------------------------------- response builders


TOOL_TEXT = (
    'Let me check.\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n'
    '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>\n</｜DSML｜tool_calls>"
)


def test_tool_call_response_shape():
    done = parse_completion(TOOL_TEXT)
    msg = chat_message(done)
    body = envelope("chat.completion", "chatcmpl-1", MODEL, choices=[
        {"index": 0, "message": msg, "logprobs": None, "finish_reason": finish_reason("stop", done)}])  # fmt: skip
    parsed = openai.types.chat.ChatCompletion.model_validate(body)
    call = parsed.choices[0].message.tool_calls[0]
    assert (
        parsed.choices[0].finish_reason == "tool_calls"
        and parsed.choices[0].message.content == "Let me check."
    )
    assert call.type == "function" and call.id.startswith("call") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 3}
    split = ReplySplitter(thinking=True)
    deltas = [split.push(ch) for ch in "I should look it up.</think>" + TOOL_TEXT]
    rest, final = split.finish()
    content = "".join(d.get("content", "") for d in [*deltas, rest])
    assert content == "Let me check." and "DSML" not in content and len(final.tool_calls) == 1


PIECES = ["<think>", "</think>", "<", "</", "\n", "\n\n", "<｜DSML｜tool_calls>", "<｜DSML｜", "a", "b c", "思",
          '<｜DSML｜invoke name="f">', "</｜DSML｜invoke>", "</｜DSML｜tool_calls>", "<｜end▁of▁sentence｜>"]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=14), st.lists(st.integers(1, 6), min_size=1), st.booleans())
def test_splitter_streams_what_the_parser_parses(pieces, cuts, thinking):
    text = "".join(pieces)
    split, sent, i, k = ReplySplitter(thinking), {"reasoning_content": "", "content": ""}, 0, 0
    while i < len(text):
        step = cuts[k % len(cuts)]
        for key, v in split.push(text[i : i + step]).items():
            sent[key] += v
        i, k = i + step, k + 1
    rest, done = split.finish()
    for key, v in rest.items():
        sent[key] += v
    assert sent["reasoning_content"] == (done.reasoning or "") and sent["content"] == done.content
