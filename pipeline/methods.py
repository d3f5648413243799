"""The named methods of the study: each a set of RunConfig overrides and a display label.

One list, used by the study spec (``pipeline.study``), the analysis tables and the plots. A
run's method is recovered from its config with ``method_of``.
"""
from __future__ import annotations

# key: (label, RunConfig overrides). Order = display order.
# Settings a config may lack (logs from before the setting existed) read as these values.
DEFAULTS = {"svd_split": "sqrt", "gradient_center": False}
METHODS = {
    "full": ("full FT", dict(variant="full")),
    "lora": ("LoRA (kaiming)", dict(variant="lora", init="kaiming")),
    "orthogonal": ("LoRA-FA orthogonal", dict(variant="lorafa", init="orthogonal")),
    "svd": ("LoRA-FA svd (S in B)", dict(variant="lorafa", init="svd", svd_split="b")),
    "svd_minor": ("LoRA-FA svd_minor (S in B)",
                  dict(variant="lorafa", init="svd_minor", svd_split="b")),
    "gradient": ("LoRA-FA gradient", dict(variant="lorafa", init="gradient",
                                          gradient_center=False)),
    "gradient_center": ("LoRA-FA gradient (centred)",
                        dict(variant="lorafa", init="gradient", gradient_center=True)),
    "svd_sqrt": ("LoRA-FA svd (√S, PiSSA)", dict(variant="lorafa", init="svd", svd_split="sqrt")),
}


def method_of(config: dict) -> str:
    """The METHODS key of a run config (a log's ``config`` dict); configs no method describes
    get ``'<variant>-<init>'``."""
    for key, (_, overrides) in METHODS.items():
        if all(config.get(k, DEFAULTS.get(k)) == v
               for k, v in overrides.items()):
            if key == "full" or config.get("variant") != "full":
                return key
    return f"{config.get('variant')}-{config.get('init')}"


def label(key: str) -> str:
    return METHODS[key][0] if key in METHODS else key
