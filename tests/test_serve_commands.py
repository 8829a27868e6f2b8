"""`lmforge serve` (app built from a model directory), `lmforge chat` (stdin/stdout), and the serve load
benchmark against an in-process server."""
from __future__ import annotations

import io
import random

import openai
import pytest
from serve_support import random_model, tiny_tokenizer

from lmforge.cli import COMMANDS, main
from lmforge.commands import chat as chat_command
from lmforge.commands import serve as serve_command
from lmforge.config import load_config
from lmforge.core.errors import ConfigError
from lmforge.infer.engine import LLMEngine
from lmforge.serve import ServerThread, create_app
from lmforge.serve import loadgen


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads cost more than they give


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = tiny_tokenizer()
    path = tmp_path_factory.mktemp("serve_model") / "tiny-chat"
    random_model(tok).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_commands_are_registered(capsys):
    assert COMMANDS["serve"].module == "lmforge.commands.serve"
    assert COMMANDS["chat"].module == "lmforge.commands.chat"
    assert main(["serve", "--help"]) == 0
    text = capsys.readouterr().out
    assert "limits.max_concurrent_requests" in text and "kv_cache_bytes" in text
    assert main(["chat", "--help"]) == 0 and "/reset" in capsys.readouterr().out
    assert main(["serve", "model=/no/such/dir"]) == 2
    assert "model directory not found" in capsys.readouterr().err


def test_serve_builds_the_app_from_a_directory(model_dir, monkeypatch):
    monkeypatch.setenv("LMFORGE_API_KEY", "from-env")
    cfg = load_config(serve_command.Config, None, [f"model={model_dir}", "max_num_seqs=4", "block_size=8",
                                                   "max_num_batched_tokens=64", "limits.max_tokens=32"])
    app, name, api_key = serve_command.build_app(cfg)
    assert name == "tiny-chat" and api_key == "from-env"
    assert app.state.ctx.engine.block_size == 8 and app.state.ctx.limits.max_tokens == 32
    with ServerThread(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="from-env", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny-chat"]
        reply = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=4)
        assert reply.usage.completion_tokens >= 1
        with pytest.raises(openai.BadRequestError, match="limit of 32"):
            client.completions.create(model="tiny-chat", prompt="hi", max_tokens=33)


def test_serve_config_errors(model_dir, tmp_path):
    with pytest.raises(ConfigError, match="--model"):
        serve_command.build_app(serve_command.Config())
    with pytest.raises(ConfigError, match="NAME=DIR"):
        serve_command.parse_loras(["just-a-name"])
    with pytest.raises(ConfigError, match="not found"):
        serve_command.parse_loras([f"a={tmp_path / 'missing'}"])
    with pytest.raises(ConfigError, match="twice"):
        serve_command.parse_loras([f"a={tmp_path}", f"a={tmp_path}"])
    assert serve_command.parse_loras([f"math={tmp_path}"]) == {"math": str(tmp_path)}
    if not hasattr(LLMEngine, "add_lora"):
        cfg = serve_command.Config(model=str(model_dir), lora=[f"math={tmp_path}"])
        with pytest.raises(ConfigError, match="add_lora"):
            serve_command.build_app(cfg)


def test_chat_streams_keeps_history_and_resets(model_dir):
    cfg = chat_command.Config(model=str(model_dir), max_tokens=5, temperature=0.0, repetition_penalty=1.0)
    stdin = io.StringIO("hello there\nand again\n/reset\nhello there\n/exit\nnever read\n")
    stdout = io.StringIO()
    transcript = chat_command.run(cfg, stdin=stdin, stdout=stdout)
    assert [t["user"] for t in transcript] == ["hello there", "and again", "hello there"]
    first, second, after_reset = transcript
    assert second["prompt_tokens"] > first["prompt_tokens"]  # the first exchange is in the second prompt
    assert after_reset["prompt_tokens"] == first["prompt_tokens"] and after_reset["reply"] == first["reply"]
    out = stdout.getvalue()
    assert "[conversation reset]" in out and out.count("assistant> ") == 3
    assert first["reply"] in out


def test_loadgen_config_validation():
    with pytest.raises(ConfigError, match="endpoint"):
        loadgen.Config(endpoint="grpc").validate()
    with pytest.raises(ConfigError, match="request_rate"):
        loadgen.Config(request_rate=0).validate()
    rng = random.Random(0)
    assert loadgen.draw_length(rng, 10, "fixed", 0.5) == 10
    assert all(5 <= loadgen.draw_length(rng, 10, "uniform", 0.5) <= 15 for _ in range(50))
    summary = loadgen.summarize([loadgen.RequestResult(ok=False, error="boom")], 1.0)
    assert summary["failed"] == 1 and summary["ttft_ms"]["p50"] is None and summary["errors"] == ["boom"]


@pytest.mark.parametrize("arrival,endpoint", [("burst", "completions"), ("poisson", "chat")])
def test_loadgen_against_the_server(arrival, endpoint, tmp_path):
    tok = tiny_tokenizer()
    engine = LLMEngine(random_model(tok), tok, max_num_seqs=4, block_size=8, max_num_batched_tokens=128)
    with ServerThread(create_app(engine, tok, "tiny")) as server:
        cfg = loadgen.Config(url=server.url, endpoint=endpoint, num_requests=6, arrival=arrival, request_rate=50.0,
                             concurrency=3, prompt_len=8, output_len=6, length_dist="uniform", length_spread=0.5,
                             output=str(tmp_path / "bench.json"))
        summary = loadgen.run_bench_serve(cfg)
    assert summary["completed"] == 6 and summary["failed"] == 0
    rng = random.Random(cfg.seed)  # the same draws as the benchmark: prompt length, then output length
    expected = 0
    for _ in range(6):
        words = loadgen.draw_length(rng, 8, "uniform", 0.5)
        for _ in range(words):
            rng.choice(loadgen._WORDS)
        expected += loadgen.draw_length(rng, 6, "uniform", 0.5)
        if arrival == "poisson":
            rng.expovariate(50.0)
    assert summary["output_tokens"] == expected  # ignore_eos: every output ran to its drawn length
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        values = summary[key]
        assert 0 < values["p50"] <= values["p90"] <= values["p99"]
    assert summary["output_tokens_per_s"] > 0 and summary["request_throughput"] > 0
    assert summary["config"]["model"] == "tiny"
    assert (tmp_path / "bench.json").is_file()
    assert "TTFT" in loadgen.format_summary(summary)


def test_loadgen_token_prompts_have_exactly_prompt_len_tokens(tmp_path):
    """With `tokenizer`, prompts are token ids of exactly the drawn length, so a benchmark compares the
    server and a baseline on the same prompt lengths (words are often several tokens each)."""
    tok = tiny_tokenizer()
    tok.save_pretrained(tmp_path / "tok")
    encode = loadgen.prompt_encoder(str(tmp_path / "tok"))
    rng = random.Random(0)
    for length in (1, 7, 40):
        prompt = loadgen.make_prompt(rng, length, encode)
        assert isinstance(prompt, list) and len(prompt) == length
    words = loadgen.make_prompt(random.Random(0), 40)
    assert len(encode(words)) > 40  # why the option exists: 40 words are more than 40 tokens here
    with pytest.raises(ConfigError, match="completions"):
        loadgen.Config(tokenizer=str(tmp_path / "tok"), endpoint="chat").validate()
    with pytest.raises(ConfigError, match="tokenizer.json"):
        loadgen.prompt_encoder(str(tmp_path / "missing"))
    engine = LLMEngine(random_model(tok), tok, max_num_seqs=4, block_size=8, max_num_batched_tokens=128)
    with ServerThread(create_app(engine, tok, "tiny")) as server:
        summary = loadgen.run_bench_serve(loadgen.Config(
            url=server.url, num_requests=3, arrival="burst", concurrency=3, prompt_len=9, output_len=4,
            length_dist="fixed", tokenizer=str(tmp_path / "tok")))
    assert summary["completed"] == 3 and summary["prompt_tokens"] == 27
