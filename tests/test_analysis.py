"""The analysis frames: columns and groups derived from RunConfig, both log schemas, test at
the val-best checkpoint, pairing by seed, steps to target with censoring, AUC."""
from dataclasses import fields

import numpy as np
import pandas as pd
import pytest

from pipeline import analysis as A
from pipeline.config import NON_SEMANTIC, RunConfig
from synthetic_logs import write_run


@pytest.fixture
def study(tmp_path):
    """Schema-2 MRPC runs: orthogonal (seeds 0-2), svd (S in B, seeds 0-2), gradient
    (seeds 0, 1, 3: seed 3 has no baseline)."""
    write_run(tmp_path, "orthogonal", 0, [0.60, 0.70, 0.70])
    write_run(tmp_path, "orthogonal", 1, [0.60, 0.65, 0.72])
    write_run(tmp_path, "orthogonal", 2, [0.62, 0.68, 0.66])
    write_run(tmp_path, "svd", 0, [0.72, 0.74, 0.73])
    write_run(tmp_path, "svd", 1, [0.66, 0.71, 0.70])
    write_run(tmp_path, "svd", 2, [0.60, 0.61, 0.62])  # never reaches 0.66: censored
    for s in (0, 1, 3):
        write_run(tmp_path, "gradient", s, [0.5, 0.6, 0.7])
    return tmp_path


def test_columns_and_configuration_come_from_runconfig(study):
    semantic = [f.name for f in fields(RunConfig) if f.name not in NON_SEMANTIC]
    assert list(A.CONFIG_COLUMNS) == semantic
    assert list(A.GROUP) == [c for c in semantic if c != "seed"]
    assert {"svd_split", "val_fraction", "split_seed", "gradient_batches"} <= set(A.GROUP)
    runs = A.load_logs(study)
    assert set(A.CONFIG_COLUMNS) <= set(runs.columns)
    assert runs["alpha"].eq(16).all()  # resolved by RunConfig, not left None


def test_results_table_keeps_the_svd_splits_apart(tmp_path):
    # the default grouping once omitted svd_split: sqrt and S-in-B runs became one n=6 cell
    for s in range(3):
        write_run(tmp_path, "svd", s, [0.70], schema=1)
        write_run(tmp_path, "svd_sqrt", s, [0.60], schema=1)
    t = A.results_table(A.load_logs(tmp_path), which="best").set_index("svd_split")
    assert sorted(t.index) == ["b", "sqrt"] and (t["n"] == 3).all()
    assert t.loc["b", "mean"] == pytest.approx(0.70) and t.loc["sqrt", "mean"] == 0.60


def test_schema_2_reports_test_at_the_val_best_step(study):
    runs = A.load_logs(study).set_index("run_id")
    r = runs.loc["mrpc-lorafa-orthogonal-r8-lr5e-03-s1"]
    assert r["protocol"] == "val" and r["method"] == "orthogonal"
    assert r["best_accuracy"] == 0.72 and r["selected_step"] == 30
    assert r["test_accuracy"] == pytest.approx(1 - 2 / 40)  # (3 * 1 + 10) % 11 = 2 rows wrong
    assert r["ax_rms"] == pytest.approx(0.2) and r["predictions"].endswith(".preds.npz")
    p = A.load_predictions(r["predictions"])
    assert p["pred"].shape == (40, 2) and list(p["index"]) == list(range(40))
    t = A.results_table(runs.reset_index(), by="method").set_index("method")
    assert t.loc["orthogonal", "n"] == 3 and "test_accuracy (mean ± std)" in t


def test_pilot_logs_are_labelled_and_have_no_test(tmp_path):
    write_run(tmp_path, "orthogonal", 0, [0.6, 0.7], schema=1)
    runs = A.load_logs(tmp_path)
    assert runs["protocol"].tolist() == ["pilot"] and "test_accuracy" not in runs
    assert runs["val_fraction"].tolist() == [0.0]  # the pilot's legacy value
    with pytest.raises(ValueError, match="pilot logs have no held-out test: use which='best'"):
        A.results_table(runs)
    curves = A.load_curves(tmp_path)
    assert set(curves["metric"]) == {"dev_loss", "accuracy"}
    assert (curves["protocol"] == "pilot").all()


def test_load_logs_reads_several_folders_and_refuses_bad_ones(study, tmp_path_factory):
    pilot = tmp_path_factory.mktemp("pilot")
    write_run(pilot, "orthogonal", 0, [0.6], schema=1)
    runs = A.load_logs([study, str(pilot)])
    assert len(runs) == 10 and (runs["protocol"] == "pilot").sum() == 1
    with pytest.raises(ValueError, match="logs folder .*absent does not exist: check the path"):
        A.load_logs([study, pilot / "absent"])
    (pilot / "mrpc" / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        A.load_logs(pilot)


def test_curve_stats_sample_std(study):
    s = A.curve_stats(A.load_curves(study), "accuracy").set_index(["method", "step"])
    assert s.loc[("orthogonal", 20), "mean"] == pytest.approx((0.70 + 0.65 + 0.68) / 3)
    assert s.loc[("orthogonal", 20), "std"] == pytest.approx(np.std([0.70, 0.65, 0.68], ddof=1))
    with pytest.raises(ValueError, match="no 'f1' points"):
        A.curve_stats(A.load_curves(study), "f1")


def test_pairing_by_seed_drops_unpaired_seeds(study):
    pairs = A.pair_with_baseline(A.load_logs(study), "best_accuracy")
    g = pairs[pairs["method"] == "gradient"]
    assert list(g["seed"]) == [0, 1]  # seed 3 has no orthogonal run
    assert list(g["diff"]) == pytest.approx([0.0, -0.02])
    assert "orthogonal" not in set(pairs["method"])
    with pytest.raises(ValueError, match="no complete runs of baseline method 'lora'"):
        A.pair_with_baseline(A.load_logs(study), "best_accuracy", baseline="lora")


def test_one_configuration_per_method_or_a_named_refusal(study):
    write_run(study, "svd", 0, [0.7], lr=1e-3)
    with pytest.raises(ValueError, match=r"mrpc: method 'svd' has 2 configurations \(lr: "):
        A.pair_with_baseline(A.load_logs(study), "best_accuracy")


def test_running_runs_are_left_out(study):
    write_run(study, "svd_minor", 0, [0.9], status="running")
    runs = A.load_logs(study)
    assert "svd_minor" in set(runs["method"])
    assert "svd_minor" not in set(A.pair_with_baseline(runs, "best_accuracy")["method"])


def test_convergence_targets_censoring_and_auc(study):
    runs, curves = A.load_logs(study), A.load_curves(study)
    conv = A.convergence(curves, runs).set_index(["method", "seed"])
    # targets: each seed's orthogonal final val accuracy (0.70, 0.72, 0.66)
    assert conv.loc[("svd", 0), "target"] == 0.70 and conv.loc[("svd", 0), "steps_to_target"] == 10
    assert conv.loc[("svd", 1), "target"] == 0.72 and conv.loc[("svd", 1), "censored"]
    assert np.isnan(conv.loc[("svd", 1), "steps_to_target"])
    assert conv.loc[("svd", 2), "censored"] and conv.loc[("svd", 2), "last_step"] == 30
    assert conv.loc[("orthogonal", 1), "steps_to_target"] == 30  # the baseline reaches its own
    assert ("gradient", 3) not in conv.index  # no baseline run of seed 3
    # AUC / step range of 0.6, 0.7, 0.7 at steps 10, 20, 30: (0.65 * 10 + 0.7 * 10) / 20
    assert conv.loc[("orthogonal", 0), "auc"] == pytest.approx(0.675)
    auc = A.curve_auc(curves, runs)
    assert auc["mrpc-lorafa-orthogonal-r8-lr5e-03-s0"] == pytest.approx(0.675)
    s = A.convergence_summary(conv.reset_index()).set_index("method")
    assert list(s.index) == ["orthogonal", "svd", "gradient"]  # METHODS order
    assert s.loc["svd", "reached"] == 1 and s.loc["svd", "n"] == 3
    assert s.loc["svd", "median_steps"] == 10


def test_steps_to_reach_lower_is_better():
    curve = pd.DataFrame({"step": [30, 10, 20], "value": [0.2, 0.5, 0.3]})
    assert A.steps_to_reach(curve, 0.3, higher_is_better=False) == 20
    assert np.isnan(A.steps_to_reach(curve, 0.9))


def test_tables_use_method_labels_and_order(study):
    runs = A.load_logs(study)
    t = A.final_results(runs)
    assert list(t.index) == ["LoRA-FA orthogonal", "LoRA-FA svd (S in B)", "LoRA-FA gradient"]
    assert t.loc["LoRA-FA gradient", "MRPC accuracy"].endswith("(n=3)")
    write_run(study, "svd", 0, [0.4], lr=1e-3)
    sweep = A.sweep_table(A.load_logs(study), x="lr", which="best")
    assert list(sweep.columns) == ["lr 0.001", "lr 0.005"]
    assert sweep.loc["LoRA-FA svd (S in B)", "lr 0.001"].startswith("0.400 / ")
    assert sweep.loc["LoRA-FA orthogonal", "lr 0.001"] == ""  # not run


def test_with_method_names_every_variant_and_the_svd_split():
    df = pd.DataFrame({"variant": ["full", "lora", "lorafa", "lorafa", "lorafa"],
                       "init": ["none", "kaiming", "svd", "svd", "orthogonal"],
                       "svd_split": ["sqrt", "sqrt", "sqrt", "b", "b"]})
    assert list(A.with_method(df)["method"]) == ["full", "lora", "svd_sqrt", "svd", "orthogonal"]
