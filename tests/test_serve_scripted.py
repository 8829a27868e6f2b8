"""End-to-end checks that need a known model output: tool calls (parsed, streamed, sent back), Chinese and
emoji text streamed without ever splitting a UTF-8 character, and stop strings. The model is a real
lmforge `Transformer` subclass whose greedy output is a scripted text (tests/serve_support.py), served by
the real engine and server."""
from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch
from serve_support import chat_prompt_ids, scripted_engine, tiny_tokenizer

from lmforge.serve import ServerThread, create_app
from lmforge.serve.protocol import ChatCompletionRequest
from lmforge.serve.tools import ToolStreamSplitter, active_tools, build_messages, parse_tool_calls

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads cost more than they give


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _serve(engine, tok):
    return ServerThread(create_app(engine, tok, "scripted"))


def test_tool_call_round_trip(tok):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    engine = scripted_engine(tok, chat_prompt_ids(tok, messages, TOOLS), "Let me check. " + CALL)
    with _serve(engine, tok) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        response = client.chat.completions.create(model="scripted", messages=messages, tools=TOOLS, temperature=0)
        choice = response.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}

        chunks = list(client.chat.completions.create(model="scripted", messages=messages, tools=TOOLS,
                                                     temperature=0, stream=True))
        content = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert "<tool_call>" not in content and content.strip() == "Let me check."
        deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
        assert len(deltas) == 1 and deltas[0].index == 0 and deltas[0].function.name == "get_weather"
        assert json.loads(deltas[0].function.arguments) == {"city": "Paris"}
        assert chunks[-1].choices[0].finish_reason == "tool_calls"

        follow_up = messages + [
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 21}'},
        ]
        again = client.chat.completions.create(model="scripted", messages=follow_up, tools=TOOLS, max_tokens=4)
        assert again.choices[0].message.role == "assistant"
        assert again.usage.prompt_tokens == len(chat_prompt_ids(tok, follow_up, TOOLS))


def test_tool_messages_rendering(tok):
    request = ChatCompletionRequest(messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "weather?"},
        {"role": "assistant", "tool_calls": [{"id": "c1", "function": {"name": "get_weather",
                                                                       "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "cold"}], tools=TOOLS)
    messages, template_tools = build_messages(request, tok.chat_template)
    assert template_tools is None  # ChatML has no tools variable: they go into the system message
    assert messages[0]["role"] == "system" and messages[0]["content"].startswith("Be brief.")
    assert "<tools>" in messages[0]["content"] and '"name": "get_weather"' in messages[0]["content"]
    assert messages[2] == {"role": "assistant", "content": CALL.replace("Paris", "Oslo")}
    assert messages[3] == {"role": "user", "content": "<tool_response>\ncold\n</tool_response>"}
    text = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    none = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], tools=TOOLS, tool_choice="none")
    assert active_tools(none) == [] and build_messages(none, tok.chat_template)[0] == [{"role": "user",
                                                                                       "content": "x"}]
    named = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], tools=TOOLS + [
        {"type": "function", "function": {"name": "other"}}],
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert [t["function"]["name"] for t in active_tools(named)] == ["get_weather"]
    assert "You must call the function 'get_weather'" in build_messages(named, tok.chat_template)[0][0]["content"]
    template_with_tools = "{% for t in tools %}{{ t.function.name }}{% endfor %}{{ messages[0].content }}"
    assert build_messages(request, template_with_tools)[1] is not None


def test_tool_call_parser():
    names = {"get_weather"}
    parsed = parse_tool_calls('a <tool_call>{"name": "get_weather", "arguments": {}}</tool_call> b', names)
    assert parsed.content == "a  b" and parsed.tool_calls[0]["function"]["arguments"] == "{}"
    unknown = parse_tool_calls('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', names)
    assert unknown.tool_calls == [] and "rm_rf" in unknown.content
    broken = parse_tool_calls("<tool_call>{not json</tool_call>", names)
    assert broken.tool_calls == [] and broken.content == "<tool_call>{not json</tool_call>"
    two = parse_tool_calls(CALL + "\n" + CALL, names)
    assert len(two.tool_calls) == 2 and two.content is None
    splitter = ToolStreamSplitter(names)
    shown = "".join(splitter.push(piece) for piece in ["Hi <", "tool", "_call>{\"name\": \"get_weather\"",
                                                        ', "arguments": {}}</tool_call>'])
    assert shown == "Hi " and len(splitter.finish().tool_calls) == 1
    plain = ToolStreamSplitter(names)
    assert plain.push("a <to") == "a " and plain.push("o> c") == "<too> c" and plain.finish().content is None


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_chinese_and_emoji_stream_never_split_a_character(tok, endpoint):
    text = "你好世界，今天天气很好。模型说：😀👍"
    prompt = "写一句话："
    messages = [{"role": "user", "content": prompt}]
    prompt_ids = tok.encode(prompt) if endpoint == "completions" else chat_prompt_ids(tok, messages)
    engine = scripted_engine(tok, prompt_ids, text)
    assert len(tok.encode(text)) > len(text)  # characters really are split over several tokens
    body = {"model": "scripted", "temperature": 0, "stream": True, "max_tokens": 100}
    if endpoint == "completions":
        path, body = "/v1/completions", {**body, "prompt": prompt}
    else:
        path, body = "/v1/chat/completions", {**body, "messages": messages}
    with _serve(engine, tok) as server:
        raw = b""
        with httpx.stream("POST", server.url + path, json=body, timeout=30) as response:
            for piece in response.iter_raw(7):  # tiny reads: events arrive cut anywhere
                raw += piece
    events = raw.split(b"\n\n")
    assert events[-2:] == [b"data: [DONE]", b""]
    deltas = []
    for event in events[:-2]:
        payload = json.loads(event.decode("utf-8")[len("data: "):])  # every event is whole UTF-8 JSON
        choice = payload["choices"][0]
        piece = choice.get("text") if endpoint == "completions" else choice["delta"].get("content")
        if piece:
            deltas.append(piece)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text
    assert len(deltas) < len(tok.encode(text))  # bytes of an unfinished character were held back


def test_stop_strings_across_tokens(tok):
    prompt = "say:"
    engine = scripted_engine(tok, tok.encode(prompt), "hello world STOP more text")
    with _serve(engine, tok) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        args = dict(model="scripted", prompt=prompt, temperature=0, max_tokens=40, stop=["STOP", "zzz"])
        response = client.completions.create(**args)
        assert response.choices[0].text == "hello world " and response.choices[0].finish_reason == "stop"
        streamed = "".join(c.choices[0].text for c in client.completions.create(**args, stream=True))
        assert streamed == "hello world "
        kept = client.completions.create(**args, extra_body={"include_stop_str_in_output": True})
        assert kept.choices[0].text == "hello world STOP"
        full = client.completions.create(model="scripted", prompt=prompt, temperature=0, max_tokens=40)
        assert full.choices[0].text == "hello world STOP more text" and full.choices[0].finish_reason == "stop"
