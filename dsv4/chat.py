"""The DeepSeek V4 chat format: messages -> prompt text, and a completion's text -> reasoning, content
and tool calls.

Reproduces the release's encoder (`encoding/encoding_dsv4.py`; the release ships no Jinja template)
string for string: role markers, `<think>`/`</think>` placement, the rule that drops earlier turns'
reasoning, the tool instructions, DSML tool calls, `<tool_result>` folding, the reasoning-effort
block and the quick-instruction task tokens. Those strings are the model's interface: change none.

Messages are OpenAI-style dicts. Roles: system, user, assistant, tool, developer, latest_reminder.
Tools (OpenAI function definitions) ride on a system or developer message's `tools` key. Assistant
turns carry `content`, `reasoning_content` and `tool_calls` (`function.arguments` a JSON string or a
dict); tool messages carry `content` (and `tool_call_id`, used to order parallel results).

The parser is deliberately forgiving where the release's asserts: a completion cut off mid-reasoning
or mid-tool-call returns what is complete. This module knows nothing of token ids except through the
`Tokenizer` handed to `encode_messages_ids`.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dsv4.tokenizer import Tokenizer

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
LATEST_REMINDER = "<｜latest_reminder｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"
TOOL_CALLS_OPEN = f"<{DSML}tool_calls>"
TOOL_CALLS_CLOSE = f"</{DSML}tool_calls>"

# Quick-instruction tasks (a message's `task` key): the token that asks for the task's output.
TASK_TOKENS = {
    "action": "<｜action｜>",
    "query": "<｜query｜>",
    "authority": "<｜authority｜>",
    "domain": "<｜domain｜>",
    "title": "<｜title｜>",
    "read_url": "<｜read_url｜>",
}
THINKING_MODES = ("chat", "thinking")
# Where an assistant message may carry its reasoning (OpenAI-compatible servers use either name).
REASONING_KEYS = ("reasoning_content", "reasoning")
CHAT_FORMATS = ("preview", "0731")

# The reasoning-effort texts, put right after BOS in thinking mode. The preview's encoder has one
# ("max"); the 0731 encoder (V4-Flash-0731, V4-Pro-0813) names three levels: "low" (its default, no
# text), "high" (the preview's "max" text, unchanged) and "max" (a new text). Texts as in the 0731
# encoder's REASONING_EFFORT_PROMPTS, quoted verbatim by public ports, e.g. GitHub
# Entrpi/ds4 and antirez/ds4 PR 686 (DS4_REASONING_EFFORT_MAX_PREFIX, 528 bytes, an em dash U+2014 after
# "Beyond maximum"), local-inference-lab/vllm issue 220, sgl-project/sglang issue 33185.
REASONING_EFFORT_MAX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve "
    "the root cause, rigorously stress-testing your logic against all potential paths, edge cases, and "
    "adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, "
    "considered alternative, and rejected hypothesis to ensure absolutely no assumption is left "
    "unchecked.\n\n"
)
REASONING_EFFORT_0731_MAX = (
    "Reasoning Effort: Beyond maximum \u2014 exhaustive, relentless, and uncompromising.\n"
    "You MUST reason with the utmost depth and rigor, leaving absolutely nothing to chance: exhaustively "
    "decompose the problem into its most fundamental components, trace every causal chain to its root, "
    "and resolve the underlying cause rather than any surface symptom.\n"
    "Do not stop reasoning until you have independently verified the solution from multiple angles and "
    "are certain that no assumption remains unchecked and no error remains undiscovered.\n\n"
)
# chat format -> effort -> text. The preview's encoder accepts None, "high" and "max" ("low" and
# "medium" are kept here as the API's names for its default); the 0731 encoder only low/high/max
# (None meaning its default, "low").
REASONING_EFFORT_TEXTS: dict[str, dict[str | None, str]] = {
    "preview": {None: "", "low": "", "medium": "", "high": "", "max": REASONING_EFFORT_MAX},
    "0731": {None: "", "low": "", "high": REASONING_EFFORT_MAX, "max": REASONING_EFFORT_0731_MAX},
}


def reasoning_effort_text(reasoning_effort: str | None, chat_format: str = "preview") -> str:
    """The text a thinking-mode prompt starts with (after BOS) for this effort in this chat format;
    a ValueError names the levels the format has."""
    if chat_format not in REASONING_EFFORT_TEXTS:
        raise ValueError(f"chat format {chat_format!r}: expected one of {CHAT_FORMATS}")
    texts = REASONING_EFFORT_TEXTS[chat_format]
    if reasoning_effort not in texts:
        levels = ", ".join(k for k in texts if k is not None)
        raise ValueError(f"reasoning_effort {reasoning_effort!r}: the {chat_format} chat format has {levels}")
    return texts[reasoning_effort]


TOOLS_INSTRUCTIONS = (
    "## Tools\n\n"
    "You have access to a set of tools to help answer the user's question. You can invoke tools by "
    f'writing a "<{DSML}tool_calls>" block like the following:\n\n'
    f"<{DSML}tool_calls>\n"
    f'<{DSML}invoke name="$TOOL_NAME">\n'
    f'<{DSML}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{DSML}parameter>\n'
    "...\n"
    f"</{DSML}invoke>\n"
    f'<{DSML}invoke name="$TOOL_NAME2">\n'
    "...\n"
    f"</{DSML}invoke>\n"
    f"</{DSML}tool_calls>\n\n"
    'String parameters should be specified as is and set `string="true"`. For all other types '
    '(numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.\n\n'
    f"If thinking_mode is enabled (triggered by {THINK_START}), you MUST output your complete reasoning "
    f"inside {THINK_START}...{THINK_END} BEFORE any tool calls or final response.\n\n"
    f"Otherwise, output directly after {THINK_END} with tool calls or final response.\n\n"
    "### Available Tool Schemas\n\n"
    "{tool_schemas}\n\n"
    "You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n"
)

RESPONSE_FORMAT_INSTRUCTIONS = (
    "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n{schema}"
)


def _to_json(value: Any) -> str:
    # The release's spelling: default separators (", ", ": "), non-ASCII kept as is.
    return json.dumps(value, ensure_ascii=False)


# ----------------------------------------------------------------------------- tools and tool calls


def render_tools(tools: list[dict[str, Any]]) -> str:
    """The tool-instruction block for OpenAI-style tools (`{"type": "function", "function": {...}}`;
    a bare function definition is accepted too), one JSON schema per line, keys in given order."""
    schemas = "\n".join(_to_json(tool.get("function", tool)) for tool in tools)
    return TOOLS_INSTRUCTIONS.replace("{tool_schemas}", schemas)


def _call_name_and_args(call: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(name, arguments dict) of an OpenAI tool call or of a plain {"name", "arguments"} dict.
    Arguments that are not a JSON object travel whole as one string parameter `arguments`."""
    fn = call.get("function", call)
    args = fn.get("arguments")
    if args is None:
        return fn["name"], {}
    if isinstance(args, str):
        try:
            parsed = json.loads(args)
        except ValueError:
            parsed = None
        args = parsed if isinstance(parsed, dict) else {"arguments": args}
    return fn["name"], args


def _dsml_tool_calls(calls: list[dict[str, Any]]) -> str:
    invokes = []
    for call in calls:
        name, args = _call_name_and_args(call)
        params = "\n".join(
            f'<{DSML}parameter name="{key}" string="{"true" if isinstance(value, str) else "false"}">'
            f"{value if isinstance(value, str) else _to_json(value)}</{DSML}parameter>"
            for key, value in args.items()
        )
        invokes.append(f'<{DSML}invoke name="{name}">\n{params}\n</{DSML}invoke>')
    return f"{TOOL_CALLS_OPEN}\n" + "\n".join(invokes) + f"\n{TOOL_CALLS_CLOSE}"


# ----------------------------------------------------------------------------- preprocessing


def _text_of(content: Any) -> str:
    """A message's content as text: OpenAI content parts are joined, non-text parts marked."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n\n".join(
        part.get("text", "") if part.get("type") == "text" else f"[Unsupported {part.get('type')}]"
        for part in content
    )


def _merge_tool_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """V4 has no tool role: tool results, and any user text right after them, become content blocks
    of one user turn. Consecutive user messages likewise merge into one turn (the release's rule)."""
    merged: list[dict[str, Any]] = []
    for msg in messages:
        msg = copy.deepcopy(msg)
        role = msg.get("role")
        last = merged[-1] if merged else {}
        open_user = last.get("role") == "user" and "content_blocks" in last
        if role == "tool":
            block = {
                "type": "tool_result",
                "tool_use_id": msg.get("tool_call_id", ""),
                "content": msg.get("content", ""),
            }
            if open_user:
                last["content_blocks"].append(block)
            else:
                merged.append({"role": "user", "content_blocks": [block]})
        elif role == "user":
            text = {"type": "text", "text": _text_of(msg.get("content"))}
            if open_user and last.get("task") is None:
                last["content_blocks"].append(text)
            else:
                user = {"role": "user", "content": text["text"], "content_blocks": [text]}
                user.update({k: msg[k] for k in ("task", "wo_eos", "mask") if k in msg})
                merged.append(user)
        else:
            merged.append(msg)
    return merged


def _sort_tool_results(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Order parallel tool results as the preceding assistant turn called them (by tool_call_id)."""
    order: dict[str, int] = {}
    for msg in messages:
        if msg.get("role") == "assistant" and msg.get("tool_calls"):
            order = {}
            for i, call in enumerate(msg["tool_calls"]):
                call_id = call.get("id") or call.get("function", {}).get("id", "")
                if call_id:
                    order[call_id] = i
        elif msg.get("role") == "user" and msg.get("content_blocks"):
            results = [b for b in msg["content_blocks"] if b.get("type") == "tool_result"]
            if len(results) < 2 or not order:
                continue
            ranked = iter(sorted(results, key=lambda b: order.get(b.get("tool_use_id", ""), 0)))
            msg["content_blocks"] = [
                next(ranked) if b.get("type") == "tool_result" else b for b in msg["content_blocks"]
            ]
    return messages


def _last_user_index(messages: list[dict[str, Any]]) -> int:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") in ("user", "developer"):
            return i
    return -1


def _drop_old_reasoning(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Before the last user turn: assistant turns lose their reasoning and developer turns are
    removed entirely (the release's rule; it applies in thinking mode when no tools are defined)."""
    last_user = _last_user_index(messages)
    kept = []
    for i, msg in enumerate(messages):
        role = msg.get("role")
        if role in ("user", "system", "tool", "latest_reminder") or i >= last_user:
            kept.append(msg)
        elif role == "assistant":
            kept.append({k: v for k, v in msg.items() if k not in REASONING_KEYS})
    return kept


# ----------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class _Conversation:
    messages: list[dict[str, Any]]
    thinking: bool
    drop_thinking: bool
    last_user: int


def _with_tools_and_format(text: str, msg: dict[str, Any]) -> str:
    if msg.get("tools"):
        text += "\n\n" + render_tools(msg["tools"])
    if msg.get("response_format"):
        text += "\n\n" + RESPONSE_FORMAT_INSTRUCTIONS.format(schema=_to_json(msg["response_format"]))
    return text


def _render_user(msg: dict[str, Any]) -> str:
    blocks = msg.get("content_blocks")
    if not blocks:
        return USER + _text_of(msg.get("content"))
    parts = []
    for block in blocks:
        kind = block.get("type")
        if kind == "text":
            parts.append(block.get("text") or "")
        elif kind == "tool_result":
            parts.append(f"<tool_result>{_text_of(block.get('content'))}</tool_result>")
        else:
            parts.append(f"[Unsupported {kind}]")
    return USER + "\n\n".join(parts)


def _render_assistant(conv: _Conversation, index: int) -> str:
    msg = conv.messages[index]
    calls = msg.get("tool_calls")
    tool_text = "\n\n" + _dsml_tool_calls(calls) if calls else ""
    # A turn answering a quick-instruction task has no reasoning block; nor do turns before the
    # last user turn while earlier reasoning is being dropped (their </think> came with the user turn).
    after_task = index > 0 and conv.messages[index - 1].get("task") is not None
    reasoning = ""
    if conv.thinking and not after_task and (not conv.drop_thinking or index > conv.last_user):
        reasoning = next((msg[k] for k in REASONING_KEYS if msg.get(k)), "") + THINK_END
    eos = "" if msg.get("wo_eos") else EOS
    return reasoning + _text_of(msg.get("content")) + tool_text + eos


def _render_message(conv: _Conversation, index: int) -> str:
    msg = conv.messages[index]
    role = msg.get("role")
    if role == "system":
        return _with_tools_and_format(_text_of(msg.get("content")), msg)
    if role == "developer":
        if not msg.get("content"):
            raise ValueError(f"a developer message needs content, got {msg!r}")
        return _with_tools_and_format(USER + _text_of(msg["content"]), msg)
    if role == "user":
        return _render_user(msg)
    if role == "latest_reminder":
        return LATEST_REMINDER + _text_of(msg.get("content"))
    if role == "assistant":
        return _render_assistant(conv, index)
    raise ValueError(
        f"unknown message role {role!r}; expected system, user, assistant, tool, developer or latest_reminder"
    )


def _transition(conv: _Conversation, index: int) -> str:
    """What follows message `index` when the next one is an assistant turn (or there is none):
    the assistant marker with `<think>`/`</think>`, or a quick-instruction task token."""
    msgs = conv.messages
    if index + 1 < len(msgs) and msgs[index + 1].get("role") not in ("assistant", "latest_reminder"):
        return ""
    msg = msgs[index]
    task = msg.get("task")
    if task is not None:
        if task not in TASK_TOKENS:
            raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASK_TOKENS)}")
        if task != "action":
            return TASK_TOKENS[task]
        return ASSISTANT + (THINK_START if conv.thinking else THINK_END) + TASK_TOKENS[task]
    if msg.get("role") in ("user", "developer"):
        opens_thinking = conv.thinking and (not conv.drop_thinking or index >= conv.last_user)
        return ASSISTANT + (THINK_START if opens_thinking else THINK_END)
    return ""


def encode_messages(
    messages: list[dict[str, Any]],
    *,
    thinking_mode: str = "chat",
    reasoning_effort: str | None = None,
    chat_format: str = "preview",
    add_generation_prompt: bool = True,
    drop_thinking: bool = True,
    add_bos: bool = True,
) -> str:
    """The prompt text for `messages`, as the release's `encode_messages` writes it.

    A conversation ending in a user turn ends with `<｜Assistant｜></think>` (chat) or
    `<｜Assistant｜><think>` (thinking); `add_generation_prompt=False` leaves that off.
    `drop_thinking` removes the reasoning of turns before the last user turn (thinking mode only);
    it is ignored, as in the release, once any message defines tools. In thinking mode the
    reasoning-effort text of `chat_format` ("preview" or "0731", see REASONING_EFFORT_TEXTS) goes right
    after BOS: the preview has one ("max"), 0731 two ("high" = the preview's "max", and a new "max").
    """
    if thinking_mode not in THINKING_MODES:
        raise ValueError(f"thinking_mode {thinking_mode!r}: expected one of {THINKING_MODES}")
    effort_text = reasoning_effort_text(reasoning_effort, chat_format)
    msgs = _sort_tool_results(_merge_tool_messages(messages))
    thinking = thinking_mode == "thinking"
    drop_thinking = drop_thinking and not any(m.get("tools") for m in msgs)
    if thinking and drop_thinking:
        msgs = _drop_old_reasoning(msgs)
    conv = _Conversation(msgs, thinking, drop_thinking, _last_user_index(msgs))

    parts = [BOS] if add_bos else []
    if thinking and msgs:
        parts.append(effort_text)
    for i in range(len(msgs)):
        parts.append(_render_message(conv, i))
        if i + 1 < len(msgs) or add_generation_prompt:
            parts.append(_transition(conv, i))
    return "".join(parts)


def encode_messages_ids(tokenizer: Tokenizer, messages: list[dict[str, Any]], **options: Any) -> list[int]:
    """Token ids of `encode_messages(messages, **options)`; BOS and the markers are written as text
    and the tokenizer maps them to their ids."""
    return tokenizer.encode(encode_messages(messages, **options))


# ----------------------------------------------------------------------------- parsing completions


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI message shape: `arguments` as a JSON string."""
        return {"type": "function", "function": {"name": self.name, "arguments": _to_json(self.arguments)}}


@dataclass
class Completion:
    reasoning: str | None  # None in chat mode
    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)


_INVOKE = re.compile(rf'<{DSML}invoke name="([^"]*)">(.*?)</{DSML}invoke>', re.DOTALL)
_PARAMETER = re.compile(
    rf'<{DSML}parameter name="([^"]*)" string="(true|false)">(.*?)</{DSML}parameter>', re.DOTALL
)


def _parse_tool_calls(block: str) -> list[ToolCall]:
    """Every complete invoke in a DSML block; a half-written one at the end is left out. A
    `string="false"` value that is not valid JSON is kept as its raw text rather than lost."""
    calls = []
    for name, body in _INVOKE.findall(block):
        args: dict[str, Any] = {}
        for key, is_string, value in _PARAMETER.findall(body):
            if is_string == "true":
                args[key] = value
                continue
            try:
                args[key] = json.loads(value)
            except ValueError:
                args[key] = value
        calls.append(ToolCall(name, args))
    return calls


def _split_tool_block(text: str) -> tuple[str, list[ToolCall]]:
    """(content, tool calls): the block starts at the first DSML tag, after a blank line."""
    start = text.find(f"<{DSML}")
    if start < 0:
        return text, []
    return text[:start].removesuffix("\n\n"), _parse_tool_calls(text[start:])


def parse_completion(text: str, *, thinking_mode: str = "chat") -> Completion:
    """Split generated text (everything after the prompt) into reasoning, content and tool calls.

    Inverse of the assistant turn `encode_messages` writes. Tolerant of truncation: without
    `</think>` all text so far is reasoning (unless a tool-call block follows it); an unfinished tool
    call is dropped, finished ones kept. Text from `<｜end▁of▁sentence｜>` on is ignored.
    """
    if thinking_mode not in THINKING_MODES:
        raise ValueError(f"thinking_mode {thinking_mode!r}: expected one of {THINKING_MODES}")
    text = text.split(EOS, 1)[0]
    if thinking_mode == "chat":
        content, calls = _split_tool_block(text.removeprefix(THINK_END))
        return Completion(None, content, calls)
    text = text.removeprefix(THINK_START)
    end = text.find(THINK_END)
    if end >= 0:  # reasoning is everything before </think>, whatever it mentions
        content, calls = _split_tool_block(text[end + len(THINK_END) :])
        return Completion(text[:end], content, calls)
    # Reasoning never closed: cut off, or the model went straight to a tool-call block.
    start = text.find("\n\n" + TOOL_CALLS_OPEN)
    if start < 0:
        return Completion(text, "")
    return Completion(text[:start], "", _parse_tool_calls(text[start:]))
