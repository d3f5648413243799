"""The run logs as pandas frames, and the numbers drawn from them (no plotting here):

    runs = load_logs("logs/study")                   # one row per run
    curves = load_curves("logs/study", kind="eval")  # long: run, config, step, metric, value

    results_table(runs, which="test")     # test at the val-best checkpoint, mean ± std, n
    convergence(curves, runs)             # steps to reach the paired baseline's final val metric
    curve_auc(curves)                     # area under each run's val curve

Columns and groupings come from ``RunConfig``: every semantic field is a column, and a
*configuration* (what seeds are averaged over) is every semantic field except ``seed``
(``GROUP``). Each row also has ``method`` (a key of ``pipeline.methods.METHODS``).

Both log schemas are read. Schema 1 (the pilot) chose its best checkpoint on GLUE dev and
reported that same dev number: its rows have ``protocol == "pilot"`` and no ``test_*``
columns. Schema 2 evaluates a validation split carved from train (``best_*``, ``final_*``
are val numbers), selects on val only, and measures GLUE dev ("test") at the val-best step
(``test_<metric>``) and at the end (``test_final_<metric>``): ``protocol == "val"``.
"""
from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import numpy as np
import pandas as pd

from .config import NON_SEMANTIC, RunConfig
from .data import TASKS
from .logs import read_log
from .methods import METHODS, label, method_of

# every semantic RunConfig field is a column; a configuration is all of them but the seed
CONFIG_COLUMNS = tuple(f.name for f in fields(RunConfig) if f.name not in NON_SEMANTIC)
GROUP = tuple(c for c in CONFIG_COLUMNS if c != "seed")
_POINT_KEYS = ("step", "epoch")


def task_label(task: str) -> str:
    """GLUE's own spelling for figures and tables: 'cola' -> 'CoLA', 'stsb' -> 'STS-B'."""
    return TASKS[task].folder if task in TASKS else str(task).upper()


def method_order(key: str):
    """Sort key: METHODS order first, other methods after, alphabetically."""
    keys = list(METHODS)
    return (keys.index(key) if key in keys else len(keys), str(key))


def _as_list(x):
    return [x] if isinstance(x, str) else list(x)


# ---------------------------------------------------------------- reading logs
def iter_logs(logs_dir):
    """(path, history) for every run log at ``<logs_dir>/<task>/<run_id>.json``; ``logs_dir``
    may be a list of such folders."""
    dirs = [logs_dir] if isinstance(logs_dir, (str, Path)) else list(logs_dir)
    for d in dirs:
        if not Path(d).is_dir():
            raise ValueError(f"logs folder {d} does not exist: check the path")
    for p in sorted(p for d in dirs for p in Path(d).glob("*/*.json")):
        try:
            h = read_log(p)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not valid JSON ({e}); delete or fix the file") from None
        if isinstance(h, dict) and "schema_version" in h:
            yield p, h


def _flat_config(path, h: dict) -> dict:
    """The log's config as RunConfig reads it (defaults filled, alpha resolved), semantic
    fields only, lists joined so every value can be a groupby key."""
    try:
        cfg = RunConfig.from_dict(h.get("config", {}))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: config not readable as a RunConfig ({e})") from None
    row = {k: getattr(cfg, k) for k in CONFIG_COLUMNS}
    return {k: ",".join(v) if isinstance(v, list) else v for k, v in row.items()}


def protocol(h: dict) -> str:
    """'val' (selected on a held-out val split, test = GLUE dev) or 'pilot' (schema 1, or
    schema 2 run with val_fraction=0: selected and reported on GLUE dev)."""
    if h.get("schema_version", 1) < 2 or h.get("data", {}).get("eval_split") != "val":
        return "pilot"
    return "val"


def _run_row(path, h: dict) -> dict:
    config = _flat_config(path, h)
    row = {"run_id": h.get("run_id"), "status": h.get("status"),
           "schema_version": h.get("schema_version"), "protocol": protocol(h),
           "method": method_of(config), **config,
           "trainable_params": h.get("model", {}).get("trainable_params"),
           "steps": h["train"]["step"][-1] if h.get("train", {}).get("step") else 0,
           "wall_time_s": h.get("wall_time_s"), "main_metric": h.get("main_metric"),
           "path": str(path)}
    for k, v in h.get("final", {}).items():
        row[f"final_{k}"] = v
    for k, b in h.get("best", {}).items():
        row[f"best_{k}"] = b["value"]
        row[f"best_{k}_step"] = b["step"]
    test = h.get("test") or {}
    for prefix, rec in (("test_", test.get("at_best")), ("test_final_", test.get("final"))):
        for k, v in (rec or {}).items():
            if k not in _POINT_KEYS:
                row[prefix + k] = v
    if h.get("selection"):
        row["selected_step"] = h["selection"].get("step")
    preds = h.get("predictions")
    row["predictions"] = str(Path(path).parent / preds) if preds else None
    row["ax_rms"] = (h.get("adapter_stats") or {}).get("ax_rms")  # RMS of A·x at init
    for split, rec in ((h.get("data") or {}).get("constant") or {}).items():
        for k, v in rec.items():  # one constant prediction (majority class / mean score)
            row[f"constant_{split}_{k}"] = v
    return row


def load_logs(logs_dir="logs") -> pd.DataFrame:
    """One row per run (of one logs folder or a list of them): run_id, status, protocol,
    method, the config columns, trainable params, steps, wall time, ``final_<m>`` /
    ``best_<m>`` (+ ``best_<m>_step``) over the evaluated split, and for schema 2
    ``test_<m>``, ``test_final_<m>``, ``selected_step``, ``predictions`` (path of the saved
    test predictions), ``ax_rms`` and ``constant_<split>_<m>`` (the metric of predicting
    the training majority class, or mean score, for every example; logged since the study)."""
    return pd.DataFrame([_run_row(p, h) for p, h in iter_logs(logs_dir)])


def load_curves(logs_dir="logs", kind="eval") -> pd.DataFrame:
    """Long-format curves, one row per (run, point, metric): run_id, status, protocol,
    method, config columns, step, epoch, metric, value. ``kind``: 'eval' (every evaluation
    of the selection split: val, or dev for pilot logs), 'epoch' (per-epoch records) or
    'train' (per-step train loss and lr)."""
    if kind not in ("eval", "epoch", "train"):
        raise ValueError(f"unknown kind {kind!r}: use 'eval', 'epoch' or 'train'")
    rows = []
    for p, h in iter_logs(logs_dir):
        config = _flat_config(p, h)
        base = {"run_id": h.get("run_id"), "status": h.get("status"), "protocol": protocol(h),
                "method": method_of(config), **config}
        if kind == "train":
            t = h.get("train", {})
            for metric in ("loss", "lr", "penalty"):
                for s, v in zip(t.get("step", []), t.get(metric, [])):
                    rows.append({**base, "step": s, "epoch": None, "metric": metric, "value": v})
            continue
        for rec in h.get("evals" if kind == "eval" else "epochs", []):
            for metric, v in rec.items():
                if metric in _POINT_KEYS or not isinstance(v, (int, float)):
                    continue
                rows.append({**base, "step": rec["step"], "epoch": rec.get("epoch"),
                             "metric": metric, "value": v})
    cols = ["run_id", "status", "protocol", "method", *CONFIG_COLUMNS, "step", "epoch",
            "metric", "value"]
    return pd.DataFrame(rows, columns=cols)


def load_predictions(path) -> dict:
    """The saved test predictions of one run (``runs['predictions']``): arrays index, pred
    (logits (n, C) or scores (n,)) and label."""
    with np.load(path) as z:
        missing = {"index", "pred", "label"} - set(z.files)
        if missing:
            raise ValueError(f"{path}: missing arrays {sorted(missing)}; rerun the run "
                             "with save_predictions=True")
        return {k: z[k] for k in ("index", "pred", "label")}


def with_method(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with a ``method`` column (a METHODS key, from the config columns)."""
    df = df.copy()
    cols = [c for c in CONFIG_COLUMNS if c in df]
    df["method"] = [method_of(dict(zip(cols, vals))) for vals in df[cols].itertuples(False)]
    return df


def main_metric(runs: pd.DataFrame) -> str:
    """The one main metric of these runs (error when tasks with different ones are mixed)."""
    metrics = runs["main_metric"].dropna().unique()
    if len(metrics) != 1:
        raise ValueError(f"runs have main metrics {sorted(metrics)}: filter to one task or "
                         "pass metric=")
    return metrics[0]


def complete(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["status"] == "complete"]


# ---------------------------------------------------------------- tables
def curve_stats(curves: pd.DataFrame, metric: str, by=("method",), x="step") -> pd.DataFrame:
    """Mean, std and seed count of ``metric`` per (by..., x)."""
    by = _as_list(by)
    d = curves[curves["metric"] == metric]
    if d.empty:
        raise ValueError(f"no '{metric}' points in these curves; metrics present: "
                         f"{sorted(curves['metric'].unique())}")
    out = d.groupby(by + [x])["value"].agg(["mean", "std", "count"]).reset_index()
    out["std"] = out["std"].fillna(0.0)  # one seed: no band rather than NaN
    return out


def _column(d: pd.DataFrame, which: str, metric: str) -> str:
    col = f"{which}_{metric}"
    if col not in d:
        hint = (" (pilot logs have no held-out test: use which='best', best on dev)"
                if which.startswith("test") else "")
        raise ValueError(f"no column {col!r}{hint}; present: "
                         f"{sorted(c for c in d.columns if c.startswith(which + '_'))}")
    return col


def results_table(runs: pd.DataFrame, metric: str | None = None, by=GROUP,
                  which: str = "test", complete_only: bool = True) -> pd.DataFrame:
    """Mean, std and n over seeds of ``<which>_<metric>`` per group of ``by`` (default: a
    configuration, seeds aside), plus a 'mean ± std' text column. ``which``: 'test' (test at
    the val-best checkpoint), 'best' / 'final' (the evaluated split), 'test_final'."""
    by = _as_list(by)
    d = complete(runs) if complete_only else runs
    if d.empty:
        raise ValueError("no (complete) runs to tabulate")
    metric = metric or main_metric(d)
    col = _column(d, which, metric)
    t = d.groupby(by, dropna=False)[col].agg(["mean", "std", "count"]).reset_index()
    t["std"] = t["std"].fillna(0.0)
    t[f"{col} (mean ± std)"] = [f"{m:.4f} ± {s:.4f}" for m, s in zip(t["mean"], t["std"])]
    return t.rename(columns={"count": "n"})


def final_results(runs: pd.DataFrame, which: str = "test") -> pd.DataFrame:
    """Wide table: one row per method (its label), one column per task with
    'mean ± std (n)' of the task's main metric at ``which``."""
    d = complete(runs)
    check_one_config_per_method(d)
    cols = {}
    for task, g in d.groupby("task", sort=True):
        metric = main_metric(g)
        t = results_table(g, metric, by=("method",), which=which)
        cols[f"{task_label(task)} {metric}"] = {
            k: f"{m:.3f} ± {s:.3f} (n={n})"
            for k, m, s, n in zip(t["method"], t["mean"], t["std"], t["n"])}
    table = pd.DataFrame(cols).fillna("not run")
    table = table.loc[sorted(table.index, key=method_order)]
    table.index = [label(k) for k in table.index]
    table.index.name = "method"
    return table


def sweep_table(runs: pd.DataFrame, x: str = "lr", by: str = "method",
                which: str = "final") -> pd.DataFrame:
    """Wide table of a sweep: one row per ``by`` group, one column per value of ``x``, cells
    'main metric / loss' (mean over seeds of the ``which`` values; blank: not run)."""
    d = complete(runs)
    if d.empty:
        raise ValueError("no complete runs in this sweep")
    metric = main_metric(d)
    loss = next((f"{which}_{k}" for k in ("dev_loss", "loss") if f"{which}_{k}" in d), None)
    g = d.groupby([by, x])[[_column(d, which, metric), loss]].mean()
    cells = [f"{m:.3f} / {l:.3f}" for m, l in g.to_numpy()]
    table = pd.Series(cells, index=g.index).unstack(x).fillna("")
    table = table.loc[sorted(table.index, key=method_order if by == "method" else str)]
    if by == "method":
        table.index = [label(k) for k in table.index]
    table.index.name = by
    table.columns = [f"{x} {v:g}" for v in table.columns]
    return table


def check_one_config_per_method(runs: pd.DataFrame) -> None:
    """Refuse runs where one (task, method) holds several configurations (other lr, epochs,
    ...): averaging or pairing them would mix results. Names the fields that differ."""
    for (task, method), g in runs.groupby(["task", "method"]):
        configs = g[list(GROUP)].drop_duplicates()
        if len(configs) > 1:
            differ = [c for c in GROUP if configs[c].nunique(dropna=False) > 1]
            vals = "; ".join(f"{c}: {sorted(map(str, configs[c].unique()))}" for c in differ)
            raise ValueError(f"{task}: method {method!r} has {len(configs)} configurations "
                             f"({vals}); filter the runs to one per method first")


def check_baseline(runs: pd.DataFrame, baseline: str) -> None:
    if baseline not in set(runs["method"]):
        raise ValueError(f"no complete runs of baseline method {baseline!r}; methods present: "
                         f"{sorted(set(runs['method']))}")


def pair_with_baseline(runs: pd.DataFrame, column: str, baseline: str = "orthogonal"):
    """Per task, every run beside the ``baseline`` method's run of the same seed: columns
    task, method, seed, run_id, value, baseline_run_id, baseline_value, diff (= value -
    baseline_value). Complete runs only; a seed missing on either side drops the pair; the
    baseline's own rows are left out."""
    d = complete(runs)
    check_one_config_per_method(d)
    if column not in d:
        raise ValueError(f"no column {column!r} in these runs")
    check_baseline(d, baseline)
    keep = ["task", "method", "seed", "run_id", column]
    base = d[d["method"] == baseline][keep].drop(columns="method").rename(
        columns={"run_id": "baseline_run_id", column: "baseline_value"})
    other = d[d["method"] != baseline][keep].rename(columns={column: "value"})
    pairs = other.merge(base, on=["task", "seed"], how="inner")
    pairs["diff"] = pairs["value"] - pairs["baseline_value"]
    return pairs.sort_values(["task", "method", "seed"], key=lambda s: s.map(
        method_order) if s.name == "method" else s).reset_index(drop=True)


# ---------------------------------------------------------------- convergence
def steps_to_reach(curve: pd.DataFrame, target: float, higher_is_better: bool = True):
    """First evaluated step of one run's curve (columns step, value) at or past ``target``;
    NaN when it never gets there (censored at its last step)."""
    c = curve.sort_values("step")
    hit = c["value"] >= target if higher_is_better else c["value"] <= target
    return float(c.loc[hit, "step"].iloc[0]) if hit.any() else np.nan


def curve_auc(curves: pd.DataFrame, runs: pd.DataFrame) -> pd.Series:
    """Per run_id: the area under the run's eval curve of its main metric divided by the
    step range (the curve's step-weighted mean height; one point: that point)."""
    main = runs.set_index("run_id")["main_metric"]
    c = curves[curves["metric"] == curves["run_id"].map(main)]
    return c.groupby("run_id").apply(_auc, include_groups=False).rename("auc")


def _auc(curve: pd.DataFrame) -> float:
    c = curve.sort_values("step")
    x, y = c["step"].to_numpy(float), c["value"].to_numpy(float)
    if len(x) < 2:
        return float(y[0]) if len(y) else np.nan
    return float(np.trapezoid(y, x) / (x[-1] - x[0]))


def convergence(curves: pd.DataFrame, runs: pd.DataFrame, baseline: str = "orthogonal",
                which: str = "final") -> pd.DataFrame:
    """Per run (complete runs, seeds that have a baseline run): the target (the baseline run
    of the same seed's ``<which>_<main metric>``, default its final val metric), the first
    evaluated step reaching it (``steps_to_target``; NaN when it never does), ``censored``
    (never reached: it ran ``last_step`` steps without getting there) and ``auc`` (area under
    its eval curve of the main metric divided by the step range: the curve's mean height).
    Each task uses its own main metric; a task without a complete baseline run is left out."""
    rows = []
    check_baseline(complete(runs), baseline)
    for task, g in complete(runs).groupby("task"):
        if baseline not in set(g["method"]):
            continue
        metric = main_metric(g)
        pairs = pair_with_baseline(g, f"{which}_{metric}", baseline)
        base = g[g["method"] == baseline][["run_id", "method", "seed", f"{which}_{metric}"]]
        base = base.assign(baseline_value=base[f"{which}_{metric}"],
                           baseline_run_id=base["run_id"])
        pairs = pd.concat([base, pairs], ignore_index=True)
        c = curves[(curves["task"] == task) & (curves["metric"] == metric)]
        by_run = dict(tuple(c.groupby("run_id")))
        for r in pairs.itertuples():
            curve = by_run.get(r.run_id)
            if curve is None:
                continue
            steps = steps_to_reach(curve, r.baseline_value)
            rows.append({"task": task, "method": r.method, "seed": r.seed,
                         "run_id": r.run_id, "baseline": baseline, "metric": metric,
                         "target_of": f"{which}_{metric}",
                         "target": r.baseline_value,
                         "steps_to_target": steps, "censored": bool(np.isnan(steps)),
                         "last_step": float(curve["step"].max()), "auc": _auc(curve)})
    cols = ["task", "method", "seed", "run_id", "baseline", "metric", "target_of", "target",
            "steps_to_target", "censored", "last_step", "auc"]
    return pd.DataFrame(rows, columns=cols)


def convergence_summary(conv: pd.DataFrame) -> pd.DataFrame:
    """Per (task, method): seeds that reached the target / seeds, median steps over the seeds
    that reached it, mean AUC."""
    g = conv.groupby(["task", "method"], sort=False)
    t = g.agg(reached=("censored", lambda c: int((~c).sum())), n=("seed", "size"),
              median_steps=("steps_to_target", "median"), auc=("auc", "mean")).reset_index()
    return t.sort_values(["task", "method"], key=lambda s: s.map(method_order)
                         if s.name == "method" else s).reset_index(drop=True)
