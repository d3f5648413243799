"""Paired statistics: every method against a baseline method, per task, paired by seed.

    cmp = compare(runs)                  # seed-level: mean difference, t CI, t and Wilcoxon p
    boot = bootstrap(runs)               # example-level paired bootstrap from saved predictions
    Path("figures/stats.md").write_text(stats_markdown(cmp, boot))

Two runs with the same seed share the data order, the val split and the head's init seed,
so the difference of their test metrics removes that part of the seed-to-seed noise: the
statistics are on the per-seed differences ``method - baseline``
(``analysis.pair_with_baseline``).
Conclusions are worded from the intervals (``verdict``): "better" / "worse" only when the
95% CI excludes 0, "undetermined at n = K" otherwise; "equivalent" only against an
explicit margin. Several methods share one baseline, so ``compare`` also gives the t p
adjusted over them (``holm``).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats as st

from .analysis import (check_baseline, complete, convergence_summary, load_predictions,
                       main_metric, method_order, pair_with_baseline, task_label)
from .methods import label
from .metrics import metrics_from_outputs


def paired_summary(diffs, confidence: float = 0.95) -> dict:
    """Mean of paired differences, its t interval (n-1 df), the paired t-test p (= one-sample
    t-test of the differences against 0) and the Wilcoxon signed-rank p. What cannot be
    computed is NaN, with the reason in ``note`` (n < 2; all differences equal or zero)."""
    d = np.asarray(diffs, dtype=float)
    n = len(d)
    out = dict(n=n, mean_diff=float(d.mean()) if n else np.nan, sd_diff=np.nan,
               ci_low=np.nan, ci_high=np.nan, t_p=np.nan, wilcoxon_p=np.nan, note="")
    if n < 2:
        out["note"] = f"n = {n}: no interval or test"
        return out
    sd = float(d.std(ddof=1))
    half = st.t.ppf(0.5 + confidence / 2, n - 1) * sd / np.sqrt(n)
    out.update(sd_diff=sd, ci_low=out["mean_diff"] - half, ci_high=out["mean_diff"] + half)
    # equal up to float rounding (0.7 - 0.6 vs 0.8 - 0.7): the t statistic would be noise
    if np.allclose(d, 0, rtol=0, atol=1e-12):
        out["note"] = "all differences 0: no test"
    elif np.allclose(d, d[0], rtol=0, atol=1e-12):
        out["note"] = "all differences equal: no t-test"
        out["wilcoxon_p"] = float(st.wilcoxon(d).pvalue)
    else:
        out["t_p"] = float(st.ttest_1samp(d, 0.0).pvalue)
        out["wilcoxon_p"] = float(st.wilcoxon(d).pvalue)
    return out


def compare(runs: pd.DataFrame, baseline: str = "orthogonal", which: str = "test",
            column: str | None = None, confidence: float = 0.95,
            margin: float | None = None) -> pd.DataFrame:
    """Per task and method: ``paired_summary`` of (method - baseline) over the seeds both
    have, on ``<which>_<main metric>`` (default: test at the val-best checkpoint) or on
    ``column`` (e.g. 'auc', higher is better), plus ``verdict`` (``margin``: the equivalence
    margin, if one was fixed beforehand) and ``holm_p``, the t p adjusted (``holm``) within
    the row's ``family``: the methods of the baseline's variant (the question: LoRA-FA inits
    against a LoRA-FA baseline) form one family per task and quantity, the other variants
    (references such as plain LoRA and full FT) a second, so adding references does not
    dilute the question's correction. Complete runs only; a task without a complete
    baseline run gets n = 0 rows that say so."""
    rows = []
    check_baseline(complete(runs), baseline)
    for task, g in complete(runs).groupby("task", sort=True):
        col = column or f"{which}_{main_metric(g)}"
        has_base = baseline in set(g["method"])
        pairs = pair_with_baseline(g, col, baseline) if has_base else None
        variant = g.groupby("method")["variant"].first()
        for method in sorted(set(g["method"]) - {baseline}, key=method_order):
            s = paired_summary([] if pairs is None else
                               pairs.loc[pairs["method"] == method, "diff"], confidence)
            if pairs is None:
                s["note"] = f"no complete {baseline} run for this task yet"
            family = ("question" if has_base and variant[method] == variant[baseline]
                      else "reference")
            rows.append({"task": task, "quantity": col, "method": method,
                         "baseline": baseline, "family": family, **s,
                         "verdict": verdict(s["ci_low"], s["ci_high"], s["n"], margin)})
    out = pd.DataFrame(rows)
    if len(out):
        out["holm_p"] = out.groupby(["task", "quantity", "family"])["t_p"].transform(holm)
        # a verdict of the unadjusted interval that the family-wise correction does not keep
        # (no t-test, e.g. all differences equal: no Holm p either, and no such flag)
        out["per_comparison"] = out["verdict"].isin(["better", "worse"]) & (out["holm_p"] >= 0.05)
        out.loc[out["per_comparison"], "note"] = [
            _with_caveat(n, "per comparison only: Holm p ≥ 0.05")
            for n in out.loc[out["per_comparison"], "note"]]
    return out


def _with_caveat(note: str, caveat: str) -> str:
    """A row's ``note`` with one more caveat, '; '-separated."""
    return "; ".join(filter(None, [note, caveat]))


def holm(p) -> np.ndarray:
    """Holm's step-down adjustment of the p-values of one family of tests (here: every
    method against the baseline, for one task and quantity), so that "adjusted p < 0.05"
    keeps the family-wise error rate at 5%. NaN p-values (no test) stay NaN and do not count
    in the family size."""
    p = np.asarray(p, dtype=float)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    m = len(order)
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(scaled)
    return out


def verdict(low: float, high: float, n: int, margin: float | None = None) -> str:
    """How an interval for (method - baseline), higher is better, may be worded: 'better' (it
    lies above 0),
    'worse' (below 0), 'equivalent within ±margin' (inside (-margin, margin): only with an
    explicit margin), else 'undetermined at n = K'."""
    if np.isfinite(low) and np.isfinite(high):
        if low > 0:
            return "better"
        if high < 0:
            return "worse"
        if margin is not None and -margin < low and high < margin:
            return f"equivalent within ±{margin:g}"
    return f"undetermined at n = {n}"


def convergence_compare(conv: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """``analysis.convergence_summary`` of ``conv`` (rows of ``analysis.convergence``) plus, per
    method, its steps to the target minus the baseline run's of the same seed: how many seeds
    got there sooner / at the same eval / later (a censored run is later than one that got
    there), and ``paired_summary`` of the differences with a censored run counted at its last
    step. That makes each such difference a lower bound, so 'faster' (the whole interval
    below 0) is said only when no run was censored; 'slower' stands either way."""
    summary = convergence_summary(conv)
    base = conv[conv["method"] == conv["baseline"]].set_index(["task", "seed"])
    rows = []
    for (task, method), g in conv[conv["method"] != conv["baseline"]].groupby(
            ["task", "method"], sort=False):
        g = g[[(task, sd) in base.index for sd in g["seed"]]]
        b = base.loc[[(task, sd) for sd in g["seed"]]]
        mine = np.where(g["censored"], g["last_step"], g["steps_to_target"])
        theirs = np.where(b["censored"], b["last_step"], b["steps_to_target"])
        cens, base_cens = g["censored"].to_numpy(), b["censored"].to_numpy()
        sooner = ~cens & (base_cens | (mine < theirs))
        tied = (cens == base_cens) & (mine == theirs)
        later = ~sooner & ~tied
        s = paired_summary(mine - theirs, confidence)
        n_cens = int(cens.sum())
        v = verdict(-s["ci_high"], -s["ci_low"], s["n"])  # fewer steps is better
        v = {"better": "faster", "worse": "slower"}.get(v, v)
        if v == "faster" and n_cens:
            v = f"undetermined at n = {s['n']}"
        rows.append(dict(task=task, method=method, sooner=int(sooner.sum()),
                         tied=int(tied.sum()), later=int(later.sum()), pairs=s["n"],
                         diff_steps=s["mean_diff"], diff_low=s["ci_low"],
                         diff_high=s["ci_high"], steps_verdict=v,
                         steps_note=(f"{n_cens} censored (counted at their last step)"
                                     if n_cens else s["note"])))
    paired = pd.DataFrame(rows, columns=["task", "method", "sooner", "tied", "later", "pairs",
                                         "diff_steps", "diff_low", "diff_high",
                                         "steps_verdict", "steps_note"])
    return summary.merge(paired, on=["task", "method"], how="left")


# ---------------------------------------------------------------- example-level bootstrap
def _predictions(run, metric):
    """(index, outputs, label) of a run, in row order; checks the file against the log."""
    if not isinstance(run.predictions, str):
        raise ValueError(f"{run.run_id}: no saved predictions; rerun with save_predictions=True")
    p = load_predictions(run.predictions)
    order = np.argsort(p["index"])
    index, out, y = p["index"][order], p["pred"][order], p["label"][order]
    logged = getattr(run, f"test_{metric}", np.nan)
    if not np.isclose(metrics_from_outputs(run.task, out, y)[metric], logged, rtol=0, atol=1e-9):
        raise ValueError(f"{run.predictions}: its {metric} differs from the log's "
                         f"test_{metric} {logged}: not this run's predictions")
    return index, out, y


def bootstrap(runs: pd.DataFrame, baseline: str = "orthogonal", n_boot: int = 1000,
              seed: int = 0, confidence: float = 0.95) -> pd.DataFrame:
    """Example-level paired bootstrap of the test main metric, per task and method, pooling
    the seeds both methods have: each resample draws test examples with replacement (the
    same draw for every run of the task) and takes mean-over-seeds(method) minus
    mean-over-seeds(baseline), each metric recomputed from the saved outputs with the
    pipeline's own ``metrics_from_outputs``. Columns:
    task, method, n_seeds, n_examples, diff (on the full test set), ci_low, ci_high (the
    percentile interval) and p (two-sided: twice the smaller tail of the resampled
    differences around 0). Deterministic in ``seed``. It measures test-set sampling noise
    given these seeds, not seed-to-seed noise (that is ``compare``'s). Cost: one
    ``metrics_from_outputs`` call (main metric only) per run and resample."""
    rows = []
    check_baseline(complete(runs), baseline)
    for task, g in complete(runs).groupby("task", sort=True):
        if baseline not in set(g["method"]):
            continue  # compare's rows say so
        metric = main_metric(g)
        pairs = pair_with_baseline(g, f"test_{metric}", baseline)
        if pairs.empty:
            continue
        by_id = {r.run_id: r for r in g.itertuples()}
        ref_index = _predictions(by_id[pairs["baseline_run_id"].iloc[0]], metric)[0]
        n = len(ref_index)
        # row 0: the full test set; then n_boot resamples of its rows, shared by every run
        rng = np.random.default_rng(seed)
        draws = np.vstack([np.arange(n), rng.integers(0, n, size=(n_boot, n))])
        scores = {}  # run_id -> its metric on each row of draws

        def score(run_id):
            if run_id not in scores:
                index, out, y = _predictions(by_id[run_id], metric)
                if not np.array_equal(index, ref_index):
                    raise ValueError(f"{by_id[run_id].predictions}: its test rows differ from "
                                     f"the other {task} runs': not the same test set")
                scores[run_id] = np.array([metrics_from_outputs(task, out[i], y[i], [metric])[
                    metric] for i in draws])
            return scores[run_id]

        for method in sorted(set(pairs["method"]), key=method_order):
            p = pairs[pairs["method"] == method]
            a = np.mean([score(r) for r in p["run_id"]], axis=0)
            b = np.mean([score(r) for r in p["baseline_run_id"]], axis=0)
            diff, boot = a[0] - b[0], (a - b)[1:]
            lo, hi = np.quantile(boot, [0.5 - confidence / 2, 0.5 + confidence / 2])
            pval = min(1.0, 2 * min(np.mean(boot <= 0), np.mean(boot >= 0)))
            rows.append({"task": task, "metric": metric, "method": method,
                         "baseline": baseline, "n_seeds": len(p), "n_examples": n,
                         "diff": float(diff), "ci_low": float(lo), "ci_high": float(hi),
                         "p": float(pval)})
    return pd.DataFrame(rows)


def with_bootstrap(cmp: pd.DataFrame, boot: pd.DataFrame | None) -> pd.DataFrame:
    """``cmp`` with the bootstrap interval of its test-metric rows as ``boot_low`` /
    ``boot_high`` (NaN where there is none) and a caveat in ``note`` where the two intervals
    disagree: the t interval has a verdict ('better' / 'worse') that the bootstrap interval
    does not share (flag ``boot_includes_0``), or the bootstrap interval excludes 0 where the
    t interval does not (flag ``boot_only``). The seed-level interval holds this test set
    fixed, the bootstrap holds the seeds fixed, and a difference within either noise is not
    yet a result for the task."""
    out = cmp.reset_index(drop=True)  # rows by position: concatenated frames repeat labels
    out["boot_low"], out["boot_high"] = np.nan, np.nan
    out["boot_includes_0"], out["boot_only"] = False, False
    if boot is None or boot.empty:
        return out
    for i, r in out.iterrows():
        b = boot[(boot["task"] == r["task"]) & (boot["method"] == r["method"])
                 & ("test_" + boot["metric"] == r["quantity"])]
        if not len(b):
            continue
        lo, hi = float(b["ci_low"].iloc[0]), float(b["ci_high"].iloc[0])
        out.loc[i, ["boot_low", "boot_high"]] = lo, hi
        if r["verdict"] in ("better", "worse") and lo <= 0 <= hi:
            out.loc[i, "boot_includes_0"] = True
            out.loc[i, "note"] = _with_caveat(
                r["note"], "bootstrap CI includes 0: within test-set sampling noise")
        elif r["verdict"] not in ("better", "worse") and not lo <= 0 <= hi:
            out.loc[i, "boot_only"] = True
            out.loc[i, "note"] = _with_caveat(
                r["note"], "bootstrap CI excludes 0, the seeds' interval does not: "
                           "within seed-to-seed noise")
    return out


# ---------------------------------------------------------------- the answer, one table
# the three caveats a verdict can carry, one place for every view of them: the flag column
# (``compare``'s per_comparison, ``with_bootstrap``'s two), its mark in the answer table, and
# its words beside the forest plot's row
CAVEATS = {"per_comparison": ("†", "per comparison only (Holm p ≥ 0.05)"),
           "boot_includes_0": ("‡", "but its bootstrap CI includes 0"),
           "boot_only": ("§", "though its bootstrap CI excludes 0")}
ANSWER_MARKS = {flag: mark for flag, (mark, _) in CAVEATS.items()}


def caveats(row) -> list[str]:
    """The ``CAVEATS`` flags set on one row of ``with_bootstrap``'s frame (a named tuple or a
    Series; a flag column that is missing counts as unset)."""
    return [flag for flag in CAVEATS if bool(getattr(row, flag, False))]

ANSWER_LEGEND = ("Each cell: method − {baseline} on the task's test metric at the val-best step, "
                 "mean of the paired per-seed differences, 95% t CI, and the interval's "
                 "verdict (better / worse: the CI excludes 0; undetermined otherwise). "
                 "† better/worse per comparison only (Holm p ≥ 0.05 over the task's inits); "
                 "‡ the example-level bootstrap CI includes 0 (within test-set sampling "
                 "noise); § undetermined across seeds but the bootstrap CI excludes 0. "
                 "Details: stats.md.")


def answer_table(cmp: pd.DataFrame, boot: pd.DataFrame | None = None) -> pd.DataFrame:
    """The study's answer at a glance: a row per method, a column per task, each cell the
    paired difference from ``compare`` (one quantity per task, e.g. the test metric), its CI
    and verdict in one short string, marked with ``ANSWER_MARKS`` where Holm's correction or
    the bootstrap (``with_bootstrap``) qualifies it."""
    c = with_bootstrap(cmp, boot)
    if c.groupby("task")["quantity"].nunique().gt(1).any():
        raise ValueError("answer_table: one quantity per task; pass compare() on the test "
                         "metric only (or filter cmp by its 'quantity' column)")

    def cell(r) -> str:
        word = r.verdict.split(" at n")[0]
        marks = "".join(ANSWER_MARKS[flag] for flag in caveats(r))
        if not np.isfinite(r.ci_low):
            return f"{_fmt(r.mean_diff, '+.3f')} (n = {r.n}: no interval)"
        return (f"{r.mean_diff:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}] "
                f"{word}{marks} (n = {r.n})")

    cells = {(r.method, f"{task_label(r.task)} ({r.quantity.removeprefix('test_')})"): cell(r)
             for r in c.itertuples(index=False)}
    out = pd.Series(cells).unstack()
    reference = set(c.loc[c["family"] == "reference", "method"])  # after the question's rows
    out = out.loc[sorted(out.index, key=lambda m: (m in reference, method_order(m)))]
    out = out.fillna("not run")
    out.index = [label(m) for m in out.index]
    out.index.name = f"method − {label(c['baseline'].iloc[0])}"
    return out


# ---------------------------------------------------------------- markdown
def _fmt(x, spec=".3f"):
    return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, spec)


def _p(x):
    return "<0.001" if x < 0.001 else _fmt(x)


def _holm_legend(g: pd.DataFrame) -> str:
    if len(set(g["family"]) if "family" in g else {"question"}) == 1:
        return ("Holm p: the paired t p adjusted over the methods in this table "
                "(family-wise error 5% at Holm p < 0.05).")
    return ("Holm p: the paired t p adjusted within its family, family-wise error 5% at "
            "Holm p < 0.05 (the methods of the baseline's variant form one family; the "
            "references, other variants, a second).")


def stats_markdown(cmp: pd.DataFrame, boot: pd.DataFrame | None = None,
                   conv: pd.DataFrame | None = None, title: str | None = None) -> str:
    """The stats tables as markdown, per task and compared quantity (in ``cmp``'s order, e.g.
    ``compare`` on the test metric, then on 'auc'): per method the paired difference vs the
    baseline (mean, 95% t CI, n, paired t and Wilcoxon p, verdict), the bootstrap interval
    from ``boot`` for the test metric, then the task's convergence summary (``conv``: rows of
    ``convergence_compare``, or of ``analysis.convergence_summary`` without the paired
    columns) when given; ``title`` on top."""
    lines = [f"# {title}", ""] if title else []
    cmp = with_bootstrap(cmp, boot)
    tasks = set(cmp["task"]) | (set() if conv is None else set(conv["task"]))
    for task in sorted(tasks):
        t = cmp[cmp["task"] == task]
        for quantity in t["quantity"].unique():
            g = t[t["quantity"] == quantity]
            lines += [f"## {task_label(task)}: {quantity}, method − "
                      f"{label(g['baseline'].iloc[0])} (paired by seed)", "",
                      _holm_legend(g), "",
                      "| method | n | mean diff | 95% CI (t) | paired t p | Holm p "
                      "| Wilcoxon p | bootstrap 95% CI | verdict | note |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
            for r in g.itertuples():
                bci = (f"[{r.boot_low:+.3f}, {r.boot_high:+.3f}]"
                       if np.isfinite(r.boot_low) else "–")
                ci = f"[{_fmt(r.ci_low, '+.3f')}, {_fmt(r.ci_high, '+.3f')}]"
                lines.append(f"| {label(r.method)} | {r.n} | {_fmt(r.mean_diff, '+.3f')} "
                             f"| {ci} | {_p(r.t_p)} | {_p(getattr(r, 'holm_p', np.nan))} "
                             f"| {_p(r.wilcoxon_p)} | {bci} "
                             f"| {r.verdict} | {r.note} |")
            lines.append("")
        if conv is not None and task in set(conv["task"]):
            c = conv[conv["task"] == task]
            lines += [f"### {task_label(task)}: convergence",
                      "", "Evaluated steps until a run first reaches the target (the baseline "
                      "run of its seed; censored: never reached within the run), and the area "
                      "under its eval curve / step range.", "",
                      "| method | reached | median steps (reached) | mean AUC "
                      "| vs baseline: sooner / tied / later | steps − baseline's, 95% CI (t) "
                      "| verdict | note |",
                      "|---|---|---|---|---|---|---|---|"]
            for r in c.itertuples():
                if np.isfinite(getattr(r, "pairs", np.nan)):
                    cmp_cells = (f"{r.sooner:.0f} / {r.tied:.0f} / {r.later:.0f} "
                                 f"| {_fmt(r.diff_steps, '+.0f')} "
                                 f"[{_fmt(r.diff_low, '+.0f')}, {_fmt(r.diff_high, '+.0f')}] "
                                 f"| {r.steps_verdict} | {r.steps_note}")
                else:  # the baseline itself, or a summary without the paired columns
                    cmp_cells = "– | – | – | "
                lines.append(f"| {label(r.method)} | {r.reached}/{r.n} "
                             f"| {_fmt(r.median_steps, '.0f')} | {_fmt(r.auc)} | {cmp_cells} |")
            lines.append("")
    return "\n".join(lines)
