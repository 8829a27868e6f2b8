"""Pretraining entry point: wire tokenizer, shards, model and the one Trainer together."""
from __future__ import annotations

import sys

import json
import time
from pathlib import Path
from typing import Any

import torch

from ..config import dump_config, to_dict
from ..core.device import pick_device, set_threads
from ..core.errors import ConfigError, DataError
from ..core.io import atomic_write_json
from ..core.seed import seed_everything
from ..train.distributed import DistInfo, init_distributed, shutdown
from ..train.loop import Trainer
from ..train.rundir import guard_run_dir, replace_dir, save_model_dir
from ..train.losses import causal_lm_loss, mean_loss


def tokenizer_dir_for(data_dir: str, explicit: str) -> str:
    """The tokenizer to use: the explicit one, else the one the shards' meta.json names."""
    if explicit:
        return explicit
    meta_path = Path(data_dir) / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"no packed dataset at {data_dir} (missing {meta_path}); run `lmforge data` first")
    meta = json.loads(meta_path.read_text())
    path = (meta.get("config") or {}).get("tokenizer")
    if not path:
        raise ConfigError(f"{meta_path} names no tokenizer; pass tokenizer=DIR")
    return path


def build_model(section, tokenizer, device: torch.device):
    """A fresh model from the preset (sized to the tokenizer) or the checkpoint in init_from."""
    from ..model import Transformer

    if section.init_from:
        model = Transformer.from_pretrained(section.init_from)
        if model.config.vocab_size < tokenizer.vocab_size:
            raise ConfigError(f"model.init_from={section.init_from} has vocab {model.config.vocab_size} < tokenizer's "
                              f"{tokenizer.vocab_size}; grow the model with `lmforge vocab` first")
        return model
    cfg = section.build_config(tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
    return Transformer(cfg)


def run(cfg) -> dict[str, Any]:
    from ..data.loader import ShardLoader, iter_eval_batches
    from ..tokenizer import Tokenizer

    tcfg = cfg.train
    device = pick_device(tcfg.device)
    set_threads(tcfg.num_threads)
    dist_info: DistInfo = init_distributed(tcfg.parallel, device)
    if dist_info.enabled and device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
    run_dir = Path(tcfg.out_dir)
    try:
        if dist_info.is_main:
            guard_run_dir(run_dir, tcfg)
        seed_everything(tcfg.seed)
        tokenizer = Tokenizer.from_pretrained(tokenizer_dir_for(cfg.data, cfg.tokenizer))
        train_batches = ShardLoader(cfg.data, "train", batch_size=tcfg.batch_size, seq_len=tcfg.seq_len,
                                    seed=tcfg.seed, rank=dist_info.rank, world_size=dist_info.world_size,
                                    tokenizer=tokenizer)
        model = build_model(cfg.model, tokenizer, device)
        if cfg.model.trainable == "embeddings":
            from ..model.resize import freeze_all_but_embeddings

            freeze_all_but_embeddings(model)
        elif cfg.model.trainable != "all":
            raise ConfigError(f"model.trainable={cfg.model.trainable!r} is not one of ['all', 'embeddings']")
        n_params = sum(p.numel() for p in model.parameters())
        flops_per_token = model.config.flops_per_token(tcfg.seq_len)
        if dist_info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, run_dir / "config.yaml")
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            if trainable != n_params:
                print(f"trainable: {trainable / 1e6:.2f}M of {n_params / 1e6:.2f}M params (model.trainable="
                      f"{cfg.model.trainable})")
            print(f"model: {model.config.model_type} {n_params / 1e6:.2f}M params, layers={model.config.num_layers} "
                  f"hidden={model.config.hidden_size} vocab={model.config.vocab_size}")
            print(f"data: {cfg.data} train windows/epoch={train_batches.windows_per_epoch} seq_len={tcfg.seq_len} "
                  f"global batch={tcfg.batch_size * tcfg.grad_accum * dist_info.world_size} sequences")

        def eval_fn(m):
            return mean_loss(m, iter_eval_batches(cfg.data, tcfg.batch_size, tcfg.seq_len, "val", dist_info.rank,
                                                  dist_info.world_size, max_batches=tcfg.eval_batches or None))

        provenance = {"stage": "pretrain", "config": to_dict(cfg), "parent": cfg.model.init_from or None,
                      "data": cfg.data, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        model_config = model.config

        def write_model(state_dict, out: Path) -> None:
            save_model_dir(model_config, state_dict, tokenizer, out, provenance)

        def read_model(directory: Path) -> dict[str, torch.Tensor]:
            from ..model.hf import load_state_dict

            return load_state_dict(directory)[1]

        trainer = Trainer(tcfg, model, causal_lm_loss, train_batches, write_model=write_model, read_model=read_model,
                          eval_fn=eval_fn,
                          flops_per_token=flops_per_token, dist_info=dist_info,
                          config_yaml=(run_dir / "config.yaml").read_text() if dist_info.is_main else "")
        before = trainer.evaluate() if not tcfg.resume else {}  # every rank: eval is collective under FSDP
        summary = trainer.fit()
        summary["initial_val"] = before
        summary["num_params"] = n_params
        if dist_info.is_main:
            final = run_dir / "model"
            replace_dir(Path(summary["checkpoint"]) / "model", final)
            summary["model_dir"] = str(final)
            atomic_write_json(run_dir / "summary.json", summary)
            _print_summary(summary)
        return summary
    finally:
        shutdown(dist_info, success=sys.exc_info()[0] is None)  # in flight here when the run failed


def _print_summary(s: dict[str, Any]) -> None:
    parts = [f"steps={s['steps']}", f"loss={s['final_loss']:.4f}" if s.get("final_loss") is not None else ""]
    if "val_loss" in s:
        parts.append(f"val_loss={s['val_loss']:.4f} val_ppl={s['val_ppl']:.2f}")
    parts.append(f"tokens/s={s['tokens_per_second']:.0f} MFU={s['mfu_steady']:.1%} wall={s['wall_seconds']:.1f}s")
    print("pretrain done: " + " ".join(p for p in parts if p) + f" -> {s.get('model_dir')}")
