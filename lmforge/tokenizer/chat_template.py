"""Render chat templates (Jinja, from model files, i.e. from strangers) safely, as transformers renders them.

Same environment as transformers 5: `ImmutableSandboxedEnvironment` with trim_blocks + lstrip_blocks, the
loopcontrols extension, a `{% generation %}` … `{% endgeneration %}` block that records where assistant
replies land in the output, the globals `raise_exception`, `strftime_now`, `dict` and `namespace`, and a
`tojson` filter that does not HTML-escape. Anything a template does wrong becomes a `ChatTemplateError`.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
from collections.abc import Iterator, Mapping
from datetime import datetime
from functools import lru_cache
from types import MappingProxyType
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..core.errors import ConfigError, LMForgeError

Message = dict[str, Any]
Span = tuple[int, int]


class ChatTemplateError(LMForgeError):
    """A chat template failed: it does not compile, it raised, or it tried something the sandbox forbids."""


# ChatML: the format lmforge trains with. The assistant's reply and its closing <|im_end|> sit inside
# {% generation %}, so SFT learns to write the reply and to stop; the newline after it is never generated.
CHATML = (
    "{%- for message in messages -%}\n"
    "{%- if message['role'] == 'assistant' -%}\n"
    "{{- '<|im_start|>assistant\\n' -}}\n"
    "{%- generation -%}\n"
    "{{- message['content'] + '<|im_end|>' -}}\n"
    "{%- endgeneration -%}\n"
    "{{- '\\n' -}}\n"
    "{%- else -%}\n"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "{{- '<|im_start|>assistant\\n' -}}\n"
    "{%- endif -%}\n"
)

# Llama-2 chat: [INST] … [/INST], system prompt folded into the first user turn, strict alternation.
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' ' }}{% generation %}{{ content.strip() + ' ' + eos_token }}{% endgeneration %}"
    "{% endif %}"
    "{% endfor %}"
)

# Zephyr: <|user|>/<|assistant|>/<|system|> headers, each turn closed by eos and a newline; relies on
# trim_blocks/lstrip_blocks. trim_blocks eats the newline after {% endgeneration %}, so the blank line below
# is what writes the assistant turn's closing "\n" (outside the generation span, as for the other roles).
ZEPHYR = """{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}

{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""

BUILTIN_TEMPLATES: Mapping[str, str] = MappingProxyType({"chatml": CHATML, "llama2": LLAMA2, "zephyr": ZEPHYR})


def resolve_chat_template(name_or_template: str) -> str:
    """The Jinja source for a built-in template name, or the string itself when it already is a template."""
    if name_or_template in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[name_or_template]
    if "{{" in name_or_template or "{%" in name_or_template:
        return name_or_template
    raise ConfigError(
        f"chat_template={name_or_template!r} is neither a built-in template ({', '.join(BUILTIN_TEMPLATES)}) "
        "nor a Jinja template string"
    )


class _GenerationTracker(jinja2.ext.Extension):
    """`{% generation %}…{% endgeneration %}`: renders its body unchanged and, while a render is being
    tracked, records the body's [start, end) character span in the output."""

    tags = {"generation"}

    def __init__(self, environment: jinja2.Environment) -> None:
        super().__init__(environment)
        # Per render, not per template: compiled templates are cached and may render in several threads.
        self._active: contextvars.ContextVar[tuple[list[str], list[Span]] | None] = contextvars.ContextVar(
            "lmforge_generation_tracker", default=None
        )
        environment.extend(track_generation=self.track)

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        text = caller()
        state = self._active.get()
        if state is not None:
            # Everything rendered before this block has already been yielded into `blocks` by Template.generate.
            blocks, spans = state
            start = sum(len(b) for b in blocks)
            spans.append((start, start + len(text)))
        return text

    @contextlib.contextmanager
    def track(self, blocks: list[str], spans: list[Span]) -> Iterator[None]:
        token = self._active.set((blocks, spans))
        try:
            yield
        finally:
            self._active.reset(token)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes (<, >, &, ') and would change what the model sees in tool schemas.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _SafeDict:
    """`dict(...)` inside templates, without exposing the dict type itself (no `dict.__subclasses__` games)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _SafeNamespace(jinja2.utils.Namespace):
    """Jinja's `namespace()`, refusing underscore names so a template cannot reach Python internals through it."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - same signature trick as jinja2's Namespace
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _SafeNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _SafeNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with '_', which is not allowed")


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for part in version.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


@lru_cache(maxsize=32)
def compile_chat_template(source: str) -> jinja2.Template:
    """The compiled template for `source` (cached), in the sandboxed environment transformers uses."""
    if _version_tuple(jinja2.__version__) < (3, 1, 6):
        # Older releases have known sandbox escapes (through str.format and the |attr filter).
        raise ChatTemplateError(f"jinja2 {jinja2.__version__} cannot render chat templates safely; install jinja2>=3.1.6")
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTracker, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _SafeDict()
    env.globals["namespace"] = _SafeNamespace
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not compile: {e.message} (template line {e.lineno})") from None


def plain_data(value: Any) -> Any:
    """`value` rebuilt from JSON types only; other objects become a placeholder like "<ndarray>".

    The sandbox only knows which attributes of plain Python types are safe; a rich object handed to a
    template (a tensor, an image) may carry methods that write files."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {plain_data(k): plain_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain_data(v) for v in value)
    return f"<{type(value).__name__}>"


_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


def _prepare_messages(messages: list[Message]) -> list[Message]:
    """Plain copies of the messages, with None-valued keys dropped and reasoning under both names templates read."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatTemplateError("a conversation must be a non-empty list of {'role': ..., 'content': ...} messages")
    prepared = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"message {i} must be a dict with 'role' and 'content', got {message!r}")
        # APIs send content=None or tool_calls=None; templates handle a missing key but print "None".
        message = {k: plain_data(v) for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_KEYS if k in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        prepared.append(message)
    return prepared


def _render(source: str, messages: list[Message], add_generation_prompt: bool, tools: list[dict] | None,
            documents: list[dict] | None, track: bool, variables: dict[str, Any]) -> tuple[str, list[Span]]:
    template = compile_chat_template(source)
    if tools is not None and not all(isinstance(t, Mapping) for t in tools):
        raise ChatTemplateError("tools must be JSON-schema dicts ({'type': 'function', 'function': {...}})")
    context = {
        **plain_data(variables),
        "messages": _prepare_messages(messages),
        "tools": plain_data(tools),
        "documents": plain_data(documents),
        "add_generation_prompt": add_generation_prompt,
    }
    blocks: list[str] = []
    spans: list[Span] = []
    try:
        if not track:
            return template.render(**context), spans
        with template.environment.track_generation(blocks, spans):  # type: ignore[attr-defined]
            for block in template.generate(**context):
                blocks.append(block)
        return "".join(blocks), spans
    except jinja2.exceptions.SecurityError as e:
        raise ChatTemplateError(f"chat template tried an unsafe operation, blocked by the sandbox: {e}") from None
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"chat template raised an error: {e}") from None
    except Exception as e:  # a stranger's template can trip any Python error; report it as the template's
        raise ChatTemplateError(f"chat template failed on these messages: {type(e).__name__}: {e}") from None


def render_chat(source: str, messages: list[Message], add_generation_prompt: bool = False,
                tools: list[dict] | None = None, documents: list[dict] | None = None, **variables: Any) -> str:
    """The conversation as text, rendered by the Jinja template `source`.

    `variables` reach the template as globals (transformers passes bos_token, eos_token, … this way)."""
    return _render(source, messages, add_generation_prompt, tools, documents, False, variables)[0]


def render_chat_with_assistant_spans(
    source: str, messages: list[Message], add_generation_prompt: bool = False,
    tools: list[dict] | None = None, documents: list[dict] | None = None, **variables: Any,
) -> tuple[str, list[Span]]:
    """The rendered conversation and the [start, end) character spans of its `{% generation %}` blocks.

    The spans are what SFT trains on (the assistant replies); a template without generation blocks gives []."""
    return _render(source, messages, add_generation_prompt, tools, documents, True, variables)


def assistant_char_mask(text: str, spans: list[Span]) -> list[int]:
    """Per character of `text`: 1 inside an assistant span, else 0."""
    mask = [0] * len(text)
    for start, end in spans:
        mask[start:end] = [1] * (end - start)
    return mask


def assistant_token_mask(offsets: list[tuple[int, int]], spans: list[Span]) -> list[int]:
    """Per token (given its character offsets): 1 if it overlaps an assistant span, else 0.

    Overlap rather than containment, as transformers does: a byte-level token that straddles a span edge
    (e.g. "\\n" merged into the reply's first piece) still counts as the reply's."""
    mask = [0] * len(offsets)
    span_index = 0
    for i, (start, end) in enumerate(offsets):
        while span_index < len(spans) and start >= spans[span_index][1]:
            span_index += 1
        if span_index == len(spans):
            break
        if end > spans[span_index][0]:
            mask[i] = 1
    return mask
