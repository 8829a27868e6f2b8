"""The stage commands wired end to end through the CLI on tiny inputs."""
from __future__ import annotations

import json

import pytest

from conftest import pretrain_args
from lmforge.cli import main


def test_corpus_tokenizer_data_commands(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    assert main(["corpus", f"out_dir={corpus}", "corpus.target_chars=60000", "corpus.world.num_people=20",
                 "corpus.world.num_companies=6", "corpus.world.num_cities=6", "corpus.world.num_countries=3",
                 "corpus.world.num_held_out_people=4"]) == 0
    assert (corpus / "train").is_dir() and (corpus / "tasks").is_dir()
    assert main(["tokenizer", f"sources=[{{path: {corpus / 'train'}}}]", "tokenizer.vocab_size=300",
                 f"output_dir={tmp_path / 'tok'}"]) == 0
    assert main(["tokenizer", f"sources=[{{path: {corpus / 'train'}}}]", f"output_dir={tmp_path / 'tok'}"]) == 2
    assert "already holds a tokenizer" in capsys.readouterr().err
    assert main(["data", f"sources=[{{path: {corpus / 'train'}, name: synth}}]", f"tokenizer={tmp_path / 'tok'}",
                 f"output_dir={tmp_path / 'data'}"]) == 0
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["splits"]["train"]["tokens"] > 10_000 and meta["dtype"] == "uint16"


def test_data_command_reports_bad_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{not json}\n')
    assert main(["data", f"sources=[{{path: {bad}}}]", "tokenizer=nowhere", f"output_dir={tmp_path / 'd'}"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


def test_generate_command_samples(tiny_data, tmp_path, capsys):
    assert main(["pretrain", *pretrain_args(tiny_data, tmp_path / "run", "train.max_steps=2")]) == 0
    capsys.readouterr()
    model = tmp_path / "run" / "model"
    assert main(["generate", "--model", str(model), "--prompt", "Hello", "--max_new_tokens", "5"]) == 0
    assert "tokens/s" in capsys.readouterr().out
    assert main(["generate", "--model", str(model), "--prompt", "Hi,你好", "--temperature", "0.8", "--top_p", "0.9",
                 "--top_k", "20", "--seed", "3", "--max_new_tokens", "4"]) == 0
    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_generate_and_chat_take_an_adapter(tiny_data, tmp_path, capsys):
    """--adapter loads a PEFT adapter on the model (the merged model's greedy text comes out)."""
    import copy
    import io

    import torch

    from lmforge.commands import chat as chat_command
    from lmforge.infer import generate
    from lmforge.infer.load import load_model_and_tokenizer
    from lmforge.peft import AdapterConfig, add_adapter, merge_and_unload, save_adapter

    assert main(["pretrain", *pretrain_args(tiny_data, tmp_path / "run", "train.max_steps=2")]) == 0
    model_dir = tmp_path / "run" / "model"
    base, tok = load_model_and_tokenizer(model_dir)
    lora = add_adapter(copy.deepcopy(base), AdapterConfig(method="lora", r=4, alpha=8, target_modules="all-linear"),
                       "default", activate=True)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(0)) * 0.5)
    save_adapter(lora, tmp_path / "adapter")
    prompt = [tok.bos_id] + tok.encode("Hello") if tok.bos_id is not None and tok.bos_id != tok.eos_id \
        else tok.encode("Hello")
    merged = tok.decode(generate(merge_and_unload(lora), [prompt], 6)[0], skip_special_tokens=True)
    plain = tok.decode(generate(base, [prompt], 6)[0], skip_special_tokens=True)
    assert merged != plain
    capsys.readouterr()
    assert main(["generate", "--model", str(model_dir), "--adapter", str(tmp_path / "adapter"), "--prompt", "Hello",
                 "--max_new_tokens", "6"]) == 0
    assert capsys.readouterr().out.startswith(f"Hello\u2192{merged}")
    assert main(["generate", "--model", str(model_dir), "--adapter", str(tmp_path / "none"), "--prompt", "x"]) == 2
    if tok.chat_template is not None:
        cfg = chat_command.Config(model=str(model_dir), adapter=str(tmp_path / "adapter"), max_tokens=4,
                                  temperature=0.0, repetition_penalty=1.0)
        transcript = chat_command.run(cfg, stdin=io.StringIO("hi\n/exit\n"), stdout=io.StringIO())
        assert len(transcript) == 1


@pytest.mark.slow
def test_quickstart_runs_and_reports(tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["quickstart", f"out_dir={out}", "pretrain_steps=4", "recall_facts=10", "progress=false",
                 "sft_steps=2", "eval_limit=4"]) == 0
    report = (out / "report.md").read_text()
    for needle in ("validation perplexity", "fact recall", "exact duplicates", "tokens/s", "MFU",
                   "## 7. Fine-tuning", "| full |", "| lora |", "## 8. Evaluation", "| full-sft |", "## 9. Serving",
                   "time to first token"):
        assert needle in report
    results = json.loads((out / "eval" / "results.json").read_text())
    assert set(results["models"]) == {"base", "full-sft", "lora-sft"}
    assert (out / "eval" / "report.html").is_file() and (out / "sft_lora" / "adapter").is_dir()
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert main(["quickstart", f"out_dir={out}"]) == 2  # never clobbers a previous run unasked
