"""Every notebook runs headless top to bottom with smoke parameters (papermill), writing only
into a temporary folder; the presentation notebook then draws figures from those logs."""
import json
from pathlib import Path

import papermill as pm
import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = dict(seeds=[0], epochs=1, batch_size=8, eval_every_steps=2, subsample_train=24,
             subsample_dev=16, quiet=True)


def execute(name, out_dir, **params):
    out = Path(out_dir) / name
    pm.execute_notebook(str(ROOT / name), str(out), parameters=params, cwd=str(ROOT),
                        kernel_name="python3", progress_bar=False)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def smoke_logs(tmp_path_factory, tiny_bert_dir, glue_dir):
    """Run the four task notebooks on a few dozen examples (a tiny random BERT with the
    MiniLM tokenizer, to keep CI fast) into one temporary logs folder."""
    tmp = tmp_path_factory.mktemp("nb")
    logs = tmp / "logs"
    for task in ("mrpc", "rte", "cola", "stsb"):
        execute(f"{task}_experiment.ipynb", tmp, logs_dir=str(logs), model=tiny_bert_dir(),
                methods=["orthogonal", "svd", "gradient"],
                lrs={"orthogonal": 5e-3, "svd": 5e-3, "gradient": 5e-3}, **SMOKE)
    return tmp, logs


def test_task_notebooks_write_one_complete_log_per_run(smoke_logs):
    _, logs = smoke_logs
    for task in ("mrpc", "rte", "cola", "stsb"):
        files = sorted((logs / task).glob("*.json"))
        assert [f.name.split("-")[2] for f in files] == ["gradient", "orthogonal", "svd"]
        assert all(json.loads(f.read_text())["status"] == "complete" for f in files)


def test_regularization_notebook_runs(smoke_logs, tiny_bert_dir):
    tmp, _ = smoke_logs
    reg_logs = tmp / "reg"
    execute("regularization_experiment.ipynb", tmp, logs_dir=str(reg_logs), model=tiny_bert_dir(),
            reg_coeffs=[0.0, 0.1], **SMOKE)
    coeffs = sorted(json.loads(f.read_text())["config"]["reg_coeff"]
                    for f in (reg_logs / "mrpc").glob("*.json"))
    assert coeffs == [0.0, 0.1]


def test_presentation_notebook_writes_the_figures(smoke_logs):
    tmp, logs = smoke_logs
    figures = tmp / "figures"
    execute("plots_for_preso.ipynb", tmp, logs_dir=str(logs), figures_dir=str(figures),
            lr_dir=str(tmp / "absent"), n_boot=50,
            sweeps={"absent": [str(tmp / "absent"), "lr"],
                    "regularization": [str(tmp / "reg"), "reg_coeff"]})
    written = {p.name for p in figures.iterdir()}
    # the smoke logs follow the study protocol (val split, test at the val-best step)
    assert {"study_mrpc_curves.png", "study_rte_curves.png", "study_cola_curves.png",
            "study_stsb_curves.png", "study_results.md", "study_results.csv", "stats.md", "answer.md", "forest.png",
            "study_convergence.png"} <= written
    table = (figures / "study_results.md").read_text()
    assert all(m in table for m in ("LoRA-FA svd (S in B)", "LoRA-FA orthogonal",
                                     "LoRA-FA gradient"))
    assert "undetermined at n = 1" in (figures / "stats.md").read_text()
    answer = (figures / "answer.md").read_text()
    assert answer.startswith("| method − LoRA-FA orthogonal") and "| MRPC (accuracy)" in answer
    assert "| STS-B (pearson)" in answer  # the regression task's column: its correlation


def test_presentation_notebook_with_one_complete_method_skips_the_paired_stats(smoke_logs):
    """A study part-way through: the baseline complete, a second method still running, and a
    task whose first run is still going (no curves for it yet, the rest drawn)."""
    tmp, logs = smoke_logs
    for task in ("mrpc", "rte"):
        part = tmp / "partial" / task
        part.mkdir(parents=True)
        for f in (logs / task).glob("*.json"):
            h = json.loads(f.read_text())
            if "-svd-" in f.name or task == "rte":
                h["status"] = "running"
            elif "-orthogonal-" not in f.name:
                continue
            (part / f.name).write_text(json.dumps(h))
    figures = tmp / "partial_figures"
    nb = execute("plots_for_preso.ipynb", tmp, logs_dir=str(part.parent),
                 figures_dir=str(figures), lr_dir=str(tmp / "absent"), sweeps={})
    assert (figures / "study_results.md").is_file() and not (figures / "stats.md").exists()
    assert not (figures / "answer.md").exists()
    out = "".join("".join(o.get("text", "")) for c in nb["cells"] for o in c.get("outputs", []))
    assert "no paired comparison yet" in out
    assert "rte: no complete study run yet" in out
    assert (figures / "study_mrpc_curves.png").is_file()
    assert not (figures / "study_rte_curves.png").exists()
