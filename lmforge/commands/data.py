"""Read, clean, dedup, mix, tokenize and pack text sources into training shards (meta.json + *.bin).

    lmforge data --config recipes/quickstart/data.yaml
    lmforge data sources='[{path: corpus/*.jsonl, weight: 2}, {path: more.parquet}]' tokenizer=runs/tok
"""
from ..data.config import DataConfig as Config
from ..data.pipeline import run_data_pipeline


def run(cfg: Config) -> dict:
    return run_data_pipeline(cfg)
