"""The study (issue 11): which frozen A should LoRA-FA use? One spec, read by the CPU study,
the GPU kit (``pipeline.gpu``) and the analysis: tasks in priority order, methods, epochs, lr
grids, seeds. Nothing here is tuned on results: every value below was fixed before any run.

Protocol: val = 10% of train (at most 1000 rows, one split seed for every run, so runs pair by
seed); lr chosen per (task, method) on val with ``SELECTION_SEEDS``, by a bracket search over
``LR_GRIDS`` (the middle three lrs, extended one at a time towards the best until it is
inside or the grid ends); then the main grid at ``STUDY_SEEDS`` with the chosen lrs; GLUE dev
is the test set, reported at the val-best step.

    python -m pipeline.study lr     [--tasks mrpc cola] [--shard K/N]   # lr-selection runs
    python -m pipeline.study select                                     # figures/lr_selection.*
    python -m pipeline.study main   [--tasks ...] [--shard K/N]         # the main grid
    python -m pipeline.study all    [--deadline-s S]   # per task, method by method: lr -> main
    (--smoke: a tiny study for tests; --gpu: the GPU profile; --dry-run: list, run nothing)

Several workers share the study without --shard too: each takes the next run that no live
worker has claimed (pipeline.sweep's lock files), so `make study` can simply run twice.

Epochs are a reasoned guess made before any result (1-epoch pilot runs still rose at the end;
MRPC, CoLA and STS-B get 5 epochs, SST-2's 10k subsample 2): check them on the val curves of
the lr sweep, where the best method's val metric must have plateaued. RTE failed that check
at 5 and gets 10 (below).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from . import logs as L
from .methods import METHODS, method_of
from .sweep import parse_shard

# ---------------------------------------------------------------- the spec (fixed before results)
TASKS = ("mrpc", "cola", "rte", "stsb", "sst2")  # priority order
# the priority order too (workers finish a method, lr and main grid, before the next): the
# headline trio of `make main` first (random, principal, gradient directions), then the rest
LORAFA = ("orthogonal", "svd", "gradient", "svd_minor", "gradient_center", "svd_sqrt")
REFERENCES = ("lora", "full")
# RTE 10, not 5: its first lr runs at 5 epochs (logs/rte_5ep_check) were still rising at the
# last evaluation for the two best (svd 2e-3, orthogonal 2e-3), so 5 fails the protocol's
# plateau check; raised before any RTE main-grid run, and RTE's lr selection restarted at 10
EPOCHS = {"mrpc": 5, "cola": 5, "rte": 10, "stsb": 5, "sst2": 2}
# about 4 val evaluations per epoch, 2 on RTE's 10 (steps per epoch at batch 32 after the 10%
# val split: MRPC 104, CoLA 241, RTE 71, STS-B 162, SST-2 10k 282)
EVAL_EVERY_STEPS = {"mrpc": 25, "cola": 60, "rte": 35, "stsb": 40, "sst2": 70}
SUBSAMPLE_TRAIN = {"sst2": 10_000}  # the first 10k rows: a fixed subsample
_LORAFA_LRS = (1e-3, 2e-3, 5e-3, 1e-2, 2e-2)
# gradient-aligned A has ~3x the A·x RMS of random A (figures/gradient_init.md), so the same lr
# is ~3x the effective step: its grid starts 3x lower (set before any study run)
_GRADIENT_LRS = (3e-4, 1e-3, 2e-3, 5e-3, 1e-2)
LR_GRIDS = {**{m: _LORAFA_LRS for m in LORAFA},
            "gradient": _GRADIENT_LRS, "gradient_center": _GRADIENT_LRS,
            "lora": (3e-4, 1e-3, 3e-3), "full": (2e-5, 5e-5, 1e-4, 2e-4)}
# lr selection: the middle LR_START lrs of each grid first; while the best is at an end of
# what ran and the grid goes further, the next lr that way (a bracket around the optimum,
# at ~60% of the full grid's cost). Selection seeds per profile (a tuple, or {task: tuple}
# while a seed is being added task by task), distinct from every study seed: two, as the
# protocol asks. The 2-core CPU study first ran one (100) everywhere and added the second
# (101) task by task, cheapest first whatever the results (SST-2, CoLA, STS-B, MRPC, RTE:
# about 1.5, 3, 4, 7 and 9 hours of two workers); a task re-selected its lrs once every
# seed-101 run of its brackets had finished (a bracket may grow), and its main grid followed
# the new choice.
LR_START = 3
# a best lr at the grid's edge extends the grid (the protocol): up to 2 more 1-2-5 lrs past it
LR_BEYOND = 2
SELECTION_SEEDS = {"cpu": (100, 101), "gpu": (100, 101)}
# study seeds per profile: 5 (CPU) / 10 (GPU) for LoRA-FA; references 3 on CPU
STUDY_SEEDS = {"cpu": tuple(range(5)), "gpu": tuple(range(10))}
REFERENCE_SEEDS = {"cpu": tuple(range(3)), "gpu": tuple(range(10))}
# length-grouped batches (chunks of 50 shuffled batches sorted by length, batch order
# shuffled; HF's group_by_length): 0.68x the padded tokens and 0.66x the time of random
# batches on MRPC (benchmarks/length_grouped.py); every method gets the same batches per seed
COMMON = dict(model="minilm", rank=8, alpha=16, targets="attention", batch_size=32,
              max_length=128, val_fraction=0.1, split_seed=0, length_grouped=True)
# run settings that change with the machine, not the question
PROFILES = {"cpu": {}, "gpu": dict(mixed_precision="bf16", checkpoint=False, quiet=True)}
LOGS = {"lr": "logs/study_lr", "main": "logs/study"}
FIGURES = "figures"


@dataclass(frozen=True)
class Study:
    tasks: tuple
    methods: tuple
    epochs: dict
    eval_every_steps: dict
    subsample_train: dict
    lr_grids: dict
    selection_seeds: dict
    study_seeds: dict
    reference_seeds: dict
    common: dict
    subsample_dev: int | None = None
    lr_start: int | None = LR_START  # lrs each bracket starts with (None: the whole grid)

    def seeds(self, method: str, profile: str = "cpu") -> tuple:
        return (self.reference_seeds if method in REFERENCES else self.study_seeds)[profile]

    def sel_seeds(self, profile: str = "cpu", task: str | None = None) -> tuple:
        seeds = self.selection_seeds[profile]
        if isinstance(seeds, dict):  # per task
            if task not in seeds:
                raise ValueError(f"no selection seeds for task {task!r} in the {profile} "
                                 f"profile: add it to SELECTION_SEEDS[{profile!r}]")
            return tuple(seeds[task])
        return tuple(seeds)


STUDY = Study(tasks=TASKS, methods=LORAFA + REFERENCES, epochs=EPOCHS,
              eval_every_steps=EVAL_EVERY_STEPS, subsample_train=SUBSAMPLE_TRAIN,
              lr_grids=LR_GRIDS, selection_seeds=SELECTION_SEEDS, study_seeds=STUDY_SEEDS,
              reference_seeds=REFERENCE_SEEDS, common=COMMON)

# the same study shrunk for tests and the GPU kit's CPU dry run: 64 training rows, 1 epoch
# (2 steps), 32 test rows, one lr per method (the middle of its grid), one seed per phase
SMOKE = replace(STUDY, tasks=("mrpc",), epochs={t: 1 for t in TASKS},
                eval_every_steps={t: None for t in TASKS},
                subsample_train={t: 64 for t in TASKS}, subsample_dev=32,
                lr_grids={m: (g[len(g) // 2],) for m, g in LR_GRIDS.items()},
                selection_seeds={"cpu": (100,), "gpu": (100,)},
                study_seeds={"cpu": (0,), "gpu": (0,)},
                reference_seeds={"cpu": (0,), "gpu": (0,)},
                common={**COMMON, "max_length": 64})


# ---------------------------------------------------------------- configs
def run_config(spec: Study, task: str, method: str, lr: float, seed: int, logs_dir: str,
               profile: str = "cpu", **overrides):
    """One RunConfig of the study: the spec's settings for ``task`` + the method's overrides."""
    from .config import RunConfig

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {list(METHODS)}")
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}: use one of {list(PROFILES)}")
    per_task = dict(epochs=spec.epochs[task], eval_every_steps=spec.eval_every_steps[task],
                    subsample_train=spec.subsample_train.get(task),
                    subsample_dev=spec.subsample_dev)
    return RunConfig(task=task, lr=lr, seed=seed, logs_dir=logs_dir,
                     **{**per_task, **spec.common, **METHODS[method][1], **PROFILES[profile],
                        **overrides})


def _next_lr(lr: float, up: bool) -> float:
    """The neighbour of ``lr`` in the 1-2-5 series (1e-3 -> 5e-4 below, 2e-2 -> 5e-2 above)."""
    e = math.floor(math.log10(lr))
    series = [float(f"{m}e{k}") for k in (e - 1, e, e + 1) for m in (1, 2, 5)]
    return min(x for x in series if x > lr * 1.001) if up else max(
        x for x in series if x < lr * 0.999)


def extended_grid(grid, beyond: int = LR_BEYOND) -> tuple:
    """``grid`` with ``beyond`` more 1-2-5 lrs below and above it: where a bracket may go when
    the best lr is at the grid's edge (the protocol: extend the grid there)."""
    grid = tuple(grid)
    if len(grid) < 2:
        return grid
    below, above = [grid[0]], [grid[-1]]
    for _ in range(beyond):
        below.insert(0, _next_lr(below[0], up=False))
        above.append(_next_lr(above[-1], up=True))
    return tuple(below[:-1]) + grid + tuple(above[1:])


def search_space(grid, start: int | None = LR_START, beyond: int = LR_BEYOND) -> tuple:
    """Every lr a bracket may try: ``extended_grid`` when brackets start in the middle of the
    grid and grow, the grid itself when all of it runs (``start`` None)."""
    grid = tuple(grid)
    return grid if start is None or len(grid) < 2 else extended_grid(grid, beyond)


def best_lr(scored):
    """The lr with the highest score among ``(score, lr)`` pairs, None if there are none.
    Ties go to the smaller lr: the protocol's one tie rule, fixed before any result."""
    return max(scored, key=lambda t: (t[0], -t[1]))[1] if scored else None


def lr_bracket(grid, means: dict, start: int | None = LR_START,
               beyond: int = LR_BEYOND) -> tuple:
    """The lrs to run for one method, given ``means`` ({lr: mean val metric over the selection
    seeds; None while a seed is unfinished, NaN if one failed}): the middle ``start`` lrs of
    ``grid`` (ascending; all of it if None, and then nothing more), then, once all of those
    have finished, one more below while the best is the lowest that ran (or every one failed),
    one more above while it is the highest, past the grid's ends by up to ``beyond`` lrs
    (``extended_grid``). Deterministic in the logs, so every worker computes the same
    brackets."""
    grid = tuple(grid)
    if start is None or len(grid) < 2:
        return grid
    full = search_space(grid, start, beyond)
    lo = full.index(grid[0]) + max(0, (len(grid) - start) // 2)
    hi = min(lo + start, full.index(grid[-1]) + 1)
    while True:
        ran = full[lo:hi]
        vals = [means.get(lr) for lr in ran]
        if any(v is None for v in vals):
            return ran  # wait for these before deciding where to go
        ok = [(v, lr) for v, lr in zip(vals, ran) if math.isfinite(v)]
        best = best_lr(ok)
        if (best is None or best == ran[0]) and lo > 0:
            lo -= 1
        elif best is not None and best == ran[-1] and hi < len(full):
            hi += 1
        else:
            return ran


def _lr_logs(spec: Study, task: str, method: str, logs_dir, profile, overrides) -> dict:
    """{lr: [stored log or None per selection seed]} over the method's whole grid."""
    return {lr: [_stored(run_config(spec, task, method, lr, seed, logs_dir, profile,
                                    **overrides)) for seed in spec.sel_seeds(profile, task)]
            for lr in search_space(spec.lr_grids[method], spec.lr_start)}


def _finished(h) -> bool:
    return h is not None and h.get("status") in ("complete", "failed")


def _mean_val(hs: list) -> float | None:
    """Mean val metric at the val-best step over the selection seeds: None while one is
    unfinished, NaN if one failed (or logged no selection)."""
    if not all(map(_finished, hs)):
        return None
    ok = [h for h in hs if h["status"] == "complete" and h.get("selection")]
    if len(ok) < len(hs):
        return math.nan
    return statistics.fmean(h["selection"]["value"] for h in ok)


def brackets(spec: Study, task: str, logs_dir: str = LOGS["lr"], profile: str = "cpu",
             **overrides) -> dict:
    """{method: (lrs of its bracket so far, {lr: [stored logs]})} for one task."""
    out = {}
    for m in spec.methods:
        logs = _lr_logs(spec, task, m, logs_dir, profile, overrides)
        means = {lr: _mean_val(hs) for lr, hs in logs.items()}
        out[m] = (lr_bracket(spec.lr_grids[m], means, spec.lr_start), logs)
    return out


def lr_selection_configs(spec: Study, task: str, logs_dir: str = LOGS["lr"],
                         profile: str = "cpu", **overrides) -> list:
    """The lr sweep of one task as far as the logs so far decide it: every method x its
    current bracket (``lr_bracket``) x the selection seeds, seed by seed (a sweep cut short
    holds whole brackets of the first seed). A bracket grows once its runs finish, so call
    again after running these."""
    br = brackets(spec, task, logs_dir, profile, **overrides)
    return [run_config(spec, task, m, lr, seed, logs_dir, profile, **overrides)
            for seed in spec.sel_seeds(profile, task) for m in spec.methods for lr in br[m][0]]


def study_configs(spec: Study, selected_lrs: dict, seeds=None, tasks=None,
                  logs_dir: str = LOGS["main"], profile: str = "cpu", **overrides) -> list:
    """The main grid: per task (priority order), seed by seed, every method at its selected lr.
    ``selected_lrs``: {task: {method: lr or {"lr": lr, ...}}} (``select_lrs()["choices"]``);
    ``seeds``: the same seeds for every method (default: the profile's, fewer for references).
    A method with no selected lr (every lr failed) or no choice yet (its bracket is open) is
    left out: it joins once ``select_lrs`` chooses, and pairs by seed then."""
    out = []
    for task in spec.tasks if tasks is None else tasks:
        chosen = selected_lrs.get(task)
        if not chosen:
            raise ValueError(f"no lrs selected for {task}: run `python -m pipeline.study lr "
                             f"--tasks {task}` then `select` first")
        all_seeds = sorted({s for m in spec.methods for s in (seeds or spec.seeds(m, profile))})
        for seed in all_seeds:
            for m in filter(chosen.__contains__, spec.methods):
                lr = chosen[m]["lr"] if isinstance(chosen[m], dict) else chosen[m]
                if lr is not None and seed in (seeds or spec.seeds(m, profile)):
                    out.append(run_config(spec, task, m, lr, seed, logs_dir, profile,
                                          **overrides))
    return out


def run_task(task: str, methods=None, lrs: dict | None = None, seeds=None,
             logs_dir: str = LOGS["main"], figures_dir: str = FIGURES, spec: Study = STUDY,
             profile: str = "cpu", **overrides) -> list[dict]:
    """One task of the study, as the experiment notebooks run it: ``methods`` (METHODS keys;
    default the spec's) at ``lrs`` ({method: lr}; default the val-selected lrs of
    ``<figures_dir>/lr_selection.json``) and ``seeds`` (default the spec's, fewer for the
    references), seed by seed. ``overrides`` are RunConfig fields (epochs, model,
    subsample_train, ...); None values are dropped, so a notebook can pass its parameters
    as they are. Complete runs are skipped, killed ones resume."""
    from .sweep import run_configs

    methods = list(methods or spec.methods)
    if lrs is None:
        chosen = read_selection(figures_dir).get(task) or {}
        lrs = {m: c["lr"] if isinstance(c, dict) else c for m, c in chosen.items()}
    missing = [m for m in methods if lrs.get(m) is None]
    if missing:
        raise ValueError(f"no lr for {missing} on {task}: pass lrs={{method: lr}} or run the "
                         "lr selection first (make study)")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    per_method = {m: list(seeds) if seeds is not None else spec.seeds(m, profile)
                  for m in methods}
    cfgs = [run_config(spec, task, m, lrs[m], s, logs_dir, profile, **overrides)
            for s in sorted({s for ss in per_method.values() for s in ss})
            for m in methods if s in per_method[m]]
    return run_configs(cfgs)


# ---------------------------------------------------------------- lr selection
def _stored(cfg) -> dict | None:
    path = L.log_path(cfg.logs_dir, cfg.task, cfg.run_id)
    if not path.is_file():
        return None
    try:
        return L.read_log(path)
    except json.JSONDecodeError:  # a write in progress elsewhere; atomic writes make it rare
        return None


def _ax_rms(h: dict) -> float | None:
    """RMS of A·x at init, mean over the adapted modules (adapter runs log it; full FT not)."""
    return (h.get("adapter_stats") or {}).get("ax_rms")


def _late_val(h: dict, metric: str, fraction: float = 0.25) -> float | None:
    """Mean val metric over the last ``fraction`` of a run's evaluations (at least one): a
    smoother selection rule than the val-best step, for ``select_lrs``' robustness check."""
    vals = [e[metric] for e in h.get("evals") or [] if e.get(metric) is not None]
    if not vals:
        return None
    return statistics.fmean(vals[-max(1, math.ceil(fraction * len(vals))):])


# the protocol's rule (val-best step) and two it is checked against, per selection seed
OTHER_RULES = {"final": lambda h, m: (h.get("final") or {}).get(m),
               "late": _late_val}


def _rule_means(ok: list, metric: str) -> dict:
    """{rule: mean over the selection seeds of what the rule scores a run} (None if a run
    lacks it: logs without eval curves)."""
    out = {}
    for rule, score in OTHER_RULES.items():
        vals = [score(h, metric) for h in ok]
        out[rule] = statistics.fmean(vals) if vals and None not in vals else None
    return out


def _pick(cands: list, key: str):
    """The lr a rule picks among a bracket's candidate rows (ties: the smaller lr), None if
    one candidate lacks the rule's score."""
    scores = [(row["rules"][key], lr) for _, lr, row in cands]
    if not scores or any(v is None for v, _ in scores):
        return None
    return best_lr(scores)


def select_lrs(logs_dir: str = LOGS["lr"], spec: Study = STUDY, tasks=None,
               figures_dir: str | None = FIGURES, profile: str = "cpu", **overrides) -> dict:
    """Mean val metric at the val-best step per (task, method, lr) over the selection seeds,
    and the best lr per (task, method) among its bracket (``lr_bracket``). An lr counts only
    when every selection seed finished; a method is selected once its bracket is final (so
    its main-grid runs can start while other brackets still grow); a choice at the end of
    what the bracket may try (``extended_grid``) is flagged ('extend the grid'). Writes
    ``<figures_dir>/lr_selection.md`` and ``.json`` (the json is what the main grid reads)
    unless ``figures_dir`` is None (for every task of the spec, whatever ``tasks`` says).
    Returns {"rows", "choices", "pending"}: choices {task: {method: choice}} of the final
    brackets only, pending {task: why} while a bracket of the task is open."""
    wanted = tuple(tasks or spec.tasks)
    # the file always holds every task of the spec: a worker on some tasks must not drop the
    # others' choices (a 'main' worker reads them back)
    every = wanted if figures_dir is None else tuple(dict.fromkeys(spec.tasks + wanted))
    rows, choices, pending = [], {}, {}
    for task in every:
        br = brackets(spec, task, logs_dir, profile, **overrides)
        n_runs = sum(len(lrs) * len(spec.sel_seeds(profile, task)) for lrs, _ in br.values())
        n_done = sum(_finished(h) for lrs, logs in br.values() for lr in lrs for h in logs[lr])
        task_choices, open_ = {}, []
        for m in spec.methods:
            grid = spec.lr_grids[m]
            lrs, logs = br[m]
            means = {lr: _mean_val(logs[lr]) for lr in lrs}  # None: a seed is unfinished
            cands = []
            for lr, mean in means.items():
                if mean is None:
                    continue
                ok = [h for h in logs[lr] if h["status"] == "complete" and h.get("selection")]
                mean = mean if math.isfinite(mean) else None  # a seed failed
                axs = [a for a in map(_ax_rms, ok) if a is not None]
                metric = logs[lr][0].get("main_metric")
                rows.append(dict(task=task, method=m, lr=lr, metric=metric,
                                 mean=mean, values=[h["selection"]["value"] for h in ok],
                                 n=len(ok), n_failed=len(logs[lr]) - len(ok), chosen=False,
                                 ax_rms=statistics.fmean(axs) if axs else None,
                                 rules=_rule_means(ok, metric)))
                if mean is not None:
                    cands.append((mean, lr, rows[-1]))
            if None in means.values():
                open_.append(m)  # the bracket still runs (and may grow): no choice yet
                continue
            if not cands:
                task_choices[m] = dict(lr=None, note="every lr failed: extend the grid down")
                continue
            lr = best_lr([(mean, lr) for mean, lr, _ in cands])
            mean, row = next((mean, row) for mean, c, row in cands if c == lr)
            row["chosen"] = True
            full = search_space(grid, spec.lr_start)
            edge = None if len(grid) == 1 else ("lowest" if lr == min(full) else
                                                "highest" if lr == max(full) else None)
            note = (f"at the {edge} lr the search may try: extend the grid by hand" if edge
                    else "outside the planned grid (the bracket extended it)"
                    if lr not in grid else "")
            task_choices[m] = dict(lr=lr, val=mean, metric=row["metric"], ax_rms=row["ax_rms"],
                                   edge=edge, note=note,
                                   other_rules={r: _pick(cands, r) for r in OTHER_RULES})
        if task_choices:
            choices[task] = task_choices
        if open_:
            which = "every method" if len(open_) == len(spec.methods) else ", ".join(open_)
            pending[task] = f"{n_done}/{n_runs} lr runs finished (brackets so far); open: {which}"
    out = {"selection_seeds": {t: list(spec.sel_seeds(profile, t)) for t in every},
           "logs_dir": str(logs_dir),
           "rows": rows, "choices": choices, "pending": pending}
    if figures_dir is not None:
        write_selection(out, figures_dir)
    return {**out, "rows": [r for r in rows if r["task"] in wanted],
            "choices": {t: c for t, c in choices.items() if t in wanted},
            "pending": {t: p for t, p in pending.items() if t in wanted}}


def _fmt(x, spec="{:.4f}"):
    return "–" if x is None else spec.format(x)


def selection_markdown(sel: dict) -> str:
    from .methods import label

    seeds = sel["selection_seeds"]
    if not isinstance(seeds, dict):  # one set for every task
        seeds = {t: seeds for t in dict.fromkeys(r["task"] for r in sel["rows"])}
    out = ["# lr selection (val metric at the val-best step, mean over the selection seeds)", "",
           "Selection seeds: " + "; ".join(f"{t} {', '.join(map(str, s))}"
                                           for t, s in seeds.items()) + ".", "",
           "Written by `python -m pipeline.study select`; the main grid reads "
           "`lr_selection.json`. ‖A·x‖: RMS of A·x over the first batches (LoRA-FA inits).", "",
           "| task | method | selected lr | val metric | ‖A·x‖ rms | note |",
           "|---|---|---|---|---|---|"]
    for task, ch in sel["choices"].items():
        for m, c in ch.items():
            out.append(f"| {task} | {label(m)} | {_fmt(c['lr'], '{:g}')} | "
                       f"{_fmt(c.get('val'))} {c.get('metric') or ''} | "
                       f"{_fmt(c.get('ax_rms'), '{:.3g}')} | {c['note']} |")
    for task, why in sel["pending"].items():
        out.append(f"| {task} | (the rest) | – | – | – | not selected yet: {why} |")
    out += ["", "## Every lr", "", "| task | method | lr | val mean | seeds | failed | ‖A·x‖ |",
            "|---|---|---|---|---|---|---|"]
    for r in sel["rows"]:
        mean = _fmt(r["mean"])
        out.append(f"| {r['task']} | {label(r['method'])} | {r['lr']:g} | "
                   f"{f'**{mean}**' if r['chosen'] else mean} | "
                   f"{', '.join(f'{v:.4f}' for v in r['values'])} | {r['n_failed']} | "
                   f"{_fmt(r['ax_rms'], '{:.3g}')} |")
    out += _rules_markdown(sel)
    return "\n".join(out) + "\n"


def _rules_markdown(sel: dict) -> list:
    """Would a smoother rule have chosen the same lr? The protocol takes each run's val-best
    step: the maximum of ~30 noisy evaluations, optimistic on a small val set."""
    from .methods import label

    picked = [(t, m, c) for t, ch in sel["choices"].items() for m, c in ch.items()
              if c["lr"] is not None and (c.get("other_rules") or {}).get("late") is not None]
    if not picked:
        return []
    same = sum(c["other_rules"]["late"] == c["lr"] for _, _, c in picked)
    out = ["", "## Would another rule choose the same lr?", "",
           "The protocol scores an lr by its runs' val metric at the val-best step (the "
           "maximum over every evaluation: optimistic, noisiest on small val sets). Checked "
           "against the val metric at the last step and the mean over the last quarter of the "
           "evaluations, among the lrs the bracket ran. A different pick is in bold; the "
           "study keeps the protocol's.", "",
           f"{same} of {len(picked)} choices agree with the last-quarter mean.", "",
           "| task | method | val-best step (used) | last step | last-quarter mean |",
           "|---|---|---|---|---|"]
    for t, m, c in picked:
        cells = [_fmt(c["other_rules"].get(r), "{:g}") for r in ("final", "late")]
        cells = [f"**{x}**" if x not in ("–", f"{c['lr']:g}") else x for x in cells]
        out.append(f"| {t} | {label(m)} | {c['lr']:g} | {cells[0]} | {cells[1]} |")
    return out


def write_selection(sel: dict, figures_dir: str = FIGURES) -> tuple[Path, Path]:
    folder = Path(figures_dir)
    folder.mkdir(parents=True, exist_ok=True)
    js, md = folder / "lr_selection.json", folder / "lr_selection.md"
    if md.is_file() and js.is_file() and json.loads(js.read_text()) == json.loads(L.to_json(sel)):
        return js, md  # unchanged (workers call this after every run)
    L.atomic_write_json(sel, js)
    text = selection_markdown(sel)
    from lora.io import atomic_write

    atomic_write(md, lambda tmp: Path(tmp).write_text(text))
    return js, md


def _selection_file(figures_dir: str = FIGURES) -> dict:
    """The whole ``<figures_dir>/lr_selection.json`` that ``select`` writes."""
    path = Path(figures_dir) / "lr_selection.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `python -m pipeline.study select` "
                                "(after the lr runs) first")
    return json.loads(path.read_text())


def read_selection(figures_dir: str = FIGURES) -> dict:
    """{task: {method: choice}} of ``<figures_dir>/lr_selection.json``."""
    return _selection_file(figures_dir)["choices"]


def keep_selection_seeds(runs, figures_dir: str = FIGURES):
    """``runs`` (lr runs, a ``load_logs`` frame) less the seeds their task's lr selection did
    not count (``selection_seeds`` of ``<figures_dir>/lr_selection.json``): a second
    selection seed still running on a task stays out of its lr figures until ``select``
    counts it. Unchanged without that file; tasks it does not name are kept."""
    if not len(runs):
        return runs
    try:
        seeds = _selection_file(figures_dir).get("selection_seeds")
    except FileNotFoundError:
        return runs
    if seeds is None:
        return runs
    if not isinstance(seeds, dict):  # one set for every task
        return runs[runs["seed"].isin(seeds)]
    keep = [t not in seeds or s in seeds[t] for t, s in zip(runs["task"], runs["seed"])]
    return runs[keep]


# ---------------------------------------------------------------- running it
class _Worker:
    """Picks this worker's next run in priority order: task by task, and within a task method
    by method, the lr runs then (once the method's bracket is final, all shards) its main grid
    at the selected lr; a worker whose share of a task is done while others still run its
    last lr runs goes on to the next task meanwhile."""

    def __init__(self, spec, tasks, phases, dirs, shard, profile, figures_dir, overrides):
        self.spec, self.tasks, self.phases, self.dirs = spec, tasks, phases, dirs
        self.k, self.n = shard or (0, 1)
        self.profile, self.figures_dir, self.overrides = profile, figures_dir, overrides
        self.finished = set()  # run ids known complete or failed (that never changes back)
        self.busy = set()  # run ids another live worker has claimed (skipped for now)
        self.chosen = {}  # task -> {method: choice}

    def _todo(self, cfgs, share=True):
        """The first config not finished yet: of this worker's share (not claimed by another
        worker), or of all of them."""
        for c in (cfgs[self.k::self.n] if share else cfgs):
            if c.run_id in self.finished or (share and c.run_id in self.busy):
                continue
            h = _stored(c)
            if h is not None and h.get("status") in ("complete", "failed"):
                self.finished.add(c.run_id)
                continue
            return c
        return None

    def _choices(self, task) -> dict:
        """{task: {method: choice}} of the methods selected so far ({} if none); cached once
        every bracket of the task is final."""
        if task not in self.chosen:
            if "lr" in self.phases:  # 'all': select from the logs as the brackets close
                sel = select_lrs(self.dirs["lr"], self.spec, self.tasks, self.figures_dir,
                                 self.profile, **self.overrides)  # the table so far, every task
                choice, final = sel["choices"].get(task), task not in sel["pending"]
            else:
                choice, final = read_selection(self.figures_dir).get(task), False
            if not final:
                return {task: choice} if choice else {}
            self.chosen[task] = choice
        return {task: self.chosen[task]} if self.chosen[task] else {}

    def next(self):
        """(next config or None, whether this worker waits on other workers' lr runs). Per
        task, method by method in the spec's order: the method's lr runs, then (once its
        bracket is final) its main grid, so a study cut short has answered its first methods
        at every seed. A method whose last lr runs other workers hold is passed over meanwhile."""
        waiting = False
        for task in self.tasks:
            lr_cfgs = (lr_selection_configs(self.spec, task, self.dirs["lr"], self.profile,
                                            **self.overrides) if "lr" in self.phases else [])
            main = []
            if "main" in self.phases:
                chosen = self._choices(task)
                if chosen or "lr" not in self.phases:  # main alone needs a selection
                    main = study_configs(self.spec, chosen, tasks=[task],
                                         logs_dir=self.dirs["main"], profile=self.profile,
                                         **self.overrides)
            rank = {m: i for i, m in enumerate(self.spec.methods)}
            queue = sorted(lr_cfgs + main, key=lambda c: rank[method_of(asdict(c))])  # stable
            cfg = self._todo(queue)
            if cfg is not None:
                return cfg, waiting
            if "main" in self.phases and self._todo(lr_cfgs, share=False) is not None:
                waiting = True  # other workers' lr runs decide the rest of this task
        return None, waiting


def work(spec: Study = STUDY, tasks=None, phases=("lr", "main"), dirs=None, shard=None,
         deadline: float | None = None, profile: str = "cpu", figures_dir: str = FIGURES,
         poll_s: float = 5.0, **overrides) -> list[dict]:
    """Run this worker's share of the study in priority order, one run at a time, until nothing
    is left or the ``deadline`` (a time.time() value) passes: no run is launched after it.
    Resumable: complete and failed runs are skipped, killed ones resume. Workers share the
    study either by ``shard=(k, n)`` (n workers, each its own k) or, without shards, by the
    sweep's run claims: each takes the next run no live worker holds, so workers can join at
    any time. Returns run_configs' summaries of the runs this worker looked at."""
    from .sweep import run_configs

    tasks = tuple(tasks or spec.tasks)
    dirs = {**LOGS, **(dirs or {})}
    worker = _Worker(spec, tasks, phases, dirs, shard, profile, figures_dir, overrides)
    done = []
    while True:
        if deadline is not None and time.time() >= deadline:
            print("study: deadline reached, no new runs launched", flush=True)
            return done
        cfg, waiting = worker.next()
        if cfg is None and not waiting and not worker.busy:
            if phases == ("lr", "main"):  # the final selection table, every task
                select_lrs(dirs["lr"], spec, tasks, figures_dir, profile, **overrides)
            return done
        if cfg is None:  # other workers still run what is left (or what it needs): look again
            worker.busy.clear()
            time.sleep(poll_s)
            continue
        res = run_configs([cfg])
        done += res
        status = res[0]["status"] if res else None
        if status in ("complete", "failed"):
            worker.finished.add(cfg.run_id)  # also a crash that left no log: not retried here
        elif status == "locked":  # another live worker runs it: take the next one
            worker.busy.add(cfg.run_id)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m pipeline.study",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=["lr", "select", "main", "all"])
    p.add_argument("--tasks", nargs="+", default=None, help="default: the spec's, in priority "
                                                            "order")
    p.add_argument("--shard", type=parse_shard, default=None, metavar="K/N",
                   help="this worker's share: every N-th run from the K-th")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="launch no run after this many seconds")
    p.add_argument("--logs-dir", default=LOGS["main"], help="main grid logs")
    p.add_argument("--lr-logs-dir", default=LOGS["lr"], help="lr-selection logs")
    p.add_argument("--figures-dir", default=FIGURES, help="where lr_selection.{md,json} go")
    p.add_argument("--glue-dir", default=None, help="GLUE folder (default: $GLUE_DIR, then "
                                                    "../shared/glue)")
    p.add_argument("--smoke", action="store_true", help="the tiny study (tests, dry runs)")
    p.add_argument("--gpu", action="store_true", help="GPU profile: 10 seeds, bf16 autocast, "
                                                      "no epoch checkpoints")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their status")
    a = p.parse_args(argv)
    spec = SMOKE if a.smoke else STUDY
    unknown = [t for t in a.tasks or () if t not in spec.tasks and t not in TASKS]
    if unknown:
        p.error(f"--tasks {unknown}: not in the study; use some of {list(TASKS)}")
    return a, spec


def main(argv=None) -> int:
    a, spec = parse_args(argv)
    tasks = tuple(a.tasks or spec.tasks)
    profile = "gpu" if a.gpu else "cpu"
    overrides = {"glue_dir": a.glue_dir} if a.glue_dir else {}
    dirs = {"lr": a.lr_logs_dir, "main": a.logs_dir}
    if a.phase == "select":
        sel = select_lrs(a.lr_logs_dir, spec, tasks, a.figures_dir, profile, **overrides)
        print(selection_markdown(sel))
        return 0
    if a.dry_run:
        from .sweep import run_configs

        cfgs = [c for t in tasks for c in lr_selection_configs(spec, t, a.lr_logs_dir, profile,
                                                               **overrides)]
        if a.phase in ("main", "all"):
            try:
                chosen = read_selection(a.figures_dir)
                waiting = [t for t in tasks if not chosen.get(t)]
                if waiting:
                    print(f"main grid: no lrs selected yet for {', '.join(waiting)} (its lr "
                          f"runs come first)")
                cfgs += study_configs(spec, chosen, tasks=[t for t in tasks if chosen.get(t)],
                                      logs_dir=a.logs_dir, profile=profile, **overrides)
            except FileNotFoundError as e:
                print(f"main grid: {e}")
        run_configs(cfgs, dry_run=True, shard=a.shard)
        return 0
    phases = {"lr": ("lr",), "main": ("main",), "all": ("lr", "main")}[a.phase]
    deadline = None if a.deadline_s is None else time.time() + a.deadline_s
    res = work(spec, tasks, phases, dirs, a.shard, deadline, profile, a.figures_dir,
               **overrides)
    ran = [r for r in res if not r["skipped"]]
    failed = [r["run_id"] for r in ran if r["status"] == "failed"]
    print(f"study {a.phase}: {len(ran)} runs made, {len(failed)} failed {failed or ''}".rstrip(),
          flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
