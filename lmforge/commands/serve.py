"""Serve a model over the OpenAI API (completions, chat completions with tools and streaming, embeddings,
/metrics for Prometheus) from the continuous-batching engine.

    lmforge serve --model runs/quickstart/sft_full/model --port 8000
    lmforge serve --model DIR --lora math=runs/lora-math/adapter,code=runs/lora-code/adapter
    LMFORGE_API_KEY=secret lmforge serve --model DIR        # the key from the environment, not argv

Then: `openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="secret")`. See docs/serve.md.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..config import opt
from ..core.errors import ConfigError
from ..serve.guard import ServeLimits


@dataclass
class Config:
    model: str = opt("", "model directory (HF layout: config.json + safetensors + tokenizer)")
    served_model_name: str = opt("", "the name clients send as `model` (empty: the model directory's name)")
    tokenizer: str = opt("", "tokenizer directory (empty: the model directory)")
    dtype: str = opt("auto", "auto (float32 on CPU, bfloat16 on CUDA) | float32 | bfloat16 | float16")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    lora: list[str] = opt([], "LoRA adapters to serve as extra models: NAME=DIR, comma-separated (or a YAML list)")
    allow_runtime_lora: bool = opt(False, "add POST /v1/load_lora_adapter and /v1/unload_lora_adapter (they read "
                                          "server-side paths: enable only for trusted clients / with an API key)")
    api_key: str = opt("", "require 'Authorization: Bearer KEY' on /v1/* (empty: $LMFORGE_API_KEY, else open)")
    host: str = opt("127.0.0.1", "address to bind (0.0.0.0 exposes the server to the network)")
    port: int = opt(8000, "TCP port")
    max_num_seqs: int = opt(16, "sequences decoded together in one batch")
    max_num_batched_tokens: int = opt(512, "tokens per model call (the chunked-prefill budget)")
    block_size: int = opt(16, "tokens per KV-cache block")
    kv_cache_bytes: int = opt(1 << 30, "memory budget of the KV cache in bytes")
    max_model_len: int = opt(0, "prompt + output limit in tokens (0 = the model's max_position_embeddings)")
    enable_prefix_caching: bool = opt(True, "reuse the KV blocks of shared prompt prefixes across requests")
    threads: int = opt(0, "torch intra-op threads on CPU (0 = torch's default)")
    seed: int = opt(0, "sampling seed of requests that send none")
    limits: ServeLimits = opt(ServeLimits, "request bounds: body size, concurrency, prompt and output length")
    log_level: str = opt("info", "uvicorn log level: critical | error | warning | info | debug")


def parse_loras(specs: list[str]) -> dict[str, str]:
    """{name: dir} from NAME=DIR strings; names are registry keys, never path pieces."""
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        name = name.strip()
        if not sep or not name or not path:
            raise ConfigError(f"lora={spec!r} must be NAME=DIR")
        if name in adapters:
            raise ConfigError(f"lora name {name!r} is given twice")
        if not Path(path).is_dir():
            raise ConfigError(f"lora {name!r}: adapter directory not found: {path}")
        adapters[name] = path
    return adapters


def build_app(cfg: Config):
    """The engine and the FastAPI app that `run` serves (tests call this directly)."""
    from ..core.device import parse_dtype, pick_device, set_threads
    from ..infer.engine import LLMEngine
    from ..infer.load import load_model_and_tokenizer
    from ..serve.app import create_app

    if not cfg.model:
        raise ConfigError("model is empty: pass --model DIR")
    if not Path(cfg.model).is_dir():
        raise ConfigError(f"model directory not found: {cfg.model}")
    adapters = parse_loras(cfg.lora)
    set_threads(cfg.threads)
    device = pick_device(cfg.device)
    model, tokenizer = load_model_and_tokenizer(cfg.model, tokenizer=cfg.tokenizer or None, device=device,
                                                dtype=parse_dtype(cfg.dtype))
    engine = LLMEngine(model, tokenizer, max_num_seqs=cfg.max_num_seqs, block_size=cfg.block_size,
                       max_num_batched_tokens=cfg.max_num_batched_tokens, max_model_len=cfg.max_model_len or None,
                       enable_prefix_caching=cfg.enable_prefix_caching, kv_cache_bytes=cfg.kv_cache_bytes,
                       seed=cfg.seed)
    if adapters:
        if not hasattr(engine, "add_lora"):
            raise ConfigError("lora: this engine build cannot serve LoRA adapters (LLMEngine.add_lora is missing)")
        for name, path in adapters.items():
            engine.add_lora(name, path)
    name = cfg.served_model_name or Path(cfg.model).resolve().name
    api_key = cfg.api_key or os.environ.get("LMFORGE_API_KEY") or None
    app = create_app(engine, tokenizer, name, api_key=api_key, limits=cfg.limits,
                     allow_runtime_lora=cfg.allow_runtime_lora)
    return app, name, api_key


def run(cfg: Config) -> None:
    import uvicorn

    app, name, api_key = build_app(cfg)
    print(f"lmforge serve: model {name!r} on http://{cfg.host}:{cfg.port}/v1"
          f" ({'API key required' if api_key else 'no API key'}); metrics at /metrics")
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, timeout_graceful_shutdown=
                cfg.limits.drain_timeout)
