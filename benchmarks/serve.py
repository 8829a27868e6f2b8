"""Serving throughput: `lmforge serve` under 32 concurrent streams vs sequential transformers `generate()`.

    python benchmarks/serve.py                      # ~77M random Llama, fp32, 32 x (64-token prompt, 128 new)
    python benchmarks/serve.py --concurrency 16 --dtype bfloat16

Builds a random Llama and a byte-level BPE tokenizer (trained on the embedded corpus), saves them as one HF
directory, starts `lmforge serve` on it as a subprocess, and drives it with `lmforge bench serve`'s load
generator (burst arrivals, `concurrency` streams, fixed lengths, EOS ignored). Then the same weights run
through `AutoModelForCausalLM.generate()` one request after another — what serving without batching gives —
for `hf_requests` requests. Prints both and the ratio of output tokens/s.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_model_dir(out: Path, hidden: int, layers: int, heads: int, intermediate: int, vocab: int) -> None:
    from lmforge.data.synthetic import generate_corpus
    from lmforge.model import ModelConfig, Transformer
    from lmforge.tokenizer import TokenizerConfig, train_tokenizer

    texts = (doc["text"] for doc in generate_corpus(seed=0, num_docs=3000))
    tok = train_tokenizer(texts, TokenizerConfig(vocab_size=vocab, min_frequency=2))
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                                    num_layers=layers, num_heads=heads, num_kv_heads=heads,
                                    max_position_embeddings=1024, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    print(f"model: {model.num_params() / 1e6:.1f}M params (hidden {hidden}, {layers} layers, vocab {tok.vocab_size})")


def bench_ours(model_dir: Path, args) -> dict:
    from lmforge.serve.loadgen import Config, format_summary, run_bench_serve
    from lmforge.serve.server import free_port, wait_healthy

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "lmforge", "serve", f"model={model_dir}", f"port={port}", f"dtype={args.dtype}",
           f"threads={args.server_threads or args.threads}", f"max_num_seqs={args.concurrency}",
           f"max_num_batched_tokens={args.max_num_batched_tokens}", "log_level=warning",
           f"limits.max_concurrent_requests={max(64, args.concurrency)}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        wait_healthy(url, proc)
        cfg = Config(url=url, num_requests=args.requests, arrival="burst", concurrency=args.concurrency,
                     prompt_len=args.prompt_len, output_len=args.output_len, length_dist="fixed", ignore_eos=True,
                     tokenizer=str(model_dir))  # prompts of exactly prompt_len tokens, as on the HF side
        run_bench_serve(Config(url=url, num_requests=2, arrival="burst", concurrency=2, prompt_len=8,
                               output_len=4, length_dist="fixed"))  # warm-up
        summary = run_bench_serve(cfg)
        print(format_summary(summary))
        return summary
    finally:
        proc.send_signal(2)
        proc.wait(timeout=60)


def bench_hf(model_dir: Path, args) -> dict:
    import random

    from transformers import AutoModelForCausalLM

    from lmforge.serve.loadgen import prompt_encoder, make_prompt

    torch.set_num_threads(args.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    encode = prompt_encoder(str(model_dir))
    rng = random.Random(0)
    tokens, started = 0, time.perf_counter()
    for _ in range(args.hf_requests):
        ids = make_prompt(rng, args.prompt_len, encode)  # the load generator's prompts: prompt_len tokens
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=args.output_len, min_new_tokens=args.output_len,
                                 do_sample=False, pad_token_id=0)
        tokens += out.shape[1] - len(ids)
    seconds = time.perf_counter() - started
    print(f"HF generate, sequential: {args.hf_requests} requests, {tokens} tokens in {seconds:.1f}s = "
          f"{tokens / seconds:.1f} output tok/s")
    return {"output_tokens_per_s": tokens / seconds, "requests": args.hf_requests, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--server_threads", type=int, default=0, help="torch threads of the server (0 = --threads)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt_len", type=int, default=64)
    parser.add_argument("--output_len", type=int, default=128)
    parser.add_argument("--max_num_batched_tokens", type=int, default=512)
    parser.add_argument("--hf_requests", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        build_model_dir(model_dir, args.hidden, args.layers, args.heads, args.intermediate, args.vocab)
        ours = bench_ours(model_dir, args)
        hf = bench_hf(model_dir, args)
    ratio = ours["output_tokens_per_s"] / hf["output_tokens_per_s"]
    ttft, tpot = ours["ttft_ms"], ours["tpot_ms"]
    print(f"\n| side | output tok/s | ratio | TTFT p50 / p90 / p99 ms | TPOT p50 ms |\n|---|---:|---:|---|---:|\n"
          f"| HF generate, sequential | {hf['output_tokens_per_s']:.1f} | 1.00x | - | - |\n"
          f"| lmforge serve, {args.concurrency} concurrent | {ours['output_tokens_per_s']:.1f} | {ratio:.2f}x | "
          f"{ttft['p50']:.0f} / {ttft['p90']:.0f} / {ttft['p99']:.0f} | {tpot['p50']:.1f} |")


if __name__ == "__main__":
    main()
