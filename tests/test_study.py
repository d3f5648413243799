"""The study spec, lr selection and the worker's run order (pipeline.study). Runs are faked
(a log written in place of training) so the order and the selection logic are tested fast;
the real runs are exercised by the GPU kit's dry run (test_gpu_kit.py)."""
import json
import math
from dataclasses import asdict, replace

import pytest

from pipeline import study as S
from pipeline.methods import METHODS, method_of


def test_spec_is_the_protocol():
    spec = S.STUDY
    assert set(spec.methods) == set(METHODS)
    assert spec.tasks[:2] == ("mrpc", "cola") and set(spec.tasks) == set(S.EPOCHS)
    selection = {s for p in ("cpu", "gpu") for t in spec.tasks for s in spec.sel_seeds(p, t)}
    assert not selection & {s for p in S.STUDY_SEEDS.values() for s in p}
    assert all(spec.sel_seeds("gpu", t) == (100, 101) for t in spec.tasks)
    # the CPU study adds the second selection seed task by task: one or both, never others
    assert {spec.sel_seeds("cpu", t) for t in spec.tasks} <= {(100,), (100, 101)}
    assert len(spec.study_seeds["cpu"]) == 5 and len(spec.study_seeds["gpu"]) == 10
    for m, grid in spec.lr_grids.items():  # sorted, >= 3 points, log-spaced within 3x steps
        assert list(grid) == sorted(grid) and len(grid) >= 3, m
        assert all(1 < b / a <= 3.34 for a, b in zip(grid, grid[1:])), m
    assert spec.lr_grids["orthogonal"][0] == 1e-3 and spec.lr_grids["orthogonal"][-1] == 2e-2


def test_configs_carry_the_spec(tmp_path):
    lr_dir = str(tmp_path / "lr")  # not logs/study_lr: its committed runs grow brackets
    assert S.LOGS["lr"] == "logs/study_lr"
    cfgs = S.lr_selection_configs(S.STUDY, "mrpc", lr_dir)
    # no logs yet: the middle three lrs of every grid, at each of the task's selection seeds
    seeds = S.STUDY.sel_seeds("cpu", "mrpc")
    assert seeds[0] == 100 and not set(seeds) & set(S.STUDY_SEEDS["cpu"])
    assert len(cfgs) == len(seeds) * sum(min(3, len(g)) for g in S.LR_GRIDS.values())
    assert {c.lr for c in cfgs if method_of(asdict(c)) == "orthogonal"} == {2e-3, 5e-3, 1e-2}
    assert all(c.length_grouped for c in cfgs) and {c.seed for c in cfgs} == set(seeds)
    assert len({c.run_id for c in cfgs}) == len(cfgs)
    assert {method_of(asdict(c)) for c in cfgs} == set(METHODS)
    assert all(c.val_fraction == 0.1 and c.epochs == 5 and c.eval_every_steps == 25 and
               c.logs_dir == lr_dir and c.mixed_precision == "no" for c in cfgs)
    sst2 = S.lr_selection_configs(S.STUDY, "sst2", lr_dir, profile="gpu")
    assert {c.seed for c in sst2} == {100, 101}
    assert all(c.subsample_train == 10_000 and c.epochs == 2 and c.mixed_precision == "bf16"
               and not c.checkpoint for c in sst2)
    chosen = {m: g[1] for m, g in S.LR_GRIDS.items()}
    main = S.study_configs(S.STUDY, {"mrpc": chosen}, tasks=["mrpc"])
    per_method = {m: sorted(c.seed for c in main if method_of(asdict(c)) == m) for m in METHODS}
    assert per_method["orthogonal"] == [0, 1, 2, 3, 4] and per_method["full"] == [0, 1, 2]
    assert [c.seed for c in main] == sorted(c.seed for c in main)  # seed by seed
    gpu = S.study_configs(S.STUDY, {"mrpc": chosen}, tasks=["mrpc"], profile="gpu")
    assert len(gpu) == 10 * len(METHODS)
    with pytest.raises(ValueError, match="no lrs selected for cola"):
        S.study_configs(S.STUDY, {"mrpc": chosen}, tasks=["cola"])


# a small spec: one task, three methods, three lrs, two selection seeds
# (lr_start=None: every lr of the grid, no bracket search, so nothing past the grid)
SPEC = replace(S.SMOKE, methods=("orthogonal", "svd", "full"), lr_start=None,
               lr_grids={"orthogonal": (1e-3, 3e-3, 1e-2), "svd": (1e-3, 3e-3, 1e-2),
                         "full": (1e-5, 3e-5, 1e-4)},
               selection_seeds={"cpu": (100, 101), "gpu": (100, 101)},
               study_seeds={"cpu": (0, 1), "gpu": (0, 1)},
               reference_seeds={"cpu": (0,), "gpu": (0,)})
# val metric of a fake run: orthogonal peaks at 3e-3 (inside), svd rises to the top edge
VAL = {"orthogonal": {1e-3: 0.70, 3e-3: 0.80, 1e-2: 0.75}, "svd": {1e-3: 0.6, 3e-3: 0.7, 1e-2: 0.8},
       "full": {1e-5: 0.7, 3e-5: 0.9, 1e-4: 0.8}}


def fake_log(cfg, status="complete", value=None):
    m = method_of(asdict(cfg))
    value = VAL[m][cfg.lr] + (cfg.seed % 100) * 1e-3 if value is None else value
    path = S.L.log_path(cfg.logs_dir, cfg.task, cfg.run_id)
    S.L.atomic_write_json({"status": status, "config": asdict(cfg), "main_metric": "accuracy",
                           "selection": {"metric": "accuracy", "value": value, "step": 1},
                           "adapter_stats": {"ax_rms": 0.5}}, path)


def test_select_lrs_picks_the_best_mean_and_flags_the_edge(tmp_path):
    lr_dir, fig = str(tmp_path / "lr"), tmp_path / "fig"
    cfgs = S.lr_selection_configs(SPEC, "mrpc", lr_dir)
    for c in cfgs[:-1]:
        fake_log(c)
    sel = S.select_lrs(lr_dir, SPEC, figures_dir=str(fig))  # full's bracket is still open
    assert set(sel["choices"]["mrpc"]) == {"orthogonal", "svd"}
    assert sel["pending"] == {"mrpc": f"{len(cfgs) - 1}/{len(cfgs)} lr runs finished "
                                      "(brackets so far); open: full"}
    assert {(r["method"], r["lr"]) for r in sel["rows"] if r["method"] == "full"} == {
        ("full", 1e-5), ("full", 3e-5)}  # rows of the open bracket's finished lrs, no choice
    assert not any(r["chosen"] for r in sel["rows"] if r["method"] == "full")
    assert "not selected yet" in (fig / "lr_selection.md").read_text()
    fake_log(cfgs[-1], status="failed", value=float("nan"))  # full at 1e-4, seed 101 diverged
    sel = S.select_lrs(lr_dir, SPEC, figures_dir=str(fig))
    ch = sel["choices"]["mrpc"]
    assert ch["orthogonal"]["lr"] == 3e-3 and ch["orthogonal"]["edge"] is None
    assert math.isclose(ch["orthogonal"]["val"], 0.8005)
    assert ch["svd"]["lr"] == 1e-2 and ch["svd"]["edge"] == "highest"
    assert "extend the grid" in ch["svd"]["note"]
    assert ch["full"]["lr"] == 3e-5
    row = next(r for r in sel["rows"] if r["method"] == "full" and r["lr"] == 1e-4)
    assert row["mean"] is None and row["n_failed"] == 1
    assert json.loads((fig / "lr_selection.json").read_text())["choices"] == json.loads(
        json.dumps(sel["choices"]))
    md = (fig / "lr_selection.md").read_text()
    assert "extend the grid" in md and "**0.8005**" in md
    main = S.study_configs(SPEC, S.read_selection(str(fig)), tasks=["mrpc"])
    assert {(method_of(asdict(c)), c.lr) for c in main} == {
        ("orthogonal", 3e-3), ("svd", 1e-2), ("full", 3e-5)}


GRID = (1e-3, 2e-3, 5e-3, 1e-2, 2e-2)


@pytest.mark.parametrize("vals, expected", [
    ({}, (2e-3, 5e-3, 1e-2)),  # nothing ran: the middle three
    ({2e-3: 0.7, 5e-3: 0.8, 1e-2: None}, (2e-3, 5e-3, 1e-2)),  # one unfinished: wait
    ({2e-3: 0.7, 5e-3: 0.8, 1e-2: 0.75}, (2e-3, 5e-3, 1e-2)),  # peak inside: done
    ({2e-3: 0.8, 5e-3: 0.7, 1e-2: 0.6}, (1e-3, 2e-3, 5e-3, 1e-2)),  # best lowest: one below
    # best at the grid's lowest: the grid is extended, 1-2-5, at most two lrs past it
    ({1e-3: 0.9, 2e-3: 0.8, 5e-3: 0.7, 1e-2: 0.6}, (5e-4,) + GRID[:4]),
    ({5e-4: 0.8, 1e-3: 0.9, 2e-3: 0.8, 5e-3: 0.7, 1e-2: 0.6}, (5e-4,) + GRID[:4]),  # done
    ({2e-4: 0.99, 5e-4: 0.95, 1e-3: 0.9, 2e-3: 0.8, 5e-3: 0.7, 1e-2: 0.6},
     (2e-4, 5e-4) + GRID[:4]),  # two past the grid: done (flagged as the edge)
    ({2e-3: 0.6, 5e-3: 0.7, 1e-2: 0.8, 2e-2: 0.9}, GRID[1:] + (5e-2,)),  # and above
    ({2e-3: 0.6, 5e-3: 0.7, 1e-2: 0.8}, GRID[1:]),  # best highest: one above, not yet run
    ({2e-3: 0.6, 5e-3: 0.7, 1e-2: 0.8, 2e-2: 0.75}, GRID[1:]),  # peak at 1e-2: done
    ({2e-3: math.nan, 5e-3: math.nan, 1e-2: math.nan}, GRID[:4]),  # all failed: go lower
    ({lr: math.nan for lr in (2e-4, 5e-4) + GRID}, (2e-4, 5e-4) + GRID[:4]),  # ...to the cap
    ({2e-3: 0.8, 5e-3: 0.8, 1e-2: 0.7}, GRID[:4]),  # tie: the smaller lr is the best
])
def test_lr_bracket_grows_towards_the_optimum(vals, expected):
    assert S.lr_bracket(GRID, vals) == expected


def test_lr_bracket_short_grids_and_no_start_run_whole():
    assert S.lr_bracket(GRID[:3], {}) == GRID[:3]
    assert S.lr_bracket(GRID[:3], dict(zip(GRID[:3], (0.9, 0.8, 0.7)))) == (5e-4,) + GRID[:3]
    assert S.lr_bracket(GRID, {}, start=None) == GRID
    assert S.lr_bracket((3e-5,), {3e-5: 0.9}) == (3e-5,)  # one lr: nowhere to go


def test_extended_grid_follows_the_1_2_5_series():
    assert S.extended_grid(GRID) == (2e-4, 5e-4) + GRID + (5e-2, 1e-1)
    assert S.extended_grid((3e-4, 1e-3, 3e-3), beyond=1) == (2e-4, 3e-4, 1e-3, 3e-3, 5e-3)
    assert S.extended_grid((2e-5, 5e-5, 1e-4, 2e-4)) == (5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4,
                                                         5e-4, 1e-3)


def test_search_space_is_what_a_bracket_can_reach():
    assert S.search_space(GRID) == S.extended_grid(GRID)
    assert S.search_space(GRID, start=None) == GRID  # the whole grid runs, no extension
    assert S.search_space((3e-5,)) == (3e-5,)
    best_at_the_cap = {lr: (1.0 if lr == min(S.search_space(GRID)) else 0.5)
                       for lr in S.search_space(GRID)}
    assert S.lr_bracket(GRID, best_at_the_cap)[0] == min(S.search_space(GRID))


def test_select_flags_a_choice_past_the_grid_and_at_the_cap(tmp_path):
    spec = replace(SPEC, methods=("orthogonal", "svd"), lr_start=3,
                   lr_grids={"orthogonal": GRID, "svd": GRID},
                   selection_seeds={"cpu": (100,), "gpu": (100,)})
    vals = {"orthogonal": {5e-4: 0.95, 1e-3: 0.9, 2e-3: 0.8, 5e-3: 0.7},  # peak at 5e-4
            "svd": dict(zip((2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1), (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)))}
    lr_dir = str(tmp_path / "lr")
    for _ in range(4):  # run every bracket until none grows
        for c in S.lr_selection_configs(spec, "mrpc", lr_dir):
            m = method_of(asdict(c))
            fake_log(c, value=vals[m].get(c.lr, 0.1 if m == "orthogonal" else 0.0))
    ch = S.select_lrs(lr_dir, spec, figures_dir=None)["choices"]["mrpc"]
    assert ch["orthogonal"]["lr"] == 5e-4 and ch["orthogonal"]["edge"] is None
    assert "outside the planned grid" in ch["orthogonal"]["note"]
    assert ch["svd"]["lr"] == 0.1 and ch["svd"]["edge"] == "highest"
    assert "extend the grid by hand" in ch["svd"]["note"]


def fake_curve_log(cfg, vals):
    """A fake run with the val curve ``vals`` (val-best its max, final its last)."""
    fake_log(cfg, value=max(vals))
    path = S.L.log_path(cfg.logs_dir, cfg.task, cfg.run_id)
    h = S.L.read_log(path)
    h.update(evals=[{"step": i, "accuracy": v} for i, v in enumerate(vals)],
             final={"accuracy": vals[-1]})
    S.L.atomic_write_json(h, path)


def test_select_checks_its_rule_against_smoother_ones(tmp_path):
    """A spike at one evaluation wins the protocol's val-best rule; the last-step and the
    last-quarter-mean rules pick the steadier lr, and the markdown says which differ."""
    spec = replace(SPEC, methods=("orthogonal", "svd"), selection_seeds={"cpu": (100,)})
    curves = {"orthogonal": {1e-3: [0.5, 0.9, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5],  # a spike
                             3e-3: [0.5, 0.6, 0.7, 0.7, 0.7, 0.7, 0.7, 0.72],
                             1e-2: [0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.65, 0.6]},
              "svd": {1e-3: [0.5, 0.6, 0.7, 0.8], 3e-3: [0.5, 0.7, 0.75, 0.7],
                      1e-2: [0.6, 0.6, 0.6, 0.6]}}
    lr_dir = str(tmp_path / "lr")
    for c in S.lr_selection_configs(spec, "mrpc", lr_dir):
        fake_curve_log(c, curves[method_of(asdict(c))][c.lr])
    sel = S.select_lrs(lr_dir, spec, figures_dir=None)
    ch = sel["choices"]["mrpc"]
    assert ch["orthogonal"]["lr"] == 1e-3  # the spike
    assert ch["orthogonal"]["other_rules"] == {"final": 3e-3, "late": 3e-3}
    assert ch["svd"]["lr"] == 1e-3 and ch["svd"]["other_rules"] == {"final": 1e-3, "late": 1e-3}
    row = next(r for r in sel["rows"] if r["method"] == "svd" and r["lr"] == 3e-3)
    assert row["rules"] == {"final": 0.7, "late": 0.7}  # last quarter of 4 evals: the last one
    md = S.selection_markdown(sel)
    assert "1 of 2 choices agree with the last-quarter mean" in md
    assert "| mrpc | LoRA-FA orthogonal | 0.001 | **0.003** | **0.003** |" in md
    assert "| mrpc | LoRA-FA svd (S in B) | 0.001 | 0.001 | 0.001 |" in md
    # logs without eval curves (older or faked runs): no check rather than a wrong one
    for c in S.lr_selection_configs(spec, "mrpc", lr_dir):
        fake_log(c)
    assert "Would another rule" not in S.selection_markdown(S.select_lrs(lr_dir, spec,
                                                                         figures_dir=None))


def test_a_second_selection_seed_reopens_a_task_until_it_finishes(tmp_path):
    """Selection seeds per task: adding seed 101 to a selected task puts it back to pending
    (no stale choice for the main grid), and once 101 finishes the mean over both seeds
    decides, which here moves orthogonal's lr."""
    one = replace(SPEC, selection_seeds={"cpu": {"mrpc": (100,)}})
    two = replace(SPEC, selection_seeds={"cpu": {"mrpc": (100, 101)}})
    lr_dir = str(tmp_path / "lr")
    for c in S.lr_selection_configs(one, "mrpc", lr_dir):
        fake_log(c)
    assert S.select_lrs(lr_dir, one, figures_dir=None)["choices"]["mrpc"]["orthogonal"]["lr"] \
        == 3e-3
    sel = S.select_lrs(lr_dir, two, figures_dir=None)
    assert not sel["choices"]
    assert sel["pending"]["mrpc"].startswith("9/18 lr runs finished")
    todo = [c for c in S.lr_selection_configs(two, "mrpc", lr_dir) if not S._stored(c)]
    assert {c.seed for c in todo} == {101} and len(todo) == 9
    for c in todo:  # seed 101 favours orthogonal's 1e-2: mean 0.85 against 3e-3's 0.80
        fake_log(c, value=0.95 if (method_of(asdict(c)), c.lr) == ("orthogonal", 1e-2)
                 else None)
    sel = S.select_lrs(lr_dir, two, figures_dir=None)
    assert not sel["pending"] and sel["choices"]["mrpc"]["orthogonal"]["lr"] == 1e-2
    assert sel["choices"]["mrpc"]["orthogonal"]["val"] == pytest.approx(0.85)
    assert "Selection seeds: mrpc 100, 101." in S.selection_markdown(sel)
    with pytest.raises(ValueError, match="no selection seeds for task 'cola'.*SELECTION_SEEDS"):
        two.sel_seeds("cpu", "cola")


def test_work_extends_a_bracket_and_selects_inside_it(tmp_path, fake_runs, monkeypatch):
    """A 5-lr grid whose val metric rises to 1e-2 then falls: the worker runs the middle
    three, then 2e-2 (never 1e-3), selects 1e-2 and runs the main grid there."""
    monkeypatch.setitem(VAL, "orthogonal", {1e-3: 0.5, 2e-3: 0.6, 5e-3: 0.7, 1e-2: 0.8,
                                            2e-2: 0.75})
    spec = replace(SPEC, methods=("orthogonal",), lr_grids={"orthogonal": GRID}, lr_start=3,
                   selection_seeds={"cpu": (100,), "gpu": (100,)})
    dirs = {"lr": str(tmp_path / "lr"), "main": str(tmp_path / "main")}
    S.work(spec, dirs=dirs, figures_dir=str(tmp_path / "fig"))
    lr_runs = [r for r in fake_runs if r.endswith("s100")]
    assert lr_runs == [f"mrpc-lorafa-orthogonal-r8-lr{x}-n64-lg-s100"
                       for x in ("2e-03", "5e-03", "1e-02", "2e-02")]
    assert fake_runs[len(lr_runs):] == ["mrpc-lorafa-orthogonal-r8-lr1e-02-n64-lg-s0",
                                        "mrpc-lorafa-orthogonal-r8-lr1e-02-n64-lg-s1"]
    ch = S.read_selection(str(tmp_path / "fig"))["mrpc"]["orthogonal"]
    assert ch["lr"] == 1e-2 and ch["edge"] is None


def test_selection_file_keeps_the_tasks_a_worker_does_not_run(tmp_path):
    """Selecting for one task (a worker run with --tasks) rewrites the file with every task's
    choices, so a main-grid worker reading it back still finds the others."""
    spec = replace(SPEC, tasks=("mrpc", "rte"), methods=("orthogonal",),
                   epochs={"mrpc": 1, "rte": 1})
    lr_dir, fig = str(tmp_path / "lr"), str(tmp_path / "fig")
    for task in spec.tasks:
        for c in S.lr_selection_configs(spec, task, lr_dir):
            fake_log(c)
    assert set(S.select_lrs(lr_dir, spec, ["rte"], fig)["choices"]) == {"rte"}
    assert set(S.read_selection(fig)) == {"mrpc", "rte"}
    assert "| mrpc | LoRA-FA orthogonal | 0.003 |" in (tmp_path / "fig" / "lr_selection.md"
                                                      ).read_text()


def test_every_lr_failed_leaves_the_method_out(tmp_path):
    lr_dir = str(tmp_path / "lr")
    for c in S.lr_selection_configs(SPEC, "mrpc", lr_dir):
        failed = method_of(asdict(c)) == "svd"
        fake_log(c, status="failed" if failed else "complete")
    ch = S.select_lrs(lr_dir, SPEC, figures_dir=None)["choices"]["mrpc"]
    assert ch["svd"]["lr"] is None and "every lr failed" in ch["svd"]["note"]
    main = S.study_configs(SPEC, {"mrpc": ch}, tasks=["mrpc"])
    assert "svd" not in {method_of(asdict(c)) for c in main}


def test_read_selection_missing_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="pipeline.study select"):
        S.read_selection(str(tmp_path))


class Order(list):
    pass


@pytest.fixture
def fake_runs(monkeypatch):
    """run_configs replaced by one that writes a complete log and records the order."""
    import pipeline.sweep

    order = Order()
    order.held_by_another = set()

    def run_configs(configs, *a, **k):
        c, = configs
        if c.run_id in order.held_by_another:  # another worker holds it (and finishes it)
            order.held_by_another.discard(c.run_id)
            fake_log(c)
            return [{"run_id": c.run_id, "status": "locked", "skipped": True}]
        order.append(c.run_id)
        fake_log(c)
        return [{"run_id": c.run_id, "status": "complete", "skipped": False}]

    monkeypatch.setattr(pipeline.sweep, "run_configs", run_configs)
    return order


def test_work_runs_each_method_lr_then_main_in_priority_order(tmp_path, fake_runs):
    dirs = {"lr": str(tmp_path / "lr"), "main": str(tmp_path / "main")}
    S.work(SPEC, dirs=dirs, figures_dir=str(tmp_path / "fig"))
    lr_ids = [c.run_id for c in S.lr_selection_configs(SPEC, "mrpc", dirs["lr"])]

    def lr_of(m):  # a method's lr runs, seed by seed
        return [r for r in lr_ids if f"-{m}-" in r]

    assert fake_runs == (
        lr_of("orthogonal") + ["mrpc-lorafa-orthogonal-r8-lr3e-03-n64-lg-s0",
                               "mrpc-lorafa-orthogonal-r8-lr3e-03-n64-lg-s1"]
        + lr_of("svd") + ["mrpc-lorafa-svd-r8-lr1e-02-splitb-n64-lg-s0",
                          "mrpc-lorafa-svd-r8-lr1e-02-splitb-n64-lg-s1"]
        + [r for r in lr_ids if r.startswith("mrpc-full-")] + ["mrpc-full-lr3e-05-n64-lg-s0"])
    assert len(lr_ids) == 3 * 3 * 2 and lr_of("orthogonal")[0].endswith("lr1e-03-n64-lg-s100")
    assert (tmp_path / "fig" / "lr_selection.md").is_file()
    fake_runs.clear()
    S.work(SPEC, dirs=dirs, figures_dir=str(tmp_path / "fig"))  # resumed: nothing left
    assert fake_runs == []


def by_method(ids):
    """Run ids in the worker's order: method by method (stable)."""
    rank = {m: i for i, m in enumerate(SPEC.methods)}
    return sorted(ids, key=lambda r: rank["full" if r.startswith("mrpc-full") else
                                           r.split("-")[2]])


def test_work_shards_split_without_overlap_and_deadline_stops(tmp_path, fake_runs):
    dirs = {"lr": str(tmp_path / "lr"), "main": str(tmp_path / "main")}
    S.work(SPEC, dirs=dirs, deadline=0.0, figures_dir=None)
    assert fake_runs == []  # a passed deadline launches nothing
    S.work(SPEC, phases=("lr",), dirs=dirs, shard=(0, 2), figures_dir=None)
    first = list(fake_runs)
    lr_ids = [c.run_id for c in S.lr_selection_configs(SPEC, "mrpc", dirs["lr"])]
    assert first == by_method(lr_ids)[0::2]
    # worker 1 of 2, 'all': its lr share and its share of the main grid; then worker 0's
    # 'all' finds only main runs left: together every run exactly once
    fake_runs.clear()
    S.work(SPEC, dirs=dirs, shard=(1, 2), figures_dir=str(tmp_path / "fig"))
    second = list(fake_runs)
    assert set(second) >= set(lr_ids) - set(first) and not set(first) & set(second)
    fake_runs.clear()
    S.work(SPEC, dirs=dirs, shard=(0, 2), figures_dir=str(tmp_path / "fig"))
    runs = first + second + list(fake_runs)
    assert len(runs) == len(set(runs)) == len(lr_ids) + 5  # 2 + 2 + 1 main runs


def test_work_without_shards_skips_runs_another_worker_claimed(tmp_path, fake_runs):
    dirs = {"lr": str(tmp_path / "lr"), "main": str(tmp_path / "main")}
    lr_ids = [c.run_id for c in S.lr_selection_configs(SPEC, "mrpc", dirs["lr"])]
    held = {lr_ids[0], lr_ids[5]}
    fake_runs.held_by_another.update(held)
    S.work(SPEC, dirs=dirs, figures_dir=None, poll_s=0.01)
    assert not held & set(fake_runs) and set(fake_runs) >= set(lr_ids) - held
    assert len(fake_runs) == len(set(fake_runs)) == len(lr_ids) - 2 + 5  # and the main grid


def test_work_runs_main_grids_while_another_worker_ends_a_bracket(tmp_path, monkeypatch):
    """orthogonal's last lr run is another worker's: meanwhile this worker goes on (svd's lr
    runs and main grid, no idle polling); once orthogonal's bracket closes its main grid comes
    first again, ahead of the later methods."""
    import time

    import pipeline.sweep

    dirs = {"lr": str(tmp_path / "lr"), "main": str(tmp_path / "main")}
    cfgs = S.lr_selection_configs(SPEC, "mrpc", dirs["lr"])
    lr = by_method([c.run_id for c in cfgs])
    held = next(c for c in cfgs if c.run_id == lr[5])
    assert held.run_id == "mrpc-lorafa-orthogonal-r8-lr1e-02-n64-lg-s101"
    order = []

    def run_configs(configs, *a, **k):
        c, = configs
        if c.run_id == held.run_id:
            return [{"run_id": c.run_id, "status": "locked", "skipped": True}]
        order.append(c.run_id)
        fake_log(c)
        if sum(not r.endswith(("s100", "s101")) for r in order) == 2:
            fake_log(held)  # the other worker finishes orthogonal's bracket now
        return [{"run_id": c.run_id, "status": "complete", "skipped": False}]

    monkeypatch.setattr(pipeline.sweep, "run_configs", run_configs)
    S.work(SPEC, dirs=dirs, figures_dir=None, poll_s=0.01, deadline=time.time() + 60)
    assert order == (lr[:5] + lr[6:12] + ["mrpc-lorafa-svd-r8-lr1e-02-splitb-n64-lg-s0",
                                          "mrpc-lorafa-svd-r8-lr1e-02-splitb-n64-lg-s1",
                                          "mrpc-lorafa-orthogonal-r8-lr3e-03-n64-lg-s0",
                                          "mrpc-lorafa-orthogonal-r8-lr3e-03-n64-lg-s1"]
                     + lr[12:] + ["mrpc-full-lr3e-05-n64-lg-s0"])


def test_dry_run_of_a_task_without_selected_lrs_lists_only_its_lr_runs(tmp_path, capsys):
    """`study all --tasks rte --dry-run` while only MRPC has lrs: RTE's lr runs, a line saying
    its main grid waits, and none of MRPC's runs (an empty task list is not 'every task')."""
    lr_dir, fig, main = (str(tmp_path / d) for d in ("lr", "fig", "main"))
    for c in S.lr_selection_configs(S.SMOKE, "mrpc", lr_dir):
        fake_log(c, value=0.7)
    S.select_lrs(lr_dir, S.SMOKE, ["mrpc"], fig)
    assert S.study_configs(S.SMOKE, S.read_selection(fig), tasks=[], logs_dir=main) == []
    assert S.main(["all", "--smoke", "--tasks", "rte", "--dry-run", "--figures-dir", fig,
                   "--lr-logs-dir", lr_dir, "--logs-dir", main]) == 0
    out = capsys.readouterr().out
    assert "main grid: no lrs selected yet for rte" in out
    assert "rte-lorafa-orthogonal" in out and "mrpc-" not in out


def test_cli_rejects_a_task_outside_the_study(capsys):
    with pytest.raises(SystemExit):
        S.main(["lr", "--tasks", "mnli"])
    assert "not in the study" in capsys.readouterr().err


def test_run_task_runs_methods_at_the_selected_lrs_seed_by_seed(tmp_path, monkeypatch):
    import pipeline.sweep

    ran = []
    monkeypatch.setattr(pipeline.sweep, "run_configs", lambda cfgs: ran.extend(cfgs) or [])
    fig = tmp_path / "fig"
    with pytest.raises(FileNotFoundError, match="lr_selection.json not found"):
        S.run_task("mrpc", spec=SPEC, figures_dir=str(fig))
    S.write_selection({"selection_seeds": [100], "rows": [], "pending": {},
                       "choices": {"mrpc": {"orthogonal": {"lr": 3e-3, "note": ""},
                                            "svd": {"lr": 1e-2, "note": ""},
                                            "full": {"lr": 3e-5, "note": ""}}}}, str(fig))
    S.run_task("mrpc", spec=SPEC, figures_dir=str(fig), logs_dir=str(tmp_path / "logs"),
               epochs=None, subsample_dev=None, batch_size=8)  # None values keep the spec's
    assert [(method_of(asdict(c)), c.seed, c.lr) for c in ran] == [
        ("orthogonal", 0, 3e-3), ("svd", 0, 1e-2), ("full", 0, 3e-5),
        ("orthogonal", 1, 3e-3), ("svd", 1, 1e-2)]  # references: fewer seeds
    assert all(c.batch_size == 8 and c.epochs == SPEC.epochs["mrpc"] for c in ran)
    ran.clear()
    S.run_task("mrpc", ["svd"], lrs={"svd": 2e-3}, seeds=[7], spec=SPEC, epochs=3)
    assert [(c.lr, c.seed, c.epochs, c.svd_split) for c in ran] == [(2e-3, 7, 3, "b")]
    with pytest.raises(ValueError, match=r"no lr for \['gradient'\] on mrpc"):
        S.run_task("mrpc", ["gradient"], lrs={"svd": 1e-3}, spec=SPEC)


def test_gradient_methods_are_told_apart_also_in_logs_that_predate_centring():
    assert method_of({"variant": "lorafa", "init": "gradient"}) == "gradient"  # no field: False
    assert method_of({"variant": "lorafa", "init": "gradient",
                      "gradient_center": True}) == "gradient_center"
    cfg = S.run_config(S.STUDY, "mrpc", "gradient_center", 1e-3, 0, "logs/x")
    assert cfg.gradient_center and "gc" in cfg.run_id
    assert S.LR_GRIDS["gradient"][0] < S.LR_GRIDS["orthogonal"][0]  # ~3x the effective step


def test_every_rule_sends_a_tie_to_the_smaller_lr(tmp_path):
    """One tie rule for the bracket, the choice and the rule check: whatever order the lrs
    come in, equal scores go to the smaller lr (RTE's 249-pair val set makes ties common)."""
    assert S.best_lr([(0.6, 1e-2), (0.6, 3e-3), (0.5, 1e-3)]) == 3e-3
    assert S.best_lr([]) is None
    spec = replace(SPEC, methods=("orthogonal",), selection_seeds={"cpu": (100,)})
    lr_dir = str(tmp_path / "lr")
    for c in S.lr_selection_configs(spec, "mrpc", lr_dir):
        fake_curve_log(c, {1e-3: [0.5], 3e-3: [0.6], 1e-2: [0.6]}[c.lr])
    ch = S.select_lrs(lr_dir, spec, figures_dir=None)["choices"]["mrpc"]["orthogonal"]
    assert ch["lr"] == 3e-3 and ch["val"] == 0.6
    assert ch["other_rules"] == {"final": 3e-3, "late": 3e-3}  # 3e-3 and 1e-2 tie in each


def test_lr_figures_keep_only_the_seeds_the_selection_counted(tmp_path):
    """A second selection seed still running on one task stays out of that task's lr
    figures; a task at two seeds keeps both; no selection file: nothing dropped."""
    import pandas as pd

    runs = pd.DataFrame({"task": ["cola", "cola", "sst2", "sst2", "rte"],
                         "seed": [100, 101, 100, 101, 101]})
    assert S.keep_selection_seeds(runs, str(tmp_path)) is runs
    S.write_selection({"selection_seeds": {"cola": [100], "sst2": [100, 101]}, "rows": [],
                       "pending": {}, "choices": {}}, str(tmp_path))
    kept = S.keep_selection_seeds(runs, str(tmp_path))
    assert list(zip(kept["task"], kept["seed"])) == [("cola", 100), ("sst2", 100),
                                                     ("sst2", 101), ("rte", 101)]
    S.write_selection({"selection_seeds": [100], "rows": [], "pending": {}, "choices": {}},
                      str(tmp_path))
    assert set(S.keep_selection_seeds(runs, str(tmp_path))["seed"]) == {100}
