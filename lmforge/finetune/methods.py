"""Fine-tuning methods: which parameters train, and how (full, freeze, bitfit, lora, dora, ia3, qlora, adapter).

Each method turns a loaded model into the model to train and says what the saved artefact is: a whole HF
model directory (full, freeze, bitfit) or a PEFT-layout adapter (lora, dora, ia3; qlora = a LoRA adapter
trained on an NF4-quantised base; adapter = bottleneck adapters in lmforge's own BOTTLENECK layout).
"""
from __future__ import annotations

import resource
import sys
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ..config import opt
from ..core.errors import ConfigError

METHODS = ("full", "freeze", "bitfit", "lora", "dora", "ia3", "qlora", "adapter", "prefix", "prompt", "ptuning",
           "ptuning_v2")
PROMPT_LEARNING_METHODS = ("prefix", "prompt", "ptuning", "ptuning_v2")  # virtual tokens (lmforge.peft.prompt_learning)
ADAPTER_METHODS = ("lora", "dora", "ia3", "qlora", "adapter", *PROMPT_LEARNING_METHODS)


@dataclass
class FinetuneSection:
    """The `finetune:` section: the method and its options."""

    method: Literal["full", "freeze", "bitfit", "lora", "dora", "ia3", "qlora", "adapter", "prefix", "prompt",
                    "ptuning", "ptuning_v2"] = opt(
        "lora", "full = every weight; freeze = only the last freeze_layers layers; bitfit = only biases; "
                "lora / dora / ia3 = a PEFT adapter (the base stays frozen); qlora = LoRA on a base quantised "
                "to 4-bit NF4; adapter = Houlsby/Pfeiffer bottleneck adapters; prefix / ptuning_v2 = learned per-layer "
                "K/V (through an MLP / directly); prompt / ptuning = learned input embeddings (directly / through "
                "an MLP or LSTM encoder)")
    freeze_layers: int = opt(2, "freeze: how many of the last transformer layers train")
    train_norm: bool = opt(True, "freeze: also train the final norm")
    train_head: bool = opt(False, "freeze: also train lm_head (with tied embeddings this trains the embeddings too)")
    r: int = opt(8, "lora/dora: rank")
    alpha: float = opt(16, "lora/dora: scale alpha/r (alpha/sqrt(r) with use_rslora)")
    dropout: float = opt(0.0, "lora/dora: dropout on the adapter branch's input")
    target_modules: list[str] | str = opt(
        "all-linear", "adapter targets: names (q_proj,v_proj), all-linear, or a regex; empty = peft's default")
    use_rslora: bool = opt(False, "rank-stabilised LoRA (alpha/sqrt(r))")
    loraplus_lr_ratio: float = opt(0.0, "LoRA+: B matrices train at lr × this (0 = off; ~16 in the paper)")
    modules_to_save: list[str] = opt([], "adapter methods: modules trained in full and saved with the adapter")
    neftune_alpha: float = opt(0.0, "NEFTune: uniform noise of this alpha on input embeddings in training (0 = off)")
    merge: bool = opt(False, "adapter methods: also save the adapter merged into the base as <out>/model")
    double_quant: bool = opt(True, "qlora: double-quantise the NF4 absmax constants (8-bit, blocks of 256)")
    quant_skip: list[str] = opt(["lm_head"], "qlora: linear layers left unquantised (suffix names)")
    adapter_size: int = opt(0, "adapter: bottleneck units (0 = hidden / adapter_reduction_factor)")
    adapter_reduction_factor: float = opt(16, "adapter: hidden / bottleneck size when adapter_size is 0")
    adapter_placement: Literal["pfeiffer", "houlsby"] = opt(
        "pfeiffer", "adapter: pfeiffer = after each MLP output; houlsby = after attention and MLP outputs")
    adapter_nonlinearity: Literal["relu", "gelu", "silu", "tanh"] = opt("relu", "adapter: the bottleneck's activation")
    num_virtual_tokens: int = opt(20, "prefix/prompt/ptuning/ptuning_v2: virtual tokens put before every sequence")
    encoder_hidden_size: int = opt(0, "prefix/ptuning: the encoder's hidden width (0 = token_dim, peft's default)")
    encoder_type: Literal["mlp", "lstm"] = opt("mlp", "ptuning: the prompt encoder, an MLP or a bidirectional LSTM + MLP")
    prompt_init: Literal["random", "text"] = opt(
        "random", "prompt: start from N(0, 1) vectors (random) or the embeddings of prompt_init_text's tokens (text)")
    prompt_init_text: str = opt("", "prompt with prompt_init=text: e.g. 'Answer the question about the world:'")

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"finetune.method={self.method!r} is not one of {list(METHODS)}")
        if self.method == "freeze" and self.freeze_layers < 0:
            raise ConfigError(f"finetune.freeze_layers={self.freeze_layers} must be >= 0")
        if self.neftune_alpha < 0:
            raise ConfigError(f"finetune.neftune_alpha={self.neftune_alpha} must be >= 0")
        if self.method in PROMPT_LEARNING_METHODS:
            if self.merge:
                raise ConfigError(f"finetune.merge=true with finetune.method={self.method}: virtual tokens are not "
                                  "weights and cannot be merged into the model; set finetune.merge=false")
            if self.num_virtual_tokens < 1:
                raise ConfigError(f"finetune.num_virtual_tokens={self.num_virtual_tokens} must be >= 1")
            if self.prompt_init == "text" and (self.method != "prompt" or not self.prompt_init_text):
                raise ConfigError(f"finetune.prompt_init=text needs finetune.method=prompt (got {self.method}) and a "
                                  f"non-empty finetune.prompt_init_text (got {self.prompt_init_text!r})")
            try:
                self.prompt_learning_config().validate()
            except ConfigError as e:
                raise ConfigError(f"finetune.{e}") from None  # its messages name the field: num_virtual_tokens=...
        if self.method == "adapter" and self.merge:
            raise ConfigError("finetune.merge=true with finetune.method=adapter: a bottleneck adapter has a "
                              "nonlinearity and cannot be merged into the weights; set finetune.merge=false")

    @property
    def is_adapter(self) -> bool:
        return self.method in ADAPTER_METHODS

    @property
    def is_prompt_learning(self) -> bool:
        return self.method in PROMPT_LEARNING_METHODS

    def prompt_learning_config(self):
        """The lmforge.peft PromptLearningConfig this section describes (prompt-learning methods)."""
        from ..peft.prompt_learning import PromptLearningConfig

        return PromptLearningConfig(method=self.method, num_virtual_tokens=self.num_virtual_tokens,
                                    encoder_hidden_size=self.encoder_hidden_size, encoder_type=self.encoder_type,
                                    init=self.prompt_init, init_text=self.prompt_init_text)

    def adapter_config(self):
        """The lmforge.peft AdapterConfig this section describes."""
        from ..peft import AdapterConfig

        if self.method == "adapter":
            return AdapterConfig(method="bottleneck", bottleneck_size=self.adapter_size,
                                 reduction_factor=self.adapter_reduction_factor, placement=self.adapter_placement,
                                 nonlinearity=self.adapter_nonlinearity, modules_to_save=list(self.modules_to_save))
        if self.method == "qlora":  # the adapter itself is a plain LoRA adapter
            return AdapterConfig(method="lora", r=self.r, alpha=self.alpha, dropout=self.dropout,
                                 target_modules=self.target_modules, use_rslora=self.use_rslora,
                                 loraplus_lr_ratio=self.loraplus_lr_ratio, modules_to_save=list(self.modules_to_save))
        return AdapterConfig(method=self.method, r=self.r, alpha=self.alpha, dropout=self.dropout,
                             target_modules=self.target_modules, use_rslora=self.use_rslora,
                             loraplus_lr_ratio=self.loraplus_lr_ratio, modules_to_save=list(self.modules_to_save))


@dataclass
class Prepared:
    """The model to train, its optimizer groups (None = the Trainer's default over trainable params)."""

    model: nn.Module
    param_groups: list[dict] | None
    trainable: int
    total: int
    trainable_names: list[str] = field(default_factory=list)

    @property
    def share(self) -> float:
        return self.trainable / self.total if self.total else 0.0


def apply_method(model: nn.Module, section: FinetuneSection, lr: float, weight_decay: float,
                 tokenizer=None) -> Prepared:
    """Set requires_grad (or inject the adapter) for `section.method`; the model is changed in place.
    `tokenizer` encodes prompt_init_text (prompt tuning with prompt_init=text)."""
    section.validate()
    method = section.method
    if section.is_prompt_learning:
        from ..peft.prompt_learning import add_prompt_adapter

        add_prompt_adapter(model, section.prompt_learning_config(), tokenizer=tokenizer)
        groups = None
    elif section.is_adapter:
        from ..peft import apply_adapter, param_groups

        if method == "qlora":
            from ..model.nf4 import quantize_model_nf4

            quantize_model_nf4(model, skip=list(section.quant_skip), double_quant=section.double_quant)
        apply_adapter(model, section.adapter_config(), log=None)
        groups = param_groups(model, lr, weight_decay, section.loraplus_lr_ratio)
    else:
        groups = None
        for param in model.parameters():
            param.requires_grad_(method == "full")
        if method == "freeze":
            _unfreeze_last_layers(model, section)
        elif method == "bitfit":
            biases = [p for n, p in model.named_parameters() if n.endswith(".bias")]
            if not biases:
                raise ConfigError(
                    f"finetune.method=bitfit: this {getattr(model.config, 'model_type', '')} model has no bias "
                    f"parameters (Llama/Mistral use none; Qwen2 has q/k/v biases), so BitFit would train nothing; "
                    f"use finetune.method=lora or ia3 for a small trainable set")
            for p in biases:
                p.requires_grad_(True)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    from ..model.nf4 import quantized_numel

    total = sum(p.numel() for p in model.parameters()) + quantized_numel(model)  # 4-bit weights are buffers
    return Prepared(model, groups, trainable, total, names)


def _unfreeze_last_layers(model: nn.Module, section: FinetuneSection) -> None:
    layers = model.model.layers
    n = section.freeze_layers
    if n > len(layers):
        raise ConfigError(f"finetune.freeze_layers={n} but the model has only {len(layers)} layers")
    for layer in list(layers)[len(layers) - n:]:
        layer.requires_grad_(True)
    if section.train_norm:
        model.model.norm.requires_grad_(True)
    if section.train_head:
        model.lm_head.requires_grad_(True)
    if n == 0 and not section.train_norm and not section.train_head:
        raise ConfigError("finetune.method=freeze with freeze_layers=0, train_norm=false, train_head=false "
                          "trains nothing")


def peak_memory(device: torch.device) -> dict[str, float | str]:
    """Peak memory so far: allocated tensor memory on CUDA, the process's peak resident set on CPU.

    On CPU the figure is the whole process's high-water mark (Python, libraries, data included), the honest
    upper bound that `resource` offers without instrumenting every allocation."""
    if device.type == "cuda":
        return {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20, "peak_memory_kind": "cuda allocated"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB, macOS bytes
    return {"peak_memory_mb": rss_bytes / 2**20, "peak_memory_kind": "process peak RSS"}
