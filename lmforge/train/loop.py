"""The one training loop. Pretrain, finetune, align and distill plug in a loss function and a batch source.

    trainer = Trainer(cfg, model, loss_fn, batches, run_dir=..., flops_per_token=...)
    result = trainer.fit()

`loss_fn(model, batch) -> LossOutput` computes the (mean) loss of one micro-batch; `batches` yields
micro-batches forever and has `state_dict()` / `load_state_dict()` so a resumed run sees the same data.
"""
from __future__ import annotations

import math
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch
from torch import nn

from ..core.device import autocast_context, pick_device
from ..core.errors import ConfigError, DataError
from . import checkpoint as ckpt
from .config import TrainConfig
from .distributed import (DistInfo, all_reduce_mean, barrier, full_model_state_dict, full_optimizer_state_dict,
                          load_full_state, wrap_model)
from .metrics import MetricsLogger, cached_peak_flops
from .optim import build_optimizer, build_scheduler


@dataclass
class LossOutput:
    loss: torch.Tensor                 # scalar, mean over this micro-batch's counted tokens
    num_tokens: int                    # tokens processed (for tokens/s)
    metrics: dict[str, float] = field(default_factory=dict)


class BatchSource(Protocol):
    def __iter__(self) -> Iterator[Any]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


LossFn = Callable[[nn.Module, Any], LossOutput]
EvalFn = Callable[[nn.Module], dict[str, float]]
WriteModel = Callable[[dict[str, torch.Tensor], Path], None]
ReadModel = Callable[[Path], dict[str, torch.Tensor]]


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' → bf16 where the hardware has native bf16 matmuls (CUDA Ampere+, CPUs with AVX-512 bf16/AMX)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "fp32"
    return "bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "fp32"


class _Endless:
    """Iterate a batch source across epochs: a source's iterator may end at an epoch boundary."""

    def __init__(self, source: BatchSource):
        self.source = source
        self.it = iter(source)

    def __next__(self) -> Any:
        for _ in range(2):
            try:
                return next(self.it)
            except StopIteration:
                self.it = iter(self.source)
        raise DataError("the training data yields no batches: the dataset is smaller than one global batch")


class Trainer:
    def __init__(self, cfg: TrainConfig, model: nn.Module, loss_fn: LossFn, batches: BatchSource, *,
                 write_model: WriteModel, read_model: ReadModel, eval_fn: EvalFn | None = None, flops_per_token: float = 0.0,
                 dist_info: DistInfo | None = None, config_yaml: str = "", param_groups: list[dict] | None = None,
                 log: Callable[[str], None] = print):
        self.cfg = cfg
        self.dist = dist_info or DistInfo()
        self.device = pick_device(cfg.device)
        self.precision = resolve_precision(cfg.precision, self.device)
        if self.precision == "fp16" and self.device.type == "cpu":
            raise ConfigError("train.precision=fp16 is CUDA-only; use bf16 or fp32 on CPU")
        self.run_dir = Path(cfg.out_dir)
        self.loss_fn, self.batches, self.eval_fn = loss_fn, batches, eval_fn
        self.write_model, self.read_model = write_model, read_model  # checkpoint's model/ dir <-> state dict
        self.flops_per_token = flops_per_token
        self.config_yaml = config_yaml
        self.log = log if self.dist.is_main else (lambda _msg: None)

        model.to(self.device)
        if cfg.activation_checkpointing and hasattr(model, "gradient_checkpointing"):
            model.gradient_checkpointing = True
        self.model = wrap_model(model, cfg.parallel, self.device)
        self.optimizer = build_optimizer(self.model, cfg, param_groups)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.forward_model = torch.compile(self.model) if cfg.compile else self.model
        self.step = 0
        self.tokens_seen = 0
        self.grad_scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self._stop_requested = False

    # ----- checkpointing -------------------------------------------------------------------------------
    def _resume(self) -> int | None:
        ckpt.clean_partial(self.run_dir) if self.dist.is_main else None
        path = ckpt.resolve_resume(self.run_dir, self.cfg.resume)
        if path is None:
            return None
        state = ckpt.load_checkpoint(path)
        model_sd = self.read_model(Path(state["model_dir"]))
        load_full_state(self.model, self.optimizer, model_sd, state["optimizer_state"], self.cfg.parallel)
        ts = state["trainer_state"]
        self.scheduler.load_state_dict(ts["scheduler"])
        self.batches.load_state_dict(ts["data"])
        self.step, self.tokens_seen = ts["step"], ts["tokens_seen"]
        self.log(f"resumed from {path} at step {self.step}")
        return self.step

    def save(self) -> Path | None:
        model_sd = full_model_state_dict(self.model, self.cfg.parallel)
        optim_sd = full_optimizer_state_dict(self.model, self.optimizer, self.cfg.parallel)
        path = None
        if self.dist.is_main:
            trainer_state = {"step": self.step, "tokens_seen": self.tokens_seen,
                             "scheduler": self.scheduler.state_dict(), "data": self.batches.state_dict(),
                             "precision": self.precision}
            path = ckpt.save_checkpoint(self.run_dir, self.step, write_model=lambda d: self.write_model(model_sd, d),
                                        optimizer_state=optim_sd, trainer_state=trainer_state,
                                        config_yaml=self.config_yaml, keep_last=self.cfg.keep_last)
        barrier(self.dist)
        return path

    # ----- the loop ------------------------------------------------------------------------------------
    def _micro_step(self, batch: Any, sync: bool) -> LossOutput:
        no_sync = getattr(self.model, "no_sync", None)
        ctx = no_sync() if (no_sync is not None and not sync) else nullcontext()
        if self.cfg.parallel == "fsdp" and hasattr(self.model, "set_requires_gradient_sync"):
            self.model.set_requires_gradient_sync(sync)
        with ctx:
            with autocast_context(self.device, self.precision):
                out = self.loss_fn(self.forward_model, batch)
            loss = out.loss / self.cfg.grad_accum
            if self.grad_scaler is not None:
                self.grad_scaler.scale(loss).backward()
            else:
                loss.backward()
        return out

    def _clip(self) -> float:
        if self.grad_scaler is not None:
            self.grad_scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)

    def evaluate(self) -> dict[str, float]:
        if self.eval_fn is None:
            return {}
        self.model.eval()
        # eager on purpose: inductor's CPU no_grad path (mkldnn weight prepacking) wants frozen weights
        with torch.no_grad(), autocast_context(self.device, self.precision):
            result = self.eval_fn(self.model)
        self.model.train()
        return {k: all_reduce_mean(v, self.dist) for k, v in result.items()}

    def _install_sigint(self):
        def handler(signum, frame):
            if self._stop_requested:
                raise KeyboardInterrupt
            self._stop_requested = True
            self.log("\ninterrupt: finishing this step, writing a checkpoint, then stopping (Ctrl-C again to abort)")
        try:
            return signal.signal(signal.SIGINT, handler)
        except ValueError:  # not in the main thread
            return None

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        resumed_at = self._resume()
        metrics = MetricsLogger(self.run_dir, tensorboard=cfg.tensorboard, enabled=self.dist.is_main,
                                truncate_after_step=resumed_at)
        peak = cfg.peak_flops or cached_peak_flops(self.device, torch.bfloat16 if self.precision == "bf16" else
                                                   torch.float16 if self.precision == "fp16" else torch.float32)
        self.log(f"device={self.device} precision={self.precision} parallel={cfg.parallel} world={self.dist.world_size} "
                 f"threads={torch.get_num_threads()} compile={cfg.compile} peak={peak / 1e9:.0f} GFLOP/s")
        previous_handler = self._install_sigint()
        progress = None
        if cfg.progress and self.dist.is_main:
            from tqdm.auto import tqdm

            progress = tqdm(total=cfg.max_steps, initial=self.step, desc="train", dynamic_ncols=True)
        batch_iter = _Endless(self.batches)
        self.model.train()
        history: list[dict[str, Any]] = []
        last_eval: dict[str, float] = {}
        t_start = time.perf_counter()
        tokens_at_start = self.tokens_seen
        try:
            while self.step < cfg.max_steps and not self._stop_requested:
                t0 = time.perf_counter()
                loss_sum, step_tokens, extra = 0.0, 0, {}
                for micro in range(cfg.grad_accum):
                    out = self._micro_step(next(batch_iter), sync=micro == cfg.grad_accum - 1)
                    loss_sum += float(out.loss.detach()) / cfg.grad_accum
                    step_tokens += out.num_tokens
                    for k, v in out.metrics.items():
                        extra[k] = extra.get(k, 0.0) + v / cfg.grad_accum
                grad_norm = self._clip()
                lr = self.scheduler.get_last_lr()[0]
                if self.grad_scaler is not None:
                    self.grad_scaler.step(self.optimizer)
                    self.grad_scaler.update()
                else:
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
                self.step += 1
                dt = time.perf_counter() - t0
                loss = all_reduce_mean(loss_sum, self.dist)
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss} at step {self.step}; lower train.lr or check the data")
                global_tokens = step_tokens * self.dist.world_size
                self.tokens_seen += global_tokens
                tgs = step_tokens / dt  # tokens per device per second
                record = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                          "tokens_per_second": tgs * self.dist.world_size, "tgs": tgs,
                          "mfu": tgs * self.flops_per_token / peak if peak else 0.0,
                          "tokens_seen": self.tokens_seen, "step_time": dt, **extra}
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.max_steps:
                    last_eval = self.evaluate()
                    record.update(last_eval)
                history.append(record)
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps or last_eval:
                    metrics.log(record)
                if progress is None and (self.step % max(1, cfg.max_steps // 10) == 0 or "val_loss" in record):
                    self.log(f"step {self.step}/{cfg.max_steps} loss {loss:.4f} lr {lr:.2e} "
                             f"tok/s {record['tokens_per_second']:.0f} mfu {record['mfu']:.1%}"
                             + (f" val_loss {record['val_loss']:.4f}" if "val_loss" in record else ""))
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{record['tokens_per_second']:.0f}",
                                         mfu=f"{record['mfu']:.0%}")
                last_eval = {}
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.max_steps:
                    self.save()
            final_eval = self.evaluate()
            if final_eval:
                metrics.log({"step": self.step, **final_eval})
            path = self.save()
        finally:
            if progress is not None:
                progress.close()
            metrics.close()
            if previous_handler is not None:
                signal.signal(signal.SIGINT, previous_handler)
        elapsed = time.perf_counter() - t_start
        trained_tokens = self.tokens_seen - tokens_at_start
        steady = history[1:] if len(history) > 1 else history
        tgs_mean = (sum(r["tgs"] for r in steady) / len(steady)) if steady else 0.0
        summary = {
            "steps": self.step, "interrupted": self._stop_requested, "checkpoint": str(path) if path else None,
            "final_loss": history[-1]["loss"] if history else None, "tokens_seen": self.tokens_seen,
            "wall_seconds": elapsed, "tokens_per_second": trained_tokens / elapsed if elapsed > 0 else 0.0,
            "tgs_steady": tgs_mean, "mfu_steady": tgs_mean * self.flops_per_token / peak if peak else 0.0,
            "precision": self.precision, "peak_flops": peak, **final_eval,
        }
        return summary
