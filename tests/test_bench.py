"""`lmforge bench`: subcommand dispatch, and `bench generate` end to end on a tiny random model."""
from __future__ import annotations

import pytest

from lmforge.cli import main

TINY = ["--hidden_size", "32", "--num_layers", "2", "--num_heads", "4", "--intermediate_size", "64",
        "--vocab_size", "128", "--prompt_tokens", "8", "--new_tokens", "6", "--rounds", "1", "--bandwidth_mb", "16",
        "--threads", "1", "--compile", "false"]


def test_bench_lists_its_subcommands_and_rejects_unknown_ones(capsys):
    assert main(["bench"]) == 0
    out = capsys.readouterr().out
    assert "generate" in out and "serve" in out
    assert main(["bench", "--help"]) == 0
    assert main(["bench", "nope"]) == 2
    assert "unknown subcommand 'nope'" in capsys.readouterr().err
    assert main(["bench", "generate", "--help"]) == 0
    assert "num_speculative_tokens" in capsys.readouterr().out


def test_bench_generate_runs_ours_only_and_reports_a_table(capsys):
    assert main(["bench", "generate", *TINY, "--hf", "false", "--dtypes", "float32"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| float32 |")]
    assert len(rows) == 1 + 3  # ours, then plain / draft / prompt lookup
    decode = float(rows[0].split("|")[4])
    assert decode > 0
    assert "read bandwidth:" in out


def test_bench_generate_against_transformers_agrees_on_tokens():
    pytest.importorskip("transformers")
    from lmforge.config import build_config
    from lmforge.cli import split_args
    from lmforge.infer.benchmark import GenerateBenchConfig, run_generate_bench

    _, overrides, _ = split_args([*TINY, "--speculative", "false", "--new_tokens", "16"])
    results = run_generate_bench(build_config(GenerateBenchConfig, {}, overrides), log=lambda _line: None)
    for dtype in ("float32", "bfloat16"):
        r = results["dtypes"][dtype]
        assert r["ours"]["decode_tps"] > 0 and r["hf"]["decode_tps"] > 0 and r["bytes_per_token"] > 0
    assert results["dtypes"]["float32"]["hf"]["same_tokens"]  # same weights, same greedy tokens


def test_bench_rejects_an_unknown_dtype(capsys):
    assert main(["bench", "generate", *TINY, "--dtypes", "int3"]) == 2
    assert "int3" in capsys.readouterr().err


def test_bench_serve_help_comes_from_the_load_generator(capsys):
    pytest.importorskip("lmforge.serve.loadgen")
    assert main(["bench", "serve", "--help"]) == 0
    assert "usage: lmforge bench serve" in capsys.readouterr().out
