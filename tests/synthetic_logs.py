"""Small synthetic run logs for the analysis, stats and plot tests: schema 2 (val curves,
test at the val-best step, saved predictions) and schema 1 (the pilot), written with the
pipeline's own log helpers so they have the real layout."""
import numpy as np
import torch

from pipeline import logs as L
from pipeline.config import RunConfig
from pipeline.methods import METHODS
from pipeline.metrics import metrics_from_outputs

LABELS = np.array([0, 1] * 20)  # a 40-row test set


def logits_with_errors(n_wrong: int, offset: int = 0):
    """Logits for LABELS with rows offset .. offset+n_wrong-1 predicted wrong."""
    pred = LABELS.copy()
    wrong = (np.arange(n_wrong) + offset) % len(LABELS)
    pred[wrong] = 1 - pred[wrong]
    return np.eye(2)[pred] * 2.0 - 1.0


def write_run(logs, method, seed, val, n_wrong=None, lr=5e-3, status="complete",
              schema=2, outputs=None, labels=None, **overrides):
    """One MRPC run of ``method`` (a METHODS key) with val accuracies ``val`` at steps 10,
    20, ...; schema 2 runs get test predictions with ``n_wrong`` errors (default: a seed- and
    method-dependent number) at the val-best step. ``task="stsb"`` (in ``overrides``) takes
    ``outputs`` (scores) and ``labels`` instead, and ``val`` as pearson. Returns the log path."""
    cfg = RunConfig(**{"task": "mrpc", "seed": seed, "lr": lr, "logs_dir": str(logs),
                       **METHODS[method][1], **overrides})
    metric = "pearson" if cfg.task == "stsb" else "accuracy"
    h = L.new_history(cfg, {}, {"eval_split": "val" if schema == 2 else "dev"},
                      torch.nn.Linear(1, 1), [], metric)
    h["status"] = status
    L.record_step(h, 1, 0.7, lr)
    for i, v in enumerate(val):
        L.record_eval(h, 10 * (i + 1), i + 1.0, {"loss" if schema == 2 else "dev_loss": 1 - v,
                                                   metric: v})
    path = L.log_path(logs, cfg.task, cfg.run_id)
    if schema == 2:
        if outputs is None:
            n_wrong = (3 * seed + len(method)) % 11 if n_wrong is None else n_wrong
            outputs, labels = logits_with_errors(n_wrong, offset=seed), LABELS
        test = metrics_from_outputs(cfg.task, outputs, labels)
        h["test"] = {"at_best": {"step": h["selection"]["step"], "loss": 0.5, **test},
                     "final": {"step": 10 * len(val), "loss": 0.5, **test}}
        path.parent.mkdir(parents=True, exist_ok=True)
        h["predictions"] = L.write_predictions(path, outputs, labels)
        h["adapter_stats"] = {"ax_rms": 0.1 * (1 + seed), "per_layer": {}, "batches": 8}
    else:  # the pilot schema: no selection, test or predictions
        h["schema_version"] = 1
        for k in ("selection", "test", "predictions", "adapter_stats"):
            h.pop(k)
        for k in ("val_fraction", "save_predictions", "gradient_batches", "patience"):
            h["config"].pop(k)
    L.write_log(h, path, 1.0)
    return path
