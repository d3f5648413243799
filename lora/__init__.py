"""svd-lorafa's adapter library: LoRA / LoRA-FA with named inits (kaiming, orthogonal, svd,
svd_minor, gradient), an unmerged forward, safetensors save/load and a rank-preserving PEFT
export.

    from lora import add_lora, mark_only_lora_as_trainable
    add_lora(model, rank=8, alpha=16, init="svd", targets="attention")   # LoRA-FA: A frozen
    mark_only_lora_as_trainable(model, head=True)

    G = estimate_gradients(model, loss_fn, batches)                       # before add_lora
    add_lora(model, rank=8, init="gradient", gradients=G)                 # A = top-r V of G

``add_lora`` = ``plan_lora`` (validate, compute every init, touch nothing) + ``apply_lora``;
``lora_config(model)`` reads the settings back from the adapters.
"""
from .inits import INITS, compute_dtype
from .io import atomic_write, export_peft, load_lora, save_lora
from .layer import (HEAD_NAMES, PRESETS, LoRALinear, LoRASettings, add_lora, apply_lora,
                    disable_lora, enable_lora, estimate_gradients, find_targets, lora_config,
                    lora_disabled, lora_modules, lora_parameters, lora_penalty, lora_state_dict,
                    mark_only_lora_as_trainable, merge_lora, plan_lora, remove_lora)
from .memory import saved_activation_bytes

__all__ = ["HEAD_NAMES", "INITS", "PRESETS", "LoRALinear", "LoRASettings", "add_lora",
           "apply_lora", "atomic_write", "compute_dtype", "disable_lora", "enable_lora",
           "estimate_gradients", "export_peft", "find_targets", "load_lora", "lora_config",
           "lora_disabled", "lora_modules", "lora_parameters", "lora_penalty", "lora_state_dict",
           "mark_only_lora_as_trainable", "merge_lora", "plan_lora", "remove_lora", "save_lora",
           "saved_activation_bytes"]
