"""Task metrics, the per-example loss, evaluation over a split, and the adapter-input RMS.

``evaluate`` scores every example from the model outputs it also returns (logits, or scores for
STS-B), so a metric recomputed from saved outputs with ``metrics_from_outputs`` is the same
number bit for bit.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import get_task, shard


def compute_metrics(task: str, preds, labels, only=None) -> dict:
    """Task metrics with sklearn/scipy. Classification: ``preds`` are class ids; STS-B: scores.
    Constant predictions give correlation 0 (as sklearn's Matthews does), not NaN. ``only``:
    a subset of the task's metrics to compute (the bootstrap scores one metric thousands of
    times, and sklearn's F1 alone costs ~10x its accuracy)."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    spec = get_task(task)
    preds, labels = np.asarray(preds), np.asarray(labels)
    out = {}
    for m in spec.metrics if only is None else [m for m in spec.metrics if m in only]:
        if m == "accuracy":
            out[m] = float(accuracy_score(labels, preds))
        elif m == "f1":
            out[m] = float(f1_score(labels, preds, zero_division=0))
        elif m == "matthews":
            out[m] = float(matthews_corrcoef(labels, preds))
        elif m in ("pearson", "spearman"):
            if np.ptp(preds) == 0 or np.ptp(labels) == 0:
                out[m] = 0.0
            else:
                fn = pearsonr if m == "pearson" else spearmanr
                out[m] = float(fn(preds, labels)[0])
    return out


def constant_metrics(task: str, train_labels, labels) -> dict:
    """The task metrics of one constant prediction for every example: the training rows'
    majority class (ties: the smaller id), or for STS-B their mean score. The floor a run
    that learned nothing sits on (figures draw it; MRPC accuracy ~0.68, F1 ~0.81)."""
    train_labels = np.asarray(train_labels)
    if get_task(task).is_regression:
        const = float(train_labels.mean())
    else:
        ids, counts = np.unique(train_labels, return_counts=True)
        const = int(ids[counts.argmax()])
    return compute_metrics(task, np.full(len(labels), const), labels)


def metrics_from_outputs(task: str, outputs, labels, only=None) -> dict:
    """Metrics from model outputs: logits (n, C) -> argmax class ids; STS-B scores (n,) as is."""
    outputs = np.asarray(outputs)
    preds = outputs.astype(np.float64) if get_task(task).is_regression else outputs.argmax(-1)
    return compute_metrics(task, preds, labels, only)


def per_example_loss(logits, labels, regression: bool):
    if regression:
        return F.mse_loss(logits.squeeze(-1).float(), labels.float(), reduction="none")
    return F.cross_entropy(logits.float(), labels, reduction="none")


@torch.no_grad()
def evaluate(model, features, collator, accelerator, task: str, batch_size: int = 64,
             quiet: bool = False, return_outputs: bool = False):
    """Mean loss + task metrics over all of ``features``; each process scores a contiguous
    shard and the shards are gathered in order, so the result equals a single-process eval.
    With ``return_outputs`` also returns the float32 outputs (logits (n, C), STS-B scores (n,))."""
    from accelerate.utils import gather_object

    spec = get_task(task)
    model.eval()
    idx = shard(list(range(len(features))), accelerator.process_index,
                accelerator.num_processes)
    outputs, losses = [], []
    chunks = [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    for chunk in tqdm(chunks, desc="eval", leave=False,
                      disable=quiet or not accelerator.is_local_main_process):
        batch = collator([features[i] for i in chunk]).to(accelerator.device)
        labels = batch.pop("labels")
        with accelerator.autocast():
            logits = model(**batch).logits
        losses += per_example_loss(logits, labels, spec.is_regression).tolist()
        out = logits.squeeze(-1) if spec.is_regression else logits
        outputs += out.float().cpu().tolist()
    if accelerator.num_processes > 1:
        outputs, losses = gather_object(outputs), gather_object(losses)
    outputs = np.asarray(outputs, dtype=np.float32)
    labels = np.asarray([f["labels"] for f in features])
    model.train()
    result = {"loss": float(np.mean(losses)), **metrics_from_outputs(task, outputs, labels)}
    return (result, outputs) if return_outputs else result


@torch.no_grad()
def adapter_input_rms(model, batches) -> dict:
    """RMS of h = A·x at every adapter over ``batches`` (dicts of model inputs; padding tokens
    left out), the model in eval mode. With A frozen, B's update reaches the output through h,
    so ||A·x|| sets B's effective learning rate: orthonormal A's of different inits are not
    equal in scale where it matters. Returns {"ax_rms": mean over layers, "per_layer": {...}}."""
    from lora import lora_modules

    mods = lora_modules(model)
    sums, count = {n: 0.0 for n, _ in mods}, 0.0
    hs = {}  # name -> A·x of the current batch, (b, t, r)
    handles = [m.register_forward_hook(
        lambda mod, inputs, _, name=n: hs.__setitem__(
            name, torch.nn.functional.linear(inputs[0], mod.lora_A).float()))
        for n, m in mods]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            mask = batch["attention_mask"].float().unsqueeze(-1)  # padding tokens left out
            model(**{k: v for k, v in batch.items() if k != "labels"})
            for n, m in mods:
                sums[n] += float((hs[n].pow(2) * mask).sum()) / m.rank
            count += float(mask.sum())
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    per_layer = {n: (s / count) ** 0.5 for n, s in sums.items()}
    return {"ax_rms": float(np.mean(list(per_layer.values()))), "per_layer": per_layer,
            "batches": len(batches)}
