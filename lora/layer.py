"""Functional LoRA / LoRA-FA injection with an *unmerged* forward.

    y = W_res x + b + s * B (A x)          s = alpha / r   (alpha / sqrt(r) with rslora)

Why unmerged: with A frozen, autograd needs only h = A x (r numbers per token) to get dL/dB,
and W_res, A are constants, so nothing of the size of x is saved for the adapter. A merged
forward (W + s B A) x - what a parametrization does - must save x to form dL/dB = s dy x^T A^T.
Adapter dropout (``dropout > 0``) costs one x-sized mask per adapted layer.
"""
from __future__ import annotations

import math
import re
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import inits

# Module-name patterns (matched with re.search against the full module name).
PRESETS = {
    # the LoRA-FA paper's setting: all four attention linears (BERT/RoBERTa and MPNet names)
    "attention": r"(attention\.self\.(query|key|value)|attention\.output\.dense|attn\.(q|k|v|o))$",
    # the LoRA paper's setting: query and value only
    "qv": r"(attention\.self\.(query|value)|attn\.(q|v))$",
    # MPNet names only
    "mpnet": r"attn\.(q|k|v|o)$",
    # every linear of the encoder blocks: attention + FFN
    "all-linear": r"layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|"
                  r"attention\.attn\.(q|k|v|o)|intermediate\.dense|output\.dense)$",
}
HEAD_NAMES = ("classifier", "score")


class LoRALinear(nn.Module):
    """Wraps a frozen nn.Linear (``base``, holding W_res) with a low-rank update s * B @ A.

    ``lora_A`` is a buffer when frozen (LoRA-FA) - saved in state_dict, never handed to an
    optimizer - and an nn.Parameter in plain LoRA. ``lora_B0`` is B at init, kept for
    ``remove_lora``, the PEFT export and the drift penalty.
    """

    def __init__(self, base: nn.Linear, a, b, *, scale, rank, alpha, init, freeze_a,
                 dropout, fingerprint):
        super().__init__()
        self.base = base
        if freeze_a:
            self.register_buffer("lora_A", a)
        else:
            self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(b)
        self.register_buffer("lora_B0", b.detach().clone())
        self.scale, self.rank, self.alpha, self.init = scale, rank, alpha, init
        self.freeze_a = freeze_a
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fingerprint = fingerprint  # hash of the *original* weight, checked on load
        self.enabled = True

    def forward(self, x):
        y = self.base(x)
        if not self.enabled:
            return y
        return y + self.scale * F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)

    def delta(self, b=None) -> torch.Tensor:
        """s * B @ A in float32+ (B defaults to the current B)."""
        ct = torch.float64 if self.base.weight.dtype == torch.float64 else torch.float32
        b = self.lora_B if b is None else b
        return self.scale * (b.detach().to(ct) @ self.lora_A.detach().to(ct))

    def extra_repr(self):
        return (f"rank={self.rank}, alpha={self.alpha}, scale={self.scale:g}, init={self.init!r}, "
                f"freeze_a={self.freeze_a}, enabled={self.enabled}")


def lora_modules(model: nn.Module):
    """(name, LoRALinear) pairs in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def find_targets(model: nn.Module, targets="attention") -> list[str]:
    """Names of the modules ``targets`` selects: a preset name, a list of name suffixes, or a
    compiled regex (searched in each module name). Raises if nothing matches or a match is not
    an nn.Linear."""
    if isinstance(targets, str):
        if targets not in PRESETS:
            raise ValueError(f"unknown targets preset {targets!r}: use one of {sorted(PRESETS)}, "
                             "a list of module-name suffixes, or a compiled regex")
        targets = re.compile(PRESETS[targets])
    if isinstance(targets, re.Pattern):
        match = lambda n: targets.search(n) is not None  # noqa: E731
    else:
        suffixes = list(targets)
        match = lambda n: any(n == s or n.endswith("." + s) for s in suffixes)  # noqa: E731
    names = [n for n, _ in model.named_modules() if n and match(n)]
    if not names:
        seen = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:6]
        raise ValueError(f"targets {getattr(targets, 'pattern', targets)!r} matched no module; "
                         f"some nn.Linear names in this model: {seen}")
    modules = dict(model.named_modules())
    for n in names:
        if not isinstance(modules[n], nn.Linear):
            raise TypeError(f"target {n!r} is a {type(modules[n]).__name__}, not an nn.Linear: "
                            "choose targets that name linear layers")
    return names


def weight_fingerprint(w: torch.Tensor) -> str:
    import hashlib
    return hashlib.sha256(w.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()[:16]


def _set_module(model, name, new):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def add_lora(model: nn.Module, rank: int = 8, alpha: float = 16, init: str = "kaiming",
             targets="attention", freeze_a: bool = True, dropout: float = 0.0, seed: int = 0,
             rslora: bool = False, svd_solver: str = "exact", niter: int = 4,
             svd_split: str = "sqrt", _tensors=None) -> list[str]:
    """Wrap the target linears of ``model`` in place; returns their names.

    freeze_a=True is LoRA-FA (only B trains); False is plain LoRA. Everything is validated and
    every init computed before the first module is replaced, so an error leaves the model as it
    was. ``_tensors`` (name -> (A, B0)) is for ``load_lora``: rebuild adapters from saved tensors.
    """
    if lora_modules(model):
        raise RuntimeError("this model already has LoRA adapters: call remove_lora(model) or "
                           "merge_lora(model) before adding new ones")
    if init not in inits.INITS:
        raise ValueError(f"unknown init {init!r}: use one of {sorted(inits.INITS)}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    scale = alpha / math.sqrt(rank) if rslora else alpha / rank
    names = find_targets(model, targets)
    generator = torch.Generator().manual_seed(seed)
    planned = []
    for name in names:
        base = model.get_submodule(name)
        w = base.weight.detach()
        if rank > min(w.shape):
            raise ValueError(f"rank {rank} exceeds min(d_out, d_in) = {min(w.shape)} of {name!r}: "
                             "use a smaller rank")
        if not torch.isfinite(w).all():
            raise ValueError(f"weight of {name!r} contains NaN or Inf: the base model is corrupt; "
                             "reload it")
        if _tensors is None:
            # generators live on the CPU: draw there, move to the weight's device after
            a, b, w_res = inits.INITS[init](w.cpu(), rank, scale, generator=generator,
                                            svd_solver=svd_solver, niter=niter,
                                            svd_split=svd_split)
            a, b = a.to(w.device), b.to(w.device)
            w_res = None if w_res is None else w_res.to(w.device)
        else:  # rebuild from saved A and B0: the same arithmetic as the init, so W_res is identical
            a, b = (t.to(w.device, w.dtype) for t in _tensors[name])
            w_res = inits.residual(w, a, b, scale) if init.startswith("svd") else None
        planned.append((name, base, a, b, w_res, weight_fingerprint(w)))
    for name, base, a, b, w_res, fp in planned:
        if w_res is not None:
            base.weight.data = w_res
        base.weight.requires_grad_(False)
        wrapper = LoRALinear(base, a, b, scale=scale, rank=rank, alpha=alpha, init=init,
                             freeze_a=freeze_a, dropout=dropout, fingerprint=fp)
        _set_module(model, name, wrapper)
    model._lora_config = dict(rank=rank, alpha=alpha, init=init, freeze_a=freeze_a,
                              dropout=dropout, seed=seed, rslora=rslora, svd_solver=svd_solver,
                              niter=niter, svd_split=svd_split, targets=names)
    return names


def mark_only_lora_as_trainable(model: nn.Module, head: bool = True, bias: str = "none",
                                head_names=HEAD_NAMES) -> None:
    """requires_grad only on B (and A in plain LoRA); optionally the classification head
    (modules whose name starts with one of ``head_names``) and biases ('none' | 'all' |
    'lora_only': the biases of adapted layers)."""
    if bias not in ("none", "all", "lora_only"):
        raise ValueError(f"unknown bias option {bias!r}: use 'none', 'all' or 'lora_only'")
    mods = lora_modules(model)
    if not mods:
        raise RuntimeError("model has no LoRA adapters: call add_lora(model, ...) first")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, m in mods:
        m.lora_B.requires_grad_(True)
        if not m.freeze_a:
            m.lora_A.requires_grad_(True)
        if bias == "lora_only" and m.base.bias is not None:
            m.base.bias.requires_grad_(True)
    for name, p in model.named_parameters():
        if head and name.split(".")[0] in head_names:
            p.requires_grad_(True)
        if bias == "all" and name.endswith("bias"):
            p.requires_grad_(True)


def lora_parameters(model: nn.Module):
    """The adapter parameters (B, and A in plain LoRA), e.g. for an optimizer group."""
    for _, m in lora_modules(model):
        if not m.freeze_a:
            yield m.lora_A
        yield m.lora_B


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors only: '<layer>.lora_A', '.lora_B', '.lora_B0'."""
    out = {}
    for name, m in lora_modules(model):
        for key in ("lora_A", "lora_B", "lora_B0"):
            out[f"{name}.{key}"] = getattr(m, key).detach()
    return out


def lora_penalty(model: nn.Module, coeff: float, reference: str = "init") -> torch.Tensor:
    """coeff * sum over adapted layers of ||B - B_ref||_F^2, B_ref = B0 ('init') or 0 ('zero').
    Add it to the loss in any training loop. For SVD inits B0 != 0, so 'init' keeps the update
    s (B - B0) A small, which is the change to the original weight."""
    if reference not in ("init", "zero"):
        raise ValueError(f"unknown reference {reference!r}: use 'init' or 'zero'")
    mods = lora_modules(model)
    if not mods:
        raise RuntimeError("model has no LoRA adapters: call add_lora(model, ...) first")
    total = sum(((m.lora_B - m.lora_B0) if reference == "init" else m.lora_B).pow(2).sum()
                for _, m in mods)
    return coeff * total


def set_lora_enabled(model: nn.Module, enabled: bool) -> None:
    """Turn every adapter on or off. Off means y = W_res x: for SVD inits that is *not* the
    original model (its principal part lives in the adapter); use remove_lora for that."""
    for _, m in lora_modules(model):
        m.enabled = enabled


def disable_lora(model):
    set_lora_enabled(model, False)


def enable_lora(model):
    set_lora_enabled(model, True)


@contextmanager
def lora_disabled(model):
    states = [(m, m.enabled) for _, m in lora_modules(model)]
    disable_lora(model)
    try:
        yield model
    finally:
        for m, e in states:
            m.enabled = e


def _unwrap(model, keep_b) -> None:
    """Replace each LoRALinear by its base linear with W_res + s * keep_b(m) @ A folded in."""
    for name, m in lora_modules(model):
        w = m.base.weight
        m.base.weight.data = (w.detach().to(torch.float64 if w.dtype == torch.float64 else torch.float32)
                              + m.delta(keep_b(m))).to(w.dtype)
        _set_module(model, name, m.base)
    if hasattr(model, "_lora_config"):
        del model._lora_config


def merge_lora(model: nn.Module) -> None:
    """Fold s * B @ A into each weight and drop the wrappers: a plain model that computes what
    the adapted one did (no adapter cost at inference)."""
    _unwrap(model, lambda m: m.lora_B)


def remove_lora(model: nn.Module) -> None:
    """Drop the adapters and restore the original weights: W = W_res + s * B0 @ A (B0 = 0 for
    random inits, so W is untouched there)."""
    _unwrap(model, lambda m: m.lora_B0)
