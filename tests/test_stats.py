"""Paired statistics against scipy and hand-computed cases; pairing by seed; the bootstrap's
determinism; the wording of intervals."""
import numpy as np
import pandas as pd
import pytest
from scipy import stats as st

from pipeline import analysis as A
from pipeline import stats as S
from synthetic_logs import write_run


def test_paired_summary_matches_a_hand_computed_interval_and_scipy():
    a, b = np.array([0.71, 0.74, 0.70, 0.76]), np.array([0.70, 0.72, 0.70, 0.73])
    s = S.paired_summary(a - b)
    d = a - b  # 0.01, 0.02, 0.00, 0.03: mean 0.015, sd 0.012910
    half = 3.182446305284263 * d.std(ddof=1) / 2  # t_{0.975, 3} * sd / sqrt(4)
    assert s["n"] == 4 and s["mean_diff"] == pytest.approx(0.015)
    assert (s["ci_low"], s["ci_high"]) == pytest.approx((0.015 - half, 0.015 + half))
    assert s["t_p"] == pytest.approx(st.ttest_rel(a, b).pvalue)
    assert s["wilcoxon_p"] == pytest.approx(st.wilcoxon(a, b).pvalue)
    # diffs 1, 2, 3: mean 2, sd 1, t_{0.975, 2} = 4.302653 -> 2 ± 2.484138
    s = S.paired_summary([1.0, 2.0, 3.0])
    assert (s["ci_low"], s["ci_high"]) == pytest.approx((2 - 2.484138, 2 + 2.484138), abs=1e-6)


def test_small_or_degenerate_samples_give_nan_with_a_reason():
    s = S.paired_summary([0.02])
    assert s["n"] == 1 and s["mean_diff"] == 0.02 and np.isnan(s["ci_low"])
    assert np.isnan(s["t_p"]) and s["note"] == "n = 1: no interval or test"
    s = S.paired_summary([])
    assert s["n"] == 0 and np.isnan(s["mean_diff"])
    s = S.paired_summary([0.0, 0.0, 0.0])
    assert np.isnan(s["t_p"]) and np.isnan(s["wilcoxon_p"]) and "all differences 0" in s["note"]
    assert s["ci_low"] == s["ci_high"] == 0.0
    s = S.paired_summary([0.7 - 0.6, 0.8 - 0.7, 0.1])  # equal up to rounding
    assert np.isnan(s["t_p"]) and s["wilcoxon_p"] == pytest.approx(0.25)
    assert s["note"] == "all differences equal: no t-test"


def test_verdict_wording():
    assert S.verdict(0.01, 0.05, 5) == "better"
    assert S.verdict(-0.05, -0.01, 5) == "worse"
    assert S.verdict(-0.01, 0.05, 5) == "undetermined at n = 5"
    assert S.verdict(np.nan, np.nan, 1) == "undetermined at n = 1"
    # equivalence only with an explicit margin, and only when the whole interval is inside it
    assert S.verdict(-0.01, 0.01, 5) == "undetermined at n = 5"
    assert S.verdict(-0.01, 0.01, 5, margin=0.02) == "equivalent within ±0.02"
    assert S.verdict(-0.01, 0.03, 5, margin=0.02) == "undetermined at n = 5"


def test_a_t_verdict_the_bootstrap_does_not_share_carries_a_caveat():
    cmp = pd.DataFrame({"task": "mrpc", "quantity": "test_accuracy", "baseline": "orthogonal",
                        "method": ["svd", "gradient", "svd_minor"], "n": 5,
                        "mean_diff": [0.017, 0.02, 0.0], "ci_low": [0.012, 0.01, -0.01],
                        "ci_high": [0.021, 0.03, 0.01], "t_p": 0.01, "wilcoxon_p": 0.06,
                        "verdict": ["better", "better", "undetermined at n = 5"], "note": ""})
    boot = pd.DataFrame({"task": "mrpc", "metric": "accuracy",
                         "method": ["svd", "gradient", "svd_minor"],
                         "ci_low": [-0.003, 0.004, -0.02], "ci_high": [0.038, 0.03, 0.02]})
    q = S.with_bootstrap(cmp, boot).set_index("method")
    assert "bootstrap CI includes 0" in q.loc["svd", "note"] and q.loc["svd", "boot_includes_0"]
    assert not q.loc[["gradient", "svd_minor"], "boot_includes_0"].any()
    assert q.loc["gradient", "note"] == ""  # both intervals exclude 0
    assert q.loc["svd_minor", "note"] == ""  # undetermined already says it
    assert (q.loc["svd", "boot_low"], q.loc["svd", "boot_high"]) == (-0.003, 0.038)
    md = S.stats_markdown(cmp, boot)
    row = next(ln for ln in md.splitlines() if ln.startswith("| LoRA-FA svd (S in B)"))
    assert "[-0.003, +0.038] | better | bootstrap CI includes 0" in row
    assert S.with_bootstrap(cmp, None)["boot_low"].isna().all()
    # the other disagreement: the seeds' interval includes 0, the bootstrap's does not
    boot.loc[boot["method"] == "svd_minor", ["ci_low", "ci_high"]] = 0.005, 0.03
    q = S.with_bootstrap(cmp, boot).set_index("method")
    assert q.loc["svd_minor", "boot_only"] and "bootstrap CI excludes 0" in q.loc["svd_minor", "note"]
    assert not q.loc[["svd", "gradient"], "boot_only"].any()


def test_a_verdict_holm_does_not_keep_is_marked_per_comparison(tmp_path):
    # test errors out of LABELS per seed: orthogonal 10; three inits 1-2 fewer (t p ~0.03
    # each, so 'better' per comparison, Holm ~0.1 over three); gradient_center 5-6 fewer
    for seed, (d, big) in enumerate(zip([1, 2, 1, 2, 0], [5, 5, 6, 5, 5])):
        write_run(tmp_path, "orthogonal", seed, [0.7], n_wrong=10)
        for m in ("svd", "svd_minor", "gradient"):
            write_run(tmp_path, m, seed, [0.7], n_wrong=10 - d)
        write_run(tmp_path, "gradient_center", seed, [0.7], n_wrong=10 - big)
    cmp = S.compare(A.load_logs(tmp_path), baseline="orthogonal").set_index("method")
    small = ["svd", "svd_minor", "gradient"]
    assert (cmp.loc[small, "verdict"] == "better").all() and (cmp.loc[small, "holm_p"] > 0.05).all()
    assert cmp.loc[small, "per_comparison"].all()
    assert cmp.loc[small, "note"].str.contains("per comparison only").all()
    g = cmp.loc["gradient_center"]
    assert g["verdict"] == "better" and g["holm_p"] < 0.05 and not g["per_comparison"]
    assert "per comparison" not in g["note"]


@pytest.fixture
def study(tmp_path):
    val = [0.6, 0.7]
    for s, (n_base, n_svd) in enumerate([(6, 3), (8, 4), (5, 5)]):
        write_run(tmp_path, "orthogonal", s, val, n_wrong=n_base)
        write_run(tmp_path, "svd", s, val, n_wrong=n_svd)
    write_run(tmp_path, "svd", 7, val, n_wrong=0)  # no baseline seed 7: not paired
    write_run(tmp_path, "gradient", 0, val, n_wrong=6)
    return tmp_path


def test_compare_pairs_by_seed(study):
    cmp = S.compare(A.load_logs(study)).set_index("method")
    d = np.array([3, 4, 0]) / 40  # baseline errors minus svd errors, seeds 0-2
    assert cmp.loc["svd", "n"] == 3 and cmp.loc["svd", "mean_diff"] == pytest.approx(d.mean())
    assert cmp.loc["svd", "t_p"] == pytest.approx(st.ttest_1samp(d, 0).pvalue)
    assert cmp.loc["svd", "quantity"] == "test_accuracy"
    assert cmp.loc["gradient", "n"] == 1 and np.isnan(cmp.loc["gradient", "ci_low"])
    assert cmp.loc["gradient", "verdict"] == "undetermined at n = 1"


def test_holm_matches_a_hand_computation_and_skips_untested_rows():
    # sorted 0.01, 0.02, 0.04 -> 3*0.01, 2*0.02, 1*0.04, then the running maximum
    adj = S.holm([0.04, np.nan, 0.01, 0.02])
    assert np.isnan(adj[1])
    np.testing.assert_allclose(adj[[2, 3, 0]], [0.03, 0.04, 0.04])
    np.testing.assert_allclose(S.holm([0.5, 0.6]), [1.0, 1.0])  # capped at 1
    assert S.holm([]).shape == (0,)


def test_compare_adjusts_p_over_the_methods_of_a_task(study):
    cmp = S.compare(A.load_logs(study)).set_index("method")
    tested = cmp["t_p"].notna()
    assert tested.sum() >= 1 and cmp.loc[~tested, "holm_p"].isna().all()
    np.testing.assert_allclose(cmp.loc[tested, "holm_p"],
                               S.holm(cmp.loc[tested, "t_p"]))
    assert (cmp.loc[tested, "holm_p"] >= cmp.loc[tested, "t_p"]).all()
    # a second method with the same differences: a family of two, each p doubled
    runs = A.load_logs(study)
    twin = pd.concat([runs, runs[runs["method"] == "svd"].assign(method="svd_minor")])
    two = S.compare(twin).set_index("method")
    np.testing.assert_allclose(two.loc[["svd", "svd_minor"], "holm_p"],
                               min(1.0, 2 * cmp.loc["svd", "t_p"]))


def test_references_form_their_own_holm_family(study):
    # a reference (another variant) with the same differences as svd: it must not double the
    # p of the question's family (LoRA-FA inits), and is adjusted within its own family
    runs = A.load_logs(study)
    one = S.compare(runs).set_index("method")
    ref = runs[runs["method"] == "svd"].assign(method="lora", variant="lora")
    cmp = S.compare(pd.concat([runs, ref])).set_index("method")
    assert cmp.loc["svd", "family"] == "question" and cmp.loc["lora", "family"] == "reference"
    np.testing.assert_allclose(cmp.loc["svd", "holm_p"], one.loc["svd", "holm_p"])
    np.testing.assert_allclose(cmp.loc["lora", "holm_p"], one.loc["svd", "t_p"])
    assert "the references, other variants, a second)." in S.stats_markdown(cmp.reset_index())


def test_bootstrap_is_deterministic_and_centred_on_the_observed_difference(study):
    runs = A.load_logs(study)
    b1 = S.bootstrap(runs, n_boot=50, seed=1).set_index("method")
    b2 = S.bootstrap(runs, n_boot=50, seed=1).set_index("method")
    b3 = S.bootstrap(runs, n_boot=50, seed=2).set_index("method")
    assert b1.equals(b2) and not b1.equals(b3)
    # full-set difference pooled over the 3 paired seeds: mean svd acc - mean orthogonal acc
    assert b1.loc["svd", "diff"] == pytest.approx((3 + 4 + 0) / 3 / 40)
    assert b1.loc["svd", "n_seeds"] == 3 and b1.loc["svd", "n_examples"] == 40
    assert b1.loc["svd", "ci_low"] <= b1.loc["svd", "diff"] <= b1.loc["svd", "ci_high"]
    # gradient seed 0 makes the baseline's errors on the same rows: every resample gives 0
    g = b1.loc["gradient"]
    assert g["diff"] == 0 and g["ci_low"] == 0 and g["ci_high"] == 0 and g["p"] == 1.0


def test_bootstrap_on_scores_recomputes_pearson(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.uniform(0, 5, 30)
    outs = {}
    for s in range(2):
        for m, noise in (("orthogonal", 1.0), ("svd", 0.5)):
            outs[m, s] = (y + noise * rng.normal(size=30)).astype(np.float32)
            write_run(tmp_path, m, s, [0.5, 0.6], task="stsb", outputs=outs[m, s], labels=y)
    b = S.bootstrap(A.load_logs(tmp_path), n_boot=100).set_index("method")
    pearson = {k: st.pearsonr(v.astype(np.float64), y)[0] for k, v in outs.items()}
    want = np.mean([pearson["svd", s] - pearson["orthogonal", s] for s in range(2)])
    assert b.loc["svd", "metric"] == "pearson" and b.loc["svd", "diff"] == pytest.approx(want)
    assert b.loc["svd", "ci_low"] < want < b.loc["svd", "ci_high"]


def test_a_task_without_baseline_runs_says_so(study):
    write_run(study, "svd", 0, [0.5], task="rte")
    runs = A.load_logs(study)
    cmp = S.compare(runs).set_index(["task", "method"])
    assert cmp.loc[("rte", "svd"), "n"] == 0
    assert cmp.loc[("rte", "svd"), "note"] == "no complete orthogonal run for this task yet"
    assert set(S.bootstrap(runs, n_boot=10)["task"]) == {"mrpc"}
    assert set(A.convergence(A.load_curves(study), runs)["task"]) == {"mrpc"}
    with pytest.raises(ValueError, match="no complete runs of baseline method 'full'"):
        S.compare(runs, baseline="full")


def test_bootstrap_needs_the_same_test_rows_and_saved_predictions(study):
    runs = A.load_logs(study)
    path = runs["predictions"].iloc[0]
    with np.load(path) as z:
        arrays = dict(z)
    np.savez(path, **{**arrays, "index": arrays["index"] + 100})
    with pytest.raises(ValueError, match="test rows differ from the other mrpc runs'"):
        S.bootstrap(runs, n_boot=10)
    with pytest.raises(ValueError, match="no saved predictions; rerun with save_predictions"):
        S.bootstrap(runs.assign(predictions=None), n_boot=10)
    np.savez(path, index=arrays["index"])
    with pytest.raises(ValueError, match=r"missing arrays \['label', 'pred'\]"):
        A.load_predictions(path)


def test_bootstrap_refuses_predictions_that_do_not_match_the_log(study):
    runs = A.load_logs(study)
    path = runs.loc[runs["run_id"].str.endswith("svd-r8-lr5e-03-splitb-s1"), "predictions"]
    with np.load(path.iloc[0]) as z:
        arrays = dict(z)
    arrays["pred"] = arrays["pred"][:, ::-1]  # every prediction flipped
    np.savez(path.iloc[0], **arrays)
    with pytest.raises(ValueError, match="differs from the log's test_accuracy"):
        S.bootstrap(runs, n_boot=10)


def test_stats_markdown_has_a_row_per_method(study):
    runs = A.load_logs(study)
    curves = A.load_curves(study)
    conv = A.convergence_summary(A.convergence(curves, runs))
    auc = S.compare(runs.assign(auc=runs["run_id"].map(A.curve_auc(curves, runs))),
                    column="auc", margin=0.01)
    assert (auc["verdict"].iloc[0], auc["mean_diff"].iloc[0]) == ("equivalent within ±0.01", 0)
    md = S.stats_markdown(pd.concat([S.compare(runs), auc]), S.bootstrap(runs, n_boot=50),
                          conv, title="Study")
    assert md.startswith("# Study\n\n## MRPC: test_accuracy, method − LoRA-FA orthogonal")
    test, auc_part = md.split("## MRPC: auc")
    rows = [line for line in test.splitlines() if line.startswith("| LoRA-FA")]
    assert any(r.startswith("| LoRA-FA svd (S in B) | 3 | +0.058 |") for r in rows)
    assert any("undetermined at n = 1" in r and "n = 1: no interval" in r for r in rows)
    assert rows[0].split("|")[8].strip().startswith("[")  # the bootstrap interval
    assert "| – | equivalent within ±0.01 |" in auc_part  # no bootstrap for the AUC
    assert "| LoRA-FA orthogonal | 3/3 |" in auc_part  # the convergence table, last


def _conv(rows):
    """analysis.convergence rows: (method, seed, steps to target or None if censored)."""
    return pd.DataFrame([dict(task="mrpc", method=m, seed=sd, baseline="orthogonal",
                              steps_to_target=np.nan if st_ is None else float(st_),
                              censored=st_ is None, last_step=100.0, auc=0.7)
                         for m, sd, st_ in rows])


def test_convergence_compare_pairs_steps_by_seed_and_words_the_interval():
    base = [("orthogonal", 0, 80), ("orthogonal", 1, 60), ("orthogonal", 2, 90)]
    c = S.convergence_compare(_conv(base + [("svd", 0, 40), ("svd", 1, 30), ("svd", 2, 50)]))
    svd = c.set_index("method").loc["svd"]
    # diffs -40, -30, -40: mean -36.67, sd 5.774, t_{0.975, 2} = 4.302653
    half = 4.302653 * 5.773503 / np.sqrt(3)
    assert (svd["sooner"], svd["tied"], svd["later"], svd["pairs"]) == (3, 0, 0, 3)
    assert (svd["diff_low"], svd["diff_high"]) == pytest.approx((-110 / 3 - half,
                                                                 -110 / 3 + half), abs=1e-4)
    assert svd["steps_verdict"] == "faster" and svd["reached"] == 3
    assert np.isnan(c.set_index("method").loc["orthogonal", "pairs"])  # the baseline itself
    # a censored run is later, counts at its last step, and forbids 'faster'
    c = S.convergence_compare(_conv(base + [("svd", 0, 40), ("svd", 1, None), ("svd", 2, 90),
                                            ("gradient", 0, 30), ("gradient", 1, 10),
                                            ("gradient", 2, None)]))
    svd, grad = c.set_index("method").loc["svd"], c.set_index("method").loc["gradient"]
    assert (svd["sooner"], svd["tied"], svd["later"]) == (1, 1, 1)
    assert svd["diff_steps"] == pytest.approx((-40 + 40 + 0) / 3)
    assert svd["steps_note"] == "1 censored (counted at their last step)"
    assert grad["steps_verdict"] == "undetermined at n = 3"
    md = S.stats_markdown(pd.DataFrame(columns=["task", "quantity", "baseline"]), conv=c)
    assert "| LoRA-FA svd (S in B) | 2/3 | 65 | 0.700 | 1 / 1 / 1 | +0 [" in md
    assert "| LoRA-FA orthogonal | 3/3 | 80 | 0.700 | – | – | – |  |" in md


def test_answer_table_is_one_cell_per_method_and_task_with_its_caveats():
    cmp = pd.DataFrame({"task": ["mrpc", "mrpc", "mrpc", "cola", "cola"],
                        "quantity": ["test_accuracy"] * 3 + ["test_matthews"] * 2,
                        "baseline": "orthogonal",
                        "method": ["svd", "gradient", "full", "svd", "gradient"],
                        "family": ["question", "question", "reference", "question", "question"],
                        "n": [5, 5, 3, 5, 1], "mean_diff": [0.017, 0.004, 0.02, -0.1, 0.2],
                        "ci_low": [0.012, -0.01, 0.01, -0.2, np.nan],
                        "ci_high": [0.021, 0.02, 0.03, -0.01, np.nan],
                        "verdict": ["better", "undetermined at n = 5", "better", "worse",
                                    "undetermined at n = 1"],
                        "per_comparison": [False, False, False, True, False], "note": ""})
    boot = pd.DataFrame({"task": "mrpc", "metric": "accuracy", "method": ["svd", "gradient"],
                         "ci_low": [-0.003, 0.001], "ci_high": [0.038, 0.01]})
    t = S.answer_table(cmp, boot)
    assert list(t.columns) == ["CoLA (matthews)", "MRPC (accuracy)"]
    # the question's inits in METHODS order, the references after them
    assert list(t.index) == ["LoRA-FA svd (S in B)", "LoRA-FA gradient", "full FT"]
    assert t.index.name == "method − LoRA-FA orthogonal"
    assert t.loc["LoRA-FA svd (S in B)", "MRPC (accuracy)"] == "+0.017 [+0.012, +0.021] better‡ (n = 5)"
    assert t.loc["LoRA-FA gradient", "MRPC (accuracy)"].endswith("undetermined§ (n = 5)")
    assert t.loc["LoRA-FA svd (S in B)", "CoLA (matthews)"].endswith("worse† (n = 5)")
    assert t.loc["LoRA-FA gradient", "CoLA (matthews)"] == "+0.200 (n = 1: no interval)"
    assert t.loc["full FT", "CoLA (matthews)"] == "not run"
    assert t.loc["full FT", "MRPC (accuracy)"] == "+0.020 [+0.010, +0.030] better (n = 3)"
    with pytest.raises(ValueError, match="one quantity per task"):
        S.answer_table(pd.concat([cmp, cmp.assign(quantity="auc")]))
