"""The server through the official `openai` client (sync and async, streaming and not), against a real
uvicorn server in a background thread serving a tiny random model."""
from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
import torch
from serve_support import random_model, tiny_tokenizer

from lmforge.infer.engine import LLMEngine
from lmforge.infer.request import SamplingParams
from lmforge.serve import ServerThread, create_app


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads cost more than they give


@pytest.fixture(scope="module")
def setup():
    tok = tiny_tokenizer()
    model = random_model(tok)
    engine = LLMEngine(model, tok, max_num_seqs=8, block_size=8, max_num_batched_tokens=128)
    with ServerThread(create_app(engine, tok, "tiny")) as server:
        yield server, engine, tok, model


@pytest.fixture(scope="module")
def client(setup):
    return openai.OpenAI(base_url=setup[0].url + "/v1", api_key="unused", max_retries=0)


def _no_stop(tok) -> dict[str, float]:
    """logit_bias that keeps EOS and <|im_end|> from ending a reply early (random models emit them)."""
    return {str(tok.token_to_id(t)): -100 for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")}


def _reference(setup, prompt: str, max_tokens: int):
    """What the engine itself generates greedily (a fresh engine on the same model)."""
    _, _, tok, model = setup
    engine = LLMEngine(model, tok, max_num_seqs=2, block_size=8, max_num_batched_tokens=128)
    return engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))[0]


def test_models_lists_the_base_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_completion_matches_the_engine(setup, client):
    want = _reference(setup, "the cat sat", 12)
    response = client.completions.create(model="tiny", prompt="the cat sat", max_tokens=12, temperature=0,
                                         extra_body={"ignore_eos": True})
    choice = response.choices[0]
    assert choice.text == want.outputs[0].text and choice.finish_reason == "length"
    assert response.usage.prompt_tokens == len(want.prompt_token_ids)
    assert response.usage.completion_tokens == 12 and response.usage.total_tokens == 12 + len(want.prompt_token_ids)


def test_completion_stream_equals_non_stream(setup, client):
    _, _, tok, _ = setup
    args = dict(model="tiny", prompt="weather in Paris", max_tokens=10, temperature=0, logit_bias=_no_stop(tok))
    full = client.completions.create(**args).choices[0].text
    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_completion_several_prompts_and_n(setup, client):
    _, _, tok, _ = setup
    response = client.completions.create(model="tiny", prompt=["the cat", "hello"], n=2, max_tokens=4,
                                         temperature=1.0, seed=3, logit_bias=_no_stop(tok))
    assert sorted(c.index for c in response.choices) == [0, 1, 2, 3]
    assert response.usage.completion_tokens == 16
    token_prompt = client.completions.create(model="tiny", prompt=tok.encode("the cat"), max_tokens=4, temperature=0)
    text_prompt = client.completions.create(model="tiny", prompt="the cat", max_tokens=4, temperature=0)
    assert token_prompt.choices[0].text == text_prompt.choices[0].text


def test_completion_logprobs_and_echo(setup, client):
    _, _, tok, _ = setup
    response = client.completions.create(model="tiny", prompt="the cat", max_tokens=5, temperature=0, logprobs=3,
                                         echo=True, logit_bias=_no_stop(tok))
    choice = response.choices[0]
    assert choice.text.startswith("the cat")
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    for logprob, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and len(top) <= 3 and max(top.values()) >= logprob - 1e-5  # greedy: the top token
    assert lp.text_offset[0] == len("the cat")


def test_chat_with_logprobs_and_n(setup, client):
    _, _, tok, _ = setup
    response = client.chat.completions.create(
        model="tiny", messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        max_completion_tokens=6, n=2, temperature=0.8, seed=1, logprobs=True, top_logprobs=2,
        logit_bias=_no_stop(tok))
    assert [c.index for c in response.choices] == [0, 1]
    expected_prompt = tok.apply_chat_template([{"role": "system", "content": "be brief"},
                                               {"role": "user", "content": "hi"}], add_generation_prompt=True,
                                              tokenize=True)
    assert response.usage.prompt_tokens == len(expected_prompt) and response.usage.completion_tokens == 12
    for choice in response.choices:
        assert choice.message.role == "assistant" and choice.finish_reason == "length"
        content = choice.logprobs.content
        assert len(content) == 6
        assert all(len(item.top_logprobs) == 2 and item.logprob <= 0 for item in content)
        raw = b"".join(bytes(item.bytes) for item in content)
        assert raw.decode("utf-8", "replace") == choice.message.content


def test_seed_reproduces_sampling(setup, client):
    args = dict(model="tiny", messages=[{"role": "user", "content": "tell me"}], max_tokens=8, temperature=1.0,
                seed=1234)
    first = client.chat.completions.create(**args).choices[0].message.content
    second = client.chat.completions.create(**args).choices[0].message.content
    assert first == second


def test_logit_bias_and_penalties_reach_the_sampler(setup, client):
    _, _, tok, _ = setup
    forced = tok.token_to_id("cat") if tok.token_to_id("cat") is not None else 100
    response = client.completions.create(model="tiny", prompt="the", max_tokens=4, temperature=0,
                                         logit_bias={str(forced): 100})
    assert response.choices[0].text == tok.decode([forced] * 4)
    for field, value in (("frequency_penalty", 2.5), ("presence_penalty", -3.0), ("top_p", 0.0)):
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(model="tiny", prompt="the", max_tokens=4, **{field: value})
        assert caught.value.status_code == 400 and field in caught.value.message
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.completions.create(model="tiny", prompt="the", max_tokens=4, logit_bias={"99999": 1})


def test_stop_strings(setup, client):
    _, _, tok, _ = setup
    full = client.completions.create(model="tiny", prompt="the cat", max_tokens=12, temperature=0,
                                     logit_bias=_no_stop(tok)).choices[0].text
    stop = full[3:5]
    if not stop.strip():
        pytest.skip("the greedy text has no usable stop string")
    cut = client.completions.create(model="tiny", prompt="the cat", max_tokens=12, temperature=0, stop=[stop],
                                    logit_bias=_no_stop(tok)).choices[0]
    assert cut.finish_reason == "stop" and cut.text == full[:full.index(stop)]


def test_chat_stream_async_client(setup):
    server, _, tok, _ = setup

    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        args = dict(model="tiny", messages=[{"role": "user", "content": "你好"}], max_tokens=8, temperature=0,
                    logit_bias=_no_stop(tok))
        full = await client.chat.completions.create(**args)
        stream = await client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
        await client.close()
        return full, chunks
    full, chunks = asyncio.run(main())
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8


def test_embeddings(setup, client):
    server, _, tok, model = setup
    response = client.embeddings.create(model="tiny", input=["hello world", "the cat sat", "hello world"])
    vectors = [torch.tensor(d.embedding) for d in response.data]
    assert len(vectors) == 3 and vectors[0].shape == (model.config.hidden_size,)
    assert all(abs(float(v.norm()) - 1.0) < 1e-4 for v in vectors)
    assert torch.allclose(vectors[0], vectors[2], atol=1e-6) and not torch.allclose(vectors[0], vectors[1])
    with torch.no_grad():
        hidden = model.hidden_states(torch.tensor([tok.encode("the cat sat")]))[0].mean(0)
    assert torch.allclose(vectors[1], hidden / hidden.norm(), atol=1e-5)
    assert response.usage.prompt_tokens == len(tok.encode("hello world")) * 2 + len(tok.encode("the cat sat"))
    floats = httpx.post(server.url + "/v1/embeddings", json={"input": "the cat sat", "encoding_format": "float"}).json()
    assert torch.allclose(torch.tensor(floats["data"][0]["embedding"]), vectors[1], atol=1e-6)


def test_sse_framing(setup):
    server = setup[0]
    body = {"model": "tiny", "prompt": "the cat", "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode("utf-8")
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for event in events[:-2]:
        assert event.startswith("data: ") and "\n" not in event
        assert json.loads(event[len("data: "):])["object"] == "text_completion"
