"""Load what inference runs: a model directory, optionally a PEFT adapter on top, and the right tokenizer.

One function for `lmforge generate`, `lmforge chat`, eval and the arena, so `--adapter` means the same
everywhere: the adapter (ours or peft's layout, any method) is loaded active on the checkpoint, and its
own tokenizer is used when it ships one (an adapter trained after a vocabulary expansion does).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def load_model_and_tokenizer(path: str | Path, adapter: str | Path | None = None, tokenizer: str | Path | None = None,
                             device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer). dtype None: float32 on CPU, bfloat16 on CUDA."""
    from ..model import Transformer
    from ..tokenizer import Tokenizer

    device = torch.device(device or "cpu")
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = Transformer.from_pretrained(path, device=device, dtype=dtype)
    if adapter:
        from ..peft import load_adapter

        model = load_adapter(model, adapter)
    tok_dir = tokenizer or (adapter if adapter and (Path(adapter) / "tokenizer.json").is_file() else path)
    return model.eval(), Tokenizer.from_pretrained(tok_dir)
