"""Train/eval loop: metrics, every variant on MiniLM, reproducibility, NaN stop, resume after
SIGKILL, and a 2-process (gloo) run equal to a single-process one."""
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import logs as L
from pipeline import train as T
from pipeline.metrics import constant_metrics
from pipeline.train import RunConfig, compute_metrics, run_experiment

ROOT = Path(__file__).resolve().parents[1]
TIME_KEYS = {"train_time_s", "wall_time_s", "started_at", "updated_at", "resumed_at_epoch",
             "env", "config"}


def tiny(glue_dir, tmp_path, model, **kw):
    base = dict(task="mrpc", model=model, variant="lorafa", init="svd", rank=4, alpha=8,
                lr=5e-3, epochs=2, batch_size=8, subsample_train=24, subsample_dev=16,
                logs_dir=str(tmp_path / "logs"), glue_dir=str(glue_dir), quiet=True,
                val_fraction=0)  # the pilot protocol (eval on dev); the val protocol: test_protocol
    base.update(kw)
    return RunConfig(**base)


def strip_times(h):
    """The parts of a history that must be reproducible (no timings, paths, env)."""
    out = {k: v for k, v in h.items() if k not in TIME_KEYS}
    out["epochs"] = [{k: v for k, v in e.items() if k not in TIME_KEYS} for e in h["epochs"]]
    return out


def assert_close_history(a, b, tol=1e-6):
    a, b = strip_times(a), strip_times(b)
    assert a["train"]["step"] == b["train"]["step"]
    for x, y in zip(a["train"]["loss"] + a["train"]["lr"], b["train"]["loss"] + b["train"]["lr"]):
        assert x == pytest.approx(y, rel=tol, abs=tol)
    assert len(a["evals"]) == len(b["evals"])
    for ea, eb in zip(a["evals"], b["evals"]):
        assert ea.keys() == eb.keys()
        for k in ea:
            assert ea[k] == pytest.approx(eb[k], rel=tol, abs=tol), k


# ---------------------------------------------------------------- metrics
def test_metrics_hand_checked():
    # labels 1 1 0 0, preds 1 0 0 0: TP=1 TN=2 FP=0 FN=1
    m = compute_metrics("mrpc", [1, 0, 0, 0], [1, 1, 0, 0])
    assert m["accuracy"] == 0.75 and m["f1"] == pytest.approx(2 / 3)
    assert compute_metrics("cola", [1, 0, 0, 0], [1, 1, 0, 0])["matthews"] == pytest.approx(
        2 / math.sqrt(12))  # (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))
    s = compute_metrics("stsb", [1, 2, 3, 4], [1, 2, 3, 5])
    assert s["pearson"] == pytest.approx(6.5 / math.sqrt(5 * 8.75)) and s["spearman"] == 1.0
    assert compute_metrics("stsb", [4, 3, 2, 1], [1, 2, 3, 5])["spearman"] == -1.0
    assert compute_metrics("stsb", [2, 2, 2, 2], [1, 2, 3, 5])["pearson"] == 0.0  # not NaN
    assert compute_metrics("rte", [0, 1, 1], [0, 1, 0]) == {"accuracy": pytest.approx(2 / 3)}
    assert compute_metrics("mrpc", [1, 0, 0, 0], [1, 1, 0, 0], only=["f1"]) == {"f1": m["f1"]}


def test_constant_metrics_majority_class_and_mean_score():
    # train: 3 ones, 1 zero -> predict 1; labels 1 0 0: accuracy 1/3, F1 2*1/(2*1+2) = 0.5
    assert constant_metrics("mrpc", [1, 1, 0, 1], [1, 0, 0]) == {
        "accuracy": pytest.approx(1 / 3), "f1": pytest.approx(0.5)}
    assert constant_metrics("rte", [0, 1], [0, 0, 1]) == {"accuracy": pytest.approx(2 / 3)}  # tie: 0
    assert constant_metrics("cola", [0, 1, 1], [0, 1]) == {"matthews": 0.0}
    assert constant_metrics("stsb", [1.0, 3.0], [0.5, 4.0, 2.0]) == {"pearson": 0.0,
                                                                   "spearman": 0.0}


# ---------------------------------------------------------------- every variant on MiniLM
MINILM_TRAINABLE = {  # 24 attention linears of 384x384, rank 8; head = classifier 384x2 + 2
    ("lorafa", "svd"): 24 * 384 * 8 + 770,
    ("lora", "kaiming"): 2 * 24 * 384 * 8 + 770,
}


@pytest.mark.parametrize("variant,init,reg", [
    ("full", "svd", 0.0), ("lora", "kaiming", 0.0), ("lorafa", "svd", 0.1)])
def test_two_step_smoke_minilm(glue_dir, tmp_path, variant, init, reg):
    cfg = RunConfig(task="mrpc", variant=variant, init=init, reg_coeff=reg, lr=1e-3, epochs=1,
                    batch_size=4, subsample_train=8, subsample_dev=8, quiet=True, val_fraction=0,
                    logs_dir=str(tmp_path / "logs"), glue_dir=str(glue_dir))
    h = run_experiment(cfg)
    assert h["status"] == "complete" and h["train"]["step"] == [1, 2]
    assert all(math.isfinite(x) for x in h["train"]["loss"])
    assert set(h["final"]) == {"loss", "accuracy", "f1"}
    n = h["model"]["trainable_params"]
    if variant == "full":
        assert n == h["model"]["num_params"] and h["model"]["adapted_modules"] == []
        assert cfg.run_id == "mrpc-full-lr1e-03-n8-s0"
    else:
        assert len(h["model"]["adapted_modules"]) == 24
        assert n == MINILM_TRAINABLE[(variant, init)]
    if reg:
        assert len(h["train"]["penalty"]) == 2 and h["train"]["penalty"][0] == 0.0  # B == B0
        assert h["train"]["penalty"][1] > 0.0
    saved = json.loads(Path(tmp_path / "logs" / "mrpc" / f"{cfg.run_id}.json").read_text())
    assert saved["status"] == "complete" and saved["train"] == h["train"]
    assert not (tmp_path / "logs" / "mrpc" / ".ckpt").exists()  # removed when complete


@pytest.mark.parametrize("init", ["kaiming", "orthogonal", "svd_minor"])
def test_other_inits_tiny(glue_dir, tmp_path, tiny_bert_dir, init):
    h = run_experiment(tiny(glue_dir, tmp_path, tiny_bert_dir(), init=init, epochs=1))
    assert h["status"] == "complete" and len(h["train"]["step"]) == 3
    assert h["config"]["init"] == init and h["model"]["trainable_params"] == 2 * 4 * 32 * 4 + 66


def test_stsb_and_cola_tiny(glue_dir, tmp_path, tiny_bert_dir):
    h = run_experiment(tiny(glue_dir, tmp_path, tiny_bert_dir(), task="stsb", epochs=1))
    assert set(h["final"]) == {"loss", "pearson", "spearman"}
    h = run_experiment(tiny(glue_dir, tmp_path, tiny_bert_dir(), task="cola", epochs=1,
                            eval_every_steps=1))
    assert "matthews" in h["final"] and [e["step"] for e in h["evals"]] == [1, 2, 3]


def test_head_lr_param_groups(tiny_bert_dir):
    cfg = RunConfig(model=tiny_bert_dir(), rank=2, lr=1e-4, head_lr=1e-2, weight_decay=0.1)
    model, *_ = T.load_model(cfg, 2)
    T.add_adapters(cfg, model)
    opt, _ = T.make_optimizer(model, cfg, total_steps=10)
    by_lr = {}
    for g in opt.param_groups:
        by_lr.setdefault(g["lr"], 0)
        by_lr[g["lr"]] += sum(p.numel() for p in g["params"])
    assert by_lr == {1e-2: 32 * 2 + 2, 1e-4: 2 * 4 * 32 * 2}  # head | 4 B's per layer x 2 layers
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, 0.1}  # bias without decay


# ---------------------------------------------------------------- reproducibility, NaN
def test_same_seed_same_history(glue_dir, tmp_path, tiny_bert_dir):
    m = tiny_bert_dir(0.1)  # dropout on: the RNG must be seeded too
    a = run_experiment(tiny(glue_dir, tmp_path / "a", m))
    b = run_experiment(tiny(glue_dir, tmp_path / "b", m))
    assert strip_times(a)["train"] == strip_times(b)["train"] and a["evals"] == b["evals"]
    c = run_experiment(tiny(glue_dir, tmp_path / "c", m, seed=1))
    assert c["train"]["loss"] != a["train"]["loss"]
    again = run_experiment(tiny(glue_dir, tmp_path / "a", m))  # complete log: not rerun
    assert again.get("skipped") and again["train"] == a["train"]


def test_nonfinite_loss_stops_and_keeps_history(glue_dir, tmp_path, tiny_bert_dir, monkeypatch):
    calls = {"n": 0}
    real = T.per_example_loss

    def poisoned(logits, labels, regression):
        calls["n"] += 1
        loss = real(logits, labels, regression)
        return loss * float("nan") if calls["n"] == 4 else loss  # training step 4 (evals: metrics)
    monkeypatch.setattr(T, "per_example_loss", poisoned)
    cfg = tiny(glue_dir, tmp_path, tiny_bert_dir(), epochs=3)
    h = run_experiment(cfg)
    assert h["status"] == "failed" and "non-finite loss" in h["error"] and "step 4" in h["error"]
    assert h["train"]["step"] == [1, 2, 3] and len(h["evals"]) == 1
    saved = json.loads(Path(cfg.logs_dir, "mrpc", f"{cfg.run_id}.json").read_text())
    assert saved["status"] == "failed" and saved["train"]["step"] == [1, 2, 3]


# ---------------------------------------------------------------- resume after SIGKILL
RUNNER = """
import json, sys, time
sys.path.insert(0, {root!r})
import pipeline.train as T
cfg = T.RunConfig(**json.loads(sys.argv[1]))
if len(sys.argv) > 2:  # slow the steps so the kill lands mid-epoch
    real = T.train_step
    def slow(*a, **k):
        time.sleep(float(sys.argv[2]))
        return real(*a, **k)
    T.train_step = slow
T.run_experiment(cfg)
"""


def run_until_killed(script, cfg, epoch, resumes=0):
    """Start a slowed run (0.3 s a step, 4 steps an epoch, an eval every step) in a subprocess
    and SIGKILL it once its log holds the eval of step 2 of epoch ``epoch + 1``; returns the
    log it left (``resumes``: how many resumes came before, to tell its log from the last)."""
    proc = subprocess.Popen([sys.executable, str(script), json.dumps(cfg.__dict__), "0.3"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = Path(cfg.logs_dir) / "mrpc" / f"{cfg.run_id}.json"
    deadline = time.time() + 120
    def reached():
        h = json.loads(log.read_text()) if log.exists() else {"evals": []}
        return (len(h.get("resumed_at_epoch", [])) == resumes
                and any(e["step"] == 4 * epoch + 2 for e in h["evals"]))
    while not reached():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, f"no eval at step {4 * epoch + 2} after 120 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return json.loads(log.read_text())


def test_resume_after_sigkill(glue_dir, tmp_path, tiny_bert_dir):
    """Killed in epoch 2, resumed and killed in epoch 2 again, resumed: the same history as
    an uninterrupted run; every resume listed; the wall time counts every session."""
    model = tiny_bert_dir(0.1)
    script = tmp_path / "runner.py"
    script.write_text(RUNNER.format(root=str(ROOT)))
    kw = dict(epochs=3, subsample_train=32, eval_every_steps=1)
    cfg = tiny(glue_dir, tmp_path / "killed", model, **kw)
    first = run_until_killed(script, cfg, 1)
    assert first["status"] == "running" and len(first["epochs"]) == 1  # killed inside epoch 2
    assert len(first["evals"]) >= 6  # the log holds evals of epoch 2 the checkpoint lacks
    second = run_until_killed(script, cfg, 1, resumes=1)  # killed in epoch 2 again
    assert second["resumed_at_epoch"] == [1] and len(second["epochs"]) == 1
    assert second["wall_time_s"] > first["wall_time_s"]  # continued from the latest log
    t = time.time()
    resumed = run_experiment(cfg)
    elapsed = time.time() - t
    assert resumed["status"] == "complete" and resumed["resumed_at_epoch"] == [1, 1]
    assert resumed["wall_time_s"] >= second["wall_time_s"] + 0.5 * elapsed
    clean = run_experiment(tiny(glue_dir, tmp_path / "clean", model, **kw))
    assert_close_history(resumed, clean, tol=1e-9)
    assert not (Path(cfg.logs_dir) / "mrpc" / ".ckpt").exists()  # removed when complete


def test_resumed_history_keeps_every_session():
    ckpt = {"run_id": "r", "wall_time_s": 10.0, "resumed_at_epoch": [1]}
    stored = {"run_id": "r", "wall_time_s": 25.0, "resumed_at_epoch": [1, 1]}
    h = L.resumed_history(dict(ckpt, resumed_at_epoch=[1]), stored, 2)
    assert h["wall_time_s"] == 25.0 and h["resumed_at_epoch"] == [1, 1, 2]
    h = L.resumed_history(dict(ckpt, resumed_at_epoch=[1]), None, 2)  # the log was deleted
    assert h["wall_time_s"] == 10.0 and h["resumed_at_epoch"] == [1, 2]


def test_checkpoint_config_mismatch(glue_dir, tmp_path, tiny_bert_dir):
    cfg = tiny(glue_dir, tmp_path, tiny_bert_dir())
    run_experiment(cfg)
    with pytest.raises(ValueError, match="different config"):
        run_experiment(tiny(glue_dir, tmp_path, tiny_bert_dir(), epochs=3))


# ---------------------------------------------------------------- 2 processes (gloo)
DDP_RUNNER = """
import json, sys
sys.path.insert(0, {root!r})
from safetensors.torch import save_file
import pipeline.train as T
cfg = T.RunConfig(**json.loads(sys.argv[1]))
def save(model, acc, history):
    sd = {{n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}}
    save_file(sd, sys.argv[2] + f"/rank{{acc.process_index}}.safetensors")
T.run_experiment(cfg, on_end=save)
"""


def test_two_process_run_matches_single(glue_dir, tmp_path, tiny_bert_dir):
    from safetensors.torch import load_file

    model = tiny_bert_dir(0.0)  # no dropout: per-process RNG streams cannot matter
    # the val protocol: 34 rows = 27 train + 7 val; batch 8: the last global batch (3) splits
    # 2/1, val 7 splits 4/3, test 13 splits 7/6
    kw = dict(subsample_train=34, subsample_dev=13, reg_coeff=0.01, grad_clip=1.0,
              val_fraction=0.2, eval_every_steps=3)
    script = tmp_path / "ddp.py"
    script.write_text(DDP_RUNNER.format(root=str(ROOT)))
    cfg = tiny(glue_dir, tmp_path / "ddp", model, **kw)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(29500 + os.getpid() % 1000)}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", env["MASTER_PORT"], str(script),
                          json.dumps(cfg.__dict__), str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r0, r1 = (load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1))
    assert r0.keys() == r1.keys() and any(".lora_B" in k for k in r0)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k  # DDP keeps the processes in lockstep
    ddp = json.loads((Path(cfg.logs_dir) / "mrpc" / f"{cfg.run_id}.json").read_text())
    assert ddp["env"]["num_processes"] == 2 and ddp["status"] == "complete"

    single_weights = {}
    single = run_experiment(tiny(glue_dir, tmp_path / "single", model, **kw),
                            on_end=lambda m, a, h: single_weights.update(
                                {n: p.detach().clone() for n, p in m.named_parameters()
                                 if p.requires_grad}))
    assert_close_history(ddp, single, tol=1e-4)
    assert (ddp["data"]["n_train"], ddp["data"]["n_val"]) == (27, 7)
    assert ddp["selection"]["step"] == single["selection"]["step"]
    for which in ("at_best", "final"):
        for k, v in single["test"][which].items():
            assert ddp["test"][which][k] == pytest.approx(v, abs=1e-4), (which, k)
    preds = [np.load(Path(c, "mrpc", h["predictions"]))["pred"]
             for c, h in ((cfg.logs_dir, ddp), (tmp_path / "single" / "logs", single))]
    assert preds[0].shape == (13, 2) and np.allclose(preds[0], preds[1], atol=1e-4)
    for k in r0:
        assert torch.allclose(r0[k], single_weights[k], atol=1e-4), k
