"""Training throughput: lmforge's training step vs a plain `transformers` loop, measured in the same run.

    python benchmarks/train_throughput.py                       # 33M Llama, batch 8x256, fp32 + bf16, 2 threads
    python benchmarks/train_throughput.py --precisions bf16 --steps 5 --rounds 4 --compile

Both sides train the same shape on the same batches with the same AdamW settings (lr, betas, eps, weight
decay, decay/no-decay groups), the same grad clipping (1.0), the same thread count and the same starting
weights:
- ours: `Transformer` + `causal_lm_loss` under `autocast_context`, backward, `clip_grad_norm_(foreach)`,
  `build_optimizer`'s AdamW, `zero_grad(set_to_none)`, scheduler step: what `Trainer.fit` does per step.
- HF:   `LlamaForCausalLM(input_ids, labels=input_ids)` (sdpa attention) under `torch.autocast`,
  backward, `clip_grad_norm_`, `torch.optim.AdamW(fused=True)` (`transformers.Trainer`'s default optimizer,
  `adamw_torch_fused`), `zero_grad(set_to_none)`, scheduler step.
fp32 means no autocast; bf16 means bf16 autocast over fp32 master weights, on both sides.

The contenders alternate round by round so that drift in machine load hits both. On Linux a step during
which other processes used more than a tenth of a core is dropped (reported as `dropped`): on a shared
2-core machine one busy neighbour stalls every OpenMP barrier. Tokens/s = tokens per step / median step.

MFU = tokens/s x FLOPs per token / peak. FLOPs per token = 6·N + 6·L·T·(heads·head_dim)
(`ModelConfig.flops_per_token`): N = every non-embedding weight plus the output projection, and the second
term is QKᵀ and AV under the causal mask, forward + backward. The peak is the best of a large square matmul
through `torch.mm` and through oneDNN (on some CPUs torch's fp32 `mm` runs MKL at half the oneDNN speed),
timed here with the same thread count: a practical peak, not a datasheet number.

`--allocator reuse` raises glibc's mmap and trim thresholds for the whole process (both sides), so freed
activations are reused instead of being returned to the OS and page-faulted back in on the next step.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from lmforge.core.device import autocast_context, cpu_name  # noqa: F401  (cpu_name: re-exported for finetune.py)
from lmforge.model import ModelConfig, Transformer
from lmforge.train.config import TrainConfig
from lmforge.train.losses import causal_lm_loss
from lmforge.train.optim import build_optimizer, build_scheduler, param_groups

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CONTAMINATION = 0.1  # cores' worth of other processes' CPU time during a step that makes it unusable


def add_shape_args(p: argparse.ArgumentParser) -> None:
    """The benchmark model's shape and batch (the 33.7M Llama both training benchmarks use by default)."""
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None, help="default: = heads (MHA)")
    p.add_argument("--intermediate", type=int, default=1376)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shape_args(p)
    p.add_argument("--precisions", default="fp32,bf16", help="comma list of fp32, bf16 (bf16 = autocast)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per contender per round")
    p.add_argument("--rounds", type=int, default=4, help="alternating rounds (HF, ours) per precision")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per contender before timing")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (both sides)")
    p.add_argument("--compile", action="store_true", help="torch.compile both models (compile time reported)")
    p.add_argument("--allocator", choices=("default", "reuse"), default="default",
                   help="reuse = glibc keeps freed memory (mallopt), for both sides")
    p.add_argument("--peak-size", type=int, default=2048, help="square matmul size for the measured peak")
    p.add_argument("--only", choices=("both", "ours", "hf"), default="both", help="run one side only")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# ---- machine -------------------------------------------------------------------------------------

def reuse_freed_memory() -> bool:
    """glibc: serve large tensors from the heap and never trim it, so freed memory is reused (no page faults)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, (1 << 31) - 1))


def cpu_ticks() -> tuple[int, int] | None:
    """(busy clock ticks of the whole machine, of this process) from /proc; None where there is no /proc."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    busy = fields[0] + fields[1] + fields[2] + sum(fields[5:8])  # user nice system irq softirq steal
    return busy, int(own[11]) + int(own[12])


def others_cores(before: tuple[int, int] | None, after: tuple[int, int] | None, seconds: float) -> float:
    """Average number of cores other processes kept busy between two `cpu_ticks()` readings."""
    if before is None or after is None or seconds <= 0:
        return 0.0
    return ((after[0] - before[0]) - (after[1] - before[1])) / os.sysconf("SC_CLK_TCK") / seconds


def matmul_peaks(dtype: torch.dtype, n: int, samples: int = 5, sample_seconds: float = 0.25) -> dict[str, float]:
    """FLOP/s of an n³ matmul through torch.mm and through oneDNN: the best of `samples` back-to-back runs
    of ~`sample_seconds` each (long enough for the check on other processes to mean something)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    kernels: dict[str, Callable[[], torch.Tensor]] = {"torch.mm": lambda: a @ b}
    onednn = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
    if onednn is not None:
        kernels["oneDNN"] = lambda: onednn(a, b, None, "none", [], "")
    peaks = {}
    for name, kernel in kernels.items():
        kernel()
        t0 = time.perf_counter()
        kernel()
        inner = max(1, round(sample_seconds / (time.perf_counter() - t0)))
        best, clean = float("inf"), 0
        for _ in range(10 * samples):
            ticks = cpu_ticks()
            t0 = time.perf_counter()
            for _ in range(inner):
                kernel()
            seconds = (time.perf_counter() - t0)
            if others_cores(ticks, cpu_ticks(), seconds) <= CONTAMINATION:
                best, clean = min(best, seconds / inner), clean + 1
                if clean == samples:
                    break
        peaks[name] = 2 * n**3 / best if clean else float("nan")
    return peaks


# ---- the two contenders --------------------------------------------------------------------------

def model_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(model_type="llama", vocab_size=args.vocab, hidden_size=args.hidden,
                       intermediate_size=args.intermediate, num_layers=args.layers, num_heads=args.heads,
                       num_kv_heads=args.kv_heads or args.heads, max_position_embeddings=max(2048, args.seq))


def train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(max_steps=10**6, warmup_steps=0, schedule="constant", lr=3e-4, grad_clip=1.0,
                       batch_size=args.batch, seq_len=args.seq)


@dataclass
class Contender:
    """One side of the race: `step(batch)` runs one whole optimizer step and returns the loss."""

    step: Callable[[tuple[torch.Tensor, torch.Tensor]], float]
    times: list[float] = field(default_factory=list)
    dropped: int = 0
    dropped_times: list[float] = field(default_factory=list)
    contaminated: bool = False  # every step overlapped other work, and these times are those steps
    warmup_seconds: float = 0.0
    first_loss: float = float("nan")


def ours(config: ModelConfig, state: dict, precision: str, cfg: TrainConfig, compile_: bool) -> Contender:
    model = Transformer(config)
    model.load_state_dict(state)
    model.train()
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    forward_model = torch.compile(model) if compile_ else model
    device = torch.device("cpu")

    def step(batch) -> float:  # Trainer.fit's step with grad_accum=1
        with autocast_context(device, precision):
            out = causal_lm_loss(forward_model, batch)
        out.loss.backward()
        loss = float(out.loss.detach())
        params = [p for p in model.parameters() if p.grad is not None]
        float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=True))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        return loss

    return Contender(step)


def hf_llama(config: ModelConfig, state: dict):
    """transformers' LlamaForCausalLM of the same shape holding the same weights (SDPA attention)."""
    import transformers

    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps, tie_word_embeddings=False, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(hf_config)
    model.load_state_dict(state, strict=False)  # same keys; HF's state dict has no extra trainable tensors
    return model


def huggingface(config: ModelConfig, state: dict, precision: str, cfg: TrainConfig, compile_: bool) -> Contender:
    model = hf_llama(config, state)
    model.train()
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  eps=cfg.eps, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: 1.0)
    forward_model = torch.compile(model) if compile_ else model

    def step(batch) -> float:
        input_ids, _ = batch
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = forward_model(input_ids=input_ids, labels=input_ids)  # HF shifts the labels itself
        out.loss.backward()
        loss = float(out.loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        return loss

    return Contender(step)


def make_batches(config: ModelConfig, args: argparse.Namespace, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, labels) with labels = the next token, as the pretraining loader yields them."""
    generator = torch.Generator().manual_seed(args.seed + 1)
    batches = []
    for _ in range(count):
        window = torch.randint(0, config.vocab_size, (args.batch, args.seq + 1), generator=generator)
        batches.append((window[:, :-1].contiguous(), window[:, 1:].contiguous()))
    return batches


def race(precision: str, args: argparse.Namespace, config: ModelConfig) -> dict[str, Contender]:
    """Build both sides from the same weights, warm them up, then time them in alternating rounds."""
    torch.manual_seed(args.seed)
    state = {k: v.clone() for k, v in Transformer(config).state_dict().items()}
    cfg = train_config(args)
    builders = {"hf": huggingface, "ours": ours}
    names = ["hf", "ours"] if args.only == "both" else [args.only]
    contenders = {name: builders[name](config, state, precision, cfg, args.compile) for name in names}
    batches = make_batches(config, args, 4)
    for contender in contenders.values():
        t0 = time.perf_counter()
        for i in range(args.warmup):
            loss = contender.step(batches[i % len(batches)])
            contender.first_loss = loss if i == 0 else contender.first_loss
        contender.warmup_seconds = time.perf_counter() - t0  # includes compilation under --compile
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            contender = contenders[name]
            for i in range(args.steps):
                ticks = cpu_ticks()
                t0 = time.perf_counter()
                contender.step(batches[i % len(batches)])
                seconds = time.perf_counter() - t0
                if others_cores(ticks, cpu_ticks(), seconds) > CONTAMINATION:
                    contender.dropped += 1
                    contender.dropped_times.append(seconds)
                else:
                    contender.times.append(seconds)
    for name, contender in contenders.items():
        if not contender.times:
            print(f"# WARNING {precision} {name}: every step overlapped with other processes' work; "
                  "using them anyway (rerun on a quieter machine)")
            contender.times, contender.dropped, contender.contaminated = contender.dropped_times, 0, True
    return contenders


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    for p in precisions:
        if p not in DTYPES:
            sys.exit(f"--precisions: {p!r} is not one of {sorted(DTYPES)}")
    if args.allocator == "reuse" and not reuse_freed_memory():
        sys.exit("--allocator reuse needs glibc (mallopt)")
    torch.set_num_threads(args.threads)
    config = model_config(args)
    flops_per_token = config.flops_per_token(args.seq)
    tokens = args.batch * args.seq
    import transformers

    print(f"# {datetime.date.today()}, {cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, threads={torch.get_num_threads()}, compile={args.compile}, "
          f"allocator={args.allocator}")
    print(f"# model: {config.num_params() / 1e6:.1f}M params (hidden {config.hidden_size}, {config.num_layers} layers, "
          f"{config.num_heads} heads, {config.num_kv_heads} kv heads, intermediate {config.intermediate_size}, "
          f"vocab {config.vocab_size}); batch {args.batch}x{args.seq}; "
          f"{flops_per_token / 1e6:.1f} MFLOP/token = 6N + 6·L·T·(heads·head_dim)")
    peaks = {}
    for p in precisions:
        measured = matmul_peaks(DTYPES[p], args.peak_size)
        peaks[p] = max(measured.values())
        print(f"# {p} matmul peak ({args.peak_size}³): " + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in measured.items())
              + f" GFLOP/s -> peak {peaks[p] / 1e9:.0f}")
    results = []
    for precision in precisions:
        contenders = race(precision, args, config)
        results.append((precision, contenders))
        for name, c in contenders.items():
            print(f"# {precision} {name}: first loss {c.first_loss:.4f}; step median {statistics.median(c.times) * 1e3:.0f} ms, "
                  f"best {min(c.times) * 1e3:.0f} ms over {len(c.times)} steps "
                  f"({'ALL DISTURBED' if c.contaminated else f'{c.dropped} dropped'}); "
                  f"warmup{'+compile' if args.compile else ''} {c.warmup_seconds:.1f} s for {args.warmup} steps")

    def tps(c: Contender | None) -> float | None:
        return tokens / statistics.median(c.times) if c else None

    print()
    print("| precision | HF tok/s | ours tok/s | ours/HF | HF MFU | ours MFU |")
    print("|---|---|---|---|---|---|")
    for precision, contenders in results:
        hf, us = tps(contenders.get("hf")), tps(contenders.get("ours"))
        cell = lambda v, fmt: fmt.format(v) if v is not None else "-"  # noqa: E731
        mfu = lambda v: cell(v * flops_per_token / peaks[precision] if v else None, "{:.0%}")  # noqa: E731
        ratio = f"{us / hf:.2f}x" if hf and us else "-"
        print(f"| {precision} | {cell(hf, '{:.0f}')} | {cell(us, '{:.0f}')} | {ratio} | {mfu(hf)} | {mfu(us)} |")


if __name__ == "__main__":
    main()
