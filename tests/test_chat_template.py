"""Chat templates render exactly as transformers renders them, mark assistant replies, and stay sandboxed."""
from __future__ import annotations

import datetime

import jinja2
import pytest

from lmforge.core.errors import ConfigError, LMForgeError
from lmforge.tokenizer import (
    BUILTIN_TEMPLATES,
    ChatTemplateError,
    Tokenizer,
    TokenizerConfig,
    assistant_char_mask,
    render_chat,
    render_chat_with_assistant_spans,
    resolve_chat_template,
    train_tokenizer,
)

CORPUS = [
    f"{who} {verb} {what}"
    for who in ["The cat", "A robot", "My teacher", "Every student"]
    for verb in ["likes", "found", "remembers"]
    for what in ["a red apple.", "the quiet sea!", "three blue books, again?"]
] + [f"{who}{verb}{what}" for who in ["小猫", "机器人", "老师"] for verb in ["喜欢", "看见了"] for what in ["大海。", "一本书！"]]

CONVERSATIONS = {
    "single_user": [{"role": "user", "content": "Hello!"}],
    "user_assistant": [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
    ],
    "system_multi_turn": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "你好，介绍一下你自己。"},
        {"role": "assistant", "content": "我是一个小模型。 I speak both."},
        {"role": "user", "content": "  Spaces and\nnewlines  "},
        {"role": "assistant", "content": "\nReply with a leading newline and 🤖"},
    ],
}

TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTools:\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}"
    "{{ tools[0] | tojson(indent=2) }}<|im_end|>\n{% endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# namespace, loop controls (break/continue), dict(), and the special-token variables transformers passes in.
FEATURES_TEMPLATE = """{%- set ns = namespace(last_user=-1) %}
{%- for m in messages %}{% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}
{{- bos_token }}
{%- for m in messages %}
  {%- if m.role == 'system' %}{% continue %}{% endif %}
  {%- if loop.index0 > ns.last_user + 1 %}{% break %}{% endif %}
  {%- set d = dict(role=m.role) %}
[{{ d.role | upper }}] {{ m.content | trim }}{{ eos_token if m.role == 'assistant' }}
{% endfor %}
{%- if add_generation_prompt %}[ASSISTANT]{% endif %}"""

TEMPLATES = {**BUILTIN_TEMPLATES, "tools": TOOLS_TEMPLATE, "features": FEATURES_TEMPLATE}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather <now> & 'here'",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def saved_tokenizer(tmp_path_factory) -> str:
    tok = train_tokenizer(CORPUS, TokenizerConfig(kind="byte_bpe", vocab_size=400, min_frequency=1))
    path = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tok(saved_tokenizer) -> Tokenizer:
    return Tokenizer.from_pretrained(saved_tokenizer)


@pytest.fixture(scope="module")
def hf(saved_tokenizer):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(saved_tokenizer)


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("template", list(TEMPLATES))
def test_rendering_matches_transformers(tok, hf, template, conversation, add_generation_prompt):
    messages = CONVERSATIONS[conversation]
    source = TEMPLATES[template]
    tools = TOOLS if template == "tools" else None
    kwargs = dict(add_generation_prompt=add_generation_prompt, tools=tools, chat_template=source)
    text = tok.apply_chat_template(messages, **kwargs)
    assert text == hf.apply_chat_template(messages, tokenize=False, **kwargs)
    ids = tok.apply_chat_template(messages, tokenize=True, **kwargs)
    assert ids == hf.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)
    ours = tok.encode_chat(messages, **kwargs)
    theirs = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, **kwargs)
    assert ours.text == text and ours.input_ids == ids == theirs["input_ids"]
    assert ours.assistant_mask == theirs["assistant_masks"]


def test_chatml_is_the_default_and_has_the_expected_layout(tok):
    messages = CONVERSATIONS["user_assistant"]
    assert tok.chat_template == BUILTIN_TEMPLATES["chatml"] == resolve_chat_template("chatml")
    assert tok.apply_chat_template(messages, add_generation_prompt=True) == (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4.<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("template", ["chatml", "llama2", "zephyr"])
def test_assistant_mask_marks_exactly_the_replies(tok, template):
    messages = CONVERSATIONS["system_multi_turn"]
    closer = {"chatml": "<|im_end|>", "llama2": " <|endoftext|>", "zephyr": "<|endoftext|>"}[template]
    reply = {"chatml": lambda c: c, "llama2": str.strip, "zephyr": lambda c: c}[template]
    expected = [reply(m["content"]) + closer for m in messages if m["role"] == "assistant"]

    text, spans = render_chat_with_assistant_spans(resolve_chat_template(template), messages,
                                                   bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    assert [text[start:end] for start, end in spans] == expected
    char_mask = assistant_char_mask(text, spans)
    assert "".join(c for c, m in zip(text, char_mask) if m) == "".join(expected)

    encoding = tok.encode_chat(messages, chat_template=template)
    masked = [i for i, m in zip(encoding.input_ids, encoding.assistant_mask) if m]
    assert tok.decode(masked) == "".join(expected)


def test_template_variables_and_extras(tok, hf):
    source = (
        "{{ custom }}|{{ bos_token }}|{{ strftime_now('%Y') }}|{{ messages[0].reasoning_content }}"
        "|{{ messages[0].thinking }}|{{ messages[0].tool_calls is defined }}|{{ {'a': '<b>'} | tojson }}"
    )
    messages = [{"role": "assistant", "content": "x", "reasoning": "because", "tool_calls": None}]
    text = tok.apply_chat_template(messages, chat_template=source, custom="mine")
    year = datetime.datetime.now().year
    assert text in (f"mine|<|endoftext|>|{y}|because|because|False|{{\"a\": \"<b>\"}}" for y in (year, year + 1))
    assert text == hf.apply_chat_template(messages, chat_template=source, custom="mine", tokenize=False)
    overridden = tok.apply_chat_template(messages, chat_template="{{ bos_token }}", bos_token="<s>")
    assert overridden == "<s>"


def test_tojson_does_not_escape_html(tok):
    text = tok.apply_chat_template(CONVERSATIONS["single_user"], tools=TOOLS, chat_template=TOOLS_TEMPLATE)
    assert "\"Weather <now> & 'here'\"" in text


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os }}",
    "{{ messages.append({'role': 'user', 'content': 'injected'}) }}",
    "{% set ns = namespace(__class__=1) %}{{ ns }}",
    "{% set ns = namespace() %}{% set ns._private = 1 %}{{ ns }}",
    "{{ messages[0].update({'role': 'system'}) }}",
    "{{ '{0.__class__.__mro__}'.format(messages) }}",
    "{{ (messages | attr('__class__')).__mro__ }}",
])
def test_sandbox_blocks_unsafe_access(source):
    with pytest.raises(ChatTemplateError, match="unsafe|sandbox|not allowed"):
        render_chat(source, CONVERSATIONS["single_user"])


def test_unsafe_attribute_renders_nothing_rather_than_leaking():
    assert render_chat("{{ messages.__class__ }}{{ ''.__class__ }}", CONVERSATIONS["single_user"]) == ""


def test_raise_exception_becomes_our_error(tok):
    wrong_order = [{"role": "assistant", "content": "I speak first"}, {"role": "user", "content": "hm"}]
    with pytest.raises(ChatTemplateError, match="Conversation roles must alternate") as info:
        tok.apply_chat_template(wrong_order, chat_template="llama2")
    assert isinstance(info.value, LMForgeError) and not isinstance(info.value, jinja2.TemplateError)
    assert info.value.__cause__ is None


def test_broken_templates_and_inputs_give_clear_errors(tok):
    with pytest.raises(ChatTemplateError, match="does not compile.*line 1"):
        render_chat("{% for m in messages %}", CONVERSATIONS["single_user"])
    with pytest.raises(ChatTemplateError, match="failed on these messages|raised an error"):
        render_chat("{{ messages[0]['content'] + 1 }}", CONVERSATIONS["single_user"])
    with pytest.raises(ChatTemplateError, match="non-empty list"):
        tok.apply_chat_template([])
    with pytest.raises(ConfigError, match="built-in template"):
        tok.apply_chat_template(CONVERSATIONS["single_user"], chat_template="not-a-template")
    bare = Tokenizer(tok.backend)
    with pytest.raises(ChatTemplateError, match="no chat template"):
        bare.apply_chat_template(CONVERSATIONS["single_user"])
