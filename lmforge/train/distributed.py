"""torch.distributed glue: process-group setup from torchrun's env, DDP / FSDP2 wrapping, full state dicts.

Launch: `torchrun --nproc_per_node N -m lmforge pretrain ... train.parallel=ddp|fsdp`. Backend is NCCL on CUDA
and gloo on CPU. Multi-node: add `--nnodes M --node_rank R --rdzv_backend c10d --rdzv_endpoint HOST:PORT`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..core.errors import ConfigError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(parallel: str, device: torch.device) -> DistInfo:
    """Join the process group torchrun set up; a single process needs nothing."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if parallel == "none":
        if world_size > 1:
            raise ConfigError(f"launched with WORLD_SIZE={world_size} but train.parallel=none; set ddp or fsdp")
        return DistInfo()
    if "RANK" not in os.environ:
        raise ConfigError(f"train.parallel={parallel} needs a torchrun launch (RANK/WORLD_SIZE unset)")
    info = DistInfo(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)
    return info


def wrap_model(model: nn.Module, parallel: str, device: torch.device) -> nn.Module:
    """DDP, or FSDP2 `fully_shard` on each transformer layer and then the root."""
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module under DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, nn.Module) and type(model).__name__.endswith("DataParallel"):
            model = model.module
        else:
            return model


def full_model_state_dict(model: nn.Module, parallel: str) -> dict[str, torch.Tensor]:
    """A full, unsharded CPU state dict (collective under FSDP: every rank must call it)."""
    if parallel == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, parallel: str) -> dict:
    if parallel == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict, optim_sd: dict | None,
                    parallel: str) -> None:
    """Load full state dicts into a (possibly sharded) model and its optimizer."""
    if parallel == "fsdp":
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, set_model_state_dict, set_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, model_sd, options=opts)
        if optim_sd is not None:
            set_optimizer_state_dict(model, optimizer, optim_sd, options=opts)
        return
    unwrap(model).load_state_dict(model_sd, strict=True)
    if optim_sd is not None:
        optimizer.load_state_dict(optim_sd)


def all_reduce_mean(value: float, info: DistInfo) -> float:
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / info.world_size


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo, success: bool = True) -> None:
    """Leave the process group. After a successful run the ranks wait for each other first: a rank tearing
    gloo down while rank 0 still writes the final model can abort it (SIGABRT at exit). After an error
    they do not wait, since a failed rank would never arrive."""
    if info.enabled and dist.is_initialized():
        if success:
            dist.barrier()
        dist.destroy_process_group()
