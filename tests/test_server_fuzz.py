"""Schemathesis against the server's own OpenAPI document, in process (ASGI): no input makes a 5xx.

The engine is the real tiny checkpoint with the official vocabulary (tokenizer, chat format, stop
strings, samplers all real), but its forward pass is replaced by random logits: the fuzzing is about
the HTTP layer, and a random forward keeps each generated request cheap. The context is small so most
generated max_tokens values are rejected early, and the rest finish fast.
"""

import pytest
import torch

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

import dsv4  # noqa: E402
from dsv4.server.app import create_app  # noqa: E402

MODEL = "tiny-v4"


def _random_forward(engine):
    vocab = engine.config.vocab_size
    gen = torch.Generator().manual_seed(0)

    def step(seqs, states, all_logits=False):
        for toks, st in zip(seqs, states, strict=True):
            st.pos += len(toks)
        return [torch.randn(len(t) if all_logits else 1, vocab, generator=gen) for t in seqs]

    return step


@pytest.fixture(scope="module")
def api_schema(tiny_ckpt):
    engine = dsv4.load(tiny_ckpt("vocab").path, dtype=torch.float32)
    engine.step = _random_forward(engine)
    app = create_app(engine, model_name=MODEL, max_context=48, default_max_tokens=4, max_running=8, max_queue=64,
                     max_body_bytes=32 << 10)  # fmt: skip
    yield schemathesis.openapi.from_asgi("/openapi.json", app)
    app.state.server.worker.close()


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case):
    if isinstance(case.body, dict) and "model" in case.body and case.operation.path.startswith("/v1/"):
        case.body["model"] = MODEL  # reach past the model check most of the time
    case.call_and_validate(checks=[not_a_server_error])
