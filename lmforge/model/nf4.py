"""NF4: QLoRA's 4-bit NormalFloat weight store (Dettmers et al. 2023), block-wise, with double quantisation.

- **Codes.** 16 levels placed at quantiles of N(0, 1) (weights of a trained network are roughly normal),
  normalised to [-1, 1]. The paper makes the set asymmetric so that 0 is exactly representable: 8 quantiles
  for the positive half and 7 for the negative half, plus 0. The outermost quantile is taken at probability
  `NF4_OFFSET` (the mean of 1 − 1/30 and 1 − 1/32, the positions for 15 and 16 bins) instead of at 1, where
  the normal quantile is infinite. The result equals the table bitsandbytes publishes (tested to 1e-6).
- **Blocks.** The flattened weight is cut into blocks of 64; each block is divided by its absmax and every
  value is replaced by the index of the nearest code. Two 4-bit indices share a byte (first value in the
  high nibble): 4 bits per weight.
- **Double quantisation.** The fp32 absmax per block costs 32/64 = 0.5 bit per weight. As in the paper, the
  constants are quantised again: their mean is subtracted (so they are centred on 0) and they are stored as
  8-bit codes in blocks of 256, each block with one fp32 scale: 8/64 + 32/(64·256) ≈ 0.127 bit per weight.
  The paper stores these as 8-bit floats (bitsandbytes' dynamic map); we use symmetric linear int8 codes,
  whose error on the mean-centred constants is at most scale/2 = max|c − mean|/254 per block of 256.

`Linear4bit` keeps the packed weight and constants as buffers (frozen, never Parameters) and dequantises
block-wise on the fly in forward, to the compute dtype (the input's, or autocast's). In training it does not
keep the dequantised weight for backward: backward dequantises again (the QLoRA memory saving).
`quantize_model_nf4` swaps every linear layer except the skipped ones (the output head by default);
embeddings and norms stay as they are. `dequantize_model` turns them back into plain `Linear` layers
(used when a QLoRA adapter is merged).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError
from .layers import Linear, linear

NF4_OFFSET = ((1 - 1 / 30) + (1 - 1 / 32)) / 2  # = 0.96770833...
BLOCK_SIZE = 64
ABSMAX_BLOCK_SIZE = 256


def nf4_code_values() -> torch.Tensor:
    """The 16 NF4 levels, ascending, in [-1, 1] with an exact 0 (float32), computed from normal quantiles."""
    positive = torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 9, dtype=torch.float64)[:-1])  # 8 values > 0
    negative = -torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 8, dtype=torch.float64)[:-1])  # 7 values < 0
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return (values / values.max()).to(torch.float32)


NF4_CODES = nf4_code_values()
_MIDPOINTS = (NF4_CODES[1:] + NF4_CODES[:-1]) / 2  # a value goes to the code whose interval holds it
# Every byte value → its two dequantised codes (high nibble first): one lookup per byte, no bit twiddling.
_BYTE_TABLE = torch.stack([NF4_CODES[torch.arange(256) >> 4], NF4_CODES[torch.arange(256) & 15]], dim=1)


@dataclass
class NF4Weight:
    """A weight matrix in NF4: packed codes plus the per-block absmax, double-quantised or plain fp32."""

    packed: torch.Tensor                  # uint8 [ceil(numel / block) · block / 2]
    absmax: torch.Tensor | None           # float32 [blocks] (double_quant=False)
    absmax_q: torch.Tensor | None         # int8 [blocks] (double_quant=True)
    absmax_scale: torch.Tensor | None     # float32 [ceil(blocks / 256)]
    absmax_offset: torch.Tensor | None    # float32 [] (the mean subtracted before the 8-bit step)
    shape: tuple[int, ...]
    block_size: int = BLOCK_SIZE

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in (("packed", self.packed), ("absmax", self.absmax), ("absmax_q", self.absmax_q),
                                  ("absmax_scale", self.absmax_scale), ("absmax_offset", self.absmax_offset))
                if v is not None}

    def nbytes(self) -> int:
        """Bytes of the 4-bit codes plus every quantisation constant."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def quantize_nf4(weight: torch.Tensor, block_size: int = BLOCK_SIZE, double_quant: bool = True,
                 absmax_block_size: int = ABSMAX_BLOCK_SIZE) -> NF4Weight:
    """Block-wise absmax NF4 quantisation of `weight` (any shape; padded with zeros to whole blocks)."""
    if block_size < 2 or block_size % 2:
        raise ConfigError(f"NF4 block_size={block_size} must be an even number >= 2")
    flat = weight.detach().reshape(-1).float()
    blocks = math.ceil(flat.numel() / block_size)
    flat = F.pad(flat, (0, blocks * block_size - flat.numel())).view(blocks, block_size)
    absmax = flat.abs().amax(dim=1)
    normalised = flat / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    codes = torch.bucketize(normalised, _MIDPOINTS.to(flat.device)).to(torch.uint8).view(-1)
    packed = (codes[0::2] << 4) | codes[1::2]
    if not double_quant:
        return NF4Weight(packed, absmax, None, None, None, tuple(weight.shape), block_size)
    absmax_q, scale, offset = _quantize_absmax(absmax, absmax_block_size)
    return NF4Weight(packed, None, absmax_q, scale, offset, tuple(weight.shape), block_size)


def _quantize_absmax(absmax: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantisation: (int8 codes, fp32 scale per block of `block`, fp32 mean offset)."""
    offset = absmax.mean()
    centred = absmax - offset
    n = centred.numel()
    groups = math.ceil(n / block)
    padded = F.pad(centred, (0, groups * block - n)).view(groups, block)
    scale = padded.abs().amax(dim=1) / 127
    q = torch.round(padded / scale.clamp_min(torch.finfo(torch.float32).tiny)[:, None]).clamp_(-127, 127)
    return q.to(torch.int8).view(-1)[:n].contiguous(), scale, offset


def dequantize_absmax(w: NF4Weight) -> torch.Tensor:
    """The per-block absmax [blocks] in float32 (undoing the double quantisation if there is one)."""
    if w.absmax is not None:
        return w.absmax.float()
    assert w.absmax_q is not None and w.absmax_scale is not None and w.absmax_offset is not None
    n = w.absmax_q.numel()
    groups = w.absmax_scale.numel()
    padded = F.pad(w.absmax_q.float(), (0, groups * (-(-n // groups)) - n)).view(groups, -1)
    return (padded * w.absmax_scale.float()[:, None]).view(-1)[:n] + w.absmax_offset.float()


def dequantize_nf4(w: NF4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight back from its NF4 store, in `dtype` (computed in float32, one cast at the end)."""
    values = F.embedding(w.packed.to(torch.int32), _BYTE_TABLE.to(w.packed.device))  # [bytes, 2]
    blocks = values.view(-1, w.block_size) * dequantize_absmax(w)[:, None]
    numel = math.prod(w.shape)
    return blocks.view(-1)[:numel].view(w.shape).to(dtype)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _NF4Matmul(torch.autograd.Function):
    """x·Wᵀ with W dequantised in forward and again in backward, so no full-precision copy of W lives
    between the two (the frozen 4-bit weight gets no gradient; only x does)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "Linear4bit") -> torch.Tensor:
        ctx.layer, ctx.x_dtype = layer, x.dtype
        return linear(x, layer.dequantize(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight = ctx.layer.dequantize(grad.dtype)
        return linear(grad, weight.t()).to(ctx.x_dtype), None


class Linear4bit(nn.Module):
    """A frozen linear layer stored in NF4: y = x·dequant(W)ᵀ + b, computed in the input's (or autocast's) dtype.

    The packed weight and constants are buffers: in the state dict, moved by `.to(device)`, never trained.
    A bias, if the original had one, stays a full-precision (frozen) Parameter."""

    _FLOAT_BUFFERS = ("weight_absmax", "weight_absmax_scale", "weight_absmax_offset")

    def __init__(self, in_features: int, out_features: int, bias: bool = False, block_size: int = BLOCK_SIZE,
                 double_quant: bool = True, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.block_size, self.double_quant = block_size, double_quant
        blocks = math.ceil(in_features * out_features / block_size)
        self.register_buffer("weight_packed", torch.zeros(blocks * block_size // 2, dtype=torch.uint8, device=device))
        if double_quant:
            groups = math.ceil(blocks / ABSMAX_BLOCK_SIZE)
            self.register_buffer("weight_absmax_q", torch.zeros(blocks, dtype=torch.int8, device=device))
            self.register_buffer("weight_absmax_scale", torch.zeros(groups, dtype=torch.float32, device=device))
            self.register_buffer("weight_absmax_offset", torch.zeros((), dtype=torch.float32, device=device))
        else:
            self.register_buffer("weight_absmax", torch.zeros(blocks, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, module: nn.Linear, block_size: int = BLOCK_SIZE, double_quant: bool = True) -> "Linear4bit":
        """Quantise a linear layer's weight (its bias is kept in full precision)."""
        weight = module.weight
        layer = cls(module.in_features, module.out_features, module.bias is not None, block_size, double_quant,
                    device=weight.device)
        layer.load_nf4(quantize_nf4(weight, block_size, double_quant))
        if module.bias is not None:
            layer.bias.data = module.bias.detach().clone()
        return layer

    def load_nf4(self, w: NF4Weight) -> None:
        for key, tensor in w.tensors().items():
            getattr(self, "weight_" + key).copy_(tensor)

    @property
    def nf4(self) -> NF4Weight:
        get = lambda key: getattr(self, "weight_" + key, None)  # noqa: E731
        return NF4Weight(self.weight_packed, get("absmax"), get("absmax_q"), get("absmax_scale"),
                         get("absmax_offset"), (self.out_features, self.in_features), self.block_size)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [out, in] in `dtype`, a fresh tensor each call."""
        return dequantize_nf4(self.nf4, dtype)

    def storage_bytes(self) -> int:
        """Bytes of the packed weight plus its quantisation constants (the bias not included)."""
        return self.nf4.nbytes()

    def to_linear(self, dtype: torch.dtype = torch.float32) -> Linear:
        """A plain `Linear` holding the dequantised weight (what merging a QLoRA adapter starts from)."""
        out = Linear(self.in_features, self.out_features, bias=self.bias is not None,
                     device=self.weight_packed.device, dtype=dtype)
        out.weight.data = self.dequantize(dtype)
        if self.bias is not None:
            out.bias.data = self.bias.detach().to(dtype).clone()
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(_compute_dtype(x))
        if torch.is_grad_enabled() and x.requires_grad:
            out = _NF4Matmul.apply(x, self)
        else:
            out = linear(x, self.dequantize(x.dtype))
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def _apply(self, fn, recurse=True):
        """`.to(dtype)` must not round the fp32 constants: keep them float32 whatever the module is cast to."""
        saved = {name: getattr(self, name) for name in self._FLOAT_BUFFERS if hasattr(self, name)}
        result = super()._apply(fn, recurse)
        for name, before in saved.items():
            after = getattr(self, name)
            if after.dtype != torch.float32:
                setattr(self, name, before.to(device=after.device))
        return result

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nf4 block={self.block_size}, double_quant={self.double_quant}")


def _skipped(name: str, skip: Sequence[str] | str) -> bool:
    """peft's naming rule: a list matches a full name or a dotted suffix, a string is a full-match regex."""
    if isinstance(skip, str):
        return re.fullmatch(skip, name) is not None
    return any(name == s or name.endswith("." + s) for s in skip)


def quantize_model_nf4(model: nn.Module, skip: Sequence[str] | str = ("lm_head",), *, block_size: int = BLOCK_SIZE,
                       double_quant: bool = True) -> nn.Module:
    """Replace every nn.Linear (lmforge's `Linear` included) not named in `skip` by a `Linear4bit`, in place.

    Embeddings, norms and stacked MoE expert weights are not linear modules and stay unquantised. Returns
    the model; ConfigError if nothing was quantised."""
    targets = [name for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and not _skipped(name, skip)]
    if not targets:
        raise ConfigError(f"quantize_model_nf4: no linear layer left to quantise (skip={skip!r})")
    for name in targets:
        _replace(model, name, Linear4bit.from_linear(model.get_submodule(name), block_size, double_quant))
    return model


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every `Linear4bit` by a plain `Linear` with the dequantised weight, in place; returns the model."""
    for name in [n for n, m in model.named_modules() if isinstance(m, Linear4bit)]:
        _replace(model, name, model.get_submodule(name).to_linear(dtype))
    return model


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def nf4_storage(model: nn.Module) -> dict[str, int | float]:
    """What the 4-bit store costs: bytes of codes and constants vs the same weights in bf16."""
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    weights = sum(m.in_features * m.out_features for m in layers)
    codes = sum(m.weight_packed.numel() for m in layers)
    total = sum(m.storage_bytes() for m in layers)
    return {"layers": len(layers), "weights": weights, "code_bytes": codes, "constant_bytes": total - codes,
            "nf4_bytes": total, "bf16_bytes": 2 * weights, "ratio_vs_bf16": total / (2 * weights) if weights else 0.0,
            "bits_per_weight": 8 * total / weights if weights else 0.0}


def quantized_numel(model: nn.Module) -> int:
    """Weights held in 4-bit stores (buffers, so `model.parameters()` does not count them)."""
    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, Linear4bit))
