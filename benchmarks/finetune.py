"""Fine-tuning steps: full, LoRA and QLoRA in lmforge vs a `transformers` + `peft` LoRA step, fp32 and bf16.

    python benchmarks/finetune.py                          # 33.7M Llama, batch 8x256, fp32 + bf16, 2 threads
    python benchmarks/finetune.py --precisions bf16 --rounds 3 --steps 4

Every configuration runs in a fresh subprocess, so each one's peak memory is its own:
- `full`:      every weight trains (lmforge `Transformer`, `build_optimizer`'s AdamW), as in pretraining;
- `lora`:      `lmforge.peft.apply_adapter(LoraConfig r=16, alpha=32, all-linear)`, AdamW over the adapter;
- `qlora`:     the same LoRA on a base quantised to NF4 (`quantize_model_nf4`, double quantisation);
- `hf-lora`:   `transformers.LlamaForCausalLM` (sdpa) + `peft.get_peft_model(LoraConfig(r=16, lora_alpha=32,
               target_modules="all-linear"))`, `torch.optim.AdamW(fused=True)` over the trainable parameters.
All start from the same weights and see the same batches; a step is forward + loss + backward + grad clip
(1.0) + AdamW + zero_grad, under bf16 autocast over fp32 master weights for bf16, plain fp32 otherwise.

Timing: the configurations take turns, round by round (the order reversed every other round), each round a
fresh subprocess that warms up and then times `--steps` steps; steps during which other processes used
more than 0.1 of a core are dropped (as in train_throughput.py). Tokens/s = tokens per step / median step.

Because a step that overlapped other processes' work says little, the script ends with an in-process A/B of
the two LoRA steps (ours vs transformers+peft), alternating step by step in one fresh process per precision
(`--ab-steps` each): both sides see the same load, so their ratio holds even on a busy machine.

Memory (Linux): `peak` is the process's peak resident set (VmHWM); `train peak` is the high-water mark
from just before the first training step (VmHWM reset through /proc/self/clear_refs after the model is
built), i.e. without the transient full-precision copy a QLoRA base passes through while being quantised.
Both include Python, torch and the batches; the median over rounds is reported.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import (CONTAMINATION, add_shape_args, cpu_name, cpu_ticks, hf_llama,  # noqa: E402
                              make_batches, model_config, others_cores, train_config)

CONFIGS = ("full", "lora", "qlora", "hf-lora")
RANK, ALPHA = 16, 32


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shape_args(p)
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {', '.join(CONFIGS)}")
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration per round")
    p.add_argument("--rounds", type=int, default=2, help="rounds (one fresh subprocess per configuration each)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ab-steps", type=int, default=8,
                   help="steps per side of the in-process alternating LoRA vs transformers+peft A/B (0 = skip)")
    p.add_argument("--worker", choices=(*CONFIGS, "ab"), help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---- memory --------------------------------------------------------------------------------------------
def _status_kb(key: str) -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    import resource

    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---- the four steps ------------------------------------------------------------------------------------
def build_ours(kind: str, config, state: dict, cfg):
    from lmforge.model import Transformer
    from lmforge.model.nf4 import nf4_storage, quantize_model_nf4
    from lmforge.peft import AdapterConfig, apply_adapter, param_groups
    from lmforge.train.optim import build_optimizer

    model = Transformer(config)
    model.load_state_dict(state)
    extra = {}
    if kind == "qlora":
        quantize_model_nf4(model)
        extra["nf4"] = nf4_storage(model)
    groups = None
    if kind in ("lora", "qlora"):
        apply_adapter(model, AdapterConfig(r=RANK, alpha=ALPHA, target_modules="all-linear"), log=None)
        groups = param_groups(model, cfg.lr, cfg.weight_decay)
    model.train()
    return model, build_optimizer(model, cfg, groups), extra


def build_hf(config, state: dict, cfg):
    import warnings

    import peft

    model = hf_llama(config, state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                           target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                  weight_decay=cfg.weight_decay, fused=True)
    return model, optimizer, {}


def make_step(kind: str, model, optimizer, precision: str, cfg):
    """One whole optimizer step of configuration `kind`; returns the loss."""
    from lmforge.core.device import autocast_context
    from lmforge.train.losses import causal_lm_loss

    params = [p for p in model.parameters() if p.requires_grad]
    device = torch.device("cpu")

    def step(batch) -> float:
        if kind == "hf-lora":
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = model(input_ids=batch[0], labels=batch[0]).loss
        else:
            with autocast_context(device, precision):
                loss = causal_lm_loss(model, batch).loss
        loss.backward()
        value = float(loss.detach())
        torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], cfg.grad_clip, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return value

    return step, sum(p.numel() for p in params)


def setup(args: argparse.Namespace):
    """(model config, train config, starting weights, batches), the same in every process."""
    from lmforge.model import Transformer

    torch.set_num_threads(args.threads)
    config = model_config(args)
    torch.manual_seed(args.seed)
    state = {k: v.clone() for k, v in Transformer(config).state_dict().items()}
    return config, train_config(args), state, make_batches(config, args, 4)


def build(kind: str, config, state: dict, cfg):
    return build_hf(config, state, cfg) if kind == "hf-lora" else build_ours(kind, config, state, cfg)


def timed(step, batch) -> tuple[float, bool]:
    """(seconds, clean): clean = other processes used at most CONTAMINATION cores meanwhile."""
    ticks = cpu_ticks()
    t0 = time.perf_counter()
    step(batch)
    seconds = time.perf_counter() - t0
    return seconds, others_cores(ticks, cpu_ticks(), seconds) <= CONTAMINATION


def worker(args: argparse.Namespace) -> dict:
    """One configuration in this (fresh) process: build, warm up, time, measure memory; returns the record."""
    config, cfg, state, batches = setup(args)
    rss_imports = _status_kb("VmRSS")
    kind, precision = args.worker, args.precision
    model, optimizer, extra = build(kind, config, state, cfg)
    del state
    gc.collect()
    peak_build = _status_kb("VmHWM")
    can_reset = reset_peak()
    step, trainable = make_step(kind, model, optimizer, precision, cfg)
    first_loss = step(batches[0])
    for i in range(1, args.warmup):
        step(batches[i % len(batches)])
    times, dropped = [], []
    for i in range(args.steps):
        seconds, clean = timed(step, batches[i % len(batches)])
        (times if clean else dropped).append(seconds)
    return {"config": kind, "precision": precision, "times": times, "dropped": dropped, "first_loss": first_loss,
            "rss_imports_mb": rss_imports / 1024, "peak_mb": max(peak_build, _status_kb("VmHWM")) / 1024,
            "train_peak_mb": _status_kb("VmHWM") / 1024 if can_reset else float("nan"),
            "trainable": trainable, **extra}


def ab_worker(args: argparse.Namespace) -> dict:
    """Our LoRA and transformers+peft LoRA in one process, alternating step by step (the order flipping every
    step), so that load from other processes hits both alike: the ratio for a shared machine."""
    config, cfg, state, batches = setup(args)
    steps = {}
    for kind in ("lora", "hf-lora"):
        model, optimizer, _ = build(kind, config, state, cfg)
        steps[kind] = make_step(kind, model, optimizer, args.precision, cfg)[0]
    for step in steps.values():
        for i in range(args.warmup):
            step(batches[i % len(batches)])
    times: dict[str, list[float]] = {k: [] for k in steps}
    for i in range(args.ab_steps):
        for kind in ("lora", "hf-lora") if i % 2 == 0 else ("hf-lora", "lora"):
            times[kind].append(timed(steps[kind], batches[i % len(batches)])[0])
    return {"precision": args.precision, "times": times}


def spawn(args: argparse.Namespace, kind: str, precision: str) -> dict:
    argv = [sys.executable, __file__, "--worker", kind, "--precision", precision]
    for key in ("hidden", "layers", "heads", "intermediate", "vocab", "batch", "seq", "steps", "warmup", "threads",
                "seed", "ab_steps"):
        argv += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    if args.kv_heads:
        argv += ["--kv-heads", str(args.kv_heads)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
    if done.returncode != 0 or line is None:
        sys.exit(f"worker {kind}/{precision} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(ab_worker(args) if args.worker == "ab" else worker(args)))
        return
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for c in configs:
        if c not in CONFIGS:
            sys.exit(f"--configs: {c!r} is not one of {list(CONFIGS)}")
    import peft
    import transformers

    config = model_config(args)
    tokens = args.batch * args.seq
    print(f"# {datetime.date.today()}, {cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, peft {peft.__version__}, threads={args.threads}")
    print(f"# model: {config.num_params() / 1e6:.1f}M params (hidden {config.hidden_size}, {config.num_layers} layers, "
          f"{config.num_heads} heads, intermediate {config.intermediate_size}, vocab {config.vocab_size}); "
          f"batch {args.batch}x{args.seq}; LoRA r={RANK} alpha={ALPHA} all-linear; {args.rounds} rounds x "
          f"{args.steps} steps per configuration")
    records: dict[tuple[str, str], list[dict]] = {}
    for precision in precisions:
        for r in range(args.rounds):
            for kind in configs if r % 2 == 0 else configs[::-1]:
                rec = spawn(args, kind, precision)
                records.setdefault((precision, kind), []).append(rec)
                print(f"# {precision} {kind} round {r}: steps {[round(t * 1e3) for t in rec['times']]} ms, "
                      f"dropped {[round(t * 1e3) for t in rec['dropped']]} ms, peak {rec['peak_mb']:.0f} MB, "
                      f"train peak {rec['train_peak_mb']:.0f} MB, first loss {rec['first_loss']:.4f}", flush=True)
    summary = {}
    for key, recs in records.items():
        times = [t for r in recs for t in r["times"]]
        disturbed = not times
        if disturbed:
            times = [t for r in recs for t in r["dropped"]]
        summary[key] = {"step": statistics.median(times), "best": min(times), "n": len(times), "disturbed": disturbed,
                        "peak": statistics.median(r["peak_mb"] for r in recs),
                        "train_peak": statistics.median(r["train_peak_mb"] for r in recs),
                        "imports": statistics.median(r["rss_imports_mb"] for r in recs),
                        "trainable": recs[0]["trainable"], "nf4": recs[0].get("nf4")}
    print()
    print("| precision | method | step ms (median) | best ms | tok/s | vs full | peak RSS MB | train peak MB | "
          "RSS after imports MB | trainable params |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (precision, kind), s in summary.items():
        full = summary.get((precision, "full"))
        vs = f"{full['step'] / s['step']:.2f}x" if full else "-"
        flag = " (ALL DISTURBED)" if s["disturbed"] else ""
        print(f"| {precision} | {kind} | {s['step'] * 1e3:.0f}{flag} | {s['best'] * 1e3:.0f} | {tokens / s['step']:.0f} | {vs} | "
              f"{s['peak']:.0f} | {s['train_peak']:.0f} | {s['imports']:.0f} | {s['trainable']:,} |")
    print()
    for precision in precisions:
        ours, hf = summary.get((precision, "lora")), summary.get((precision, "hf-lora"))
        if ours and hf:
            print(f"{precision}: ours LoRA {tokens / ours['step']:.0f} tok/s vs transformers+peft LoRA "
                  f"{tokens / hf['step']:.0f} tok/s -> {hf['step'] / ours['step']:.2f}x (target >= 1.15x; best steps "
                  f"{hf['best'] / ours['best']:.2f}x); "
                  f"train peak {ours['train_peak']:.0f} vs {hf['train_peak']:.0f} MB")
        q, lora = summary.get((precision, "qlora")), summary.get((precision, "lora"))
        if q and lora:
            print(f"{precision}: QLoRA vs LoRA: {tokens / q['step']:.0f} vs {tokens / lora['step']:.0f} tok/s "
                  f"({lora['step'] / q['step']:.2f}x), train peak {q['train_peak']:.0f} vs {lora['train_peak']:.0f} MB")
    nf4 = next((s["nf4"] for s in summary.values() if s["nf4"]), None)
    if nf4:
        print(f"QLoRA base weights: {nf4['layers']} linear layers, {nf4['weights']:,} weights: NF4 {nf4['nf4_bytes']:,} "
              f"bytes ({nf4['code_bytes']:,} codes + {nf4['constant_bytes']:,} constants, "
              f"{nf4['bits_per_weight']:.3f} bits/weight) vs bf16 {nf4['bf16_bytes']:,} bytes -> "
              f"{nf4['ratio_vs_bf16']:.2%} (target <= 30%); embeddings, norms and lm_head stay unquantised")
    if args.ab_steps > 0 and {"lora", "hf-lora"} <= set(configs):
        print()
        print("In-process A/B, alternating step by step (fresh process per precision):")
        print("| precision | ours LoRA ms (median / best) | HF+peft LoRA ms (median / best) | ours/HF+peft (median) | (best) |")
        print("|---|---|---|---|---|")
        for precision in precisions:
            times = spawn(args, "ab", precision)["times"]
            ours, hf = times["lora"], times["hf-lora"]
            print(f"| {precision} | {statistics.median(ours) * 1e3:.0f} / {min(ours) * 1e3:.0f} | "
                  f"{statistics.median(hf) * 1e3:.0f} / {min(hf) * 1e3:.0f} | "
                  f"{statistics.median(hf) / statistics.median(ours):.2f}x | {min(hf) / min(ours):.2f}x |", flush=True)


if __name__ == "__main__":
    main()
