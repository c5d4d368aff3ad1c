"""From a validated request body to the engine's terms: prompt token ids and sampling parameters.

Everything a client can get wrong about the model is decided here, before anything is queued, and
raised as an `APIError` (4xx): the model name, a prompt the chat format cannot render, token ids
outside the vocabulary, a prompt or a completion that does not fit the context, sampling values
`SamplingParams` rejects. Server-wide defaults (the CLI's sampling flags) fill what a request leaves out.
It knows the request models and the engine's API, not HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..chat import reasoning_effort_text
from ..sampling import SamplingParams
from .errors import APIError
from .schemas import ChatRequest, CompletionRequest, SamplingFields

_SAMPLING = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")
# Below these the sampler's logits overflow to inf and the draw fails inside the shared decode step
# (failing every sequence in it): tinier temperatures mean greedy, tinier penalties are refused.
MIN_TEMPERATURE = 1e-5
MIN_REPETITION_PENALTY = 1e-3


@dataclass
class Limits:
    """What the server admits: the context (prompt + completion tokens) and the cap on a completion whose
    request gives no max_tokens (None: up to the context, as OpenAI-compatible servers do)."""

    context: int
    default_max_tokens: int | None = None
    defaults: dict[str, Any] = field(default_factory=dict)  # SamplingParams fields from the CLI


def check_model(asked: str, served: str) -> None:
    if asked != served:
        raise APIError(404, f"the model {asked!r} does not exist; this server serves {served!r} (see /v1/models)",
                       param="model", code="model_not_found")  # fmt: skip


def completion_budget(prompt_len: int, asked: int | None, limits: Limits, param: str) -> int:
    """max_tokens for a prompt: what was asked if it fits the context, else a 400."""
    room = limits.context - prompt_len
    if room < 1:
        raise APIError(400, f"the prompt is {prompt_len} tokens but the context is {limits.context} tokens "
                       "(the model's max_seq_len, or the server's --max-context): shorten the prompt",
                       param="messages" if param == "max_completion_tokens" else "prompt",
                       code="context_length_exceeded")  # fmt: skip
    if asked is None:
        return room if limits.default_max_tokens is None else min(limits.default_max_tokens, room)
    if asked > room:
        raise APIError(400, f"{param}={asked} does not fit: the prompt is {prompt_len} tokens and the context "
                       f"{limits.context}, so at most {room} tokens can be generated",
                       param=param, code="context_length_exceeded")  # fmt: skip
    return asked


def sampling_fields(req: SamplingFields, limits: Limits) -> dict[str, Any]:
    """SamplingParams fields of a request (without max_tokens and logprobs), defaults filled in."""
    out = {k: v for k, v in limits.defaults.items() if k != "max_tokens"}
    for name in _SAMPLING:
        value = getattr(req, name)
        if value is not None:
            out[name] = value
    if 0.0 < out.get("temperature", 1.0) < MIN_TEMPERATURE:
        out["temperature"] = 0.0
    if 0.0 < out.get("repetition_penalty", 1.0) < MIN_REPETITION_PENALTY:
        raise APIError(400, f"repetition_penalty must be at least {MIN_REPETITION_PENALTY} (it divides the logits), "
                       f"got {out['repetition_penalty']}", param="repetition_penalty", code="invalid_value")  # fmt: skip
    if req.top_k is not None:
        out["top_k"] = max(req.top_k, 0)
    if req.seed is not None:
        out["seed"] = req.seed
    if req.stop is not None:
        out["stop"] = [req.stop] if isinstance(req.stop, str) else list(req.stop)
    if req.stop_token_ids:
        out["stop_token_ids"] = list(req.stop_token_ids)
    if req.ignore_eos is not None:
        out["ignore_eos"] = req.ignore_eos
    return out


def make_params(fields: dict[str, Any], n: int) -> list[SamplingParams]:
    """n parameter sets; a seeded request gets seeds seed, seed+1, ... so its choices differ."""
    try:
        base = SamplingParams.of(**fields)
    except ValueError as e:
        raise APIError(400, str(e).split(" (got ", 1)[0], code="invalid_value") from None
    out = []
    for i in range(n):
        seed = None if base.seed is None else (base.seed + i + 2**63) % 2**64 - 2**63
        out.append(SamplingParams.of(**{**fields, "seed": seed}))
    return out


def thinking_mode(req: ChatRequest) -> str:
    """`thinking.type`, else `chat_template_kwargs.thinking` (or `enable_thinking`), else on when a
    reasoning_effort is given (it only means something in thinking mode)."""
    if req.thinking is not None:
        return "thinking" if req.thinking.type == "enabled" else "chat"
    kwargs = req.chat_template_kwargs or {}
    for key in ("thinking", "enable_thinking"):
        if key in kwargs:
            if not isinstance(kwargs[key], bool):
                raise APIError(400, f"chat_template_kwargs.{key} must be true or false, got {kwargs[key]!r}",
                               param=f"chat_template_kwargs.{key}", code="invalid_value")  # fmt: skip
            return "thinking" if kwargs[key] else "chat"
    return "thinking" if req.reasoning_effort is not None else "chat"


def chat_tools(req: ChatRequest) -> list[dict[str, Any]] | None:
    """The tools the prompt offers: none for tool_choice "none", only the named one for a named choice."""
    tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
    choice = req.tool_choice
    if choice == "none" or not tools:
        if choice not in (None, "none", "auto"):
            raise APIError(400, "tool_choice names or requires a tool but no tools are given",
                           param="tool_choice", code="invalid_value")  # fmt: skip
        return None
    if choice is None or isinstance(choice, str):
        return tools  # "auto" / "required": the model decides (V4 cannot be forced to call)
    named = [t for t in tools if t["function"]["name"] == choice.function.name]
    if not named:
        raise APIError(400, f"tool_choice names {choice.function.name!r}, which is not among the tools",
                       param="tool_choice", code="invalid_value")  # fmt: skip
    return named


def chat_prompt(engine, req: ChatRequest, mode: str) -> list[int]:
    """The prompt ids of a chat request in the V4 format (blocking: run it off the event loop)."""
    messages = [m.model_dump(exclude_none=True) for m in req.messages]
    try:
        reasoning_effort_text(req.reasoning_effort, engine.chat_format)
    except ValueError as e:
        raise APIError(400, str(e), param="reasoning_effort", code="invalid_value") from None
    try:
        return engine.encode(messages, thinking_mode=mode, reasoning_effort=req.reasoning_effort,
                             tools=chat_tools(req))  # fmt: skip
    except APIError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise APIError(400, f"the messages cannot be written in the V4 chat format: {e}", param="messages",
                       code="invalid_value") from None  # fmt: skip


def completion_prompts(engine, req: CompletionRequest) -> list[list[int]]:
    """The prompt ids of each prompt of a completions request (text gets BOS; ids pass as given)."""
    p = req.prompt
    batch = p if isinstance(p, list) and p and not isinstance(p[0], int) else [p]
    vocab = engine.config.vocab_size
    out = []
    for i, one in enumerate(batch):
        if isinstance(one, str):
            try:
                out.append(engine.encode(one))
            except (ValueError, TypeError) as e:  # e.g. a lone surrogate escaped in the JSON
                raise APIError(
                    400, f"the prompt cannot be tokenized: {e}", param="prompt", code="invalid_value"
                ) from None
            continue
        if not one:
            raise APIError(400, "a prompt of token ids is empty", param="prompt", code="invalid_value")
        bad = next((t for t in one if not 0 <= t < vocab), None)
        if bad is not None:
            where = f"prompt[{i}]" if len(batch) > 1 else "prompt"
            raise APIError(400, f"token id {bad} in {where} is outside the vocabulary [0, {vocab})",
                           param="prompt", code="invalid_value")  # fmt: skip
        out.append(list(one))
    return out
