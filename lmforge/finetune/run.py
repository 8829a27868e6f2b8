"""Supervised fine-tuning entry point: conversations + a pretrained HF model + a method, through the one Trainer.

Full, freeze and bitfit save `<out>/model` (an HF directory); lora, dora and ia3 save `<out>/adapter` (PEFT
layout) and, with finetune.merge=true, the merged model as `<out>/model`. Checkpoints hold, in their
`model/` directory, what the final artefact holds: the whole model or just the adapter.
"""
from __future__ import annotations

import sys

import random
import time
from pathlib import Path
from typing import Any

import torch

from ..config import dump_config, to_dict
from ..core.device import pick_device, set_threads
from ..core.errors import ConfigError, DataError
from ..core.io import atomic_write_json
from ..core.seed import seed_everything
from ..data.readers import ReadStats
from ..train.rundir import guard_run_dir, replace_dir, save_model_dir
from ..train.distributed import DistInfo, init_distributed, shutdown, unwrap
from ..train.loop import Trainer
from ..train.losses import causal_lm_loss
from .data import SFTBatches, add_neftune, read_conversations, sft_loss, tokenize_all
from .methods import apply_method, peak_memory


def load_examples(cfg, tokenizer, log=print) -> tuple[list, list, dict]:
    """(train examples, val examples, read stats): read, normalise, split off validation, tokenise."""
    d = cfg.data
    if not d.path:
        raise ConfigError("data.path is empty: name one or more SFT JSONL files")
    stats = ReadStats()
    train = read_conversations(d.path, d.format, d.on_error, stats)
    if d.val:
        val = read_conversations(d.val, d.format, d.on_error, stats)
    elif d.val_fraction > 0:
        order = list(range(len(train)))
        random.Random(f"lmforge-sft-val:{cfg.train.seed}").shuffle(order)
        n_val = max(1, int(len(train) * d.val_fraction))
        held = set(order[:n_val])
        val = [c for i, c in enumerate(train) if i in held]
        train = [c for i, c in enumerate(train) if i not in held]
    else:
        val = []
    if stats.skipped:
        log(f"data: skipped {stats.skipped} bad lines (data.on_error=skip), e.g. {stats.skipped_examples[0]}")
    max_len = min(d.max_seq_len, cfg.train.seq_len)  # train.seq_len bounds every row, packed or not
    train_ex = tokenize_all(tokenizer, train, max_len, d.train_on_prompt)
    val_ex = tokenize_all(tokenizer, val, max_len, d.train_on_prompt)
    if not train_ex:
        raise DataError(f"{d.path}: no conversation has an assistant token to train on (does the chat template mark "
                        f"replies with {{% generation %}}? if not, set data.train_on_prompt=true)")
    return train_ex, val_ex, stats.to_dict()


def run(cfg) -> dict[str, Any]:
    from ..model import Transformer
    from ..tokenizer import Tokenizer

    tcfg, fcfg = cfg.train, cfg.finetune
    fcfg.validate()
    if fcfg.is_prompt_learning and cfg.data.packing:
        raise ConfigError(f"finetune.method={fcfg.method} puts virtual tokens before each sequence, which the "
                          "conversations of a packed row cannot share; set data.packing=false")
    if not cfg.model.init_from:
        raise ConfigError("model.init_from is required: the HF model directory to fine-tune")
    if not Path(cfg.model.init_from).is_dir():
        raise ConfigError(f"model.init_from={cfg.model.init_from}: not a directory")
    device = pick_device(tcfg.device)
    set_threads(tcfg.num_threads)
    dist_info: DistInfo = init_distributed(tcfg.parallel, device)
    if dist_info.enabled and fcfg.is_adapter:
        shutdown(dist_info)
        raise ConfigError("adapter methods run single-process for now; use train.parallel=none")
    run_dir = Path(tcfg.out_dir)
    try:
        if dist_info.is_main:
            guard_run_dir(run_dir, tcfg)
        seed_everything(tcfg.seed)
        tokenizer = Tokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.init_from)
        train_ex, val_ex, read_stats = load_examples(cfg, tokenizer)
        pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
        batches = SFTBatches(train_ex, tcfg.batch_size, tcfg.seq_len, seed=tcfg.seed, packing=cfg.data.packing,
                             pad_id=pad_id, rank=dist_info.rank, world_size=dist_info.world_size)
        model = Transformer.from_pretrained(cfg.model.init_from, dtype=torch.float32)
        if model.config.vocab_size < tokenizer.vocab_size:
            raise ConfigError(f"model.init_from={cfg.model.init_from} has vocab {model.config.vocab_size} < its "
                              f"tokenizer's {tokenizer.vocab_size}")
        prepared = apply_method(model, fcfg, tcfg.lr, tcfg.weight_decay,
                                **({"tokenizer": tokenizer} if fcfg.is_prompt_learning else {}))
        neftune = add_neftune(model, fcfg.neftune_alpha) if fcfg.neftune_alpha > 0 else None
        log = print if dist_info.is_main else (lambda _m: None)
        if dist_info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, run_dir / "config.yaml")
        log(f"model: {cfg.model.init_from} method={fcfg.method} trainable params {prepared.trainable:,} / "
            f"{prepared.total:,} ({prepared.share:.4%})")
        log(f"data: {len(train_ex)} train / {len(val_ex)} val conversations, packing={cfg.data.packing}, "
            f"{batches.batches_per_epoch} batches/epoch")

        def eval_fn(m):
            if not val_ex:
                return {}
            val = SFTBatches(val_ex, tcfg.batch_size, tcfg.seq_len, shuffle=False, packing=cfg.data.packing,
                             pad_id=pad_id, epochs=1)
            return sft_loss(m, val)

        provenance = {"stage": "finetune", "method": fcfg.method, "config": to_dict(cfg),
                      "parent": cfg.model.init_from, "data": cfg.data.path,
                      "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        write_model, read_model = _model_io(model, fcfg, tokenizer, provenance, cfg.model.init_from)
        trainer = Trainer(tcfg, model, causal_lm_loss, batches, write_model=write_model, read_model=read_model,
                          eval_fn=eval_fn, flops_per_token=model.config.flops_per_token(tcfg.seq_len),
                          dist_info=dist_info, param_groups=prepared.param_groups,
                          config_yaml=(run_dir / "config.yaml").read_text() if dist_info.is_main else "")
        before = trainer.evaluate() if not tcfg.resume else {}
        summary = trainer.fit()
        if neftune is not None:
            neftune.remove()
        summary.update(initial_val=before, method=fcfg.method, trainable_params=prepared.trainable,
                       total_params=prepared.total, trainable_share=prepared.share, read_stats=read_stats,
                       **peak_memory(trainer.device))
        if dist_info.is_main:
            summary.update(_save_final(unwrap(trainer.model), fcfg, tokenizer, run_dir, provenance,
                                       cfg.model.init_from, Path(summary["checkpoint"])))
            atomic_write_json(run_dir / "summary.json", summary)
            log(f"finetune done: steps={summary['steps']} loss={summary['final_loss']:.4f}"
                + (f" val_loss {before.get('val_loss', float('nan')):.4f} -> {summary['val_loss']:.4f}"
                   if "val_loss" in summary else "")
                + f" peak memory {summary['peak_memory_mb']:.0f} MB ({summary['peak_memory_kind']})"
                + f" -> {summary.get('adapter_dir') or summary.get('model_dir')}")
        return summary
    finally:
        shutdown(dist_info, success=sys.exc_info()[0] is None)  # in flight here when the run failed


def _model_io(model, fcfg, tokenizer, provenance: dict, base: str):
    """(write_model, read_model) for the Trainer's checkpoints: the whole model in HF layout, or for adapter
    methods only the adapter in PEFT layout (megabytes instead of the whole base on every checkpoint)."""
    from ..model.hf import load_state_dict

    model_config = model.config
    if not fcfg.is_adapter:
        def write_full(state_dict, out: Path) -> None:
            save_model_dir(model_config, state_dict, tokenizer, out, provenance)

        return write_full, lambda directory: load_state_dict(directory)[1]

    from ..peft import save_adapter

    def write_adapter(_state_dict, out: Path) -> None:
        # the live model equals the state dict here: checkpoints are taken between optimizer steps
        save_adapter(model, out, base_model_name_or_path=base)

    def read_adapter(directory: Path) -> dict[str, torch.Tensor]:
        return adapter_into_state_dict(model, directory)

    return write_adapter, read_adapter


def adapter_into_state_dict(model, directory: Path, name: str = "default") -> dict[str, torch.Tensor]:
    """The model's full state dict with adapter `name`'s tensors replaced by those saved in `directory`
    (what the Trainer loads strictly on resume; the frozen base is the live one, unchanged by training)."""
    if getattr(model, "prompt_learning_state", None) is not None:  # prefix/prompt/P-tuning: encoder + table
        from ..peft.prompt_io import training_state_dict

        return training_state_dict(model, directory, name)
    from safetensors.torch import load_file

    from ..core.errors import CheckpointError
    from ..peft.io import PREFIX, WEIGHTS_NAME, adapter_parameter_map

    saved = load_file(str(Path(directory) / WEIGHTS_NAME))
    key_of = {id(t): k for k, t in model.state_dict(keep_vars=True).items()}
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for file_key, live in adapter_parameter_map(model, name).items():
        if PREFIX + file_key not in saved:
            raise CheckpointError(f"{directory / WEIGHTS_NAME}: missing {PREFIX + file_key}")
        state[key_of[id(live)]] = saved[PREFIX + file_key]
    return state


def _save_final(model, fcfg, tokenizer, run_dir: Path, provenance: dict, base: str, checkpoint: Path) -> dict[str, str]:
    """Write the run's artefacts; returns their paths for the summary.

    Whole-model methods copy the final checkpoint's model/ (already gathered from every rank under
    DDP/FSDP); adapter methods write from the live single-process model."""
    out: dict[str, str] = {}
    if fcfg.is_adapter:
        from ..peft import merge_and_unload, save_adapter

        save_adapter(model, run_dir / "adapter", base_model_name_or_path=base)
        tokenizer.save_pretrained(run_dir / "adapter")
        atomic_write_json(run_dir / "adapter" / "lmforge.json", provenance)
        out["adapter_dir"] = str(run_dir / "adapter")
        if fcfg.merge:
            import copy

            merged = merge_and_unload(copy.deepcopy(model))
            save_model_dir(merged.config, merged.state_dict(), tokenizer, run_dir / "model", provenance)
            out["model_dir"] = str(run_dir / "model")
        return out
    replace_dir(checkpoint / "model", run_dir / "model")
    out["model_dir"] = str(run_dir / "model")
    return out
