"""Run ids, atomic JSON logs, load_logs/load_curves, the sweep CLI and the plot helpers."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import analysis as A
from pipeline import logs as L
from pipeline import sweep as S
from pipeline.train import RunConfig

ROOT = Path(__file__).resolve().parents[1]


def test_run_id_readable_and_distinct():
    cfg = RunConfig(task="MRPC", variant="lorafa", init="svd", rank=8, alpha=16, lr=3e-3, seed=0)
    assert cfg.run_id == "mrpc-lorafa-svd-r8-lr3e-03-s0"
    assert RunConfig(lr=1.5e-4).run_id != RunConfig(lr=2e-4).run_id  # no rounding collisions
    assert RunConfig(lr=1.5e-4).run_id == "mrpc-lorafa-svd-r8-lr1.5e-04-s0"
    assert RunConfig(variant="full", init="svd", lr=2e-5).run_id == "mrpc-full-lr2e-05-s0"
    assert RunConfig(reg_coeff=0.01, subsample_train=64, seed=2, tag="x").run_id == \
        "mrpc-lorafa-svd-r8-lr5e-04-reg1e-02-n64-x-s2"
    assert RunConfig(rank=4, alpha=16).run_id.endswith("-r4-lr5e-04-a16-s0")
    assert RunConfig(svd_split="b", svd_solver="randomized").run_id == \
        "mrpc-lorafa-svd-r8-lr5e-04-splitb-rsvd4-s0"
    assert RunConfig(init="orthogonal", svd_split="b").run_id.endswith("orthogonal-r8-lr5e-04-s0")
    with pytest.raises(ValueError, match="unknown variant"):
        RunConfig(variant="qlora")
    with pytest.raises(ValueError, match="unknown init"):
        RunConfig(init="gaussian")


def test_grid_dedupes_full_variant():
    cfgs = S.grid({"task": "mrpc", "variant": ["full", "lorafa"], "init": ["kaiming", "svd"],
                   "rank": 8, "lr": 1e-4, "seed": [0, 1]})
    ids = [c.run_id for c in cfgs]
    assert len(ids) == len(set(ids)) == 2 + 4  # full ignores init: 2 seeds, lorafa 2x2


def test_atomic_write_keeps_old_file_on_error(tmp_path):
    p = tmp_path / "t" / "run.json"
    L.atomic_write_json({"a": 1}, p)
    with pytest.raises(TypeError):
        L.atomic_write_json({"a": object()}, p)  # not serialisable: fails mid-write
    assert json.loads(p.read_text()) == {"a": 1}
    assert os.listdir(p.parent) == ["run.json"]  # no temp file left behind
    assert oct(p.stat().st_mode & 0o777) == "0o644"


def test_steps_are_rounded_once_at_record_time_and_written_exactly(tmp_path):
    h = {"train": {"step": [], "loss": [], "lr": []},
         "test": {"at_best": {"accuracy": 0.7156862745098039}}, "names": ["a", "b"],
         "evals": [{"step": 1, "loss": 0.123456789012}], "ratio": [0.1 + 0.2, 1]}
    for step, loss in enumerate([0.6931471805599453, 0.1 + 0.2, 2e-12], 1):
        L.record_step(h, step, loss, lr=1e-3 / 3)
    assert h["train"]["loss"] == [0.6931472, 0.3, 2e-12]  # 7 significant digits, in memory
    assert h["train"]["lr"] == [0.0003333333] * 3
    path = tmp_path / "log.json"
    L.atomic_write_json(h, path)
    text = path.read_text()
    assert json.loads(text) == h  # the writer rounds nothing: scalars and lists stay exact
    assert '"loss": [0.6931472, 0.3, 2e-12]' in text  # one line per series
    assert '"ratio": [0.30000000000000004, 1]' in text
    assert '"names": [\n' in text  # lists of strings keep json's layout
    L.atomic_write_json(json.loads(text), path)
    assert path.read_text() == text  # rewriting a read-back log changes nothing


def test_summarize_final_and_best():
    h = {"evals": [{"step": 10, "epoch": 1, "dev_loss": 0.5, "accuracy": 0.7},
                   {"step": 20, "epoch": 2, "dev_loss": 0.4, "accuracy": 0.8},
                   {"step": 30, "epoch": 3, "dev_loss": 0.45, "accuracy": 0.75}]}
    L.summarize(h)
    assert h["final"] == {"dev_loss": 0.45, "accuracy": 0.75}
    assert h["best"] == {"dev_loss": {"value": 0.4, "step": 20},
                         "accuracy": {"value": 0.8, "step": 20}}


# ---------------------------------------------------------------- the sweep, end to end
def test_sweep_cli_runs_skips_and_loads(glue_dir, tmp_path, tiny_bert_dir, monkeypatch, capsys):
    logs = tmp_path / "logs"
    argv = ["--task", "mrpc", "--variant", "lorafa", "--init", "kaiming", "svd", "--rank", "4",
            "--lr", "1e-3", "--seeds", "0", "1", "--epochs", "2", "--batch-size", "8",
            "--subsample-train", "16", "--subsample-dev", "8", "--model", tiny_bert_dir(),
            "--glue-dir", str(glue_dir), "--logs-dir", str(logs), "--quiet"]
    assert S.main(argv) == 0
    files = sorted(p.name for p in (logs / "mrpc").glob("*.json"))
    assert files == [f"mrpc-lorafa-{i}-r4-lr1e-03-{m}-n16-s{s}.json"
                     for i in ("kaiming", "svd") for m in [Path(tiny_bert_dir()).name]
                     for s in (0, 1)]
    h = L.read_log(logs / "mrpc" / files[0])
    for key in ("schema_version", "config", "env", "train", "epochs", "evals", "wall_time_s",
                "model", "status", "final", "best"):
        assert key in h, key
    assert h["status"] == "complete" and h["env"]["packages"]["torch"]
    assert [e["step"] for e in h["evals"]] == [2, 4] and h["config"]["alpha"] == 8

    # a second sweep over the same grid runs nothing
    monkeypatch.setattr(S, "run_experiment", lambda cfg: pytest.fail(f"reran {cfg.run_id}"))
    assert S.main(argv) == 0
    # ... and the same run ids with other epochs are refused (naming the field), not skipped
    assert S.main([a if a != "2" else "3" for a in argv]) == 2
    assert "epochs: 2 -> 3" in capsys.readouterr().err

    runs = A.load_logs(logs)
    assert len(runs) == 4 and set(runs["init"]) == {"kaiming", "svd"}
    assert {"final_accuracy", "best_f1", "best_f1_step", "trainable_params"} <= set(runs)
    assert (runs["steps"] == 4).all() and (runs["status"] == "complete").all()
    curves = A.load_curves(logs)
    assert len(curves) == 4 * 2 * 3  # runs x evals x (dev_loss, accuracy, f1)
    train = A.load_curves(logs, kind="train")
    assert set(train["metric"]) == {"loss", "lr"} and len(train) == 4 * 4 * 2


def test_sweep_dry_run_cli(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pipeline.sweep", "--init", "kaiming", "svd",
                          "--lr", "1e-4", "5e-4", "--logs-dir", str(tmp_path), "--dry-run"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "mrpc-lorafa-svd-r8-lr5e-04-s0: todo" in out.stdout and "4 runs" in out.stdout
    assert not any(tmp_path.iterdir())  # nothing ran


def test_sweep_cli_refuses_a_conflicting_log_in_one_line(tmp_path):
    _fake_run(tmp_path, "svd", 0, [0.7])  # stored with epochs=3 (the RunConfig default)
    out = subprocess.run([sys.executable, "-m", "pipeline.sweep", "--init", "svd", "--lr", "5e-4",
                          "--epochs", "1", "--logs-dir", str(tmp_path), "--dry-run"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0 and "epochs: 3 -> 1" in out.stderr


# ---------------------------------------------------------------- synthetic logs
def _fake_run(logs, init, seed, accs, lr=5e-4):
    cfg = RunConfig(init=init, seed=seed, lr=lr, logs_dir=str(logs))
    h = {"schema_version": 1, "run_id": cfg.run_id, "status": "complete",
         "config": cfg.__dict__, "main_metric": "accuracy", "model": {"trainable_params": 1},
         "train": {"step": [1], "loss": [0.5], "lr": [1e-3]}, "wall_time_s": 1.0,
         "evals": [{"step": 10 * (i + 1), "epoch": i + 1, "accuracy": a, "dev_loss": 1 - a}
                   for i, a in enumerate(accs)]}
    L.summarize(h)
    L.atomic_write_json(h, L.log_path(logs, "mrpc", cfg.run_id))


def test_run_variants_orders_by_seed_and_shards_split_without_overlap(tmp_path):
    from pipeline.sweep import run_variants
    kw = dict(inits={"lora": ["kaiming"], "lorafa": ["orthogonal", "svd"]},
              lrs={"full": 1e-4, "lora": 1e-3, "lorafa": 5e-3}, seeds=[0, 1],
              logs_dir=str(tmp_path), dry_run=True)
    every = [r["run_id"] for r in run_variants("mrpc", ["full", "lora", "lorafa"], **kw)]
    assert len(every) == 8 and all(r.endswith("-s0") for r in every[:4])
    assert "mrpc-lora-kaiming-r8-lr1e-03-s1" in every and "mrpc-full-lr1e-04-s0" in every
    halves = [[r["run_id"] for r in run_variants("mrpc", ["full", "lora", "lorafa"],
                                                 shard=(k, 2), **kw)] for k in (0, 1)]
    assert sorted(halves[0] + halves[1]) == sorted(every) and not set(halves[0]) & set(halves[1])
    with pytest.raises(ValueError, match="no lr"):
        run_variants("mrpc", ["full"], inits={}, lrs={}, logs_dir=str(tmp_path), dry_run=True)
