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

from .data import TASKS


def task_label(task: str) -> str:
    """GLUE's own spelling for figures and tables: 'cola' -> 'CoLA', 'stsb' -> 'STS-B'."""
    return TASKS[task].folder if task in TASKS else str(task).upper()

GROUP = ("task", "variant", "init", "rank", "lr")  # a configuration, seeds aside


def _color(name):
    """The method's fixed colour, or None (matplotlib's cycle) for other groupings."""
    return globals().get("METHOD_COLORS", {}).get(name)


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
    for j, (key, g) in enumerate(stats.groupby(by, sort=True)):
        key = key if isinstance(key, tuple) else (key,)
        name = str(key[0]) if len(by) == 1 else ", ".join(f"{b}={k}" for b, k in zip(by, key))
        if by == ["reg_coeff"]:
            name = f"reg_coeff={key[0]:g}"
        # per-step train loss: no markers (they would hide the line); eval points: a distinct,
        # shrinking marker per group, so identical lines (two runs at chance) stay visible
        dense = len(g) > 60
        line, = ax.plot(g[x], g["mean"], marker=None if dense else "osD^v"[j % 5],
                        markersize=6 - (j % 4), alpha=0.85, color=_color(name),
                        label=f"{name} (n={g['count'].max()})")
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
                            higher_is_better: bool = True, paired: bool = True) -> pd.DataFrame:
    """How fast each group reaches the baseline's quality. Baseline runs are the rows of
    ``runs`` matching every key of ``baseline`` (e.g. {"init": "orthogonal"}); their
    ``<which>_<metric>`` is the target. ``paired`` (default): each run is held to the
    baseline run of its own seed (same data order), so the baseline itself always reaches it
    and runs of seeds without a baseline run are left out; else one target for all, the
    baseline's mean. Per group of ``by``: mean/std of steps to the target over seeds, how many
    seeds reached it, and the speedup vs the baseline's own mean steps. Column ``target`` is
    the mean target."""
    by = _as_list(by)
    mask = np.ones(len(runs), dtype=bool)
    for k, v in baseline.items():
        mask &= (runs[k] == v).to_numpy()
    base = runs[mask & (runs["status"] == "complete").to_numpy()]
    if base.empty:
        raise ValueError(f"no complete runs match baseline {baseline}")
    col = f"{which}_{metric}"
    if paired:
        targets = base.groupby("seed")[col].mean()  # one baseline run per seed in a grid
        per_run = pd.concat([steps_to_reach(curves[curves["seed"] == seed], metric, target,
                                            higher_is_better)
                             for seed, target in targets.items()], ignore_index=True)
    else:
        targets = base[col]
        per_run = steps_to_reach(curves, metric, float(targets.mean()), higher_is_better)
    t = per_run.groupby(by, dropna=False)["steps_to_target"].agg(
        mean_steps="mean", std_steps="std", reached="count", n="size").reset_index()
    base_steps = per_run[per_run["run_id"].isin(base["run_id"])]["steps_to_target"].mean()
    t["speedup_vs_baseline"] = base_steps / t["mean_steps"]
    t.attrs["target"] = float(targets.mean())
    t.insert(0, "target", float(targets.mean()))
    return t


# ---------------------------------------------------------------- presentation helpers
METHODS = ["full FT", "LoRA (kaiming)", "LoRA (svd)", "LoRA-FA (kaiming)", "LoRA-FA (orthogonal)",
           "LoRA-FA (svd)", "LoRA-FA (svd_minor)", "LoRA-FA (svd, orthonormal A)"]


# one colour per method in every figure (tab10 order)
METHOD_COLORS = dict(zip(METHODS, ["#1f77b4", "#ff7f0e", "#8c564b", "#9467bd", "#2ca02c",
                                   "#d62728", "#e377c2", "#17becf"]))


def with_method(df: pd.DataFrame) -> pd.DataFrame:
    """Add a readable 'method' column (variant + init), e.g. 'LoRA-FA (svd)', 'full FT';
    SVD inits with all of S in B (``svd_split='b'``) read 'LoRA-FA (svd, orthonormal A)'."""
    df = df.copy()
    names = {"full": "full FT", "lora": "LoRA", "lorafa": "LoRA-FA"}
    split = df["svd_split"] if "svd_split" in df else ["sqrt"] * len(df)
    df["method"] = [names[v] if v == "full" else
                    f"{names[v]} ({i}, orthonormal A)" if str(i).startswith("svd") and sp == "b"
                    else f"{names[v]} ({i})" for v, i, sp in zip(df["variant"], df["init"], split)]
    return df


def _method_key(m):
    return (METHODS.index(m) if m in METHODS else len(METHODS), m)


def plot_task(runs: pd.DataFrame, eval_curves: pd.DataFrame, train_curves: pd.DataFrame,
              task: str, by: str = "method", smooth: int = 10, title: str | None = None):
    """Two panels for one task: train loss (rolling mean over ``smooth`` steps) and the dev
    main metric vs optimizer step, one line per ``by`` group, mean ± std over seeds."""
    import matplotlib.pyplot as plt

    r = runs[runs["task"] == task]
    if r.empty:
        raise ValueError(f"no runs for task {task!r}; tasks present: {sorted(runs['task'].unique())}")
    metric = r["main_metric"].dropna().iloc[0]
    fig, (ax_loss, ax_dev) = plt.subplots(1, 2, figsize=(12, 4.2))
    tr = train_curves[(train_curves["task"] == task) & (train_curves["metric"] == "loss")].copy()
    tr = tr.sort_values("step")
    tr["value"] = tr.groupby("run_id")["value"].transform(
        lambda v: v.rolling(smooth, min_periods=1).mean())
    ev = eval_curves[eval_curves["task"] == task]
    # a run still going would pull the mean and n of a seed band; the table skips it too
    tr, ev = tr[tr["status"] == "complete"], ev[ev["status"] == "complete"]
    if ev.empty:
        raise ValueError(f"no complete runs for task {task!r} yet: finish or resume them first")
    plot_curves(tr, "loss", by=(by,), ax=ax_loss)
    plot_curves(ev, metric, by=(by,), ax=ax_dev)
    ax_loss.set_ylabel(f"train loss (mean of {smooth} steps)")
    ax_dev.set_ylabel(f"dev {metric}")
    for ax in (ax_loss, ax_dev):
        ax.set_xlabel("optimizer step")
    fig.suptitle(title or f"{task_label(task)}: mean ± std over seeds (complete runs)")
    fig.tight_layout()
    return fig


def final_results(runs: pd.DataFrame, which: str = "best", by: str = "method") -> pd.DataFrame:
    """Wide table: one row per ``by`` group, one column per task with 'mean ± std (n)' of the
    task's main metric (``which``: 'best' epoch/eval or 'final')."""
    d = runs[runs["status"] == "complete"]
    cols = {}
    for task, g in d.groupby("task", sort=True):
        metric = g["main_metric"].dropna().iloc[0]
        t = results_table(g, metric, by=(by,), which=which)
        cols[f"{task_label(task)} {metric}"] = {
            k: f"{m:.3f} ± {s:.3f} (n={n})"
            for k, m, s, n in zip(t[by], t["mean"], t["std"], t["n"])}
    table = pd.DataFrame(cols).fillna("not run")
    table = table.loc[sorted(table.index, key=_method_key if by == "method" else str)]
    table.index.name = by
    return table


def plot_convergence(conv: pd.DataFrame, ax=None, title: str | None = None):
    """Bar chart of ``steps_to_reach_baseline`` output grouped by task and method: mean steps
    to reach the target (error bar = std over seeds); runs that never reach it are marked."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(9, 4))
    tasks = sorted(conv["task"].unique())
    methods = sorted(conv["method"].unique(), key=_method_key)
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        xs, ys, es, notes = [], [], [], []
        for i, task in enumerate(tasks):
            row = conv[(conv["task"] == task) & (conv["method"] == m)]
            if row.empty:
                continue
            row = row.iloc[0]
            xs.append(i + (j - (len(methods) - 1) / 2) * width)
            ys.append(0.0 if np.isnan(row["mean_steps"]) else row["mean_steps"])
            es.append(0.0 if np.isnan(row["std_steps"]) else row["std_steps"])
            notes.append(f"{int(row['reached'])}/{int(row['n'])}")
        # std bars clipped at 0 steps (a count of steps is never negative)
        bars = ax.bar(xs, ys, width, yerr=[np.minimum(es, ys), es], label=m, capsize=3,
                      color=_color(m))
        for b, e, note in zip(bars, es, notes):  # how many seeds reached the target at all
            ax.annotate(note, (b.get_x() + b.get_width() / 2, b.get_height() + e),
                        ha="center", va="bottom", fontsize=7, xytext=(0, 2),
                        textcoords="offset points")
    # the target under each task: a target at chance (e.g. MCC 0) makes that task's bars moot
    targets = conv.groupby("task")["target"].first()
    ax.set_xticks(range(len(tasks)), [f"{task_label(t)}\n(target {targets[t]:.3f})"
                                      for t in tasks])
    ax.set_ylabel("optimizer steps to reach target")
    ax.set_title(title or "Steps to reach the best dev metric of the random-init LoRA-FA run "
                          "of the same seed\n(bar: mean ± std over the seeds that reached it; "
                          "label: seeds that reached it)")
    ax.legend(fontsize="small", ncol=2)
    ax.grid(axis="y", alpha=0.3)
    return ax


def sweep_table(runs: pd.DataFrame, x: str = "lr", by: str = "method",
                which: str = "final") -> pd.DataFrame:
    """Wide table of a sweep: one row per ``by`` group, one column per value of ``x``, cells
    'main metric / dev loss' (mean over seeds of the ``which`` values; blank: not run)."""
    d = runs[runs["status"] == "complete"]
    if d.empty:
        raise ValueError("no complete runs in this sweep")
    metric = d["main_metric"].dropna().iloc[0]
    g = d.groupby([by, x])[[f"{which}_{metric}", f"{which}_dev_loss"]].mean()
    cells = [f"{m:.3f} / {l:.3f}" for m, l in g.to_numpy()]
    table = pd.Series(cells, index=g.index).unstack(x).fillna("")
    table = table.loc[sorted(table.index, key=_method_key if by == "method" else str)]
    table.columns = [f"{x} {v:g}" for v in table.columns]
    return table


def plot_metric_vs(runs: pd.DataFrame, x: str = "lr", metric: str | None = None,
                   by: str = "method", which: str = "final", ax=None, logx: bool = True,
                   title: str | None = None):
    """A run-level metric against a config value (lr sweep, penalty strength): one line per
    ``by`` group, mean ± std over seeds. Zero x-values are drawn at the left edge of a log
    axis via symlog."""
    import matplotlib.pyplot as plt

    d = runs[runs["status"] == "complete"]
    if metric is None:
        metric = d["main_metric"].dropna().iloc[0]
    col = f"{which}_{metric}"
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    groups = sorted(d.groupby(by), key=lambda kv: _method_key(str(kv[0])))
    for j, (key, g) in enumerate(groups):
        s = g.groupby(x)[col].agg(["mean", "std"]).reset_index().sort_values(x)
        # distinct markers and shrinking sizes keep identical lines (e.g. two inits both at
        # the majority-class accuracy) visible on top of each other
        line, = ax.plot(s[x], s["mean"], marker="osD^v"[j % 5], markersize=9 - 1.5 * (j % 4),
                        alpha=0.85, label=str(key), color=_color(str(key)))
        ax.fill_between(s[x], s["mean"] - s["std"].fillna(0), s["mean"] + s["std"].fillna(0),
                        color=line.get_color(), alpha=0.2, linewidth=0)
    if logx:
        nonzero = d[x][d[x] > 0]
        if (d[x] == 0).any() and len(nonzero):
            ax.set_xscale("symlog", linthresh=float(nonzero.min()))
        else:
            ax.set_xscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(f"dev {metric} ({which})")
    if title:
        ax.set_title(title)
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return ax
