"""The training-loop config shared by every stage that trains (pretrain, finetune, align, distill)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config import opt
from ..core.errors import ConfigError


@dataclass
class TrainConfig:
    out_dir: str = opt("runs/pretrain", "run directory: checkpoints/, metrics.jsonl, tensorboard/, config.yaml")
    overwrite: bool = opt(False, "allow writing into a run directory that already holds a finished run")
    resume: str = opt("", "'' = fresh run; 'auto' = continue from <out_dir>/checkpoints/latest if any; or a step dir")
    seed: int = opt(1234, "seed for init, data order and dropout")
    max_steps: int = opt(200, "optimizer steps to run")
    batch_size: int = opt(8, "micro-batch size per process (sequences)")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    seq_len: int = opt(256, "tokens per training sequence")
    lr: float = opt(3e-3, "peak learning rate")
    min_lr_ratio: float = opt(0.1, "final LR as a fraction of the peak (cosine/wsd)")
    schedule: Literal["cosine", "wsd", "constant"] = opt(
        "cosine", "LR schedule after warmup: cosine decay, warmup-stable-decay, or constant")
    warmup_steps: int = opt(20, "linear warmup steps")
    decay_fraction: float = opt(0.2, "wsd: fraction of max_steps spent in the final decay")
    weight_decay: float = opt(0.1, "AdamW weight decay (not applied to norms, biases, embeddings)")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    eps: float = opt(1e-8, "AdamW epsilon")
    grad_clip: float = opt(1.0, "clip the global grad norm to this (0 = off)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = opt(
        "auto", "auto = bf16 autocast where the device supports it (CPU with AVX-512 bf16, CUDA Ampere+), else fp32")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    num_threads: int = opt(0, "CPU intra-op threads (0 = torch default: one per core)")
    compile: bool = opt(False, "wrap the model in torch.compile")
    activation_checkpointing: bool = opt(False, "recompute each layer in backward to save memory")
    parallel: Literal["none", "ddp", "fsdp"] = opt("none", "multi-process strategy under torchrun: DDP or FSDP2 fully_shard")
    eval_every: int = opt(50, "evaluate val loss every N steps (0 = only at the end)")
    eval_batches: int = opt(8, "val batches per evaluation (0 = the whole val split)")
    save_every: int = opt(100, "write a resumable checkpoint every N steps (0 = only at the end)")
    keep_last: int = opt(2, "checkpoints to keep (older ones are deleted)")
    log_every: int = opt(1, "print/log metrics every N steps")
    tensorboard: bool = opt(True, "also write TensorBoard event files to <out_dir>/tensorboard")
    peak_flops: float = opt(0.0, "device peak FLOP/s for MFU (0 = measure a large matmul once)")
    progress: bool = opt(True, "show a progress bar on the console")

    def validate(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be >= 1")
        if self.lr <= 0:
            raise ConfigError(f"train.lr={self.lr} must be > 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"train.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ConfigError(f"train.decay_fraction={self.decay_fraction} must be in [0, 1]")
        if self.warmup_steps < 0:
            raise ConfigError(f"train.warmup_steps={self.warmup_steps} must be >= 0")
