"""Hugging Face checkpoint directories: config.json + safetensors (+ index) + generation_config.json.

Weights are read and written only with safetensors. The in-memory key names are HF's; the one
conversion is Mixtral's experts: published checkpoints (and transformers 5.24's save_pretrained) store
`model.layers.{i}.block_sparse_moe.gate.weight` and `...block_sparse_moe.experts.{j}.w1/w2/w3.weight`
(w1 = gate, w3 = up, w2 = down), while our module keeps stacked `mlp.experts.gate_up_proj` /
`mlp.experts.down_proj` (transformers 5's in-memory layout, also accepted on load). Tied embeddings are
saved as transformers does: no `lm_head.weight` key.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from ..core.device import dtype_name, parse_dtype
from ..core.errors import CheckpointError, LMForgeError
from ..core.io import atomic_write_bytes, atomic_write_json
from .config import ModelConfig

if TYPE_CHECKING:
    from .transformer import Transformer

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
_IGNORED_KEYS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")  # old checkpoints saved this buffer
_EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")


# ---- config --------------------------------------------------------------------------------------

def read_config(path: str | Path) -> ModelConfig:
    """ModelConfig from `<path>/config.json`; CheckpointError names the file when it is missing or bad."""
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise CheckpointError(f"{file}: not found (is {path} an HF model directory?)")
    try:
        hf = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: not valid JSON: {e}") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    try:
        return ModelConfig.from_hf(hf)
    except (LMForgeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{file}: {e}") from None


# ---- weights on disk -----------------------------------------------------------------------------

def _weight_files(path: Path) -> dict[str, Path]:
    """key -> file holding it, from the index (sharded) or the single model.safetensors."""
    index = path / INDEX_NAME
    single = path / WEIGHTS_NAME
    if single.is_file():
        return {key: single for key in _keys_of(single)}
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        files = {name: path / name for name in set(weight_map.values())}
        for name, file in files.items():
            if "/" in name or "\\" in name or not file.is_file():
                raise CheckpointError(f"{index}: shard {name!r} is missing from {path}")
        return {key: files[name] for key, name in weight_map.items()}
    raise CheckpointError(f"{path}: no {WEIGHTS_NAME} or {INDEX_NAME} (weights are read only from safetensors)")


def _keys_of(file: Path) -> list[str]:
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise CheckpointError(f"{file}: cannot read safetensors header: {e}") from None


def read_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """All tensors of a checkpoint directory (on CPU, stored dtype) and the file each came from."""
    where = _weight_files(Path(path))
    tensors: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for key, file in where.items():
        by_file.setdefault(file, []).append(key)
    for file, keys in by_file.items():
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                present = set(f.keys())
                for key in keys:
                    if key not in present:
                        raise CheckpointError(f"{file}: index lists {key} but the shard lacks it")
                    tensors[key] = f.get_tensor(key)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{file}: cannot read safetensors: {e}") from None
    return tensors, where


# ---- key conversion ------------------------------------------------------------------------------

def to_hf_state_dict(config: ModelConfig, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict in the key layout transformers writes (Mixtral experts split, tied head dropped)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue
        moe = re.match(r"^model\.layers\.(\d+)\.mlp\.(gate\.weight|experts\.gate_up_proj|experts\.down_proj)$", key)
        if not moe:
            out[key] = tensor.detach().contiguous()
            continue
        prefix = f"model.layers.{moe.group(1)}.block_sparse_moe"
        if moe.group(2) == "gate.weight":
            out[f"{prefix}.gate.weight"] = tensor.detach().contiguous()
        elif moe.group(2) == "experts.gate_up_proj":
            size = config.intermediate_size
            for j in range(config.num_experts):
                out[f"{prefix}.experts.{j}.w1.weight"] = tensor[j, :size].detach().contiguous()
                out[f"{prefix}.experts.{j}.w3.weight"] = tensor[j, size:].detach().contiguous()
        else:
            for j in range(config.num_experts):
                out[f"{prefix}.experts.{j}.w2.weight"] = tensor[j].detach().contiguous()
    return out


def from_hf_state_dict(
    tensors: dict[str, torch.Tensor], config: ModelConfig, where: dict[str, Path],
) -> dict[str, torch.Tensor]:
    """Checkpoint tensors renamed to our keys: Mixtral experts stacked, stale RoPE buffers dropped."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, int, str], torch.Tensor] = {}
    for key, tensor in tensors.items():
        if _IGNORED_KEYS.search(key):
            continue
        match = _EXPERT_KEY.match(key)
        if match:
            experts[(int(match.group(1)), int(match.group(2)), match.group(3))] = tensor
            continue
        out[key.replace(".block_sparse_moe.gate.", ".mlp.gate.")] = tensor
    if experts:
        layers = sorted({layer for layer, _, _ in experts})
        for layer in layers:
            out.update(_stack_experts(layer, experts, config, where))
    return out


def _stack_experts(layer: int, experts: dict, config: ModelConfig, where: dict[str, Path]) -> dict[str, torch.Tensor]:
    up = (config.intermediate_size, config.hidden_size)
    shapes = {"w1": up, "w3": up, "w2": (config.hidden_size, config.intermediate_size)}
    parts: dict[str, list[torch.Tensor]] = {"w1": [], "w2": [], "w3": []}
    for j in range(config.num_experts):
        for name, shape in shapes.items():
            key = f"model.layers.{layer}.block_sparse_moe.experts.{j}.{name}.weight"
            tensor = experts.pop((layer, j, name), None)
            if tensor is None:
                raise CheckpointError(f"{_file_hint(where)}: missing weight {key}")
            if tuple(tensor.shape) != shape:
                raise CheckpointError(f"{_locate(key, where)}: {key} has shape {tuple(tensor.shape)}, expected {shape}")
            parts[name].append(tensor)
    leftover = [k for k in experts if k[0] == layer]
    if leftover:
        _, j, name = leftover[0]
        key = f"model.layers.{layer}.block_sparse_moe.experts.{j}.{name}.weight"
        raise CheckpointError(f"{_locate(key, where)}: unexpected weight {key} "
                              f"(num_local_experts={config.num_experts})")
    gate_up = torch.stack([torch.cat([w1, w3]) for w1, w3 in zip(parts["w1"], parts["w3"])])
    return {f"model.layers.{layer}.mlp.experts.gate_up_proj": gate_up,
            f"model.layers.{layer}.mlp.experts.down_proj": torch.stack(parts["w2"])}


def _file_hint(where: dict[str, Path]) -> str:
    files = sorted({str(f) for f in where.values()})
    return files[0] if len(files) == 1 else f"{files[0]} (+{len(files) - 1} shards)"


def _original_key(key: str) -> str:
    """The checkpoint's name for one of our keys (only Mixtral's router is renamed one to one)."""
    return key.replace(".mlp.gate.", ".block_sparse_moe.gate.")


def _locate(key: str, where: dict[str, Path]) -> str:
    """The file a key came from, for error messages."""
    file = where.get(key) or where.get(_original_key(key))
    return str(file) if file is not None else _file_hint(where)


# ---- load ----------------------------------------------------------------------------------------

def load_pretrained(cls: type["Transformer"], path: str | Path, device=None, dtype=None) -> "Transformer":
    """Build `cls` from an HF directory; CheckpointError names file and key for any mismatch."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    config = read_config(path)
    tensors, where = read_tensors(path)
    state = from_hf_state_dict(tensors, config, where)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # some files carry the tied copy; the embedding is the truth
    target_dtype = parse_dtype(dtype) or _stored_dtype(state)
    device = torch.device(device) if device is not None else torch.device("cpu")
    with torch.device("meta"):
        model = cls(config)
    expected = {k: v for k, v in model.state_dict().items()
                if not (k == "lm_head.weight" and config.tie_word_embeddings)}
    for key in expected:
        if key not in state:
            raise CheckpointError(f"{_file_hint(where)}: missing weight {_original_key(key)}")
    for key, tensor in state.items():
        if key not in expected:
            raise CheckpointError(f"{_locate(key, where)}: unexpected weight {key}")
        if tensor.shape != expected[key].shape:
            raise CheckpointError(f"{_locate(key, where)}: {_original_key(key)} has shape "
                                  f"{tuple(tensor.shape)}, expected {tuple(expected[key].shape)}")
    state = {k: v.to(device=device, dtype=target_dtype if v.is_floating_point() else v.dtype) for k, v in state.items()}
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    if model.model.rotary_emb is not None:
        model.model.rotary_emb.reset_parameters(device)
    model.aux_loss = torch.zeros((), device=device)
    return model.eval()


def _stored_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    for tensor in state.values():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


# ---- save ----------------------------------------------------------------------------------------

def parse_size(size: int | str) -> int:
    """Bytes from 5000000, "5GB" (10^9) or "5GiB" (2^30), as transformers reads max_shard_size."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", size.upper())
    if not match:
        raise LMForgeError(f"max_shard_size={size!r} is not a size like 500MB, 5GB or 2GiB")
    units = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    return int(float(match.group(1)) * units[match.group(2)])


def _shard(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    return shards


def save_pretrained(model: "Transformer", path: str | Path, max_shard_size: int | str = "5GB") -> None:
    """Write a model as an HF directory (see save_state_dict)."""
    save_state_dict(model.config, model.state_dict(), path, max_shard_size)


def load_state_dict(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, our-layout state dict) of an HF directory, without building a module (resume, FSDP).

    Tied checkpoints get `lm_head.weight` back as the embedding tensor."""
    path = Path(path)
    config = read_config(path)
    tensors, where = read_tensors(path)
    state = from_hf_state_dict(tensors, config, where)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return config, state


def save_state_dict(config: ModelConfig, state_dict: dict[str, torch.Tensor], path: str | Path,
                    max_shard_size: int | str = "5GB") -> None:
    """Write weights (atomic per file), then generation_config.json and config.json; drop stale shards."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.cpu() for k, v in to_hf_state_dict(config, state_dict).items()}
    shards = _shard(state, parse_size(max_shard_size))
    written: set[str] = set()
    if len(shards) == 1:
        atomic_write_bytes(path / WEIGHTS_NAME, safetensors_bytes(shards[0], metadata={"format": "pt"}))
        written.add(WEIGHTS_NAME)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            atomic_write_bytes(path / name, safetensors_bytes(shard, metadata={"format": "pt"}))
            weight_map.update({key: name for key in shard})
            written.add(name)
        total = sum(t.numel() * t.element_size() for t in state.values())
        atomic_write_json(path / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
        written.add(INDEX_NAME)
    for stale in [path / WEIGHTS_NAME, path / INDEX_NAME, *path.glob("model-*-of-*.safetensors")]:
        if stale.name not in written and stale.exists() and (stale.name in (WEIGHTS_NAME, INDEX_NAME)
                                                            or _SHARD_RE.match(stale.name)):
            stale.unlink()
    generation = {"_from_model_config": True, "bos_token_id": config.bos_token_id,
                  "eos_token_id": config.eos_token_id}
    if config.pad_token_id is not None:
        generation["pad_token_id"] = config.pad_token_id
    atomic_write_json(path / GENERATION_CONFIG_NAME, generation)
    atomic_write_json(path / CONFIG_NAME, config.to_hf(dtype=dtype_name(state_dict["model.embed_tokens.weight"].dtype)))
