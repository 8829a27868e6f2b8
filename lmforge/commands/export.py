r"""Export a model directory: fold adapters into the base (`--merge-adapter`) and/or change its dtype.

    lmforge export --model runs/quickstart/pretrain/model --adapter runs/quickstart/sft_lora/adapter --merge-adapter \
        --out runs/quickstart/merged

The result is a plain Hugging Face directory (config.json + safetensors + tokenizer) that transformers and
every lmforge stage load without peft. The merge runs in float32 whatever the saved dtype, so merging a
bf16 model does not round the base twice. `lmforge.peft.unmerge_adapter` is the exact inverse on a model
that still holds the adapter.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import opt
from ..core.errors import ConfigError


@dataclass
class Config:
    model: str = opt("", "base model directory (HF layout)")
    adapter: list[str] = opt([], "PEFT-layout adapter directories to apply, in order (lmforge's or peft's)")
    merge_adapter: bool = opt(False, "fold the adapters into the base weights (needed to export with adapters)")
    out: str = opt("", "output directory (a new HF model directory)")
    dtype: str = opt("auto", "saved weight dtype: auto (the base's) | float32 | bfloat16 | float16")
    overwrite: bool = opt(False, "replace an existing output directory")


def run(cfg: Config) -> Path:
    import torch

    from ..core.device import dtype_name, parse_dtype
    from ..core.io import atomic_write_json
    from ..model import Transformer
    from ..model.hf import read_config
    from ..peft import load_adapter, merge_and_unload
    from ..tokenizer import Tokenizer

    if not cfg.model:
        raise ConfigError("model is empty: pass --model DIR")
    if not cfg.out:
        raise ConfigError("out is empty: pass --out DIR")
    if cfg.adapter and not cfg.merge_adapter:
        raise ConfigError("adapter given without merge_adapter=true: an export is a plain model, so the adapter "
                          "must be merged (or serve it unmerged with `lmforge serve --lora name=DIR`)")
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise ConfigError(f"{out} is not empty; pass overwrite=true to replace it")
    if out.resolve() == Path(cfg.model).resolve():
        raise ConfigError(f"out={out} is the base model's directory; write the export somewhere else")
    read_config(cfg.model)  # a clear error for a directory that is not a model
    dtype = parse_dtype(cfg.dtype) or _saved_dtype(cfg.model)
    started = time.perf_counter()
    model = Transformer.from_pretrained(cfg.model, dtype=torch.float32)
    for index, adapter in enumerate(cfg.adapter):
        load_adapter(model, adapter, name=f"adapter{index}")
        model = merge_and_unload(model)  # one at a time: each merges into what the previous left
    model = model.to(dtype)
    tokenizer_dir = next((a for a in reversed(cfg.adapter) if (Path(a) / "tokenizer.json").is_file()), cfg.model)
    tokenizer = Tokenizer.from_pretrained(tokenizer_dir)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ConfigError(f"the tokenizer in {tokenizer_dir} has {tokenizer.vocab_size} ids but the model only "
                          f"{model.config.vocab_size} rows")
    tmp = out.with_name("." + out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    atomic_write_json(tmp / "lmforge.json", {
        "stage": "export", "parent": str(cfg.model), "adapters": list(cfg.adapter), "merged": bool(cfg.adapter),
        "dtype": dtype_name(dtype), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    merged = f" with {len(cfg.adapter)} adapter(s) merged" if cfg.adapter else ""
    print(f"export: {cfg.model}{merged} -> {out} ({dtype_name(dtype)}, {model.num_params() / 1e6:.2f}M params, "
          f"{time.perf_counter() - started:.1f}s)")
    return out


def _saved_dtype(model_dir: str):
    """The dtype the base's weights are stored in (a floating tensor of its first safetensors file)."""
    import torch
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{model_dir}: no safetensors weights")
    with safe_open(str(files[0]), framework="pt") as f:
        for key in f.keys():
            tensor = f.get_tensor(key)
            if tensor.is_floating_point():
                return tensor.dtype
    return torch.float32
