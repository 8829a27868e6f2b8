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
