"""Run logs: one JSON file per run at ``<logs_dir>/<task>/<run_id>.json``, rewritten atomically
(temp file + os.replace) at the start, after every evaluation and at the end, so a reader never
sees half a file and a killed run leaves its history up to the last evaluation.

Log schema (``schema_version`` 1)::

    {
      "schema_version": 1,
      "run_id": "mrpc-lorafa-svd-r8-lr3e-04-s0",
      "status": "running" | "complete" | "failed",
      "error": null | "one-line reason (e.g. non-finite loss at step 12)",
      "config": {...every RunConfig field...},
      "env": {"python", "platform", "packages": {"torch", "transformers", ...}, "device",
              "num_processes", "mixed_precision", "model_path", "git_commit"},
      "data": {"source": "folder:<folder name>" | "hub", "n_train", "n_dev", "dev_split",
               "steps_per_epoch", "total_steps"},
      "model": {"num_params", "trainable_params", "adapted_modules": [...]},
      "main_metric": "accuracy",            # metric used for 'best' and steps-to-reach
      "train": {"step": [...], "loss": [...], "lr": [...], "penalty": [...] (reg_coeff > 0)},
                                            # per optimizer step: mean data loss of the batch
      "epochs": [{"epoch": 1, "step": 115, "train_loss": ..., "train_time_s": ...,
                  "dev_loss": ..., "accuracy": ..., ...}],   # one per finished epoch
      "evals": [{"step": 115, "epoch": 1.0, "dev_loss": ..., "accuracy": ..., ...}],
                                            # every evaluation (end of epoch and every N steps)
      "final": {"dev_loss": ..., "accuracy": ...},          # last evaluation
      "best": {"accuracy": {"value": ..., "step": ...}, ...},  # best per metric (min dev_loss)
      "wall_time_s": ..., "started_at": "ISO time", "updated_at": "ISO time",
      "resumed_at_epoch": [...]              # epochs a resumed session started from
    }

Metric keys: accuracy, f1 (MRPC/QQP), matthews (CoLA), pearson/spearman (STS-B).
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

SCHEMA_VERSION = 1
PACKAGES = ("torch", "transformers", "accelerate", "datasets", "peft", "safetensors",
            "scikit-learn", "scipy", "numpy", "tokenizers")
LOWER_IS_BETTER = {"dev_loss", "loss"}


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def log_path(logs_dir, task: str, run_id: str) -> Path:
    return Path(logs_dir) / task / f"{run_id}.json"


def atomic_write_json(obj, path) -> None:
    """Write to a temp file in the same folder, then os.replace (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, allow_nan=True)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; logs are for everyone to read
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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


def summarize(history: dict) -> None:
    """Fill 'final' and 'best' from 'evals' (in place)."""
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


# ---------------------------------------------------------------- reading many logs
CONFIG_COLUMNS = ("task", "model", "variant", "init", "rank", "alpha", "targets", "lr",
                  "head_lr", "epochs", "batch_size", "seed", "reg_coeff", "subsample_train",
                  "tag", "svd_split", "svd_solver")


def iter_logs(logs_dir):
    """(path, history) for every run log under logs_dir (checkpoint folders skipped)."""
    for p in sorted(Path(logs_dir).glob("*/*.json")):
        try:
            h = read_log(p)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not valid JSON ({e}); delete or fix the file") from None
        if isinstance(h, dict) and "schema_version" in h:
            yield p, h


def _flat_config(h: dict) -> dict:
    c = h.get("config", {})
    row = {k: c.get(k) for k in CONFIG_COLUMNS}
    if isinstance(row["targets"], list):
        row["targets"] = ",".join(row["targets"])
    return row


def load_logs(logs_dir="logs"):
    """One row per run: run_id, status, config columns, trainable params, steps, wall time,
    ``final_<metric>`` and ``best_<metric>`` (+ ``best_<metric>_step``)."""
    import pandas as pd

    rows = []
    for p, h in iter_logs(logs_dir):
        row = {"run_id": h.get("run_id"), "status": h.get("status"), **_flat_config(h),
               "trainable_params": h.get("model", {}).get("trainable_params"),
               "steps": h["train"]["step"][-1] if h.get("train", {}).get("step") else 0,
               "wall_time_s": h.get("wall_time_s"), "main_metric": h.get("main_metric"),
               "path": str(p)}
        for k, v in h.get("final", {}).items():
            row[f"final_{k}"] = v
        for k, b in h.get("best", {}).items():
            row[f"best_{k}"] = b["value"]
            row[f"best_{k}_step"] = b["step"]
        rows.append(row)
    return pd.DataFrame(rows)


def load_curves(logs_dir="logs", kind="eval"):
    """Long-format curves, one row per (run, point, metric): run_id, config columns, step,
    epoch, metric, value. ``kind``: 'eval' (every evaluation), 'epoch' (per-epoch records,
    incl. train_loss) or 'train' (per-step train loss and lr)."""
    import pandas as pd

    if kind not in ("eval", "epoch", "train"):
        raise ValueError(f"unknown kind {kind!r}: use 'eval', 'epoch' or 'train'")
    rows = []
    for _, h in iter_logs(logs_dir):
        base = {"run_id": h.get("run_id"), "status": h.get("status"), **_flat_config(h)}
        if kind == "train":
            t = h.get("train", {})
            for metric in ("loss", "lr", "penalty"):
                for s, v in zip(t.get("step", []), t.get(metric, [])):
                    rows.append({**base, "step": s, "epoch": None, "metric": metric, "value": v})
            continue
        for rec in h.get("evals" if kind == "eval" else "epochs", []):
            for metric, v in rec.items():
                if metric in ("step", "epoch") or not isinstance(v, (int, float)):
                    continue
                rows.append({**base, "step": rec["step"], "epoch": rec.get("epoch"),
                             "metric": metric, "value": v})
    cols = ["run_id", "status", *CONFIG_COLUMNS, "step", "epoch", "metric", "value"]
    return pd.DataFrame(rows, columns=cols)
