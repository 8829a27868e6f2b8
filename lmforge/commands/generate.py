"""Sample text from a model directory with the KV-cache generator.

    lmforge generate --model runs/quickstart/pretrain/model --prompt "Li Ming lives in" --max_new_tokens 40
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from ..config import opt
from ..core.errors import ConfigError


@dataclass
class Config:
    model: str = opt("", "model directory (HF layout: config.json + safetensors + tokenizer)")
    adapter: str = opt("", "PEFT adapter directory to load on the model (ours or peft's; any method)")
    prompt: list[str] = opt([], "prompt(s); several prompts (comma-separated or repeated in YAML) run as one batch")
    chat: bool = opt(False, "wrap each prompt as a user message with the model's chat template")
    max_new_tokens: int = opt(64, "tokens to generate per prompt")
    temperature: float = opt(0.0, "0 = greedy; otherwise softmax temperature")
    top_k: int = opt(0, "keep the k most likely tokens (0 = off)")
    top_p: float = opt(1.0, "nucleus sampling: keep the smallest set with this much probability (1 = off)")
    seed: int = opt(0, "sampling seed")
    device: str = opt("auto", "auto | cpu | cuda")
    dtype: str = opt("auto", "auto (float32 on CPU, bfloat16 on CUDA) | float32 | bfloat16 | float16")
    draft: str = opt("", "speculative decoding with this draft model directory (same tokenizer; one prompt)")
    prompt_lookup: int = opt(0, "speculative decoding by prompt lookup with n-grams up to this size (0 = off)")
    num_speculative_tokens: int = opt(4, "tokens the draft / prompt lookup proposes per target forward")
    sink_window: int = opt(0, "StreamingLLM attention-sink KV cache of this many slots (0 = off): "
                              "generation may run past any length")
    num_sinks: int = opt(4, "with sink_window: the first tokens always kept in the cache")
    num_beams: int = opt(1, "beam search with this many beams (1 = off; deterministic, ignores temperature)")
    length_penalty: float = opt(1.0, "beam search: a finished beam scores sum(log p) / length ** length_penalty")
    compile: bool = opt(False, "run decode steps through a torch.compile'd graph (first call compiles, 10-20 s; "
                               "needs a C++ compiler; RoPE models)")

    def validate(self) -> None:
        speculative = bool(self.draft) or self.prompt_lookup > 0
        if speculative and len(self.prompt) > 1:
            raise ConfigError(f"draft/prompt_lookup decode one sequence; got {len(self.prompt)} prompts")
        if speculative and self.sink_window:
            raise ConfigError("sink_window cannot be combined with draft/prompt_lookup")
        if self.num_beams > 1 and (speculative or self.sink_window):
            raise ConfigError("num_beams > 1 cannot be combined with draft/prompt_lookup/sink_window")
        if self.compile and (speculative or self.sink_window or self.num_beams > 1):
            raise ConfigError("compile applies to plain decoding, not draft/prompt_lookup/sink_window/beams")
        if self.num_beams < 1:
            raise ConfigError(f"num_beams={self.num_beams} must be >= 1")
        if self.num_speculative_tokens < 1:
            raise ConfigError(f"num_speculative_tokens={self.num_speculative_tokens} must be >= 1")


def run(cfg: Config) -> list[str]:
    import torch

    from ..core.device import parse_dtype, pick_device
    from ..infer import generate
    from ..infer.load import load_model_and_tokenizer
    from ..model import Transformer

    if not cfg.model:
        raise ConfigError("model is empty: pass --model DIR")
    if not cfg.prompt:
        raise ConfigError("prompt is empty: pass --prompt TEXT")
    device = pick_device(cfg.device)
    dtype = parse_dtype(cfg.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model, tok = load_model_and_tokenizer(cfg.model, cfg.adapter or None, device=device, dtype=dtype)
    if cfg.chat:
        prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
                   for p in cfg.prompt]
    else:
        prompts = [([tok.bos_id] if tok.bos_id is not None and tok.bos_id != tok.eos_id else []) + tok.encode(p)
                   for p in cfg.prompt]
    stop = [i for i in {tok.eos_id, tok.token_to_id("<|im_end|>")} if i is not None]
    started = time.perf_counter()
    stats = None
    if cfg.draft or cfg.prompt_lookup > 0:
        from ..infer.speculative import speculative_generate

        draft = Transformer.from_pretrained(cfg.draft, device=device, dtype=dtype).eval() if cfg.draft else None
        started = time.perf_counter()
        result = speculative_generate(model, prompts[0], cfg.max_new_tokens, draft=draft,
                                      num_speculative_tokens=cfg.num_speculative_tokens,
                                      prompt_lookup_ngram=cfg.prompt_lookup, temperature=cfg.temperature,
                                      top_k=cfg.top_k, top_p=cfg.top_p, seed=cfg.seed, eos_token_id=stop)
        outputs, stats = [result.tokens], result.stats
    elif cfg.num_beams > 1:
        from ..infer.beam import beam_search

        outputs = [beam_search(model, p, num_beams=cfg.num_beams, max_new_tokens=cfg.max_new_tokens,
                               length_penalty=cfg.length_penalty, eos_token_id=stop)[0].token_ids for p in prompts]
    else:
        outputs = generate(model, prompts, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                           top_p=cfg.top_p, eos_token_id=stop, seed=cfg.seed, sink_window=cfg.sink_window,
                           num_sinks=cfg.num_sinks, compile=cfg.compile)
    elapsed = time.perf_counter() - started
    texts = [tok.decode(out, skip_special_tokens=True) for out in outputs]
    for prompt, text in zip(cfg.prompt, texts):
        print(f"{prompt}\u2192{text}" if not cfg.chat else f"user: {prompt}\nassistant: {text}")
    new_tokens = sum(len(o) for o in outputs)
    note = "; includes compiling the decode step" if cfg.compile else ""
    print(f"[{new_tokens} tokens in {elapsed:.2f}s: {new_tokens / max(elapsed, 1e-9):.1f} tokens/s{note}]")
    if stats is not None:
        print(f"[speculative: {stats.accepted}/{stats.proposed} proposals accepted ({stats.acceptance_rate:.0%}), "
              f"{stats.tokens_per_target_forward:.2f} tokens per target forward]")
    return texts
