"""svd-lorafa's adapter library: LoRA / LoRA-FA with named inits (kaiming, orthogonal, svd,
svd_minor), an unmerged forward, safetensors save/load and a rank-preserving PEFT export.

    from lora import add_lora, mark_only_lora_as_trainable
    add_lora(model, rank=8, alpha=16, init="svd", targets="attention")   # LoRA-FA: A frozen
    mark_only_lora_as_trainable(model, head=True)
"""
from .inits import INITS
from .memory import saved_activation_bytes
from .io import export_peft, load_lora, save_lora
from .layer import (PRESETS, LoRALinear, add_lora, disable_lora, enable_lora, find_targets,
                    lora_disabled, lora_modules, lora_parameters, lora_penalty, lora_state_dict,
                    mark_only_lora_as_trainable, merge_lora, remove_lora)

__all__ = ["INITS", "PRESETS", "LoRALinear", "add_lora", "disable_lora", "enable_lora",
           "export_peft", "find_targets", "load_lora", "lora_disabled", "lora_modules",
           "lora_parameters", "lora_penalty", "lora_state_dict", "mark_only_lora_as_trainable",
           "merge_lora", "remove_lora", "save_lora", "saved_activation_bytes"]
