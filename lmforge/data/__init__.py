"""Data: read, clean, dedup, mix, tokenize and pack text into token shards; load them as batches.

    from lmforge.data import DataConfig, run_data_pipeline, ShardLoader
    run_data_pipeline(cfg, tokenizer)                      # -> shards + meta.json + stats in cfg.output_dir
    loader = ShardLoader(cfg.output_dir, "train", batch_size=8, seq_len=256, seed=0)
    for input_ids, labels in loader: ...                   # one epoch of int64 [8, 256] tensors
"""
from .clean import Cleaner
from .config import CleanConfig, DataConfig, DedupConfig, SourceConfig
from .dedup import Deduplicator, MinHasher, estimate_jaccard
from .loader import ShardLoader, TokenShardDataset, check_tokenizer, iter_eval_batches, read_meta
from .mix import WeightedMixer
from .pack import Packer, pack_documents, split_of, token_dtype
from .pipeline import run_data_pipeline
from .readers import Document, ReadStats, iter_texts, read_jsonl, read_parquet, read_hf_disk, read_source, read_txt
from .stats import build_report, render_markdown

__all__ = [
    "DataConfig", "SourceConfig", "CleanConfig", "DedupConfig",
    "Document", "ReadStats", "read_source", "read_txt", "read_jsonl", "read_parquet", "read_hf_disk", "iter_texts",
    "Cleaner", "Deduplicator", "MinHasher", "estimate_jaccard", "WeightedMixer",
    "Packer", "pack_documents", "split_of", "token_dtype",
    "ShardLoader", "TokenShardDataset", "iter_eval_batches", "read_meta", "check_tokenizer",
    "build_report", "render_markdown", "run_data_pipeline",
]
