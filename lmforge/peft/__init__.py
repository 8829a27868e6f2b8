"""Parameter-efficient fine-tuning: LoRA, rsLoRA, DoRA and IA3 adapters in peft's layout.

```python
from lmforge.peft import AdapterConfig, apply_adapter, save_adapter, load_adapter, merge_and_unload
model = apply_adapter(model, AdapterConfig(method="lora", r=8, alpha=16, target_modules="all-linear"))
...train (only adapter parameters require grad; param_groups(...) gives LoRA+ groups)...
save_adapter(model, "out/adapter")           # adapter_config.json + adapter_model.safetensors, as peft writes
model = load_adapter(base_model, "out/adapter")   # ours or peft's
plain = merge_and_unload(model)              # a plain Transformer for save_pretrained
add_prompt_adapter(model, PromptLearningConfig(method="prefix", num_virtual_tokens=20))  # prefix/prompt/P-tuning
```
"""
from .bottleneck import BottleneckLayer
from .config import ALL_LINEAR, AdapterConfig
from .ia3 import IA3Linear
from .inject import (ModulesToSave, adapter_rows, add_adapter, apply_adapter, delete_adapter, disable_adapters,
                     find_targets, set_adapter, trainable_parameters)
from .io import adapter_state_dict, load_adapter, read_adapter_config, save_adapter
from .lora import LoraLinear
from .merge import merge_adapter, merge_and_unload, unload, unmerge_adapter
from .optim import param_groups
from .prompt_learning import (PROMPT_METHODS, PromptLearningConfig, add_prompt_adapter, delete_prompt_adapter,
                              disable_prompt_adapters, set_prompt_adapter, virtual_tokens)

__all__ = [
    "ALL_LINEAR", "AdapterConfig", "LoraLinear", "IA3Linear", "BottleneckLayer", "ModulesToSave",
    "apply_adapter", "add_adapter", "set_adapter", "delete_adapter", "disable_adapters", "adapter_rows",
    "find_targets", "trainable_parameters", "param_groups",
    "save_adapter", "load_adapter", "read_adapter_config", "adapter_state_dict",
    "merge_adapter", "unmerge_adapter", "merge_and_unload", "unload",
    "PROMPT_METHODS", "PromptLearningConfig", "add_prompt_adapter", "set_prompt_adapter", "delete_prompt_adapter",
    "disable_prompt_adapters", "virtual_tokens",
]
