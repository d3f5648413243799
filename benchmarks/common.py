"""Shared pieces of the benchmarks: the base models, the training variants, one train step,
machine info, tables and JSON.

Every variant starts from the same base model and trains the classification head too, so the
rows of one table differ only in how the encoder is (or is not) adapted:

    head-only      encoder frozen, no backward into it                   (reference)
    frozen-bwd     encoder frozen, backward flows to the embeddings      (the floor for adapters)
    full-ft        everything trains
    peft-lora      PEFT LoRA, r=8, alpha=16, dropout 0
    peft-lorafa    the same PEFT model with peft.optimizers.create_lorafa_optimizer (A frozen)
    merged-lorafa  W + s B A inside a torch parametrization, A frozen (minLoRA's forward)
    ours-<init>    lora.add_lora(freeze_a=True, init=<init>): unmerged LoRA-FA
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.utils.parametrize as parametrize

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # so `python benchmarks/x.py` finds lora/ and pipeline/
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: every model is local or random

import lora  # noqa: E402
from lora import inits  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
RANK, ALPHA, LR = 8, 16, 1e-4
INITS = ("kaiming", "orthogonal", "svd", "svd_minor")
VARIANTS = ("head-only", "frozen-bwd", "full-ft", "peft-lora", "peft-lorafa", "merged-lorafa",
            *(f"ours-{i}" for i in INITS))
MODELS = ("minilm", "roberta")
TARGETS = ("attention", "all-linear")


# ---------------------------------------------------------------- base models

def load_base(name: str, seed: int = 0, **config) -> nn.Module:
    """'minilm': the embedded all-MiniLM-L6-v2 with a fresh 2-way head. 'roberta': a randomly
    initialised RoBERTa-base shape (RobertaConfig defaults: 12 x 768, FFN 3072); only
    max_position_embeddings is raised to 514, as in the real roberta-base, because RoBERTa's
    positions start after the padding index and the default 512 stops at 510 tokens.
    ``config``: overrides of config fields (e.g. attention_probs_dropout_prob=0.0)."""
    from transformers import (AutoModelForSequenceClassification, RobertaConfig,
                              RobertaForSequenceClassification, logging)
    logging.set_verbosity_error()
    torch.manual_seed(seed)
    if name == "minilm":
        from pipeline.models import resolve_model
        return AutoModelForSequenceClassification.from_pretrained(resolve_model("minilm"),
                                                                  num_labels=2, **config)
    if name == "roberta":
        return RobertaForSequenceClassification(RobertaConfig(max_position_embeddings=514,
                                                              num_labels=2, **config))
    raise ValueError(f"unknown model {name!r}: use one of {MODELS}")


def head_name(model) -> str:
    return "classifier"  # BERT and RoBERTa sequence classifiers both call it that


def freeze_all_but_head(model) -> None:
    for n, p in model.named_parameters():
        p.requires_grad_(n.split(".")[0] == head_name(model))


# ---------------------------------------------------------------- the merged reference

class MergedLoRA(nn.Module):
    """minLoRA's parametrization, LoRA-FA flavour: weight -> W + s B A with A a frozen buffer.
    The adapted weight is a fresh non-leaf tensor every forward, so F.linear must save the
    input x (to form dL/dW' = dy^T x, from which dL/dB follows) and W' itself (for dL/dx)."""

    def __init__(self, a, b, scale):
        super().__init__()
        self.register_buffer("lora_A", a)
        self.lora_B = nn.Parameter(b)
        self.scale = scale

    def forward(self, w):
        return w + self.scale * self.lora_B @ self.lora_A


def add_merged_lorafa(model, names, seed=0) -> None:
    g = torch.Generator().manual_seed(seed)
    for name in names:
        linear = model.get_submodule(name)
        a, b, _ = inits.kaiming(linear.weight.detach(), RANK, ALPHA / RANK, generator=g)
        parametrize.register_parametrization(linear, "weight", MergedLoRA(a, b, ALPHA / RANK))


# ---------------------------------------------------------------- variants

def build(model_name: str, variant: str, targets: str = "attention", seed: int = 0,
          device: str = "cpu", config: dict | None = None):
    """(model in train mode, optimizer) for one variant. ``targets`` is a lora preset; PEFT and
    the merged reference get the same module names that ``lora.find_targets`` picks. Adapters
    are initialised on the CPU, then everything moves to ``device`` before the optimizer."""
    model = load_base(model_name, seed, **(config or {}))
    names = lora.find_targets(model, targets)
    freeze_all_but_head(model)
    if variant == "head-only":
        pass
    elif variant == "frozen-bwd":
        # make the embeddings' output require grad: every encoder op then sits on the backward
        # path and saves what it needs for dL/dx, but no weight gradient is formed
        model.enable_input_require_grads()
    elif variant == "full-ft":
        for p in model.parameters():
            p.requires_grad_(True)
    elif variant in ("peft-lora", "peft-lorafa"):
        from peft import LoraConfig, get_peft_model
        cfg = LoraConfig(task_type="SEQ_CLS", r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                         target_modules=names)  # SEQ_CLS also trains (a copy of) the classifier
        model = get_peft_model(model, cfg)
        if variant == "peft-lorafa":
            from peft.optimizers import create_lorafa_optimizer
            model.to(device)
            opt = create_lorafa_optimizer(model, r=RANK, lora_alpha=ALPHA, lr=LR,
                                          weight_decay=0.01)  # it also freezes every lora_A
            return model.train(), opt
    elif variant == "merged-lorafa":
        add_merged_lorafa(model, names, seed)
    elif variant.startswith("ours-"):
        lora.add_lora(model, rank=RANK, alpha=ALPHA, init=variant[len("ours-"):], targets=names,
                      freeze_a=True, dropout=0.0, seed=seed)
        lora.mark_only_lora_as_trainable(model, head=True)
    else:
        raise ValueError(f"unknown variant {variant!r}: use one of {VARIANTS}")
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    return model.train(), torch.optim.AdamW(params, lr=LR, weight_decay=0.01)


def make_batch(model, batch: int, seq: int, seed: int = 0) -> dict:
    """Random token ids (no padding: every position costs) and binary labels, on the model's
    device."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(5, vocab, (batch, seq), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
           "labels": torch.randint(0, 2, (batch,), generator=g)}
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in out.items()}


def train_step(model, opt, batch) -> None:
    """One optimizer step: forward, backward, update (HF models compute the CE loss)."""
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def trainable_params(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def optimizer_state_bytes(opt) -> int:
    """Bytes held in the optimizer's state (Adam moments, step counters) after a step."""
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
               if torch.is_tensor(t))


def saved_tensors(model, batch) -> tuple[int, Counter]:
    """(bytes, count per (shape, dtype)) of what autograd saves for backward in one training
    forward: lora.saved_activation_bytes (parameters and buffers left out, each storage once)."""
    hist = Counter()
    nbytes = lora.saved_activation_bytes(lambda: model(**batch).loss, model, by_shape=hist)
    return nbytes, hist


def saved_mib(model, batch) -> float:
    """MiB autograd saves for backward in one training forward (see saved_tensors)."""
    return saved_tensors(model, batch)[0] / 2**20


# ---------------------------------------------------------------- output

def machine_info() -> dict:
    import transformers
    try:
        import peft
        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    cuda = torch.cuda.is_available()
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft_version, "python": platform.python_version(),
            "device": torch.cuda.get_device_name(0) if cuda else "cpu",
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine_info(), **payload}, indent=2))
    return path


def finish(name: str, sections: list[str], args, t_start: float, **payload) -> Path:
    """Print the tables and write them with the raw rows to results/<name>.json."""
    text = "\n".join(sections)
    print(text)
    path = write_json(name, {"args": vars(args), **payload, "tables_md": text,
                             "wall_s": time.perf_counter() - t_start})
    print(f"\nwrote {path} ({time.perf_counter() - t_start:.0f}s)")
    return path


def table(rows: list[dict], cols: list[str], title: str = "") -> str:
    """A Markdown table (pasted as is into benchmarks/README.md)."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return "" if v is None else str(v)
    lines = ([f"\n{title}\n"] if title else []) + [
        "| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def verdict(value: float, goal: float) -> str:
    return "met" if value <= goal else "NOT met"
