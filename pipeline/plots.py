"""Plot and table helpers for the notebooks, on the frames of ``pipeline.logs``:

    runs = load_logs("logs")                   # one row per run
    curves = load_curves("logs", kind="eval")  # long format: run, config, step, metric, value

    plot_curves(curves.query("task == 'mrpc' and rank == 8"), "accuracy", by=("init",))
    results_table(runs, "accuracy")                        # mean ± std over seeds
    steps_to_reach_baseline(curves, runs, "accuracy", baseline={"init": "kaiming"})
"""
from __future__ import annotations

import numpy as np
import pandas as pd

GROUP = ("task", "variant", "init", "rank", "lr")  # a configuration, seeds aside


def _as_list(x):
    return [x] if isinstance(x, str) else list(x)


def curve_stats(curves: pd.DataFrame, metric: str, by=("init",), x="step") -> pd.DataFrame:
    """Mean, std and seed count of ``metric`` per (by..., x)."""
    by = _as_list(by)
    d = curves[curves["metric"] == metric]
    if d.empty:
        raise ValueError(f"no '{metric}' points in these curves; metrics present: "
                         f"{sorted(curves['metric'].unique())}")
    g = d.groupby(by + [x])["value"]
    out = g.agg(["mean", "std", "count"]).reset_index()
    out["std"] = out["std"].fillna(0.0)  # one seed: no band rather than NaN
    return out


def plot_curves(curves: pd.DataFrame, metric: str, by=("init",), x="step", ax=None,
                title: str | None = None, band: bool = True):
    """One line per group of ``by`` (mean over the remaining runs, i.e. seeds) with a
    mean ± std band. Filter ``curves`` to one task/rank/lr first so groups are comparable."""
    import matplotlib.pyplot as plt

    by = _as_list(by)
    stats = curve_stats(curves, metric, by, x)
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    for key, g in stats.groupby(by, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        label = ", ".join(f"{b}={k}" for b, k in zip(by, key)) + f" (n={g['count'].max()})"
        line, = ax.plot(g[x], g["mean"], label=label)
        if band:
            ax.fill_between(g[x], g["mean"] - g["std"], g["mean"] + g["std"],
                            color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel(x)
    ax.set_ylabel(metric)
    if title:
        ax.set_title(title)
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return ax


def results_table(runs: pd.DataFrame, metric: str | None = None, by=GROUP,
                  which: str = "final", complete_only: bool = True) -> pd.DataFrame:
    """Mean, std and n over seeds of ``<which>_<metric>`` (which: 'final' | 'best') per group,
    plus a 'mean ± std' text column. ``metric`` defaults to each run's main metric."""
    by = _as_list(by)
    d = runs[runs["status"] == "complete"] if complete_only else runs
    if d.empty:
        raise ValueError("no (complete) runs to tabulate")
    if metric is None:
        metrics = d["main_metric"].dropna().unique()
        if len(metrics) != 1:
            raise ValueError(f"runs have several main metrics {list(metrics)}: pass metric=")
        metric = metrics[0]
    col = f"{which}_{metric}"
    if col not in d:
        raise ValueError(f"no column {col!r}: metrics present: "
                         f"{sorted(c for c in d.columns if c.startswith(which + '_'))}")
    t = d.groupby(by, dropna=False)[col].agg(["mean", "std", "count"]).reset_index()
    t["std"] = t["std"].fillna(0.0)
    t[f"{col} (mean ± std)"] = [f"{m:.4f} ± {s:.4f}" for m, s in zip(t["mean"], t["std"])]
    return t.rename(columns={"count": "n"})


def steps_to_reach(curves: pd.DataFrame, metric: str, target: float,
                   higher_is_better: bool = True) -> pd.DataFrame:
    """Per run: the first evaluated step whose ``metric`` reaches ``target`` (NaN: never)."""
    d = curves[curves["metric"] == metric].sort_values("step")
    rows = []
    for run_id, g in d.groupby("run_id", sort=True):
        hit = g["value"] >= target if higher_is_better else g["value"] <= target
        first = g.loc[hit, "step"]
        row = g.iloc[0].drop(["step", "epoch", "metric", "value"]).to_dict()
        row["steps_to_target"] = float(first.iloc[0]) if len(first) else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def steps_to_reach_baseline(curves: pd.DataFrame, runs: pd.DataFrame, metric: str,
                            baseline: dict, by=GROUP, which: str = "final",
                            higher_is_better: bool = True) -> pd.DataFrame:
    """How fast each group reaches the baseline's quality. Target = mean ``<which>_<metric>``
    of the baseline runs (rows of ``runs`` matching every key of ``baseline``, e.g.
    {"init": "kaiming", "lr": 5e-4}); per group of ``by``: mean/std of steps to reach it over
    seeds, how many seeds reached it, and the speedup vs the baseline's own mean steps."""
    by = _as_list(by)
    mask = np.ones(len(runs), dtype=bool)
    for k, v in baseline.items():
        mask &= (runs[k] == v).to_numpy()
    base = runs[mask & (runs["status"] == "complete").to_numpy()]
    if base.empty:
        raise ValueError(f"no complete runs match baseline {baseline}")
    target = float(base[f"{which}_{metric}"].mean())
    per_run = steps_to_reach(curves, metric, target, higher_is_better)
    t = per_run.groupby(by, dropna=False)["steps_to_target"].agg(
        mean_steps="mean", std_steps="std", reached="count", n="size").reset_index()
    base_steps = per_run[per_run["run_id"].isin(base["run_id"])]["steps_to_target"].mean()
    t["speedup_vs_baseline"] = base_steps / t["mean_steps"]
    t.attrs["target"] = target
    t.insert(0, "target", target)
    return t
