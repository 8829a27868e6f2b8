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
