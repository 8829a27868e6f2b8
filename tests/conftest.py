"""Shared fixtures: a tiny packed dataset built once per test session (per xdist worker)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest


def pytest_configure(config):
    """One intra-op thread per xdist worker: two workers × two threads on two cores oversubscribe the CPU,
    and tiny models then run tens of times slower."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests (tiny models run slower with more), restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A small synthetic corpus → byte-level BPE (vocab 384) → packed shards; returns the data dir."""
    from lmforge.data.config import DataConfig, SourceConfig
    from lmforge.data.pipeline import run_data_pipeline
    from lmforge.data.readers import iter_texts
    from lmforge.data.synthetic import write_corpus
    from lmforge.tokenizer import TokenizerConfig, train_tokenizer

    root = tmp_path_factory.mktemp("tiny_data")
    write_corpus(root / "corpus", seed=3, target_chars=150_000)
    sources = [SourceConfig(path=str(root / "corpus" / "train"), name="corpus")]
    tok = train_tokenizer(iter_texts(sources), TokenizerConfig(vocab_size=384, min_frequency=2))
    tok.save_pretrained(root / "tokenizer")
    cfg = DataConfig(sources=sources, tokenizer=str(root / "tokenizer"), output_dir=str(root / "data"),
                     val_fraction=0.05, shard_size_tokens=50_000)
    run_data_pipeline(cfg, tok, log=lambda _msg: None)
    return root / "data"


TINY_MODEL = ["model.hidden_size=64", "model.intermediate_size=128", "model.num_layers=2", "model.num_heads=4",
              "model.num_kv_heads=2", "model.max_position_embeddings=128"]


def pretrain_args(data_dir: Path, out_dir: Path, *extra: str) -> list[str]:
    """CLI overrides for a few-second pretraining run on tiny_data."""
    return [f"data={data_dir}", f"train.out_dir={out_dir}", "train.batch_size=4", "train.seq_len=32",
            "train.lr=3e-3", "train.warmup_steps=2", "train.eval_every=0", "train.eval_batches=4",
            "train.progress=false", "train.tensorboard=false", "train.precision=fp32", "train.seed=7",
            *TINY_MODEL, *extra]


@pytest.fixture
def restore_threads():
    """Fine-tuning runs set train.num_threads=1 (tiny matmuls, shared cores); give later tests theirs back."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sft_base(tiny_data, tmp_path_factory) -> dict:
    """A random tiny Llama + the tiny tokenizer saved as an HF dir, and an SFT file from the synthetic world."""
    import json
    from dataclasses import replace

    import torch

    from lmforge.data.synthetic import make_world, sft_examples, split_facts
    from lmforge.model import PRESETS, Transformer
    from lmforge.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("sft_base")
    tok = Tokenizer.from_pretrained(tiny_data.parent / "tokenizer")
    cfg = replace(PRESETS["llama-tiny"](), vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                  num_layers=2, num_heads=4, num_kv_heads=2, max_position_embeddings=256,
                  bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    torch.manual_seed(0)
    Transformer(cfg).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    world = make_world(3)
    records = sft_examples(world, split_facts(world, 3).train, 3, langs=("en",))[:48]
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"model": root / "model", "data": root / "sft.jsonl", "world": world}


def finetune_args(base: dict, out: Path, *extra: str) -> list[str]:
    """Config overrides for a few-step `lmforge finetune` run on sft_base (later overrides win)."""
    return [f"model.init_from={base['model']}", f"data.path={base['data']}", "data.max_seq_len=64",
            "data.val_fraction=0.25", f"train.out_dir={out}", "train.batch_size=4", "train.seq_len=64",
            "train.lr=1e-2", "train.warmup_steps=1", "train.eval_every=0", "train.eval_batches=0",
            "train.progress=false", "train.tensorboard=false", "train.precision=fp32", "train.seed=3",
            "train.num_threads=1", "train.peak_flops=1e11", "train.max_steps=3", "train.save_every=0", *extra]


def crash_during(monkeypatch, module: str, call: int, run) -> None:
    """Call `run()` with `module`'s causal_lm_loss raising SystemExit on its `call`-th use (a crash in the
    middle of a run, after some checkpoint), check that it died, then put the real loss back."""
    import importlib

    run_module = importlib.import_module(module)  # the module, not a re-exported function of that name
    real, calls = run_module.causal_lm_loss, {"n": 0}

    def dying_loss(model, batch):
        calls["n"] += 1
        if calls["n"] == call:
            raise SystemExit("simulated crash")
        return real(model, batch)

    monkeypatch.setattr(run_module, "causal_lm_loss", dying_loss)
    with pytest.raises(SystemExit):
        run()
    monkeypatch.setattr(run_module, "causal_lm_loss", real)


def step_losses(run_dir) -> dict[int, float]:
    """{step: training loss} from a run directory's metrics.jsonl."""
    from lmforge.train.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def redrawn_llama(vocab_size: int, hidden_size: int, intermediate_size: int, seed: int = 0, std: float = 0.2,
                  model_type: str = "llama", **extra):
    """A 2-layer GQA model (Llama unless `model_type` says otherwise; `extra`: more ModelConfig fields) whose
    weights (norms aside) are redrawn N(0, std²) from `seed`: larger than the default init, so a wrong
    formula shows in the logits. Eval mode."""
    import torch

    from lmforge.model import ModelConfig, Transformer

    torch.manual_seed(seed)
    model = Transformer(ModelConfig(model_type=model_type, vocab_size=vocab_size, hidden_size=hidden_size,
                                    intermediate_size=intermediate_size, num_layers=2, num_heads=4, num_kv_heads=2,
                                    max_position_embeddings=64, **extra))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not name.endswith("norm.weight"):
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model.eval()


def reference_greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    """argmax of the full forward over everything so far, appended one token at a time (no cache)."""
    import torch

    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_tokens):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]
