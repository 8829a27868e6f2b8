"""Feed-forward building blocks: RMSNorm, the SwiGLU MLP, and the Mixtral-style MoE.

Parameter names match Hugging Face's in-memory modules (`weight`, `gate_proj`/`up_proj`/`down_proj`;
for MoE `gate.weight` and the fused `experts.gate_up_proj` / `experts.down_proj` that transformers 5
uses), so PEFT-style targeting by name works and `hf.py` only converts MoE keys at the file boundary.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig

# oneDNN's matmul, as torch.compile's CPU backend calls it. PyTorch routes eager fp32 matmuls to MKL's
# sgemm, which on the AMD Zen CPU we measured runs a 256-bit code path at about half the oneDNN speed.
_ONEDNN_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None


@torch.library.custom_op("lmforge::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x·Wᵀ + b by oneDNN (fp32 CPU tensors). A custom op, so torch.compile calls it as is."""
    return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")


@onednn_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _onednn_linear_setup(ctx, inputs, output) -> None:
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight)


def _onednn_linear_backward(ctx, grad: torch.Tensor):
    x, weight = ctx.saved_tensors
    grad_x = grad_weight = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = onednn_linear(grad, weight.t(), None)  # grad·W; oneDNN reads the transposed view as is
    grad_2d = grad.reshape(-1, grad.shape[-1])
    if ctx.needs_input_grad[1]:
        grad_weight = onednn_linear(grad_2d.t(), x.reshape(-1, x.shape[-1]).t(), None)  # gradᵀ·x
    if ctx.needs_input_grad[2]:
        grad_bias = grad_2d.sum(0)
    return grad_x, grad_weight, grad_bias


onednn_linear.register_autograd(_onednn_linear_backward, setup_context=_onednn_linear_setup)


# Below these multiply-adds (rows·in·out) the custom op's fixed cost (~15 µs a call, ~70 µs for forward
# plus backward) outweighs oneDNN's faster kernel: measured crossovers, inference and training.
_ONEDNN_MIN_MACS = 1 << 19
_ONEDNN_MIN_MACS_WITH_GRAD = 1 << 22


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, computed by oneDNN for plain fp32 CPU tensors outside autocast (same values, ~2x faster
    where MKL is slow); everything else (bf16/autocast, CUDA, quantised or sharded weights, tiny
    products) goes to F.linear."""
    if (_ONEDNN_LINEAR is not None and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.device.type == "cpu" and weight.device.type == "cpu" and x.dim() >= 2
            and type(weight) in (torch.Tensor, nn.Parameter) and type(x) is torch.Tensor
            and (bias is None or bias.dtype == torch.float32) and not torch.is_autocast_enabled("cpu")):
        grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
        if x.numel() * weight.shape[0] >= (_ONEDNN_MIN_MACS_WITH_GRAD if grad else _ONEDNN_MIN_MACS):
            return onednn_linear(x, weight, bias)
    return F.linear(x, weight, bias)


# Inference only: oneDNN's blocked ("packed") weight layout. Batch-1 decode is a chain of GEMVs that read
# every weight once per token; from the plain row-major layout oneDNN's bf16 GEMV reads ~34 GB/s on this
# CPU, from its own blocked layout ~54 GB/s (the machine's read bandwidth), fp32 41 -> 62 GB/s on a
# 8192x8192 weight. The packed copy is a second copy of the weight (memory), made by `pack_weights`.
_REORDER_WEIGHT = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None) if _ONEDNN_LINEAR is not None else None


def _weight_key(weight: torch.Tensor) -> tuple:
    """What identifies a weight's current values: storage, in-place version, dtype (a training step,
    a LoRA merge or `.to()` changes one of them, which makes a packed copy stale)."""
    return weight.data_ptr(), weight._version, weight.dtype


class Linear(nn.Linear):
    """nn.Linear (same parameters, same name for PEFT/LoRA targeting) whose forward is `linear` above,
    or, after `pack()`, oneDNN on the packed weight whenever no gradient is needed."""

    _packed: tuple | None = None  # (weight key, packed weight) from pack()

    def pack(self) -> bool:
        """Keep a oneDNN-packed copy of the weight for no-grad forwards (fp32/bf16 CPU plain tensors only)."""
        weight = self.weight
        if (_REORDER_WEIGHT is None or type(weight) not in (torch.Tensor, nn.Parameter)
                or weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16)
                or weight.is_inference()):
            self._packed = None
            return False
        key = _weight_key(weight)
        if self._packed is None or self._packed[0] != key:
            with torch.no_grad():
                self._packed = (key, _REORDER_WEIGHT(weight.detach(), 1))
        return True

    def unpack(self) -> None:
        self._packed = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self._packed
        if packed is not None and torch.compiler.is_compiling():
            # Traced by the compiled decode step: freshness was checked eagerly by pack_weights() just
            # before (data pointers cannot be traced); a re-pack makes new tensors, so a recompile.
            if _usable_packed(x, packed[0][2], False):
                return _ONEDNN_LINEAR(x, packed[1], self.bias, "none", [], "")
        elif packed is not None:
            if packed[0] != _weight_key(self.weight):
                self._packed = None  # the weight changed since pack(): drop the stale copy
            elif (x.dtype == packed[0][2] and type(x) is torch.Tensor and x.device.type == "cpu"
                  and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
                  and not torch.is_autocast_enabled("cpu") and (self.bias is None or self.bias.dtype == x.dtype)):
                return _ONEDNN_LINEAR(x, packed[1], self.bias, "none", [], "")
        return linear(x, self.weight, self.bias)


def _usable_packed(x: torch.Tensor, dtype: torch.dtype, needs_grad: bool) -> bool:
    return (x.dtype == dtype and type(x) is torch.Tensor and x.device.type == "cpu"
            and not (torch.is_grad_enabled() and (x.requires_grad or needs_grad))
            and not torch.is_autocast_enabled("cpu"))


class FusedLinears:
    """Several `Linear`s that read the same input (q/k/v; gate/up) as one packed oneDNN product at
    inference: one GEMV instead of three saves ~25 µs per layer per decoded token here. `__call__`
    returns None when it no longer applies (a weight changed, a module was wrapped by an adapter, a
    gradient is needed), and the caller runs the Linears one by one."""

    def __init__(self, linears: list[Linear]):
        self.linears = linears
        self.keys = [(_weight_key(m.weight), None if m.bias is None else _weight_key(m.bias)) for m in linears]
        self.sizes = [m.out_features for m in linears]
        with torch.no_grad():
            weight = torch.cat([m.weight.detach() for m in linears])
            self.bias = None if linears[0].bias is None else torch.cat([m.bias.detach() for m in linears])
            self.packed = _REORDER_WEIGHT(weight, 1)
        self.dtype = weight.dtype

    @classmethod
    def make(cls, linears: list[nn.Module], current: "FusedLinears | None") -> "FusedLinears | None":
        if current is not None and current.valid():
            return current
        if _REORDER_WEIGHT is None or any(type(m) is not Linear for m in linears):
            return None  # e.g. wrapped by an adapter (LoRA, DoRA): each runs on its own
        weight = linears[0].weight
        if (any(type(m.weight) not in (torch.Tensor, nn.Parameter) or m.weight.dtype != weight.dtype
                       or m.weight.device.type != "cpu" or m.weight.is_inference() for m in linears)
                or weight.dtype not in (torch.float32, torch.bfloat16)
                or len({m.bias is None for m in linears}) > 1):
            return None
        for m in linears:
            m.unpack()  # the fused copy replaces theirs
        return cls(linears)

    def valid(self, module_linears: list[nn.Module] | None = None) -> bool:
        linears = module_linears if module_linears is not None else self.linears
        return all(type(m) is Linear and m is orig and key == (_weight_key(m.weight),
                   None if m.bias is None else _weight_key(m.bias))
                   for m, orig, key in zip(linears, self.linears, self.keys))

    def __call__(self, x: torch.Tensor, linears: list[nn.Module]) -> list[torch.Tensor] | None:
        if not _usable_packed(x, self.dtype, any(m.weight.requires_grad for m in self.linears)) \
                or not (torch.compiler.is_compiling() or self.valid(linears)):  # see Linear.forward
            return None
        return list(_ONEDNN_LINEAR(x, self.packed, self.bias, "none", [], "").split(self.sizes, dim=-1))


def pack_weights(model: nn.Module) -> int:
    """Pack `model`'s linears in oneDNN's layout for inference (q/k/v and gate/up fused into one product
    each, every other `Linear` on its own); a no-op for what is already packed and unchanged. Returns
    how many linears are packed. Costs a second copy of those weights; `unpack_weights` frees it."""
    count = 0
    for module in model.modules():
        if hasattr(module, "pack_fused"):
            count += module.pack_fused()
    for module in model.modules():
        if isinstance(module, Linear) and not getattr(module, "_in_fused", False):
            count += module.pack()
    return count


def unpack_weights(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, Linear):
            module.unpack()
        if hasattr(module, "pack_fused"):
            module.unpack_fused()


class FusedPackMixin:
    """For a module whose `FUSED` Linears (attribute names) read the same input."""

    FUSED: tuple[str, ...] = ()
    _fused: FusedLinears | None = None

    def fused_linears(self) -> list[nn.Module]:
        return [getattr(self, name) for name in self.FUSED]

    def pack_fused(self) -> int:
        linears = self.fused_linears()
        self._fused = FusedLinears.make(linears, self._fused)
        for m in linears:
            if isinstance(m, Linear):
                m._in_fused = self._fused is not None
        return len(linears) if self._fused is not None else 0

    def unpack_fused(self) -> None:
        self._fused = None
        for m in self.fused_linears():
            if isinstance(m, Linear):
                m._in_fused = False

    def run_fused(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each FUSED linear applied to x: by the fused packed product when it applies, else one by one."""
        linears = self.fused_linears()
        if self._fused is not None:
            out = self._fused(x, linears)
            if out is not None:
                return out
            if not self._fused.valid(linears):
                self.unpack_fused()  # stale: free it (the next pack_weights makes a fresh one)
        return [m(x) for m in linears]


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 like HF (the residual stream may be bf16).

    Every norm here feeds only Linear layers. Under autocast each Linear would cast its float32 input
    to bf16 on its own (q, k and v: three copies of one tensor, and three casts back in backward), so
    the norm emits the autocast dtype once instead; the matmuls see exactly the same values.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            out = F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        else:
            out = self.weight * F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            out = out.to(torch.get_autocast_dtype(device_type))
        return out


class MLP(FusedPackMixin, nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    FUSED = ("gate_proj", "up_proj")

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.run_fused(x) if self._fused is not None else (self.gate_proj(x), self.up_proj(x))
        return self.down_proj(F.silu(gate) * up)


class Experts(nn.Module):
    """E SwiGLU experts stored as stacked weights: gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I].

    Stacked weights let the MoE block run each expert on its tokens with one gather and three matmuls,
    and are the layout transformers 5 uses in memory; `hf.py` splits them into Mixtral's published
    `block_sparse_moe.experts.{j}.w1/w2/w3` keys on save and joins them on load.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def expert_forward(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = linear(x, self.gate_up_proj[expert]).chunk(2, dim=-1)
        return linear(F.silu(gate) * up, self.down_proj[expert])


class MoE(nn.Module):
    """Mixtral sparse MoE: router logits → softmax → top-k → renormalise → weighted sum of experts.

    forward returns (output, (router_prob_sum [E], routed_count [E], rows)), the per-layer statistics
    from which the model builds HF's load-balancing loss over all layers at once.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.num_experts
        self.gate = Linear(config.hidden_size, config.num_experts, bias=False)  # the router
        self.experts = Experts(config.num_experts, config.hidden_size, config.intermediate_size)

    def forward(
        self, x: torch.Tensor, token_weight: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        router_logits = self.gate(flat)
        probs = torch.softmax(router_logits.float(), dim=-1)
        top_weights, top_experts = torch.topk(probs, self.top_k, dim=-1)
        top_weights = top_weights / top_weights.sum(dim=-1, keepdim=True)

        # Token-choice dispatch: sort the (token, slot) pairs by expert, run each expert on its slice.
        flat_experts = top_experts.reshape(-1)
        order = torch.argsort(flat_experts, stable=True)
        counts = torch.bincount(flat_experts, minlength=self.num_experts)
        token_of = order // self.top_k
        routed = flat.index_select(0, token_of)
        outputs = []
        start = 0
        for expert, count in enumerate(counts.tolist()):  # one host sync per layer, not per expert
            if count:
                outputs.append(self.experts.expert_forward(expert, routed[start:start + count]))
            start += count
        expert_out = torch.cat(outputs) * top_weights.reshape(-1)[order, None].to(flat.dtype)
        out = torch.zeros_like(flat).index_add_(0, token_of, expert_out.to(flat.dtype))

        stats = self._router_stats(probs, top_experts, token_weight)
        return out.reshape(shape), stats

    def _router_stats(
        self, probs: torch.Tensor, top_experts: torch.Tensor, token_weight: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sums for HF's load_balancing_loss_func; `token_weight` [N] (0 for padding) excludes pads."""
        if token_weight is None:
            token_weight = torch.ones(probs.shape[0], device=probs.device, dtype=torch.float32)
        counts = torch.zeros(self.num_experts, device=probs.device, dtype=torch.float32)
        counts.scatter_add_(0, top_experts.reshape(-1), token_weight.repeat_interleave(self.top_k))
        prob_sum = (probs * token_weight[:, None]).sum(dim=0)
        return prob_sum, counts, token_weight.sum()


def load_balancing_loss(stats: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], num_experts: int) -> torch.Tensor:
    """HF Mixtral's auxiliary loss: E · Σ_e (share of routed slots to e) · (mean router prob of e).

    As in `transformers...load_balancing_loss_func`, all layers are pooled (sums over layers divided by
    the total row count) before the product, rather than averaging per-layer losses.
    """
    prob_sum = sum(s[0] for s in stats)
    counts = sum(s[1] for s in stats)
    rows = sum(s[2] for s in stats)
    return num_experts * torch.sum((counts / rows) * (prob_sum / rows))
