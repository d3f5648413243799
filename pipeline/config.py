"""RunConfig: the one list of run settings, their help text, their checks and the run id.

Every setting is a field with ``metadata={"help": ...}``; the sweep CLI and the analysis
columns are built from these fields, so a new setting is added here and nowhere else.
A field added after logs already existed carries ``metadata["legacy"]``: the value runs had
before it, used by ``RunConfig.from_dict`` for stored configs that lack the field (so an old
log is never mistaken for a run of the new protocol).

    from pipeline.config import RunConfig
    cfg = RunConfig(task="rte", init="orthogonal", lr=5e-3)   # alpha = 2 * rank
    cfg.run_id                      # 'rte-lorafa-orthogonal-r8-lr5e-03-s0'
"""
from __future__ import annotations

import math
import numbers
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from lora.inits import INITS
from lora.layer import PRESETS, LoRASettings

from .data import _split_key, get_task

VARIANTS = ("full", "lora", "lorafa")
MIXED_PRECISION = ("no", "bf16", "fp16")
# fields that do not change the result: may differ between a log and a rerun
NON_SEMANTIC = {"logs_dir", "glue_dir", "quiet", "checkpoint", "eval_batch_size", "cpu",
                "save_predictions"}
# settings of the adapter: they do not change a 'full' run
ADAPTER_FIELDS = {"init", "rank", "alpha", "targets", "lora_dropout", "rslora", "svd_split",
                  "svd_solver", "niter", "gradient_batches", "gradient_step",
                  "gradient_center"}


def setting(default, help: str, **meta):
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class RunConfig:
    # what to train
    task: str = setting("mrpc", "GLUE task (mrpc, rte, cola, stsb, sst2, qnli, qqp, mnli, wnli)")
    model: str = setting("minilm", "'minilm' | 'mpnet' | hub id | local folder")
    variant: str = setting("lorafa", "'full' fine-tuning | 'lora' (A trains) | 'lorafa' (A frozen)")
    init: str = setting("svd", "adapter init: kaiming | orthogonal | svd | svd_minor | gradient "
                               "(ignored for 'full')")
    rank: int = setting(8, "adapter rank r")
    alpha: float | None = setting(None, "adapter scale numerator, s = alpha / r; default 2 * rank")
    targets: str | list = setting("attention", "adapted linears: a lora.PRESETS name "
                                               "(attention, qv, all-linear, mpnet) or a list of "
                                               "module-name suffixes")
    lora_dropout: float = setting(0.0, "dropout on the adapter input x, in [0, 1)")
    rslora: bool = setting(False, "rank-stabilised scale s = alpha / sqrt(r)")
    svd_split: str = setting("sqrt", "svd inits: 'sqrt' puts sqrt(S) on each side (PiSSA), 'b' "
                                     "puts S in B (A orthonormal)")
    svd_solver: str = setting("exact", "svd inits: 'exact' or 'randomized' SVD")
    niter: int = setting(4, "power iterations of the randomized SVD")
    gradient_center: bool = setting(False, "init 'gradient': centre each layer's inputs before "
                                           "taking dL/dW (drops the mean-input direction)",
                                    legacy=False)
    gradient_batches: int = setting(8, "init 'gradient': training batches (the run's own "
                                       "epoch-0 order) that estimate dL/dW")
    gradient_step: float = setting(0.0, "init 'gradient': start one step of size eta = "
                                        "gradient_step along -G_r (s B A = -eta G_r, LoRA-One); "
                                        "0: B = 0, the model unchanged at step 0")
    reg_coeff: float = setting(0.0, "coeff * sum ||B - B0||^2 added to the loss")
    # how to train
    lr: float = setting(5e-4, "peak learning rate (AdamW, linear warmup and decay)")
    head_lr: float | None = setting(None, "learning rate of the classifier head (default: lr)")
    epochs: int = setting(3, "training epochs")
    batch_size: int = setting(32, "global batch per optimizer step (split over processes)")
    eval_batch_size: int = setting(64, "evaluation batch size")
    max_length: int = setting(128, "tokens per example (longer ones are truncated)")
    pad_to_max_length: bool = setting(False, "pad every batch to max_length (benchmarks; "
                                             "default pads to the longest in the batch)")
    length_grouped: bool = setting(False, "batch examples of similar length (shuffled chunks "
                                          "sorted by length; seeded): less padding")
    warmup_ratio: float = setting(0.06, "fraction of the steps with linear warmup, in [0, 1)")
    weight_decay: float = setting(0.0, "AdamW weight decay (not on biases and LayerNorm)")
    grad_clip: float | None = setting(None, "clip the gradient norm to this value")
    seed: int = setting(0, "training seed: head init, data order, dropout")
    mixed_precision: str = setting("no", "'no' | 'bf16' (CPU or GPU) | 'fp16' (GPU only)")
    cpu: bool = setting(False, "run on CPU even when a GPU is present")
    # what to evaluate on
    subsample_train: int | None = setting(None, "keep the first N training rows (smoke runs)")
    subsample_dev: int | None = setting(None, "keep the first N GLUE dev rows (smoke runs)")
    dev_split: str = setting("dev", "GLUE dev split used as the test set (MNLI: dev_matched "
                                    "or dev_mismatched)")
    val_fraction: float = setting(0.1, "fraction of train held out for validation (selection, "
                                       "early stopping); 0: select on GLUE dev (pilot protocol)",
                                  legacy=0.0)
    val_max: int = setting(1000, "at most this many validation rows")
    split_seed: int = setting(0, "seed of the train/validation split (the same for every "
                                 "method and training seed, so runs are paired)")
    eval_every_steps: int | None = setting(None, "also evaluate validation every N steps "
                                                 "(always at epoch ends)")
    patience: int | None = setting(None, "stop after this many evaluations without a better "
                                         "validation metric (default: never)")
    # bookkeeping
    tag: str = setting("", "free suffix for the run id (tells otherwise equal configs apart)")
    logs_dir: str = setting("logs", "folder of the run logs")
    glue_dir: str | None = setting(None, "GLUE folder; default $GLUE_DIR, then ../shared/glue; "
                                         "'hub' = the HuggingFace hub")
    checkpoint: bool = setting(True, "checkpoint at epoch ends and resume after a kill")
    save_predictions: bool = setting(True, "save per-example test predictions at the val-best "
                                           "step beside the log (<run_id>.preds.npz)",
                                     legacy=False)
    quiet: bool = setting(False, "no progress bars or per-epoch lines")

    def __post_init__(self):
        for f in fields(self):  # numpy scalars and Paths become plain, JSON-able values
            v = getattr(self, f.name)
            if isinstance(v, numbers.Integral) and not isinstance(v, (bool, int)):
                setattr(self, f.name, int(v))
            elif isinstance(v, numbers.Real) and not isinstance(v, (bool, int, float)):
                setattr(self, f.name, float(v))
            elif isinstance(v, np.bool_):
                setattr(self, f.name, bool(v))
            elif isinstance(v, os.PathLike):
                setattr(self, f.name, os.fspath(v))
            v = getattr(self, f.name)
            if f.type == "bool" and not isinstance(v, bool):
                raise ValueError(f"{f.name} must be True or False, got {v!r}")
            if f.type.startswith(("int", "float")) and not (
                    (v is None and "None" in f.type) or _number(v, integral=f.type[0] == "i")):
                raise ValueError(f"{f.name} must be {'an int' if f.type[0] == 'i' else 'a number'}"
                                 f"{' or None' if 'None' in f.type else ''}, got {v!r}")
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be 'minilm', 'mpnet', a hub id or a folder, got "
                             f"{self.model!r}")
        spec = get_task(self.task)  # raises on an unknown task
        self.task = spec.name
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}: use one of {VARIANTS}")
        if self.alpha is None and isinstance(self.rank, int):
            self.alpha = 2 * self.rank
        if isinstance(self.targets, str) and self.targets not in PRESETS:
            raise ValueError(f"unknown targets preset {self.targets!r}: use one of "
                             f"{tuple(PRESETS)} or a list of module-name suffixes")
        if not isinstance(self.targets, str):
            self.targets = list(self.targets)
            if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
                raise ValueError(f"targets {self.targets!r}: give a preset name or a non-empty "
                                 "list of module-name suffixes")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        # the adapter settings are checked by lora itself (one set of rules), for 'full' too
        LoRASettings(rank=self.rank, alpha=self.alpha,
                     init="kaiming" if self.variant == "full" else self.init,
                     freeze_a=self.variant == "lorafa", dropout=self.lora_dropout,
                     seed=self.seed, rslora=self.rslora, svd_solver=self.svd_solver,
                     niter=self.niter, svd_split=self.svd_split,
                     gradient_step=self.gradient_step if self.variant != "full" else 0.0)
        if self.variant == "full":
            self.init = "none"  # no adapter: keep run ids and sweeps free of fake inits
        _positive_int("gradient_batches", self.gradient_batches)
        if not (math.isfinite(self.reg_coeff) and self.reg_coeff >= 0):
            raise ValueError(f"reg_coeff must be >= 0, got {self.reg_coeff}")
        if self.reg_coeff and self.variant == "full":
            raise ValueError("reg_coeff penalises ||B - B0|| of adapters: variant='full' has "
                             "none; set reg_coeff=0")
        _positive("lr", self.lr)
        if self.head_lr is not None:
            _positive("head_lr", self.head_lr)
        _positive_int("epochs", self.epochs)
        _positive_int("batch_size", self.batch_size)
        _positive_int("eval_batch_size", self.eval_batch_size)
        _positive_int("max_length", self.max_length)
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.grad_clip is not None:
            _positive("grad_clip", self.grad_clip)
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"unknown mixed_precision {self.mixed_precision!r}: use one of "
                             f"{MIXED_PRECISION}")
        for name in ("subsample_train", "subsample_dev", "eval_every_steps", "patience"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name), hint="or None")
        if _split_key(spec, self.dev_split) == "train":  # raises on an unknown split
            raise ValueError("dev_split='train' would test on the training rows: use 'dev'")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        _positive_int("val_max", self.val_max)
        _positive_int("split_seed", self.split_seed, zero_ok=True)
        _positive_int("seed", self.seed, zero_ok=True)
        if self.patience is not None and self.val_fraction == 0:
            raise ValueError("patience stops on the selection split: with val_fraction=0 that "
                             "is GLUE dev (the test set); set val_fraction > 0")
        if not isinstance(self.tag, str) or any(c in self.tag for c in "/\\ "):
            raise ValueError(f"tag {self.tag!r} must be a string without '/', '\\' or spaces "
                             "(it is part of a file name)")

    def check_device(self) -> None:
        """Refuse a mixed precision this machine cannot run (measured with accelerate 1.15:
        fp16 on CPU silently runs float32; bf16 autocast on CPU really computes in bfloat16)."""
        import torch

        on_cpu = self.cpu or not torch.cuda.is_available()
        if self.mixed_precision == "fp16" and on_cpu:
            raise ValueError("mixed_precision='fp16' needs a GPU (on CPU it would silently run "
                             "float32): use 'bf16' or 'no'")
        if self.mixed_precision == "bf16" and not on_cpu and not torch.cuda.is_bf16_supported():
            raise ValueError("mixed_precision='bf16': this GPU has no bfloat16; use 'fp16' or 'no'")

    @property
    def run_id(self) -> str:
        """Readable and deterministic: task-variant-init-rank-lr-seed plus non-default extras."""
        adapter = self.variant != "full"
        parts = [self.task, self.variant]
        if adapter:
            parts += [self.init, f"r{self.rank}"]
        parts.append(f"lr{fmt_float(self.lr)}")
        if self.model != "minilm":
            parts.append(Path(self.model).name.replace("_", "-"))
        if adapter and self.alpha != 2 * self.rank:
            parts.append(f"a{self.alpha:g}")
        if adapter and self.targets != "attention":
            parts.append("t" + (self.targets if isinstance(self.targets, str)
                                else "+".join(self.targets)))
        uses = INITS[self.init].uses if adapter else ()  # the settings this init reads
        if "svd_split" in uses and self.svd_split != "sqrt":
            parts.append(f"split{self.svd_split}")
        if "svd_solver" in uses and self.svd_solver != "exact":
            parts.append(f"rsvd{self.niter}")
        if adapter and INITS[self.init].needs_gradient and self.gradient_batches != 8:
            parts.append(f"gb{self.gradient_batches}")
        if adapter and INITS[self.init].needs_gradient and self.gradient_center:
            parts.append("gc")
        if "gradient_step" in uses and self.gradient_step:
            parts.append(f"gs{fmt_float(self.gradient_step)}")
        if self.reg_coeff:
            parts.append(f"reg{fmt_float(self.reg_coeff)}")
        if self.head_lr is not None:
            parts.append(f"hlr{fmt_float(self.head_lr)}")
        if self.subsample_train:
            parts.append(f"n{self.subsample_train}")
        # the protocol: only non-default choices show (val_fraction=0 runs keep pilot ids)
        if self.val_fraction and self.val_fraction != 0.1:
            parts.append(f"val{self.val_fraction:g}")
        if self.val_fraction and self.split_seed:
            parts.append(f"ss{self.split_seed}")
        if self.patience is not None:
            parts.append(f"pat{self.patience}")
        if self.length_grouped:
            parts.append("lg")
        if self.tag:
            parts.append(self.tag)
        parts.append(f"s{self.seed}")
        return "-".join(str(p) for p in parts)

    def semantic(self) -> dict:
        """The settings that change the result (paths, verbosity, ... left out; for 'full'
        also the adapter's settings). Two configs with equal ``semantic()`` are the same run."""
        skip = NON_SEMANTIC | (ADAPTER_FIELDS if self.variant == "full" else set())
        return {k: v for k, v in asdict(self).items() if k not in skip}

    def differs_from(self, stored: dict) -> str:
        """'' if a stored config (a log's or checkpoint's) gives the same result as this one,
        else 'field: stored -> now' for each field that differs."""
        now, old = self.semantic(), RunConfig.from_dict(stored).semantic()
        return ", ".join(f"{k}: {old[k]!r} -> {now[k]!r}" for k in now if old[k] != now[k])

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        """A config from a stored dict; unknown keys are ignored and a field the dict lacks
        takes its ``legacy`` value (what runs did before the field existed) or its default."""
        kw = {}
        for f in fields(cls):
            if f.name in d:
                kw[f.name] = d[f.name]
            elif "legacy" in f.metadata:
                kw[f.name] = f.metadata["legacy"]
        return cls(**kw)

    @classmethod
    def defaults(cls) -> dict:
        return {f.name: f.default for f in fields(cls) if f.default is not MISSING}


def _number(x, integral=False) -> bool:
    return not isinstance(x, bool) and isinstance(x, numbers.Integral if integral else numbers.Real)


def _positive(name, x):
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(x) or x <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {x!r}")


def _positive_int(name, x, zero_ok=False, hint=""):
    low = 0 if zero_ok else 1
    if isinstance(x, bool) or not isinstance(x, numbers.Integral) or x < low:
        raise ValueError(f"{name} must be an int >= {low}{' ' + hint if hint else ''}, got {x!r}")


def fmt_float(x: float) -> str:
    """Shortest exact scientific form: 3e-04, 1.5e-04 (never rounds two lrs together)."""
    for p in range(8):
        s = f"{x:.{p}e}"
        if float(s) == x:
            return s
    return repr(x)
