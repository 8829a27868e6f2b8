"""Batch-1 generation speed: lmforge's `generate` vs transformers' `generate()` on the same weights.

    python benchmarks/generate.py                                   # 134M Llama, fp32 + bf16, 2 threads
    python benchmarks/generate.py --dtypes bfloat16 --rounds 5 --new_tokens 256
    python benchmarks/generate.py --model runs/x/model --hf false   # a checkpoint, ours only

Prints prefill and decode tokens/s for both sides with the ours/HF ratio, the bytes each decoded token
reads and the bandwidth that achieves against the machine's read bandwidth measured in the same run, and
speculative decoding's acceptance and speed-up (draft model = the target's first layers; prompt lookup).
The options are the keys of `lmforge bench generate --help` (the same code:
`lmforge/infer/benchmark.py`), given as `--key value` or `key=value`.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lmforge.cli import split_args  # noqa: E402
from lmforge.config import load_config  # noqa: E402
from lmforge.infer.benchmark import GenerateBenchConfig, run_generate_bench  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    config_path, overrides, wants_help = split_args(list(sys.argv[1:] if argv is None else argv))
    if wants_help:
        print(__doc__)
        return
    run_generate_bench(load_config(GenerateBenchConfig, config_path, overrides))


if __name__ == "__main__":
    main()
