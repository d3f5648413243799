"""Run logs: one JSON file per run at ``<logs_dir>/<task>/<run_id>.json``, rewritten atomically
at the start, after every evaluation and at the end, so a reader never sees half a file and a
killed run leaves its history up to the last evaluation. The writer helpers here keep the
record-keeping out of the training loop.

Log schema (``schema_version`` 2)::

    {
      "schema_version": 2,
      "run_id": "mrpc-lorafa-svd-r8-lr3e-04-s0",
      "status": "running" | "complete" | "failed",
      "error": null | "one-line reason (e.g. non-finite loss at step 12)",
      "config": {...every RunConfig field...},
      "env": {"python", "platform", "packages": {"torch", "transformers", ...}, "device",
              "num_processes", "mixed_precision", "model_path", "git_commit"},
      "data": {"source": "folder:<folder name>" | "hub", "n_train", "n_val", "n_test",
               "eval_split": "val" | "dev",   # what evals/best/selection are measured on
               "dev_split", "split_seed", "val_fraction", "val_ids_sha",
               "steps_per_epoch", "total_steps"},
      "model": {"num_params", "trainable_params", "adapted_modules": [...]},
      "adapter_stats": {"ax_rms", "per_layer": {module: rms}, "batches"} | null,
                                            # RMS of A·x at init (adapters only)
      "gradient_init": {"batches", "examples", "ids_sha"} | null,  # init="gradient": the
                                            # first training batches that estimated dL/dW
      "main_metric": "accuracy",            # the selection metric
      "train": {"step": [...], "loss": [...], "lr": [...], "penalty": [...] (reg_coeff > 0)},
                                            # per optimizer step: mean data loss of the batch
      "epochs": [{"epoch": 1, "step": 115, "train_loss", "train_time_s", "loss", <metric>...}],
      "evals": [{"step": 115, "epoch": 1.0, "loss": ..., "accuracy": ..., ...}],
                                            # every evaluation of the eval split (val)
      "final": {"loss": ..., "accuracy": ...},              # last evaluation
      "best": {"accuracy": {"value": ..., "step": ...}, ...},  # best per metric (min loss)
      "selection": {"metric", "step", "value"},  # the val-best step of the main metric
      "stopped_early": null | {"step", "epoch"},  # patience ran out
      "test": {"at_best": {"step", "loss", <metric>...}, "final": {...}} | null,
                                            # GLUE dev at the val-best step and at the end
                                            # (null when eval_split is "dev": no test set)
      "predictions": "<run_id>.preds.npz" | null,  # beside the log: test outputs at the
                                            # val-best step; arrays index (GLUE dev row),
                                            # pred (logits (n, C) or STS-B scores (n,)), label
      "wall_time_s": ...,                   # summed over every session of the run
      "started_at": "ISO time", "updated_at": "ISO time",
      "resumed_at_epoch": [...]              # every resume: the epoch it started from
    }

Schema 1 (the pilot protocol) had no validation split: evals were GLUE dev with key
"dev_loss", "data" had "n_dev", and there were no "selection", "test", "predictions" or
"adapter_stats". Such logs stay readable; ``RunConfig.from_dict`` gives their configs the
pilot values of the newer settings (val_fraction=0, save_predictions=False).

Metric keys: accuracy, f1 (MRPC/QQP), matthews (CoLA), pearson/spearman (STS-B).
"""
from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import time
from dataclasses import asdict
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np

from lora.io import atomic_write

SCHEMA_VERSION = 2
PACKAGES = ("torch", "transformers", "accelerate", "datasets", "peft", "safetensors",
            "scikit-learn", "scipy", "numpy", "tokenizers")
LOWER_IS_BETTER = {"dev_loss", "loss"}


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def log_path(logs_dir, task: str, run_id: str) -> Path:
    return Path(logs_dir) / task / f"{run_id}.json"


_NUMBER_LIST = re.compile(r"\[\s+([-+\d.eE,\s]+?)\s+\]")  # a JSON list of plain numbers


def sig7(x: float) -> float:
    """``x`` at 7 significant digits: float32's precision, which the losses were computed in."""
    return float(f"{x:.7g}")


def to_json(obj) -> str:
    """A log's JSON text: indented for reading, each list of numbers on one line (a 5-epoch log
    is 40% smaller, which the GPU kit's carry limit needs). Numbers are written exactly as
    given: the per-step series are already at ``sig7``, rounded once by ``record_step``."""
    text = json.dumps(obj, indent=1)
    return _NUMBER_LIST.sub(lambda m: "[" + ", ".join(x.strip() for x in m[1].split(",")) + "]",
                            text)


def atomic_write_json(obj, path) -> None:
    """Write ``to_json(obj)`` atomically (lora.io.atomic_write: temp file, fsync, os.replace)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(to_json(obj)))


def predictions_path(log: Path) -> Path:
    return log.with_name(log.name.removesuffix(".json") + ".preds.npz")


def write_predictions(log, outputs, labels) -> str:
    """Save per-example test outputs beside the log (arrays index, pred, label), deflated
    (lossless; a third of the bytes, which the GPU kit's 64 MiB device call counts); returns
    the file name the log records."""
    out = predictions_path(Path(log))

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez_compressed(f, index=np.arange(len(labels)), pred=np.asarray(outputs),
                                label=np.asarray(labels))
    atomic_write(out, write)
    return out.name


def read_log(path) -> dict:
    with open(path) as f:
        return json.load(f)


def git_commit(repo=None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo or Path(__file__).parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def portable_path(path) -> str | None:
    """A path as it may be committed: no machine-specific prefix. Installed packages become
    'site-packages/<pkg>/...', other absolute paths their last folder name."""
    if path is None:
        return None
    p = Path(path)
    if not p.is_absolute():
        return str(path)
    if "site-packages" in p.parts:
        return str(Path("site-packages", *p.parts[p.parts.index("site-packages") + 1:]))
    return p.name


def environment(device=None, num_processes=1, mixed_precision="no", model_path=None) -> dict:
    packages = {}
    for p in PACKAGES:
        try:
            packages[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            packages[p] = None
    return {"python": platform.python_version(), "platform": platform.platform(),
            "packages": packages, "device": str(device), "num_processes": num_processes,
            "mixed_precision": mixed_precision, "model_path": portable_path(model_path),
            "git_commit": git_commit()}


# ---------------------------------------------------------------- writing one run's log
def new_history(cfg, env: dict, data: dict, model, adapted: list, main_metric: str) -> dict:
    """The log of a fresh run (``cfg`` a RunConfig, ``model`` the model it trains)."""
    return {
        "schema_version": SCHEMA_VERSION, "run_id": cfg.run_id, "status": "running",
        "error": None, "config": asdict(cfg), "env": env, "data": data,
        "model": {"num_params": sum(p.numel() for p in model.parameters()),
                  "trainable_params": sum(p.numel() for p in model.parameters()
                                          if p.requires_grad),
                  "adapted_modules": adapted},
        "adapter_stats": None, "gradient_init": None, "main_metric": main_metric,
        "train": {"step": [], "loss": [], "lr": [], **({"penalty": []} if cfg.reg_coeff else {})},
        "epochs": [], "evals": [], "final": {}, "best": {}, "selection": None,
        "stopped_early": None, "test": None, "predictions": None,
        "wall_time_s": 0.0, "started_at": now(), "updated_at": now(), "resumed_at_epoch": []}


class LogWriter:
    """Writes one run's log (on the main process only) with ``wall_time_s`` = the earlier
    sessions' time + this session's, so far."""

    def __init__(self, path, prior_wall_s: float, session_start: float, enabled: bool = True):
        self.path, self.prior, self.start, self.enabled = path, prior_wall_s, session_start, enabled

    def __call__(self, history: dict) -> None:
        if self.enabled:
            write_log(history, self.path, self.prior + time.time() - self.start)


def resumed_history(checkpointed: dict, stored: dict | None, epoch: int) -> dict:
    """The history to continue from a checkpoint: the checkpoint's records (later ones are
    replayed), but the wall time and resume list of the latest log, so both count every
    session, including the work a kill threw away."""
    h = checkpointed
    if stored is not None and stored.get("run_id") == h.get("run_id"):
        h["wall_time_s"] = max(h["wall_time_s"], stored.get("wall_time_s") or 0.0)
        h["resumed_at_epoch"] = list(stored.get("resumed_at_epoch") or [])
    h["resumed_at_epoch"].append(epoch)
    return h


def record_step(history: dict, step: int, loss: float, lr: float, penalty=None) -> None:
    """Append one optimizer step, its numbers at ``sig7`` as the log stores them, so a run's
    history in memory, its log and a resumed run's history are the same numbers."""
    t = history["train"]
    t["step"].append(step)
    t["loss"].append(sig7(loss))
    t["lr"].append(sig7(lr))
    if "penalty" in t:
        t["penalty"].append(None if penalty is None else sig7(penalty))


def record_eval(history: dict, step: int, epoch: float, metrics: dict) -> dict:
    """Append an evaluation of the eval split and refresh final/best/selection."""
    rec = {"step": step, "epoch": round(epoch, 4), **metrics}
    history["evals"].append(rec)
    summarize(history)
    return rec


def record_epoch(history: dict, epoch: int, step: int, train_loss: float,
                 train_time_s: float, metrics: dict) -> None:
    history["epochs"].append({"epoch": epoch, "step": step, "train_loss": train_loss,
                              "train_time_s": train_time_s, **metrics})


def summarize(history: dict) -> None:
    """Fill 'final', 'best' and 'selection' from 'evals' (in place). Ties go to the earliest
    step."""
    evals = history.get("evals", [])
    if not evals:
        return
    history["final"] = {k: v for k, v in evals[-1].items() if k not in ("step", "epoch")}
    best = {}
    for k in history["final"]:
        vals = [(e[k], e["step"]) for e in evals if e.get(k) is not None and e[k] == e[k]]
        if vals:
            pick = min if k in LOWER_IS_BETTER else max
            v, s = pick(vals, key=lambda t: t[0])
            best[k] = {"value": v, "step": s}
    history["best"] = best
    m = history.get("main_metric")
    if m in best and "selection" in history:
        history["selection"] = {"metric": m, **best[m]}


def evals_since_best(history: dict) -> int:
    """Evaluations after the selected (val-best) one: what ``patience`` counts."""
    sel = history.get("selection")
    if not sel:
        return 0
    return sum(e["step"] > sel["step"] for e in history["evals"])


def write_log(history: dict, path, wall_time_s: float) -> None:
    history["wall_time_s"] = wall_time_s
    history["updated_at"] = now()
    atomic_write_json(history, path)
