"""Functional LoRA / LoRA-FA injection with an *unmerged* forward.

    y = W_res x + b + s * B (A x)          s = alpha / r   (alpha / sqrt(r) with rslora)

Why unmerged: with A frozen, autograd needs only h = A x (r numbers per token) to get dL/dB,
and W_res, A are constants, so nothing of the size of x is saved for the adapter. A merged
forward (W + s B A) x - what a parametrization does - must save x to form dL/dB = s dy x^T A^T.
Adapter dropout (``dropout > 0``) costs one x-sized mask per adapted layer.
"""
from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from typing import NamedTuple

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
HEAD_NAMES = ("classifier", "score")  # the one list of classification-head module names


@dataclass(frozen=True)
class LoRASettings:
    """The settings of one ``add_lora`` call (its defaults live in ``add_lora``'s signature),
    validated on construction: every error is one line that names the fix. Each LoRALinear
    keeps its own copy; ``lora_config(model)`` reads them back."""
    rank: int
    alpha: float
    init: str
    freeze_a: bool
    dropout: float
    seed: int
    rslora: bool
    svd_solver: str
    niter: int
    svd_split: str
    gradient_step: float

    def __post_init__(self):
        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_real(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        for key, options in [("init", sorted(inits.INITS)), ("svd_solver", inits.SVD_SOLVERS),
                             ("svd_split", inits.SVD_SPLITS)]:
            if getattr(self, key) not in options:
                raise ValueError(f"unknown {key} {getattr(self, key)!r}: use one of {options}")
        if not is_int(self.rank) or self.rank <= 0:
            raise ValueError(f"rank must be a positive int, got {self.rank!r}")
        if not is_real(self.alpha) or self.alpha <= 0:
            raise ValueError(f"alpha must be a finite number > 0, got {self.alpha!r}: the "
                             "adapter scale is alpha/rank (alpha = 2*rank is the usual choice)")
        if not is_real(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        for flag in ("freeze_a", "rslora"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        if not is_int(self.seed):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if not is_int(self.niter) or self.niter < 0:
            raise ValueError(f"niter (randomized SVD power iterations) must be an int >= 0, "
                             f"got {self.niter!r}")
        if not is_real(self.gradient_step) or self.gradient_step < 0:
            raise ValueError(f"gradient_step must be a finite number >= 0, got "
                             f"{self.gradient_step!r} (0: B starts at 0)")
        if self.gradient_step and self.init != "gradient":
            raise ValueError(f"gradient_step only applies to init='gradient' (got init="
                             f"{self.init!r}): drop it or use init='gradient'")
        if self.init == "svd_minor" and self.svd_solver != "exact":
            raise ValueError("init='svd_minor' needs svd_solver='exact': randomized SVD only "
                             "finds the largest singular values")

    @property
    def scale(self) -> float:
        """s = alpha / r (alpha / sqrt(r) with rslora)."""
        return self.alpha / math.sqrt(self.rank) if self.rslora else self.alpha / self.rank


class LoRALinear(nn.Module):
    """Wraps a frozen nn.Linear (``base``, holding W_res) with a low-rank update s * B @ A.

    ``lora_A`` is a buffer when frozen (LoRA-FA) - saved in state_dict, never handed to an
    optimizer - and an nn.Parameter in plain LoRA. ``lora_B0`` is the B at which the model is
    the original one, W = W_res + s B0 A0 (B at init for inits that change W, else 0), kept
    for ``remove_lora``, the PEFT export and the drift penalty; plain LoRA with an init that
    changes W also keeps A at init (``lora_A0``), since A moves. The adapter's settings are in
    ``settings`` (rank, alpha, init, freeze_a also as attributes).
    """

    def __init__(self, base: nn.Linear, a, b, settings: LoRASettings, fingerprint: str):
        super().__init__()
        self.base = base
        self.settings = settings
        changes_w = inits.INITS[settings.init].changes_w
        if settings.freeze_a:
            self.register_buffer("lora_A", a)
        else:
            self.lora_A = nn.Parameter(a)
            if changes_w:
                self.register_buffer("lora_A0", a.detach().clone())
        self.lora_B = nn.Parameter(b)
        self.register_buffer("lora_B0", b.detach().clone() if changes_w else torch.zeros_like(b))
        self.scale = settings.scale
        self.dropout = nn.Dropout(settings.dropout) if settings.dropout > 0 else nn.Identity()
        self.fingerprint = fingerprint  # hash of the *original* weight, checked on load
        self.enabled = True

    rank = property(lambda self: self.settings.rank)
    alpha = property(lambda self: self.settings.alpha)
    init = property(lambda self: self.settings.init)
    freeze_a = property(lambda self: self.settings.freeze_a)

    def forward(self, x):
        y = self.base(x)
        if not self.enabled:
            return y
        return y + self.scale * F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)

    @property
    def initial_a(self) -> torch.Tensor:
        """A at init: the A of W = W_res + s B0 A0."""
        return getattr(self, "lora_A0", self.lora_A)

    def delta(self, b=None, a=None) -> torch.Tensor:
        """s * B @ A in ``compute_dtype`` (B, A default to the current ones)."""
        ct = inits.compute_dtype(self.base.weight)
        b = self.lora_B if b is None else b
        a = self.lora_A if a is None else a
        return self.scale * (b.detach().to(ct) @ a.detach().to(ct))

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
    data = w.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def _set_module(model, name, new):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


class PlannedAdapter(NamedTuple):
    name: str
    a: torch.Tensor  # A at init
    b: torch.Tensor  # B at init (B0, or the gradient_step start)
    w_res: torch.Tensor | None  # the weight the base layer keeps; None: W as it is
    fingerprint: str  # of the original W


class LoRAPlan(NamedTuple):
    settings: LoRASettings
    adapters: list[PlannedAdapter]


def _check_tensor(what, t, shape) -> None:
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape):
        got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{what} must have shape {list(shape)}, got {got}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{what} contains NaN or Inf")


def plan_lora(model: nn.Module, settings: LoRASettings, targets="attention", gradients=None,
              tensors=None) -> LoRAPlan:
    """Validate everything and compute each adapter's A, B0 and W_res, touching nothing: an
    error here leaves the model as it was. ``gradients`` ({name: G}) is what init='gradient'
    needs; ``tensors`` ({name: (A0, B0)}) rebuilds saved adapters instead of running the init
    (``load_lora``), with W_res recomputed by the init's own arithmetic."""
    if lora_modules(model):
        raise RuntimeError("this model already has LoRA adapters: call remove_lora(model) or "
                           "merge_lora(model) before adding new ones")
    init = inits.INITS[settings.init]
    uses_gradients = init.needs_gradient and tensors is None
    if gradients is not None and not uses_gradients:
        raise ValueError(f"gradients are only used by init='gradient' (got init="
                         f"{settings.init!r}): drop the gradients argument or use init='gradient'")
    if uses_gradients and not isinstance(gradients, dict):
        raise ValueError("init='gradient' needs gradients={module name: dL/dW}: compute them "
                         "with lora.estimate_gradients(model, loss_fn, batches, targets)")
    names = find_targets(model, targets)
    rank, scale = settings.rank, settings.scale
    generator = torch.Generator().manual_seed(settings.seed)
    planned = []
    for name in names:
        w = model.get_submodule(name).weight.detach()
        if rank > min(w.shape):
            raise ValueError(f"rank {rank} exceeds min(d_out, d_in) = {min(w.shape)} of {name!r}: "
                             "use a smaller rank")
        if not torch.isfinite(w).all():
            raise ValueError(f"weight of {name!r} contains NaN or Inf: the base model is corrupt; "
                             "reload it")
        if tensors is not None:  # rebuild: the same arithmetic as the init, so W_res is identical
            if name not in tensors:
                raise ValueError(f"no saved tensors for target {name!r}")
            a, b = tensors[name]
            _check_tensor(f"A of {name!r}", a, (rank, w.shape[1]))
            _check_tensor(f"B0 of {name!r}", b, (w.shape[0], rank))
            if not init.changes_w and b.any():
                raise ValueError(f"B0 of {name!r} is non-zero but init={settings.init!r} starts "
                                 "from B = 0")
            a, b = a.to(w.device, w.dtype), b.to(w.device, w.dtype)
            w_res = inits.residual(w, a, b, scale) if init.changes_w else None
        else:
            kw = {}
            if uses_gradients:
                if name not in gradients:
                    raise ValueError(f"gradients has no entry for target {name!r}: pass "
                                     "lora.estimate_gradients(...) for the same targets")
                g = gradients[name]
                _check_tensor(f"gradient of {name!r}", g, w.shape)
                if not g.any():
                    raise ValueError(f"gradient of {name!r} is all zeros: the loss does not "
                                     "depend on this layer; choose other targets or batches")
                kw["grad"] = g.detach().cpu()
            # generators live on the CPU: draw there, move to the weight's device after
            a, b, w_res = init.fn(w.cpu(), rank, scale, generator=generator,
                                  svd_solver=settings.svd_solver, niter=settings.niter,
                                  svd_split=settings.svd_split,
                                  gradient_step=settings.gradient_step, **kw)
            a, b = a.to(w.device), b.to(w.device)
            w_res = None if w_res is None else w_res.to(w.device)
        planned.append(PlannedAdapter(name, a, b, w_res, weight_fingerprint(w)))
    return LoRAPlan(settings, planned)


def apply_lora(model: nn.Module, plan: LoRAPlan) -> list[str]:
    """Wrap each planned target in its LoRALinear (the only step that changes the model)."""
    modules = dict(model.named_modules())
    for p in plan.adapters:  # the model must still be the one planned for
        m = modules.get(p.name)
        if not isinstance(m, nn.Linear) or tuple(m.weight.shape) != (p.b.shape[0], p.a.shape[1]):
            raise ValueError(f"{p.name!r} is no longer the linear this plan was made for: "
                             "call plan_lora again on this model")
    for p in plan.adapters:
        base = modules[p.name]
        if p.w_res is not None:
            base.weight.data = p.w_res
        base.weight.requires_grad_(False)
        _set_module(model, p.name, LoRALinear(base, p.a, p.b, plan.settings, p.fingerprint))
    return [p.name for p in plan.adapters]


def add_lora(model: nn.Module, rank: int = 8, alpha: float = 16, init: str = "kaiming",
             targets="attention", freeze_a: bool = True, dropout: float = 0.0, seed: int = 0,
             rslora: bool = False, svd_solver: str = "exact", niter: int = 4,
             svd_split: str = "sqrt", gradients=None, gradient_step: float = 0.0) -> list[str]:
    """Wrap the target linears of ``model`` in place; returns their names.

    freeze_a=True is LoRA-FA (only B trains); False is plain LoRA. init='gradient' needs
    ``gradients`` ({module name: dL/dW}, from ``estimate_gradients``); with ``gradient_step``
    eta > 0 it starts one gradient step in (s B A = -eta G_r, LoRA-One). Everything is validated
    and every init computed (``plan_lora``) before the first module is replaced
    (``apply_lora``), so an error leaves the model as it was.
    """
    settings = LoRASettings(rank=rank, alpha=alpha, init=init, freeze_a=freeze_a,
                            dropout=dropout, seed=seed, rslora=rslora, svd_solver=svd_solver,
                            niter=niter, svd_split=svd_split, gradient_step=gradient_step)
    return apply_lora(model, plan_lora(model, settings, targets, gradients=gradients))


def lora_config(model: nn.Module) -> dict:
    """The settings of the model's adapters (read from each LoRALinear) plus their
    ``targets``; refuses adapters that disagree (they came from different add_lora calls)."""
    mods = lora_modules(model)
    if not mods:
        raise RuntimeError("model has no LoRA adapters: call add_lora(model, ...) first")
    (first_name, first), settings = mods[0], asdict(mods[0][1].settings)
    for name, m in mods[1:]:
        for key, value in asdict(m.settings).items():
            if value != settings[key]:
                raise ValueError(f"adapters disagree on {key}: {settings[key]!r} at "
                                 f"{first_name!r}, {value!r} at {name!r}; lora_config describes "
                                 "adapters added by one add_lora call")
    return {**settings, "targets": [n for n, _ in mods]}


def estimate_gradients(model: nn.Module, loss_fn, batches, targets="attention",
                       center: bool = False) -> dict[str, torch.Tensor]:
    """G = mean over ``batches`` of dL/dW for every target linear, in float32 (float64 for a
    float64 model: ``compute_dtype``): what ``add_lora(init="gradient", gradients=G)`` needs.
    ``loss_fn(model, batch)`` returns a scalar loss; ``lora`` knows nothing else of the task.

    The pass runs in eval mode (no dropout: the estimate is deterministic and draws nothing
    from the global RNG) with only the target weights requiring grad, keeping one running sum
    per target. Afterwards every weight is bit-identical and the requires_grad flags, any
    existing ``.grad`` and ``model.training`` are as they were.

    ``center=True`` returns the gradient with every layer's inputs centred, per batch:
    G_c = sum_t delta_t (x_t - mu)^T = G - (sum_t delta_t) mu^T, mu the batch's mean input to the
    layer (over the tokens whose ``attention_mask`` is 1 when the batch is a mapping holding one,
    else over every row). This drops the mean-input direction, which otherwise dominates the
    top of G in transformers (a near-constant A x that acts like a bias)."""
    if lora_modules(model):
        raise RuntimeError("estimate_gradients needs the model without adapters: call it "
                           "before add_lora (or after remove_lora)")
    weights = {n: model.get_submodule(n).weight for n in find_targets(model, targets)}
    saved = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    training = model.training
    sums, n, masks, hooks = {}, 0, [None], []
    try:
        model.eval()
        for p, _, _ in saved:
            p.requires_grad_(False)
            p.grad = None
        for w in weights.values():
            w.requires_grad_(True)
        if center:
            hooks = [model.get_submodule(name).register_forward_hook(
                partial(_center_hook, name=name, mask=masks, out=sums)) for name in weights]
        with torch.enable_grad():
            for n, batch in enumerate(batches, start=1):
                masks[:] = [batch.get("attention_mask") if isinstance(batch, Mapping) else None]
                loss = loss_fn(model, batch)
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    raise ValueError(f"loss_fn must return a scalar tensor, got "
                                     f"{type(loss).__name__}: return e.g. model(**batch).loss")
                if not torch.isfinite(loss):
                    raise ValueError(f"loss_fn returned {loss.item()} on batch {n}: the gradient "
                                     "would be NaN; check the batch and the model")
                loss.backward()
                for name, w in weights.items():
                    if w.grad is None:
                        raise ValueError(f"target {name!r} got no gradient from loss_fn: choose "
                                         "targets the loss depends on")
                    g = w.grad.to(inits.compute_dtype(w), copy=True)
                    sums[name] = g if name not in sums else sums[name].add_(g)
                    w.grad = None
    finally:
        for h in hooks:
            h.remove()
        for p, flag, grad in saved:
            p.requires_grad_(flag)
            p.grad = grad
        model.train(training)
    if n == 0:
        raise ValueError("batches is empty: pass at least one batch to estimate gradients from")
    return {name: g / n for name, g in sums.items()}


def _center_hook(module, inputs, output, *, name, mask, out):
    """estimate_gradients(center=True): once the output's gradient delta is known, subtract
    (sum_t delta_t) mu^T from the running sum (mu: the mean input over the batch's real tokens)."""
    x = inputs[0].detach()
    ct = inits.compute_dtype(x)
    m = mask[0]
    m = torch.ones(x.shape[:-1], device=x.device) if m is None or m.shape != x.shape[:-1] else m
    m = m.to(ct).unsqueeze(-1)
    mu = (x.to(ct) * m).sum(tuple(range(x.dim() - 1))) / m.sum().clamp_min(1)

    def subtract(delta):
        corr = -torch.outer(delta.to(ct).reshape(-1, delta.shape[-1]).sum(0), mu)
        out[name] = corr if name not in out else out[name].add_(corr)

    output.register_hook(subtract)


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
    """Adapter tensors only: '<layer>.lora_A', '.lora_B', '.lora_B0' (and '.lora_A0')."""
    return {k: v.detach() for k, v in model.state_dict(keep_vars=True).items() if ".lora_" in k}


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


def _unwrap(model, delta) -> None:
    """Replace each LoRALinear by its base linear with W_res + delta(m) folded in."""
    for name, m in lora_modules(model):
        w = m.base.weight
        w.data = (w.detach().to(inits.compute_dtype(w)) + delta(m)).to(w.dtype)
        _set_module(model, name, m.base)


def merge_lora(model: nn.Module) -> None:
    """Fold s * B @ A into each weight and drop the wrappers: a plain model that computes what
    the adapted one did (no adapter cost at inference)."""
    _unwrap(model, lambda m: m.delta())


def remove_lora(model: nn.Module) -> None:
    """Drop the adapters and restore the original weights: W = W_res + s * B0 @ A0 (B0 = 0 for
    random and gradient inits, so W is untouched there)."""
    _unwrap(model, lambda m: m.delta(m.lora_B0, m.initial_a))
