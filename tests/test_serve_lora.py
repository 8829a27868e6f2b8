"""Multi-LoRA through the server: adapters are listed in /v1/models, a request's `model` picks one (the
output equals the adapter-merged model's), names are looked up, never used as paths, and unknown ones
are 404. Skipped where the engine has no multi-LoRA support."""
from __future__ import annotations

import copy

import openai
import pytest
import torch
from serve_support import random_model, tiny_tokenizer

from lmforge.infer.engine import LLMEngine
from lmforge.infer.request import SamplingParams

if not hasattr(LLMEngine, "add_lora"):
    pytest.skip("LLMEngine.add_lora is not in this build", allow_module_level=True)

from lmforge.commands import serve as serve_command  # noqa: E402
from lmforge.peft import AdapterConfig, add_adapter, load_adapter, merge_and_unload, save_adapter  # noqa: E402
from lmforge.serve import ServerThread, create_app  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads cost more than they give


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = tiny_tokenizer()
    base = random_model(tok)
    model = add_adapter(copy.deepcopy(base), AdapterConfig(method="lora", r=4, alpha=8, target_modules="all-linear"),
                        "default", activate=True)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.5)
    adapter_dir = save_adapter(model, tmp_path_factory.mktemp("adapter") / "sql")
    return tok, base, str(adapter_dir)


def _greedy_text(model, tok, prompt: str) -> str:
    engine = LLMEngine(model, tok, max_num_seqs=2, block_size=8, max_num_batched_tokens=64)
    return engine.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0].outputs[0].text


def test_requests_route_to_adapters(setup):
    tok, base, adapter_dir = setup
    merged = merge_and_unload(load_adapter(copy.deepcopy(base), adapter_dir))
    engine = LLMEngine(copy.deepcopy(base), tok, max_num_seqs=4, block_size=8, max_num_batched_tokens=64)
    engine.add_lora("sql", adapter_dir)
    with ServerThread(create_app(engine, tok, "tiny")) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        models = {m.id: m for m in client.models.list().data}
        assert set(models) == {"tiny", "sql"} and models["sql"].parent == "tiny"
        args = dict(prompt="the cat sat", max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
        with_adapter = client.completions.create(model="sql", **args)
        without = client.completions.create(model="tiny", **args)
        assert with_adapter.model == "sql"
        assert with_adapter.choices[0].text == _greedy_text(merged, tok, "the cat sat")
        assert without.choices[0].text == _greedy_text(base, tok, "the cat sat")
        assert with_adapter.choices[0].text != without.choices[0].text
        for name in ("nope", "../sql", adapter_dir, "sql/"):
            with pytest.raises(openai.NotFoundError) as caught:
                client.completions.create(model=name, **args)
            assert caught.value.code == "model_not_found"
        with pytest.raises(openai.BadRequestError, match="base model"):
            client.embeddings.create(model="sql", input="hi")


def test_serve_command_loads_loras(setup, tmp_path):
    tok, base, adapter_dir = setup
    base.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    cfg = serve_command.Config(model=str(tmp_path / "model"), lora=[f"sql={adapter_dir}"], max_num_seqs=2,
                               max_num_batched_tokens=64, block_size=8)
    app, name, _ = serve_command.build_app(cfg)
    assert app.state.ctx.models.names() == ["model", "sql"]


def test_load_and_unload_adapters_at_runtime(setup, tmp_path):
    """POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's API), only when enabled: a loaded
    adapter is a model at once and answers like the merged model; bad paths, duplicate names and unknown
    adapters are clear 4xx; without the flag the routes do not exist."""
    import httpx

    tok, base, adapter_dir = setup
    merged_text = _greedy_text(merge_and_unload(load_adapter(copy.deepcopy(base), adapter_dir)), tok, "the cat sat")
    body = {"prompt": "the cat sat", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    engine = LLMEngine(copy.deepcopy(base), tok, max_num_seqs=4, block_size=8, max_num_batched_tokens=64)
    with ServerThread(create_app(engine, tok, "tiny", allow_runtime_lora=True)) as server, \
            httpx.Client(base_url=server.url, timeout=30) as client:
        assert client.post("/v1/completions", json={**body, "model": "sql"}).status_code == 404
        loaded = client.post("/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": adapter_dir})
        assert loaded.status_code == 200 and loaded.json()["status"] == "loaded"
        assert {m["id"] for m in client.get("/v1/models").json()["data"]} == {"tiny", "sql"}
        reply = client.post("/v1/completions", json={**body, "model": "sql"}).json()
        assert reply["choices"][0]["text"] == merged_text
        for bad, param in (({"lora_name": "sql", "lora_path": adapter_dir}, "lora_name"),
                           ({"lora_name": "tiny", "lora_path": adapter_dir}, "lora_name"),
                           ({"lora_name": "x", "lora_path": str(tmp_path / "missing")}, "lora_path"),
                           ({"lora_name": "x", "lora_path": str(tmp_path)}, "lora_path")):
            response = client.post("/v1/load_lora_adapter", json=bad)
            assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
        assert client.post("/v1/load_lora_adapter", json={"lora_name": "x"}).status_code == 400
        unloaded = client.post("/v1/unload_lora_adapter", json={"lora_name": "sql"})
        assert unloaded.status_code == 200 and unloaded.json()["status"] == "unloaded"
        assert client.post("/v1/completions", json={**body, "model": "sql"}).status_code == 404
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": "sql"}).status_code == 404
        again = client.post("/v1/load_lora_adapter", json={"lora_name": "sql2", "lora_path": adapter_dir})
        assert again.status_code == 200
    with ServerThread(create_app(LLMEngine(copy.deepcopy(base), tok, max_num_seqs=2, block_size=8,
                                           max_num_batched_tokens=64), tok, "tiny")) as server:
        response = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": adapter_dir})
        assert response.status_code == 404
