"""Speed benchmarks, ours against the field's baseline measured in the same run.

    lmforge bench generate                                   # batch-1 prefill/decode vs transformers, fp32 + bf16
    lmforge bench generate --model runs/x/model --dtypes bfloat16 --hf false
    lmforge bench serve --help                               # load generator against an OpenAI-compatible server
"""
from __future__ import annotations

from ..infer.benchmark import GenerateBenchConfig, run_generate_bench


def _run_generate(cfg: GenerateBenchConfig) -> dict:
    return run_generate_bench(cfg)


def _serve_subcommand() -> tuple[type, object]:
    """`bench serve` lives in lmforge.serve.loadgen (imported only when asked for)."""
    from ..serve.loadgen import Config, run_bench_serve

    return Config, run_bench_serve


# name -> (summary, loader returning (Config dataclass, run function)); loaders keep imports lazy.
SUBCOMMANDS = {
    "generate": ("batch-1 prefill/decode tokens/s vs transformers, bandwidth, speculative decoding",
                 lambda: (GenerateBenchConfig, _run_generate)),
    "serve": ("load test a running OpenAI-compatible server: TTFT, TPOT, throughput at a request rate",
              _serve_subcommand),
}
