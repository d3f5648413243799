"""The figures draw what they claim: seed bands, a zero line and intervals in the forest plot,
censored runs as their own marker (never as a zero-height bar), chance lines."""
import matplotlib
import numpy as np
import pytest

from pipeline import analysis as A
from pipeline import plots as P
from pipeline import stats as S
from synthetic_logs import write_run

matplotlib.use("Agg")


@pytest.fixture(autouse=True)
def _close_figures():
    """Every test's figures are closed after it (pyplot keeps them otherwise)."""
    yield
    import matplotlib.pyplot as plt
    plt.close("all")


@pytest.fixture
def study(tmp_path):
    for s in range(3):
        write_run(tmp_path, "orthogonal", s, [0.60, 0.70, 0.70 + 0.01 * s], n_wrong=6 + s)
        write_run(tmp_path, "svd", s, [0.72, 0.74, 0.75] if s else [0.5, 0.55, 0.6],
                  n_wrong=3 + s)
    write_run(tmp_path, "gradient", 0, [0.6, 0.7, 0.8], n_wrong=2)
    return tmp_path


def test_plot_curves_draws_a_band_per_method(study):
    ax = P.plot_curves(A.load_curves(study), "accuracy")
    assert len(ax.lines) == 3 and len(ax.collections) == 3  # a mean line + band per method
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["LoRA-FA orthogonal (n=3)", "LoRA-FA svd (S in B) (n=3)",
                      "LoRA-FA gradient (n=1)"]
    assert ax.lines[0].get_color() == P.METHOD_COLORS["orthogonal"]


def test_every_method_has_its_own_colour():
    from pipeline.methods import METHODS

    assert set(P.METHOD_COLORS) == set(METHODS)
    assert len(set(P.METHOD_COLORS.values())) == len(METHODS)


def test_plot_task_skips_running_runs_and_labels_the_split(study):
    write_run(study, "svd_minor", 0, [0.9], status="running")
    runs, evals = A.load_logs(study), A.load_curves(study)
    fig = P.plot_task(runs, evals, A.load_curves(study, "train"), "mrpc")
    ax = fig.axes[1]
    assert ax.get_ylabel() == "val accuracy" and len(ax.lines) == 3  # no svd_minor line
    lo, hi = ax.get_ylim()
    assert hi - lo >= 0.1  # a few examples' difference does not fill the axis


def test_plot_task_zooms_on_the_second_half(study):
    runs = A.load_logs(study).assign(constant_val_accuracy=0.5)
    fig = P.plot_task(runs, A.load_curves(study), A.load_curves(study, "train"), "mrpc")
    full, zoom = fig.axes[1], fig.axes[2]
    curves = [ln for ln in zoom.lines if "majority" not in ln.get_label()]
    assert {x for ln in curves for x in ln.get_xdata()} == {20, 30}  # evals at 10, 20, 30
    lo, hi = zoom.get_ylim()
    assert lo > full.get_ylim()[0] and hi - lo >= 0.1  # zoomed in, but not onto a cliff
    assert lo > 0.5  # the majority floor (0.5) does not stretch the zoom back out
    write_run(study, "gradient", 1, [0.6, 0.2, 0.1], n_wrong=9)  # a stalled seed: wide band
    runs = A.load_logs(study).assign(constant_val_accuracy=0.5)
    fig1 = P.plot_task(runs, A.load_curves(study), A.load_curves(study, "train"), "mrpc")
    zoom = fig1.axes[2]
    means = np.concatenate([ln.get_ydata() for ln in zoom.lines
                            if "majority" not in ln.get_label()])
    lo, hi = zoom.get_ylim()
    assert lo <= means.min() and hi >= means.max()  # every mean in view ...
    assert lo > 0.25  # ... but not the stalled seed's band (its mean - std ~ 0.1)
    fig2 = P.plot_task(runs, A.load_curves(study), A.load_curves(study, "train"), "mrpc",
                       zoom_from=None)
    assert len(fig2.axes) == 2


def test_plot_task_zoom_ignores_a_diverged_runs_nan_evaluations(study):
    write_run(study, "svd_minor", 0, [0.6, np.nan, np.nan], n_wrong=9)  # loss went NaN
    runs = A.load_logs(study).assign(constant_val_accuracy=0.5)
    fig = P.plot_task(runs, A.load_curves(study), A.load_curves(study, "train"), "mrpc")
    lo, hi = fig.axes[2].get_ylim()
    assert np.isfinite([lo, hi]).all() and lo > 0.5  # the finite means set the range


def test_forest_plot_has_a_zero_line_and_an_interval_per_method(study):
    runs = A.load_logs(study)
    cmp = S.compare(runs)
    fig = P.plot_forest(cmp, S.bootstrap(runs, n_boot=50))
    ax = fig.axes[0]
    zero = [ln for ln in ax.lines if list(ln.get_xdata()) == [0, 0]]
    assert len(zero) == 1
    assert [t.get_text() for t in ax.get_yticklabels()] == ["LoRA-FA svd (S in B)",
                                                            "LoRA-FA gradient"]
    notes = [t.get_text() for t in ax.texts]
    # gradient: one seed, a point and no interval; svd: every difference equal, no t-test, so
    # no Holm p and no 'per comparison' caveat
    assert any(n.startswith("undetermined at n = 1") for n in notes)
    assert "better (n = 3)" in notes


def test_convergence_marks_censored_runs_apart(study):
    conv = A.convergence(A.load_curves(study), A.load_logs(study))
    assert conv["censored"].sum() == 1  # svd seed 0 never reaches 0.70
    fig = P.plot_convergence(conv)
    ax = fig.axes[0]
    open_marks = [c for c in ax.collections if len(c.get_offsets())
                  and not np.any(c.get_facecolor()[:, 3])]
    assert len(open_marks) == 1 and len(open_marks[0].get_offsets()) == 1
    assert open_marks[0].get_offsets()[0][0] == 30  # at its last step, not at 0
    assert not ax.patches  # no bars
    assert "1/3 reached" not in [t.get_text() for t in ax.texts]
    assert "2/3 reached" in [t.get_text() for t in ax.texts]


def test_chance_line_for_matthews(tmp_path):
    ax = matplotlib.pyplot.figure().gca()
    P._chance_line(ax, "matthews")
    P._chance_line(ax, "accuracy")  # no label-free chance level: nothing drawn
    assert [list(ln.get_ydata()) for ln in ax.lines] == [[0, 0]]


def test_majority_line_from_the_logged_constant_prediction(study):
    runs = A.load_logs(study).assign(constant_val_accuracy=0.68)
    fig = P.plot_task(runs, A.load_curves(study), A.load_curves(study, "train"), "mrpc")
    floor = [ln for ln in fig.axes[1].lines if list(ln.get_ydata()) == [0.68, 0.68]]
    assert len(floor) == 1 and "majority class" in floor[0].get_label()
    ax = matplotlib.pyplot.figure().gca()
    P._chance_line(ax, "accuracy", runs.assign(constant_val_accuracy=[0.6] + [0.7] * 6))
    assert not ax.lines  # runs on different val splits: no single floor to draw


def test_plot_lr_curves_a_panel_per_method_a_line_per_lr(study):
    write_run(study, "orthogonal", 0, [0.5, 0.6, 0.65], lr=1e-3)
    runs = A.load_logs(study).assign(constant_val_accuracy=0.5)
    fig = P.plot_lr_curves(runs, A.load_curves(study), "mrpc")
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["LoRA-FA orthogonal", "LoRA-FA svd (S in B)",
                                                 "LoRA-FA gradient"]
    labels = [t.get_text() for t in panels[0].get_legend().get_texts()]
    assert labels == ["majority class (accuracy 0.500)", "lr=0.001 (n=1)", "lr=0.005 (n=3)"]
    color = {(i, ln.get_label()): ln.get_color() for i, ax in enumerate(panels)
             for ln in ax.lines}
    assert color[0, "lr=0.005 (n=3)"] == color[1, "lr=0.005 (n=3)"]  # an lr: one colour
    assert color[0, "lr=0.001 (n=1)"] != color[0, "lr=0.005 (n=3)"]
    with pytest.raises(ValueError, match="no complete lr runs"):
        P.plot_lr_curves(runs, A.load_curves(study), "cola")


def test_plot_metric_vs_one_line_per_method(study):
    write_run(study, "svd", 0, [0.5], lr=1e-3)
    ax = P.plot_metric_vs(A.load_logs(study), x="lr", which="best")
    assert [t.get_text() for t in ax.get_legend().get_texts()][:2] == [
        "LoRA-FA orthogonal", "LoRA-FA svd (S in B)"]
    assert ax.get_xscale() == "log" and ax.get_ylabel() == "val accuracy (best)"


def test_plot_metric_vs_legend_below_sits_under_the_axes(study):
    ax = P.plot_metric_vs(A.load_logs(study), x="lr", which="best", legend="below")
    ax.figure.canvas.draw()
    legend = ax.get_legend().get_window_extent()
    assert legend.y1 <= ax.get_window_extent().y0  # under the plotting area, covering no line


def test_forest_axis_fits_the_inits_and_a_wide_reference_interval_runs_off_it():
    import pandas as pd
    cmp = pd.DataFrame({"task": "cola", "quantity": "test_matthews", "baseline": "orthogonal",
                        "method": ["lora", "svd", "gradient"], "n": [3, 5, 5],
                        "family": ["reference", "question", "question"],
                        "mean_diff": [0.0, 0.01, -0.02], "ci_low": [-0.4, -0.03, -0.05],
                        "ci_high": [0.4, 0.05, 0.01], "t_p": 0.5, "wilcoxon_p": 0.6,
                        "verdict": ["undetermined at n = 3", "undetermined at n = 5",
                                    "undetermined at n = 5"], "note": ""})
    ax = P.plot_forest(cmp).axes[0]
    lo, hi = ax.get_xlim()
    assert -0.07 < lo < -0.05 and 0.05 < hi < 0.07  # the inits' intervals, padded, not ±0.4
    notes = [t.get_text() for t in ax.texts]
    assert any("t CI [-0.40, +0.40] off the axis" in t for t in notes)
    assert sum("off the axis" in t for t in notes) == 1


def test_forest_axis_keeps_reference_intervals_while_no_init_has_one():
    import pandas as pd
    cmp = pd.DataFrame({"task": "cola", "quantity": "test_matthews", "baseline": "orthogonal",
                        "method": ["lora", "svd"], "n": [3, 1],
                        "family": ["reference", "question"], "mean_diff": [0.0, 0.0],
                        "ci_low": [-0.4, np.nan], "ci_high": [0.4, np.nan], "t_p": np.nan,
                        "wilcoxon_p": np.nan, "verdict": ["undetermined at n = 3",
                                                          "undetermined at n = 1"], "note": ""})
    ax = P.plot_forest(cmp).axes[0]
    lo, hi = ax.get_xlim()
    assert lo < -0.4 and hi > 0.4
    assert not any("off the axis" in t.get_text() for t in ax.texts)


def test_forest_panels_share_the_row_spacing_when_a_task_has_fewer_methods():
    """A task with one comparison so far (RTE's first init) gets the other panels' row height,
    its row at the top, not one row stretched over the whole panel."""
    import pandas as pd
    rows = [("mrpc", "svd"), ("mrpc", "gradient"), ("mrpc", "svd_minor"), ("rte", "svd")]
    cmp = pd.DataFrame({"task": [t for t, _ in rows], "quantity": "test_accuracy",
                        "baseline": "orthogonal", "method": [m for _, m in rows], "n": 5,
                        "family": "question", "mean_diff": 0.01, "ci_low": -0.01,
                        "ci_high": 0.03, "t_p": 0.3, "wilcoxon_p": 0.4,
                        "verdict": "undetermined at n = 5", "note": ""})
    mrpc, rte = P.plot_forest(cmp).axes[:2]
    assert mrpc.get_ylim() == rte.get_ylim()
    assert [t.get_text() for t in rte.get_yticklabels()] == ["LoRA-FA svd (S in B)"]
    assert rte.get_yticks()[0] == max(mrpc.get_yticks())  # the top row


def test_forest_notes_carry_the_caveats_the_answer_table_marks():
    """The forest plot and the answer table read the same caveat flags: every flagged row's
    note has the caveat's words, an unflagged row has none of them."""
    import pandas as pd
    from pipeline.methods import label
    cmp = pd.DataFrame({"task": "mrpc", "quantity": "test_accuracy", "baseline": "orthogonal",
                        "method": ["svd", "gradient", "svd_minor"], "family": "question",
                        "n": 5, "mean_diff": [0.017, 0.004, -0.03],
                        "ci_low": [0.012, -0.01, -0.05], "ci_high": [0.021, 0.02, -0.01],
                        "t_p": 0.01, "wilcoxon_p": 0.05,
                        "verdict": ["better", "undetermined at n = 5", "worse"],
                        "per_comparison": [False, False, True], "note": ""})
    boot = pd.DataFrame({"task": "mrpc", "metric": "accuracy",
                         "method": ["svd", "gradient", "svd_minor"],
                         "ci_low": [-0.003, 0.001, -0.06], "ci_high": [0.038, 0.01, -0.02]})
    ax = P.plot_forest(cmp, boot).axes[0]
    notes = {t.get_text().split(",")[0].split(" (n")[0]: t.get_text() for t in ax.texts}
    words = {flag: w for flag, (_, w) in S.CAVEATS.items()}
    assert words["boot_includes_0"] in notes["better"]
    assert words["boot_only"] in notes["undetermined at n = 5"]
    assert words["per_comparison"] in notes["worse"]
    for note, flagged in [(notes["better"], "boot_includes_0"),
                          (notes["undetermined at n = 5"], "boot_only"),
                          (notes["worse"], "per_comparison")]:
        assert [f for f, w in words.items() if w in note] == [flagged]
    table = S.answer_table(cmp, boot)["MRPC (accuracy)"]
    marks = {m: table[label(m)].split(" (n")[0][-1] for m in ["svd", "gradient", "svd_minor"]}
    assert marks == {"svd": "‡", "gradient": "§", "svd_minor": "†"}


def test_forest_tick_labels_do_not_touch_in_a_narrow_panel():
    """Three panels of seven long-labelled methods with two-line notes (the study's forest):
    what is left for each axis is narrow, and its tick labels must still not run together."""
    import pandas as pd
    from pipeline.methods import METHODS
    methods = [m for m in METHODS if m != "orthogonal"][:7]
    cmp = pd.concat([pd.DataFrame({
        "task": task, "quantity": "test_accuracy", "baseline": "orthogonal",
        "method": methods, "family": "question", "n": 5, "mean_diff": 0.004,
        "ci_low": -0.138, "ci_high": 0.138, "t_p": 0.9, "wilcoxon_p": 1.0,
        "verdict": "better", "per_comparison": True, "note": ""})
        for task in ["mrpc", "cola", "rte"]])
    fig = P.plot_forest(cmp)
    fig.canvas.draw()
    for ax in fig.axes[:3]:
        lo, hi = ax.get_xlim()
        boxes = [t.get_window_extent() for t in ax.get_xticklabels()
                 if t.get_text() and lo <= t.get_position()[0] <= hi]
        assert len(boxes) >= 2
        gaps = [b.x0 - a.x1 for a, b in zip(boxes, boxes[1:])]
        assert min(gaps) > 4, [t.get_text() for t in ax.get_xticklabels()]  # pixels


@pytest.mark.parametrize("n_tasks, grid", [(3, (1, 3)), (4, (2, 2)), (5, (2, 3))])
def test_forest_and_convergence_wrap_many_tasks_into_rows(n_tasks, grid):
    """Four or five tasks do not make one strip 25 inches wide: at most three panels a row."""
    import pandas as pd
    tasks = ["mrpc", "cola", "rte", "stsb", "sst2"][:n_tasks]
    cmp = pd.DataFrame({"task": tasks, "quantity": "test_accuracy", "baseline": "orthogonal",
                        "method": "svd", "family": "question", "n": 5, "mean_diff": 0.01,
                        "ci_low": -0.01, "ci_high": 0.03, "t_p": 0.3, "wilcoxon_p": 0.4,
                        "verdict": "undetermined at n = 5", "note": ""})
    conv = pd.DataFrame({"task": tasks, "method": "svd", "seed": 0, "baseline": "orthogonal",
                         "steps_to_target": 100.0, "last_step": 500, "censored": False,
                         "target": 0.7, "target_of": "final val accuracy",
                         "metric": "accuracy"})
    for fig in (P.plot_forest(cmp), P.plot_convergence(conv)):
        axes = [ax for ax in fig.axes if ax.get_title()]
        assert len(axes) == n_tasks
        rows = {round(ax.get_position().y0, 3) for ax in axes}
        cols = {round(ax.get_position().x0, 3) for ax in axes}
        assert (len(rows), len(cols)) == grid
        assert fig.get_size_inches()[0] < 20


def test_convergence_panels_share_the_row_spacing_when_a_task_has_fewer_methods():
    """STS-B with only its baseline finished: one row at the top of its panel, the seeds
    within ±0.2 of it, not spread over the whole panel's height."""
    import pandas as pd
    rows = [(t, m, s) for t, ms in (("mrpc", ["orthogonal", "svd", "gradient"]),
                                    ("stsb", ["orthogonal"])) for m in ms for s in range(5)]
    conv = pd.DataFrame({"task": [t for t, _, _ in rows], "method": [m for _, m, _ in rows],
                         "seed": [s for _, _, s in rows], "baseline": "orthogonal",
                         "steps_to_target": 300.0, "last_step": 800, "censored": False,
                         "target": 0.8, "target_of": "final val metric", "metric": "accuracy"})
    mrpc, stsb = [ax for ax in P.plot_convergence(conv).axes if ax.get_title()]
    assert mrpc.get_ylim() == stsb.get_ylim()
    assert stsb.get_yticks()[0] == max(mrpc.get_yticks())
    ys = stsb.collections[0].get_offsets()[:, 1]
    assert np.ptp(ys) <= 0.4 + 1e-9 and abs(ys.mean() - stsb.get_yticks()[0]) < 1e-9
