"""Figures from the frames of ``pipeline.analysis`` and ``pipeline.stats`` (plotting only):

    plot_task(runs, evals, train, "mrpc")        # train loss + eval metric, seed bands
    plot_forest(stats.compare(runs))             # paired differences vs the baseline, 95% CIs
    plot_convergence(analysis.convergence(evals, runs))   # steps to target, censored marked
    plot_metric_vs(runs, x="lr")                 # a sweep: metric against a config value
    plot_lr_curves(lr_runs, evals, "mrpc")       # the lr sweep's val curves, a panel a method

Every method keeps one colour (``METHOD_COLORS``, in ``pipeline.methods`` order) and its
label from ``pipeline.methods.label``.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .analysis import _as_list, complete, curve_stats, main_metric, method_order, task_label
from .methods import METHODS, label
from .stats import CAVEATS, caveats, with_bootstrap

# one colour per method in every figure (tab10 hues; a method without one would take
# matplotlib's cycle and could share a hue with another, as svd_sqrt once shared full FT's blue)
METHOD_COLORS = dict(zip(METHODS, ["#1f77b4", "#ff7f0e", "#2ca02c", "#17becf", "#e377c2",
                                   "#9467bd", "#d62728", "#8c564b"]))
MARKERS = "osD^v<>"
# eval points and sweeps: a dash pattern per group, so a line hidden under another shows through
LINESTYLES = ["-", "--", ":", "-."]
# metrics whose chance level is 0 whatever the labels (a constant prediction scores 0)
ZERO_AT_CHANCE = {"matthews", "pearson", "spearman"}


def _name(by, key):
    key = key if isinstance(key, tuple) else (key,)
    if by == ["method"]:
        return label(key[0])
    if len(by) == 1:
        return f"{by[0]}={key[0]:g}" if isinstance(key[0], float) else str(key[0])
    return ", ".join(f"{b}={k}" for b, k in zip(by, key))


def _sorted_groups(df, by):
    groups = list(df.groupby(by, sort=True))
    return sorted(groups, key=lambda kv: method_order(kv[0][0] if isinstance(kv[0], tuple)
                                                      else kv[0])) if by == ["method"] else groups


def _chance_line(ax, metric, runs: pd.DataFrame | None = None, split: str = "val"):
    """The floor of a figure: 0 for correlation metrics, else the metric of predicting the
    training majority class for every ``split`` example (``constant_<split>_<metric>``,
    logged by the study's runs; one value, as they share the split), when known."""
    if metric in ZERO_AT_CHANCE:
        ax.axhline(0, color="0.3", lw=1, ls=":", label=f"chance ({metric} 0)")
        return
    col = f"constant_{split}_{metric}"
    values = runs[col].dropna().unique() if runs is not None and col in runs else []
    if len(values) == 1:
        ax.axhline(values[0], color="0.3", lw=1, ls=":",
                   label=f"majority class ({metric} {values[0]:.3f})")


def _min_span(ax, span=0.1):
    """Keep at least ``span`` of y range: a few examples' difference is not a cliff."""
    lo, hi = ax.get_ylim()
    if hi - lo < span:
        mid = (hi + lo) / 2
        ax.set_ylim(mid - span / 2, mid + span / 2)


def task_panels(n: int, width: float, height: float):
    """A figure with one panel per task, at most three to a row (four tasks: 2 x 2), each
    panel ``width`` x ``height`` inches; returns the figure and the n axes, row by row."""
    import matplotlib.pyplot as plt

    nrows = -(-n // 3)
    ncols = -(-n // nrows)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(8, width * ncols), height * nrows),
                             squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.remove()
    return fig, list(axes.ravel()[:n])


def _rows_from_top(ax, n_rows: int, labels: list[str]) -> np.ndarray:
    """y positions for ``labels``, one row each from the top of a panel with room for
    ``n_rows`` (so every task panel of a figure keeps the same row spacing); sets the ticks
    and the y-range."""
    ys = n_rows - 1 - np.arange(len(labels))
    ax.set_yticks(ys, labels)
    ax.set_ylim(-0.7, n_rows - 0.3)
    return ys


def _legend_below(fig, handles, labels, ncol=3):
    """One legend for the whole figure, under the panels (saved with bbox_inches='tight')."""
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), fontsize="small",
               ncol=min(ncol, len(labels)), frameon=False)


def plot_curves(curves: pd.DataFrame, metric: str, by=("method",), x="step", ax=None,
                title: str | None = None, band: bool = True, legend: bool = True,
                colors: dict | None = None):
    """One line per group of ``by`` (mean over the remaining runs, i.e. seeds) with a
    mean ± std band and the group's seed count. Filter ``curves`` to one task (and one
    configuration per group) first so groups are comparable. ``colors``: group key -> colour
    (default: the method's colour when grouping by method, else matplotlib's cycle)."""
    import matplotlib.pyplot as plt

    by = _as_list(by)
    stats = curve_stats(curves, metric, by, x)
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    for j, (key, g) in enumerate(_sorted_groups(stats, by)):
        name = _name(by, key)
        k0 = key[0] if isinstance(key, tuple) else key
        color = (colors or (METHOD_COLORS if by == ["method"] else {})).get(k0)
        # per-step train loss: no markers (they would hide the line); eval points: a distinct,
        # shrinking marker per group, so identical lines (two runs at chance) stay visible
        dense = len(g) > 60
        line, = ax.plot(g[x], g["mean"], marker=None if dense else MARKERS[j % len(MARKERS)],
                        ls="-" if dense else LINESTYLES[j % len(LINESTYLES)],
                        markersize=6 - (j % 4), alpha=0.85, color=color,
                        label=f"{name} (n={g['count'].max()})")
        if band:
            ax.fill_between(g[x], g["mean"] - g["std"], g["mean"] + g["std"],
                            color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel(x)
    ax.set_ylabel(metric)
    if title:
        ax.set_title(title)
    if legend:
        ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return ax


def plot_task(runs: pd.DataFrame, eval_curves: pd.DataFrame, train_curves: pd.DataFrame,
              task: str, by: str = "method", smooth: int = 10, title: str | None = None,
              zoom_from: float | None = 0.5):
    """Panels for one task: train loss (rolling mean over ``smooth`` steps) and the
    evaluated split's main metric (val, or dev for pilot logs) vs optimizer step, one line
    per ``by`` group, mean ± std over seeds, complete runs only; with ``zoom_from``, a third
    panel zooms on the metric's evaluations from that fraction of the last step on, where
    the end points and the plateau check are read (still at least 0.1 of y range)."""
    import matplotlib.pyplot as plt

    r = runs[runs["task"] == task]
    if r.empty:
        raise ValueError(f"no runs for task {task!r}; tasks present: "
                         f"{sorted(runs['task'].unique())}")
    metric = main_metric(r)
    split = "dev" if (r["protocol"] == "pilot").all() else "val"
    fig, axes = plt.subplots(1, 3 if zoom_from else 2, figsize=(17 if zoom_from else 12, 4.2))
    ax_loss, ax_dev = axes[:2]
    ids = train_curves["run_id"].isin(r["run_id"])  # only the runs given (e.g. one protocol)
    tr = complete(train_curves[ids & (train_curves["metric"] == "loss")]).sort_values("step")
    tr = tr.assign(value=tr.groupby("run_id")["value"].transform(
        lambda v: v.rolling(smooth, min_periods=1).mean()))
    # a run still going would pull the mean and n of a seed band; the table skips it too
    ev = complete(eval_curves[eval_curves["run_id"].isin(r["run_id"])])
    if ev.empty:
        raise ValueError(f"no complete runs for task {task!r} yet: finish or resume them first")
    plot_curves(tr, "loss", by=(by,), ax=ax_loss, legend=False)
    _chance_line(ax_dev, metric, r, split)
    plot_curves(ev, metric, by=(by,), ax=ax_dev, legend=False)
    _min_span(ax_dev)
    ax_loss.set_ylabel(f"train loss (mean of {smooth} steps)")
    ax_dev.set_ylabel(f"{split} {metric}")
    if zoom_from:
        ax_zoom = axes[2]
        plot_curves(ev[ev["step"] >= zoom_from * ev["step"].max()], metric, by=(by,),
                    ax=ax_zoom, legend=False)
        # y-range from the mean lines, bands clipped: one stalled seed's band must not
        # stretch the zoom back out (the full panel shows the bands whole)
        means = np.concatenate([ln.get_ydata() for ln in ax_zoom.lines]).astype(float)
        means = means[np.isfinite(means)]  # a diverged run's NaN evaluations are not a range
        if len(means):
            pad = 0.08 * (means.max() - means.min())
            ax_zoom.set_ylim(means.min() - pad, means.max() + pad)
        _min_span(ax_zoom)
        ylim = ax_zoom.get_ylim()
        _chance_line(ax_zoom, metric, r, split)
        ax_zoom.set_ylim(ylim)  # the floor only where it falls inside the zoom
        ax_zoom.set_ylabel(f"{split} {metric}")
        ax_zoom.set_title(f"zoom: from {zoom_from:.0%} of the steps on", fontsize="medium")
    for ax in axes:
        ax.set_xlabel("optimizer step")
    fig.suptitle(title or f"{task_label(task)}: mean ± std over seeds (complete runs)")
    fig.tight_layout()
    _legend_below(fig, *ax_dev.get_legend_handles_labels())
    return fig


def plot_lr_curves(runs: pd.DataFrame, eval_curves: pd.DataFrame, task: str, ncols: int = 4,
                   title: str | None = None):
    """The lr sweep of one task as curves: a panel per method, its val metric vs optimizer
    step at every lr that ran (mean ± std over the selection seeds, complete runs), the
    majority-class floor, one shared y range. The check that the epochs suffice: the best
    lr's curve must have flattened before the end."""
    import matplotlib.pyplot as plt

    r = complete(runs[runs["task"] == task])
    if r.empty:
        raise ValueError(f"no complete lr runs for task {task!r} yet")
    metric = main_metric(r)
    ev = eval_curves[eval_curves["run_id"].isin(r["run_id"])]
    methods = sorted(r["method"].unique(), key=method_order)
    nrows = -(-len(methods) // ncols)
    ncols = min(ncols, len(methods))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 4 * nrows), squeeze=False,
                             sharex=True, sharey=True)
    lrs = sorted(r["lr"].unique())  # one colour per lr in every panel
    colors = {lr: f"C{i % 10}" for i, lr in enumerate(lrs)}
    for ax, m in zip(axes.flat, methods):
        _chance_line(ax, metric, r, "val")
        plot_curves(ev[ev["method"] == m], metric, by=("lr",), ax=ax, title=label(m),
                    colors=colors, legend=False)
        ax.legend(fontsize="x-small", loc="upper center", bbox_to_anchor=(0.5, -0.28),
                  ncol=2, frameon=False)  # under the panel: never over a curve
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(f"val {metric}")
    for ax in list(axes.flat)[len(methods):]:
        ax.set_visible(False)
    _min_span(axes.flat[0])
    fig.suptitle(title or f"{task_label(task)}: lr selection runs, val {metric} "
                          "(mean ± std over selection seeds)")
    fig.tight_layout()
    return fig


def _forest_xlim(g: pd.DataFrame, widen: float = 2.5) -> tuple[float, float]:
    """x-range of one forest panel: 0, every mean difference, the t and bootstrap intervals of
    the question's methods (all methods where there is no family), and each other method's
    intervals unless they alone would widen that span more than ``widen``-fold; padded 10%."""
    def span(rows):
        xs = rows[["ci_low", "ci_high", "boot_low", "boot_high"]].to_numpy(float).ravel()
        return xs[np.isfinite(xs)]

    q = g["family"] == "question" if "family" in g else pd.Series(True, index=g.index)
    if not q.any():
        q[:] = True
    xs = np.concatenate([[0.0], g["mean_diff"].to_numpy(float), span(g[q])])
    xs = xs[np.isfinite(xs)]
    base = np.ptp(xs)
    for i in g.index[~q]:
        wider = np.concatenate([xs, span(g.loc[[i]])])
        if base == 0 or np.ptp(wider) <= widen * base:  # no inits' span yet: nothing to fit
            xs = wider
    lo, hi = xs.min(), xs.max()
    pad = 0.1 * (hi - lo) or 0.01
    return lo - pad, hi + pad


def plot_forest(cmp: pd.DataFrame, boot: pd.DataFrame | None = None, title: str | None = None):
    """Forest plot of ``stats.compare``: per task a panel, per method the mean paired
    difference vs the baseline with its 95% t interval (thick), the example-level bootstrap
    interval (thin, below) when ``boot`` is given, a line at 0, and n and the verdict at the
    right. A method with n < 2 has a point and no interval. The x-range fits the question's
    methods (``family`` 'question', when ``cmp`` has it) and every point: a reference whose
    few seeds give a far wider interval runs off the axis, with its interval in its note,
    rather than squeezing the inits' intervals into a sliver."""
    from matplotlib.ticker import MaxNLocator

    cmp = with_bootstrap(cmp, boot)
    tasks = sorted(cmp["task"].unique())
    rows = cmp.groupby("task").size().max()
    fig, axes = task_panels(len(tasks), 6.2, 0.55 * rows + 1.6)
    for ax, task in zip(axes, tasks):
        g = cmp[cmp["task"] == task].sort_values("method", key=lambda s: s.map(method_order))
        ys = _rows_from_top(ax, rows, [label(m) for m in g["method"]])
        xlim = _forest_xlim(g)
        for y, r in zip(ys, g.itertuples()):
            color = METHOD_COLORS.get(r.method, "0.2")
            ax.errorbar(r.mean_diff, y, xerr=[[r.mean_diff - r.ci_low], [r.ci_high - r.mean_diff]]
                        if np.isfinite(r.ci_low) else None, fmt="o", color=color, lw=2.5,
                        capsize=4)
            if np.isfinite(r.boot_low):
                ax.plot([r.boot_low, r.boot_high], [y - 0.25] * 2, color=color, lw=1, alpha=0.7)
            note = (r.note if r.n == 0 else r.verdict if "n =" in r.verdict
                    else f"{r.verdict} (n = {r.n})")
            note += "".join(f",\n{CAVEATS[flag][1]}" for flag in caveats(r))
            if np.isfinite(r.ci_low) and (r.ci_low < xlim[0] or r.ci_high > xlim[1]):
                note += f",\nt CI [{r.ci_low:+.2f}, {r.ci_high:+.2f}] off the axis"
            ax.annotate(note, (1.02, y), xycoords=("axes fraction", "data"), va="center",
                        fontsize=8)
        ax.axvline(0, color="0.3", lw=1, ls="--")
        ax.set_xlim(*xlim)
        # a narrow axis: at most 3 bins of a 1-2-5 step, so the tick labels do not touch
        ax.xaxis.set_major_locator(MaxNLocator(nbins=3, steps=[1, 2, 5, 10]))
        ax.set_xlabel(f"{g['quantity'].iloc[0]}: method − {label(g['baseline'].iloc[0])}")
        ax.set_title(task_label(task))
        ax.grid(axis="x", alpha=0.3)
    from matplotlib.lines import Line2D
    keys = [Line2D([], [], color="0.3", lw=2.5, marker="o")]
    names = ["mean difference over seeds, 95% t interval"]
    if boot is not None and not boot.empty:
        keys.append(Line2D([], [], color="0.3", lw=1))
        names.append("95% paired bootstrap interval over test examples (seeds pooled)")
    fig.suptitle(title or "Paired differences vs the baseline run of the same seed")
    fig.tight_layout()
    _legend_below(fig, keys, names, ncol=1)
    return fig


def plot_convergence(conv: pd.DataFrame, title: str | None = None):
    """``analysis.convergence`` per task: each seed's steps to reach the paired baseline's
    target as a filled dot; a run that never reached it (censored) as an open triangle at
    its last step (it had that many steps and did not get there); 'k/n reached' at the
    right."""
    tasks = sorted(conv["task"].unique())
    n_methods = conv.groupby("task")["method"].nunique().max()
    fig, axes = task_panels(len(tasks), 5.2, 0.5 * n_methods + 1.8)
    for ax, task in zip(axes, tasks):
        c = conv[conv["task"] == task]
        methods = sorted(c["method"].unique(), key=method_order)
        ys = _rows_from_top(ax, n_methods, [label(m) for m in methods])
        for y, m in zip(ys, methods):
            g = c[c["method"] == m].sort_values("seed")
            dy = np.linspace(-0.2, 0.2, len(g)) if len(g) > 1 else np.zeros(1)  # seeds apart
            reached = ~g["censored"].to_numpy()
            color = METHOD_COLORS.get(m, "0.2")
            ax.scatter(g["steps_to_target"][reached], y + dy[reached], color=color, s=30)
            ax.scatter(g["last_step"][~reached], y + dy[~reached], facecolors="none",
                       edgecolors=color, marker=">", s=45)
            ax.annotate(f"{reached.sum()}/{len(g)} reached", (1.02, y),
                        xycoords=("axes fraction", "data"), va="center", fontsize=8)
        ax.set_xlim(0, 1.06 * c["last_step"].max())
        ax.set_xlabel("optimizer steps to reach the target")
        target, metric = c["target"], c["metric"].iloc[0]
        moot = " — at chance: moot" if metric in ZERO_AT_CHANCE and target.max() < 0.01 else ""
        ax.set_title(f"{task_label(task)}: target = baseline's {c['target_of'].iloc[0]}\n"
                     f"({target.min():.3f}–{target.max():.3f}{moot})", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    from matplotlib.lines import Line2D
    fig.suptitle(title or "Steps until a run first reaches the value of the "
                          f"{label(conv['baseline'].iloc[0])} run with the same seed")
    fig.tight_layout()
    _legend_below(fig, [Line2D([], [], ls="", marker="o", color="0.3"),
                        Line2D([], [], ls="", marker=">", mfc="none", mec="0.3")],
                  ["reached (one dot per seed)", "never reached: censored at its last step"])
    return fig


def plot_metric_vs(runs: pd.DataFrame, x: str = "lr", metric: str | None = None,
                   by: str = "method", which: str = "final", ax=None, logx: bool = True,
                   title: str | None = None, legend: str = "inside"):
    """A run-level metric against a config value (lr sweep, penalty strength): one line per
    ``by`` group, mean ± std over seeds. Zero x-values are drawn at the left edge of a log
    axis via symlog. ``legend``: "inside" (matplotlib's best spot) or "below" the axes (many
    groups: it never covers a line)."""
    import matplotlib.pyplot as plt

    d = complete(runs)
    metric = metric or main_metric(d)
    col = f"{which}_{metric}"
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    for j, (key, g) in enumerate(_sorted_groups(d, [by])):
        key = key[0] if isinstance(key, tuple) else key
        s = g.groupby(x)[col].agg(["mean", "std"]).reset_index().sort_values(x)
        # distinct markers and shrinking sizes keep identical lines (e.g. two inits both at
        # the majority-class accuracy) visible on top of each other
        line, = ax.plot(s[x], s["mean"], marker=MARKERS[j % len(MARKERS)],
                        ls=LINESTYLES[j % len(LINESTYLES)],
                        markersize=9 - 1.5 * (j % 4), alpha=0.85, label=_name([by], key),
                        color=METHOD_COLORS.get(key) if by == "method" else None)
        ax.fill_between(s[x], s["mean"] - s["std"].fillna(0), s["mean"] + s["std"].fillna(0),
                        color=line.get_color(), alpha=0.2, linewidth=0)
    if logx:
        nonzero = d[x][d[x] > 0]
        if (d[x] == 0).any() and len(nonzero):
            ax.set_xscale("symlog", linthresh=float(nonzero.min()))
        else:
            ax.set_xscale("log")
    split = "dev" if (d["protocol"] == "pilot").all() else "val"
    _chance_line(ax, metric, d if which in ("final", "best") else None, split)
    if "loss" not in metric:
        _min_span(ax)
    ax.set_xlabel(x)
    ax.set_ylabel(f"{split} {metric.removeprefix('dev_')} ({which})")
    if title:
        ax.set_title(title)
    if legend == "below":
        ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2,
                  frameon=False)
    else:
        ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return ax
