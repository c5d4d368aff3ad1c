"""Known answers for the V4 chat encoding (the release's four golden cases, V4_SPEC's token ids) and
the completion parser, including round trips and completions cut off anywhere."""

import hashlib
import json
from pathlib import Path

import pytest

from dsv4.chat import (
    ASSISTANT,
    BOS,
    EOS,
    REASONING_EFFORT_0731_MAX,
    REASONING_EFFORT_MAX,
    THINK_END,
    THINK_START,
    USER,
    Completion,
    ToolCall,
    encode_messages,
    encode_messages_ids,
    parse_completion,
    render_tools,
)
from dsv4.tokenizer import Tokenizer

DATA = Path(__file__).parent / "data"
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather for a specific location",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string"}},
            "required": ["location"],
        },
    },
}


def golden(case: int) -> tuple[list[dict], str]:
    """The release's encoding/tests case: (messages, expected prompt). Case 1 keeps its tools beside
    the messages, as upstream does; the .txt files have no final newline upstream."""
    data = json.loads((DATA / f"chat_input_{case}.json").read_text(encoding="utf-8"))
    if isinstance(data, dict):
        messages = data["messages"]
        messages[0]["tools"] = data["tools"]
    else:
        messages = data
    expected = (DATA / f"chat_output_{case}.txt").read_text(encoding="utf-8").removesuffix("\n")
    return messages, expected


def assistant_turns(prompt: str, marker: str = ASSISTANT + THINK_START) -> list[str]:
    """Each assistant turn's completion text (from after the marker up to the next user turn)."""
    return [part.split(USER)[0] for part in prompt.split(marker)[1:]]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_dir(None)


# ----------------------------------------------------------------------------- encoding


def test_spec_known_answer_ids(tok):
    messages = [SYSTEM, {"role": "user", "content": "What is 2+2?"}]
    ids = encode_messages_ids(tok, messages, thinking_mode="chat")
    assert ids == [
        0,
        3476,
        477,
        260,
        11502,
        22896,
        16,
        128803,
        3085,
        344,
        223,
        20,
        13,
        20,
        33,
        128804,
        128822,
    ]


def test_chat_and_thinking_generation_prompts():
    messages = [SYSTEM, {"role": "user", "content": "What is 2+2?"}]
    base = f"{BOS}You are a helpful assistant.{USER}What is 2+2?{ASSISTANT}"
    assert encode_messages(messages) == base + THINK_END
    assert encode_messages(messages, thinking_mode="thinking") == base + THINK_START
    assert encode_messages(messages, add_generation_prompt=False) == base.removesuffix(ASSISTANT)
    assert encode_messages(messages, add_bos=False) == base.removeprefix(BOS) + THINK_END


def test_reasoning_effort_max_block():
    messages = [SYSTEM, {"role": "user", "content": "Why?"}]
    thinking = encode_messages(messages, thinking_mode="thinking", reasoning_effort="max")
    assert (
        thinking
        == BOS + REASONING_EFFORT_MAX + encode_messages(messages, thinking_mode="thinking")[len(BOS) :]
    )
    assert REASONING_EFFORT_MAX == (
        "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
        "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root "
        "cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial "
        "scenarios.\nExplicitly write out your entire deliberation process, documenting every intermediate step, "
        "considered alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"
    )
    # Chat mode ignores it; the lower levels add nothing.
    assert encode_messages(messages, reasoning_effort="max") == encode_messages(messages)
    assert encode_messages(messages, thinking_mode="thinking", reasoning_effort="high") == encode_messages(
        messages, thinking_mode="thinking"
    )
    with pytest.raises(ValueError, match="reasoning_effort"):
        encode_messages(messages, reasoning_effort="extreme")


# ----------------------------------------------------------------------------- the 0731 chat format
# Known answers from public copies of the 0731 encoder (encoding/encoding_dsv4.py of
# deepseek-ai/DeepSeek-V4-Flash-0731, REASONING_EFFORT_PROMPTS):
# - antirez/ds4 PR 686: the byte length and sha256 prefix of the "high" (476 B, f7a24f3b3050d4a8) and
#   "max" (528 B, 53fb31b8392ec5b4) texts;
# - local-inference-lab/vllm issue 220: the full thinking prompt for user "test" at max, 579 characters,
#   "<｜begin▁of▁sentence｜>Reasoning Effort: Beyond maximum — exhaustive, ...\n\n<｜User｜>test<｜Assistant｜><think>";
# - local-inference-lab/vllm PR 231: the same prompt is 5 tokens at low and 84 at high (/tokenize).
TEST = [{"role": "user", "content": "test"}]


def test_0731_effort_texts_byte_for_byte():
    for text, size, digest in [(REASONING_EFFORT_MAX, 476, "f7a24f3b3050d4a8"),
                               (REASONING_EFFORT_0731_MAX, 528, "53fb31b8392ec5b4")]:  # fmt: skip
        raw = text.encode("utf-8")
        assert (len(raw), hashlib.sha256(raw).hexdigest()[:16]) == (size, digest)
    assert REASONING_EFFORT_0731_MAX == (
        "Reasoning Effort: Beyond maximum \u2014 exhaustive, relentless, and uncompromising.\n"
        "You MUST reason with the utmost depth and rigor, leaving absolutely nothing to chance: exhaustively decompose "
        "the problem into its most fundamental components, trace every causal chain to its root, and resolve the "
        "underlying cause rather than any surface symptom.\n"
        "Do not stop reasoning until you have independently verified the solution from multiple angles and are "
        "certain that no assumption remains unchecked and no error remains undiscovered.\n\n"
    )


def test_0731_levels(tok):
    tail = f"{USER}test{ASSISTANT}{THINK_START}"
    render = lambda effort, **kw: encode_messages(TEST, thinking_mode="thinking", reasoning_effort=effort,  # noqa: E731
                                                  chat_format="0731", **kw)  # fmt: skip
    assert render("max") == BOS + REASONING_EFFORT_0731_MAX + tail and len(render("max")) == 579
    assert render("high") == BOS + REASONING_EFFORT_MAX + tail
    assert render("low") == render(None) == BOS + tail
    assert [len(tok.encode(render(e))) for e in ("low", "high")] == [5, 84]
    # The text follows BOS, before a system prompt; chat mode ignores the level.
    with_system = encode_messages(
        [SYSTEM, *TEST], thinking_mode="thinking", reasoning_effort="max", chat_format="0731"
    )
    assert with_system == BOS + REASONING_EFFORT_0731_MAX + SYSTEM["content"] + tail
    assert encode_messages(TEST, reasoning_effort="max", chat_format="0731") == encode_messages(TEST)


def test_preview_rendering_unchanged_by_the_0731_table():
    for effort in (None, "low", "medium", "high", "max"):
        preview = encode_messages(TEST, thinking_mode="thinking", reasoning_effort=effort)
        again = encode_messages(TEST, thinking_mode="thinking", reasoning_effort=effort, chat_format="preview")
        text = REASONING_EFFORT_MAX if effort == "max" else ""
        assert preview == again == BOS + text + f"{USER}test{ASSISTANT}{THINK_START}"


def test_0731_rejects_levels_it_lacks():
    with pytest.raises(ValueError, match="'medium': the 0731 chat format has low, high, max"):
        encode_messages(TEST, thinking_mode="thinking", reasoning_effort="medium", chat_format="0731")
    with pytest.raises(ValueError, match="chat format 'v5'"):
        encode_messages(TEST, chat_format="v5")


@pytest.mark.parametrize("case, mode", [(1, "thinking"), (2, "thinking"), (3, "thinking"), (4, "chat")])
def test_release_golden_cases(case, mode):
    messages, expected = golden(case)
    assert encode_messages(messages, thinking_mode=mode) == expected


def test_golden_prompt_tokenizes_markers_as_single_ids(tok):
    _, prompt = golden(1)
    ids = tok.encode(prompt)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert ids.count(128825) == prompt.count("｜DSML｜")
    assert tok.decode(ids) == prompt


def test_multi_turn_drops_earlier_reasoning():
    messages, expected = golden(2)
    prompt = encode_messages(messages, thinking_mode="thinking")
    assert "The user said hello" not in prompt
    assert f"{USER}Hello{ASSISTANT}{THINK_END}Hi there!" in prompt
    kept = encode_messages(messages, thinking_mode="thinking", drop_thinking=False)
    assert f"{ASSISTANT}{THINK_START}The user said hello, I should greet back.{THINK_END}Hi there!" in kept
    # Chat mode never writes reasoning.
    chat = encode_messages(messages, thinking_mode="chat")
    assert THINK_START not in chat and "It is Paris." not in chat


def test_tools_keep_all_reasoning():
    messages, _ = golden(2)
    messages[0] = {**SYSTEM, "tools": [WEATHER_TOOL]}
    prompt = encode_messages(messages, thinking_mode="thinking")
    assert "The user said hello, I should greet back.</think>" in prompt
    assert prompt.startswith(BOS + "You are a helpful assistant.\n\n## Tools\n\n")


def test_render_tools_accepts_bare_functions():
    assert render_tools([WEATHER_TOOL]) == render_tools([WEATHER_TOOL["function"]])
    assert (
        '{"name": "get_weather", "description": "Get the weather for a specific location", '
        in render_tools([WEATHER_TOOL])
    )


def test_developer_before_last_user_is_dropped_in_thinking_mode():
    messages = [
        {"role": "developer", "content": "Search first."},
        {"role": "assistant", "content": "ok", "reasoning_content": "r1"},
        {"role": "user", "content": "next"},
    ]
    prompt = encode_messages(messages, thinking_mode="thinking")
    assert prompt == f"{BOS}ok{EOS}{USER}next{ASSISTANT}{THINK_START}"
    assert encode_messages(messages).startswith(f"{BOS}{USER}Search first.{ASSISTANT}{THINK_END}ok{EOS}")


def test_parallel_tool_results_follow_call_order_and_fold_into_user_turn():
    calls = [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}},
        {"id": "b", "type": "function", "function": {"name": "g", "arguments": {"y": "two"}}},
    ]
    messages = [
        {"role": "system", "content": "", "tools": [WEATHER_TOOL]},
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": "b", "content": "B"},
        {"role": "tool", "tool_call_id": "a", "content": [{"type": "text", "text": "A"}]},
        {"role": "user", "content": "and then?"},
    ]
    prompt = encode_messages(messages)
    assert prompt.endswith(
        f"{USER}<tool_result>A</tool_result>\n\n<tool_result>B</tool_result>\n\nand then?{ASSISTANT}{THINK_END}"
    )
    assert '<｜DSML｜parameter name="x" string="false">1</｜DSML｜parameter>' in prompt
    assert '<｜DSML｜parameter name="y" string="true">two</｜DSML｜parameter>' in prompt


def test_latest_reminder_and_tasks():
    messages = [
        {"role": "latest_reminder", "content": "2026-01-01"},
        {"role": "user", "content": "q", "task": "query"},
    ]
    assert encode_messages(messages) == f"{BOS}<｜latest_reminder｜>2026-01-01{USER}q<｜query｜>"
    titled = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello", "task": "title"},
        {"role": "assistant", "content": "Greeting"},
    ]
    expected = f"{BOS}{USER}hi{ASSISTANT}{THINK_START}{THINK_END}hello{EOS}<｜title｜>Greeting{EOS}"
    assert encode_messages(titled, thinking_mode="thinking") == expected


def test_bad_messages_raise():
    with pytest.raises(ValueError, match="unknown message role"):
        encode_messages([{"role": "narrator", "content": "x"}])
    with pytest.raises(ValueError, match="thinking_mode"):
        encode_messages([], thinking_mode="fast")
    with pytest.raises(ValueError, match="developer message needs content"):
        encode_messages([{"role": "developer", "content": ""}])


# ----------------------------------------------------------------------------- parsing


def test_parse_golden_turns():
    _, prompt = golden(1)
    first, last = assistant_turns(prompt)
    assert parse_completion(first, thinking_mode="thinking") == Completion(
        reasoning="The user wants to know the weather in Beijing. I should use the get_weather tool.",
        content="",
        tool_calls=[ToolCall("get_weather", {"location": "Beijing", "unit": "celsius"})],
    )
    final = parse_completion(last, thinking_mode="thinking")
    assert final.reasoning == "Got the weather data. Let me format a nice response."
    assert "22°C" in final.content and final.tool_calls == []


TYPED_ARGS = {
    "city": "Paris",
    "looks_numeric": "42",
    "days": 3,
    "ratio": 0.5,
    "metric": True,
    "tags": ["a", "中文"],
    "filter": {"min": None, "max": [1, 2]},
    "multiline": "line one\nline two",
}


@pytest.mark.parametrize("mode", ["chat", "thinking"])
def test_round_trip_typed_tool_calls(mode):
    assistant = {
        "role": "assistant",
        "content": "Let me check.",
        "reasoning_content": "Need two calls.",
        "tool_calls": [
            {"type": "function", "function": {"name": "lookup", "arguments": json.dumps(TYPED_ARGS)}},
            {"type": "function", "function": {"name": "ping", "arguments": "{}"}},
        ],
    }
    messages = [{"role": "system", "content": "s", "tools": [WEATHER_TOOL]}, {"role": "user", "content": "u"}]
    prompt = encode_messages([*messages, assistant], thinking_mode=mode)
    marker = ASSISTANT + (THINK_START if mode == "thinking" else THINK_END)
    completion = parse_completion(assistant_turns(prompt, marker)[0], thinking_mode=mode)
    assert completion.reasoning == ("Need two calls." if mode == "thinking" else None)
    assert completion.content == "Let me check."
    assert completion.tool_calls == [ToolCall("lookup", TYPED_ARGS), ToolCall("ping", {})]
    assert json.loads(completion.tool_calls[0].to_openai()["function"]["arguments"]) == TYPED_ARGS


def test_parse_plain_answers():
    assert parse_completion("2 + 2 = 4.<｜end▁of▁sentence｜>") == Completion(None, "2 + 2 = 4.")
    thought = parse_completion(
        "Simple arithmetic.</think>2 + 2 = 4.<｜end▁of▁sentence｜>", thinking_mode="thinking"
    )
    assert thought == Completion("Simple arithmetic.", "2 + 2 = 4.")
    assert parse_completion("no eos yet", thinking_mode="chat").content == "no eos yet"


def test_truncated_completion_never_raises():
    """Cut a rendered tool-calling turn at every character: no exception, reasoning is whatever was
    written so far, and the tool calls found are always a prefix of the full list."""
    calls = [
        {"type": "function", "function": {"name": "lookup", "arguments": json.dumps(TYPED_ARGS)}},
        {"type": "function", "function": {"name": "get_weather", "arguments": '{"location": "Oslo"}'}},
    ]
    assistant = {
        "role": "assistant",
        "content": "Checking.",
        "reasoning_content": "Think 思考.",
        "tool_calls": calls,
    }
    prompt = encode_messages([{"role": "user", "content": "u"}, assistant], thinking_mode="thinking")
    full_text = assistant_turns(prompt)[0]
    full = parse_completion(full_text, thinking_mode="thinking")
    assert [c.name for c in full.tool_calls] == ["lookup", "get_weather"]
    for cut in range(len(full_text) + 1):
        part = parse_completion(full_text[:cut], thinking_mode="thinking")
        assert part.tool_calls == full.tool_calls[: len(part.tool_calls)]
        if THINK_END not in full_text[:cut]:
            assert part.reasoning == full_text[:cut] and part.content == ""
        assert "｜DSML｜" not in part.content


def test_half_written_tool_call_keeps_finished_ones():
    text = (
        'ok</think>\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="a">\n'
        '<｜DSML｜parameter name="n" string="false">7</｜DSML｜parameter>\n</｜DSML｜invoke>\n'
        '<｜DSML｜invoke name="b">\n<｜DSML｜parameter name="q" string="true">unfin'
    )
    assert parse_completion(text, thinking_mode="thinking") == Completion("ok", "", [ToolCall("a", {"n": 7})])


def test_invalid_json_argument_is_kept_as_text():
    text = (
        '<｜DSML｜tool_calls>\n<｜DSML｜invoke name="a">\n'
        '<｜DSML｜parameter name="bad" string="false">[1, 2,</｜DSML｜parameter>\n</｜DSML｜invoke>\n'
        "</｜DSML｜tool_calls><｜end▁of▁sentence｜>"
    )
    assert parse_completion(text).tool_calls == [ToolCall("a", {"bad": "[1, 2,"})]


def test_tool_calls_without_closing_think():
    text = (
        'plan\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="a">\n\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>'
    )
    assert parse_completion(text, thinking_mode="thinking") == Completion("plan", "", [ToolCall("a", {})])


def test_reasoning_may_mention_dsml():
    text = 'Use <｜DSML｜invoke name="x"> later.</think>Done.<｜end▁of▁sentence｜>'
    assert parse_completion(text, thinking_mode="thinking") == Completion(
        'Use <｜DSML｜invoke name="x"> later.', "Done."
    )
