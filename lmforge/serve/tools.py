"""Function calling: turn OpenAI messages + `tools` into chat-template input, and model text into tool calls.

The format (the one Qwen2.5 and Hermes models are trained on, so such checkpoints work unchanged):

- tools are offered in a system message, one JSON schema per line inside `<tools>` … `</tools>`, unless
  the model's own chat template renders `tools` itself (its source mentions `tools`), in which case the
  schemas go to the template;
- the model calls a tool by writing, anywhere in its reply,
  `<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>` (one block per call);
- an earlier assistant turn's `tool_calls` are written back in that same form, and a `role: tool`
  message becomes a user turn `<tool_response>…</tool_response>` when the template has no `tool` role.

Text outside the blocks is the message content; a block that is not valid JSON, or names a tool that was
not offered, stays in the content as text.

`tool_choice: "required"` or a named function is enforced, not only asked for: the reply is decoded under
a grammar (`forced_call_grammar`) that admits only `<tool_call>` blocks whose JSON names an offered tool
(the named one) and whose arguments follow that tool's parameter schema — so even a model never trained
on tools returns a call that parses.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from .protocol import APIError, ChatMessage, ChatCompletionRequest

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
_TOOL_CALL = re.compile(re.escape(TOOL_CALL_OPEN) + r"\s*(.*?)\s*" + re.escape(TOOL_CALL_CLOSE), re.DOTALL)

TOOLS_PREAMBLE = (
    "# Tools\n\n"
    "You may call one or more functions to help with the user's request. The functions are described "
    "by these JSON schemas:\n<tools>\n{schemas}\n</tools>\n\n"
    "To call a function, write a JSON object with its name and arguments inside tags:\n"
    "<tool_call>\n{{\"name\": <function-name>, \"arguments\": <arguments-object>}}\n</tool_call>"
)


def message_text(message: ChatMessage, index: int) -> str:
    """A message's content as one string (text parts joined); other part types are refused."""
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    texts = []
    for part in message.content:
        if part.type != "text" or part.text is None:
            raise APIError(400, f"messages[{index}].content: part type {part.type!r} is not supported "
                                "(this server takes text only)", param=f"messages[{index}].content")
        texts.append(part.text)
    return "".join(texts)


def template_renders(template_source: str | None, name: str) -> bool:
    """Whether a chat template reads `name` itself (e.g. `tools`, `tool_calls`)."""
    return template_source is not None and name in template_source


def active_tools(request: ChatCompletionRequest) -> list[dict[str, Any]]:
    """The tool schemas to offer, after `tool_choice` (none: no tools; a named tool: only that one)."""
    if not request.tools or request.tool_choice == "none":
        return []
    tools = [tool.model_dump(exclude_none=True) for tool in request.tools]
    choice = request.tool_choice
    if choice is not None and not isinstance(choice, str):
        tools = [t for t in tools if t["function"]["name"] == choice.function.name]
        if not tools:
            raise APIError(400, f"tool_choice names function {choice.function.name!r}, which is not in tools",
                           param="tool_choice")
    return tools


def forced_call_grammar(request: ChatCompletionRequest, tools: list[dict[str, Any]]) -> str | None:
    """A Lark grammar (llguidance dialect) for replies that must call a tool, or None when the call is
    optional. Named function: exactly one call of it; "required": one or more calls of offered tools."""
    choice = request.tool_choice
    if not tools or choice is None or choice in ("auto", "none"):
        return None
    variants = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                 "properties": {"name": {"const": t["function"]["name"]},
                                "arguments": t["function"].get("parameters") or {"type": "object"}}}
                for t in tools]
    schema = variants[0] if len(variants) == 1 else {"anyOf": variants}
    schema = {**schema, "x-guidance": {"whitespace_flexible": False}}  # compact JSON, as response_format
    calls = "call" if choice != "required" else 'call ("\\n" call)*'
    return (f"start: {calls}\n"
            f'call: "{TOOL_CALL_OPEN}" body "{TOOL_CALL_CLOSE}"\n'
            f"body: %json {json.dumps(schema, ensure_ascii=False)}\n")


def _tool_instruction(request: ChatCompletionRequest) -> str:
    choice = request.tool_choice
    if choice == "required":
        return "\n\nYou must call at least one of these functions."
    if choice is not None and not isinstance(choice, str):
        return f"\n\nYou must call the function {choice.function.name!r}."
    return ""


def build_messages(request: ChatCompletionRequest, template_source: str | None) -> tuple[list[dict], list[dict] | None]:
    """(messages for the chat template, tools for the template or None)."""
    tools = active_tools(request)
    template_takes_tools = template_renders(template_source, "tools")
    template_takes_calls = template_renders(template_source, "tool_calls")
    template_takes_tool_role = template_renders(template_source, "'tool'") or \
        template_renders(template_source, '"tool"')
    messages: list[dict[str, Any]] = []
    for i, message in enumerate(request.messages):
        text = message_text(message, i)
        role = "system" if message.role == "developer" else message.role
        if role == "assistant" and message.tool_calls and not template_takes_calls:
            blocks = [format_tool_call(call.function.name, call.function.arguments) for call in message.tool_calls]
            text = "\n".join(([text] if text else []) + blocks)
            messages.append({"role": "assistant", "content": text})
        elif role == "assistant" and message.tool_calls:
            messages.append({"role": "assistant", "content": text,
                             "tool_calls": [call.model_dump(exclude_none=True) for call in message.tool_calls]})
        elif role == "tool" and not template_takes_tool_role:
            messages.append({"role": "user", "content": f"<tool_response>\n{text}\n</tool_response>"})
        else:
            entry = {"role": role, "content": text}
            if message.tool_call_id is not None:
                entry["tool_call_id"] = message.tool_call_id
            if message.name is not None:
                entry["name"] = message.name
            messages.append(entry)
    if not tools:
        return messages, None
    if template_takes_tools:
        return messages, tools
    preamble = TOOLS_PREAMBLE.format(schemas="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
    preamble += _tool_instruction(request)
    if messages and messages[0]["role"] == "system":
        messages[0] = {**messages[0], "content": messages[0]["content"] + "\n\n" + preamble}
    else:
        messages.insert(0, {"role": "system", "content": preamble})
    return messages, None


def format_tool_call(name: str, arguments: str | dict[str, Any]) -> str:
    """An earlier call written back the way the model is asked to write calls."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            pass  # keep the caller's string as it is
    return TOOL_CALL_OPEN + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + TOOL_CALL_CLOSE


@dataclass
class ParsedToolCalls:
    content: str | None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


def parse_tool_calls(text: str, tool_names: set[str]) -> ParsedToolCalls:
    """Split model output into content and OpenAI-shaped tool calls (see the module docstring)."""
    calls: list[dict[str, Any]] = []
    kept: list[str] = []
    last = 0
    for match in _TOOL_CALL.finditer(text):
        call = _decode_call(match.group(1), tool_names)
        if call is None:
            continue
        kept.append(text[last:match.start()])
        last = match.end()
        calls.append(call)
    kept.append(text[last:])
    content = "".join(kept).strip() if calls else text
    return ParsedToolCalls(content=content or None, tool_calls=calls)


def _decode_call(body: str, tool_names: set[str]) -> dict[str, Any] | None:
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or value.get("name") not in tool_names:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": value["name"], "arguments": arguments}}


class ToolStreamSplitter:
    """Streaming: pass content through, but hold back anything from a possible `<tool_call>` on, so a
    call's raw JSON never reaches the client as content. `finish()` parses the held text."""

    def __init__(self, tool_names: set[str]):
        self.tool_names = tool_names
        self._held = ""
        self._in_call = False

    def push(self, text: str) -> str:
        """The content that is safe to send now."""
        if self._in_call:
            self._held += text
            return ""
        buffer = self._held + text
        at = buffer.find(TOOL_CALL_OPEN)
        if at != -1:
            self._in_call = True
            self._held = buffer[at:]
            return buffer[:at]
        keep = _partial_suffix(buffer, TOOL_CALL_OPEN)
        self._held = buffer[len(buffer) - keep:] if keep else ""
        return buffer[:len(buffer) - keep]

    def finish(self) -> ParsedToolCalls:
        """Content still held (after calls are removed) and the parsed calls."""
        parsed = parse_tool_calls(self._held, self.tool_names)
        self._held = ""
        return parsed


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0
