"""The study protocol on a tiny BERT and the tiny GLUE fixture: validation carved from train
selects the checkpoint, GLUE dev is the test set measured at the val-best step, predictions
saved beside the log recompute the logged test metric exactly, the split is the same for every
method and seed, a killed run resumes to the same history and predictions, early stopping,
the gradient-aligned init and the adapter-input RMS."""
import copy
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import logs as L
from pipeline import train as T
from pipeline.config import RunConfig
from pipeline.data import load_examples, make_collator, split_sha
from pipeline.metrics import adapter_input_rms, metrics_from_outputs
from pipeline.train import run_experiment
from test_train import RUNNER, ROOT, assert_close_history, run_until_killed


def cfg_for(glue_dir, tmp_path, model, **kw):
    base = dict(task="mrpc", model=model, variant="lorafa", init="orthogonal", rank=4,
                lr=2e-2, epochs=2, batch_size=8, subsample_train=40, subsample_dev=16,
                val_fraction=0.2, eval_every_steps=2, logs_dir=str(tmp_path / "logs"),
                glue_dir=str(glue_dir), quiet=True)
    base.update(kw)
    return RunConfig(**base)


class Spy:
    """Wraps T.evaluate: records, per call, the split size, the result and the trainable
    tensors the model had."""

    def __init__(self, monkeypatch):
        self.calls, self.real = [], T.evaluate
        monkeypatch.setattr(T, "evaluate", self)

    def __call__(self, model, features, *a, **k):
        out = self.real(model, features, *a, **k)
        result = out[0] if isinstance(out, tuple) else out
        tensors = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        self.calls.append((len(features), result, tensors))
        return out


def test_val_selects_and_test_is_measured_at_the_val_best_step(glue_dir, tmp_path,
                                                                tiny_bert_dir, monkeypatch):
    spy = Spy(monkeypatch)
    cfg = cfg_for(glue_dir, tmp_path, tiny_bert_dir(0.0))
    h = run_experiment(cfg)
    assert h["schema_version"] == 2 and h["status"] == "complete"
    d = h["data"]
    assert (d["n_train"], d["n_val"], d["n_test"], d["eval_split"]) == (32, 8, 16, "val")
    assert d["split_seed"] == 0 and len(d["val_ids_sha"]) == 16
    # every selection eval ran on val (8 rows), the two test evals on GLUE dev (16 rows)
    sizes = [n for n, _, _ in spy.calls]
    assert sizes[:len(h["evals"])] == [8] * len(h["evals"]) and set(sizes[len(h["evals"]):]) == {16}
    for (_, result, _), rec in zip(spy.calls, h["evals"]):
        assert {k: rec[k] for k in result} == result
    # the selection is the earliest best val accuracy; test at_best is that model on dev
    acc = [e["accuracy"] for e in h["evals"]]
    sel = h["selection"]
    assert sel["metric"] == "accuracy" and sel["value"] == max(acc)
    assert sel["step"] == h["evals"][acc.index(max(acc))]["step"]
    assert h["test"]["at_best"]["step"] == sel["step"] and h["test"]["final"]["step"] == 8
    at_val_best = spy.calls[acc.index(max(acc))][2]
    test_calls = [c for c in spy.calls if c[0] == 16]
    best_call = next(c for c in test_calls if {k: c[1][k] for k in c[1]} ==
                     {k: h["test"]["at_best"][k] for k in c[1]})
    for n, t in at_val_best.items():
        assert torch.equal(best_call[2][n], t), n  # test was measured with the val-best tensors
    final_call = test_calls[0]
    assert {k: h["test"]["final"][k] for k in final_call[1]} == final_call[1]
    assert not (Path(cfg.logs_dir) / "mrpc" / ".ckpt").exists()


def test_predictions_recompute_the_logged_test_metric(glue_dir, tmp_path, tiny_bert_dir):
    for task in ("mrpc", "stsb"):
        cfg = cfg_for(glue_dir, tmp_path, tiny_bert_dir(0.0), task=task, epochs=1)
        h = run_experiment(cfg)
        assert h["predictions"] == f"{cfg.run_id}.preds.npz"
        path = Path(cfg.logs_dir) / task / h["predictions"]
        with zipfile.ZipFile(path) as zf:  # deflated: the committed logs count against 64 MiB
            assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_DEFLATED}
        z = np.load(path)
        assert z["index"].tolist() == list(range(16))
        assert z["pred"].shape == ((16, 2) if task == "mrpc" else (16,))
        dev = load_examples(task, "dev", glue_dir, 16)
        assert z["label"].tolist() == [e["label"] for e in dev]
        at_best = {k: v for k, v in h["test"]["at_best"].items() if k not in ("step", "loss")}
        assert metrics_from_outputs(task, z["pred"], z["label"]) == at_best  # exactly
        # the floor the figures draw: one constant prediction from the training labels
        train = load_examples(task, "train", glue_dir, 40)
        labels = np.array([e["label"] for e in train])
        const = h["data"]["constant"]["test"]
        if task == "mrpc":
            majority = np.bincount(labels[labels >= 0]).argmax()
            assert {"val", "test"} <= set(h["data"]["constant"])
            assert const["accuracy"] == pytest.approx(np.mean(z["label"] == majority))
        else:
            assert const == {"pearson": 0.0, "spearman": 0.0}


def test_no_predictions_when_not_asked_and_pilot_protocol(glue_dir, tmp_path, tiny_bert_dir):
    h = run_experiment(cfg_for(glue_dir, tmp_path, tiny_bert_dir(0.0), epochs=1,
                               save_predictions=False))
    assert h["predictions"] is None and h["test"]["at_best"]
    pilot = run_experiment(cfg_for(glue_dir, tmp_path / "p", tiny_bert_dir(0.0), epochs=1,
                                   val_fraction=0))
    d = pilot["data"]
    assert d["eval_split"] == "dev" and d["n_val"] == 0 and d["n_train"] == 40
    assert pilot["test"] is None and pilot["predictions"] is None and pilot["selection"]


def test_same_split_for_every_method_and_seed(glue_dir, tiny_bert_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert_dir(0.0))
    kw = dict(task="rte", glue_dir=str(glue_dir), subsample_train=50, val_fraction=0.2)
    splits = []
    for over in (dict(), dict(seed=3), dict(variant="full"), dict(init="svd", lr=1e-3),
                 dict(variant="lora", init="kaiming", seed=1)):
        train, val, test, info = T.load_splits(RunConfig(**kw, **over), tok)
        splits.append((info["val_ids_sha"], [f["input_ids"] for f in val]))
        assert len(train) + len(val) == 50 and info["n_val"] == 10
    assert all(s == splits[0] for s in splits)
    other = T.load_splits(RunConfig(**kw, split_seed=1), tok)[3]
    assert other["val_ids_sha"] != splits[0][0]


def test_resume_reproduces_history_and_predictions(glue_dir, tmp_path, tiny_bert_dir):
    model = tiny_bert_dir(0.1)
    script = tmp_path / "runner.py"
    script.write_text(RUNNER.format(root=str(ROOT)))
    # 4 steps an epoch, an eval every step; the val-best step falls in epoch 1 (lr decays to 0
    # over 3 epochs at a far too high lr), so the best tensors come back from the checkpoint
    kw = dict(epochs=3, subsample_train=40, val_fraction=0.2, eval_every_steps=1, lr=0.3)
    cfg = cfg_for(glue_dir, tmp_path / "killed", model, **kw)
    killed = run_until_killed(script, cfg, 1)
    assert killed["status"] == "running" and len(killed["epochs"]) == 1
    resumed = run_experiment(cfg)
    clean = run_experiment(cfg_for(glue_dir, tmp_path / "clean", model, **kw))
    assert resumed["resumed_at_epoch"] == [1]
    assert_close_history(resumed, clean, tol=1e-9)
    assert resumed["selection"] == clean["selection"] and resumed["selection"]["step"] <= 4
    assert resumed["test"] == clean["test"]
    a, b = (np.load(Path(c.logs_dir) / "mrpc" / h["predictions"])
            for c, h in ((cfg, resumed), (cfg_for(glue_dir, tmp_path / "clean", model, **kw),
                                          clean)))
    assert np.array_equal(a["pred"], b["pred"])


def test_patience_stops_early_and_tests_at_the_val_best_step(glue_dir, tmp_path, tiny_bert_dir):
    cfg = cfg_for(glue_dir, tmp_path, tiny_bert_dir(0.0), epochs=5, eval_every_steps=1,
                  patience=2, lr=0.3)
    h = run_experiment(cfg)
    stop = h["stopped_early"]
    assert stop is not None and h["status"] == "complete"
    assert h["train"]["step"][-1] == stop["step"] < 20  # 5 epochs of 4 steps not all run
    assert L.evals_since_best(h) == 2 and h["evals"][-1]["step"] == stop["step"]
    assert h["test"]["at_best"]["step"] == h["selection"]["step"] < stop["step"]
    assert h["epochs"][-1]["step"] == stop["step"]


def test_stored_pilot_log_is_not_taken_for_a_new_protocol_run(glue_dir, tmp_path,
                                                             tiny_bert_dir):
    cfg = cfg_for(glue_dir, tmp_path, tiny_bert_dir(0.0), epochs=1)
    old = {k: v for k, v in cfg.__dict__.items() if k not in ("val_fraction", "val_max",
                                                              "split_seed", "patience")}
    log = {"schema_version": 1, "run_id": cfg.run_id, "status": "complete", "config": old}
    L.atomic_write_json(log, L.log_path(cfg.logs_dir, "mrpc", cfg.run_id))
    with pytest.raises(ValueError, match=r"different config \(val_fraction: 0.0 -> 0.2\)"):
        run_experiment(cfg)


def test_length_grouped_run(glue_dir, tmp_path, tiny_bert_dir, monkeypatch):
    from pipeline import data as D

    seen = []
    real = D.length_grouped_batches
    monkeypatch.setattr(T, "length_grouped_batches",
                        lambda *a, **k: seen.append(a[1:]) or real(*a, **k))
    h = run_experiment(cfg_for(glue_dir, tmp_path, tiny_bert_dir(0.0), length_grouped=True))
    assert h["status"] == "complete" and len(h["train"]["step"]) == 8
    assert (8, 0, 1) in seen and "-lg-" in h["run_id"]  # (batch_size, seed, epoch 1)


# ---------------------------------------------------------------- gradient init, ||A x||
def first_batches(cfg, n=2):
    model, tok, _ = T.load_model(cfg, 2)
    train, *_ = T.load_splits(cfg, tok)
    coll = make_collator(tok)
    return model, [coll([train[i] for i in b]) for b in T.epoch_batches(cfg, train, 0)[:n]]


def test_gradient_init_leaves_the_model_unchanged_at_step_0(glue_dir, tmp_path, tiny_bert_dir):
    cfg = cfg_for(glue_dir, tmp_path, tiny_bert_dir(0.0), init="gradient", gradient_batches=2)
    torch.manual_seed(0)
    model, batches = first_batches(cfg)
    base = copy.deepcopy(model).eval()
    adapted = T.add_adapters(cfg, model, batches)
    model.eval()
    inputs = {k: v for k, v in batches[0].items() if k != "labels"}
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, base(**inputs).logits)
    for name in adapted:  # A is not a random draw: rows orthonormal, not B0 = 0 by accident
        a = model.get_submodule(name).lora_A
        assert torch.allclose(a @ a.T, torch.eye(4), atol=1e-5)
    h = run_experiment(cfg)
    g = h["gradient_init"]
    assert h["status"] == "complete" and (g["batches"], g["examples"]) == (2, 16)
    ids = sorted(i for b in T.epoch_batches(cfg, list(range(32)), 0)[:2] for i in b)
    assert g["ids_sha"] == split_sha(ids)
    assert "-gb2-" in h["run_id"]


def test_adapter_input_rms_by_hand(glue_dir, tmp_path, tiny_bert_dir):
    cfg = cfg_for(glue_dir, tmp_path, tiny_bert_dir(0.0))
    model, batches = first_batches(cfg)
    T.add_adapters(cfg, model)
    stats = adapter_input_rms(model, batches)
    name = "bert.encoder.layer.0.attention.self.query"
    mod = model.get_submodule(name)
    seen = []
    handle = mod.register_forward_hook(lambda m, i, o: seen.append(i[0] @ m.lora_A.T))
    model.eval()
    with torch.no_grad():
        for b in batches:
            model(**{k: v for k, v in b.items() if k != "labels"})
    handle.remove()
    h = torch.cat([x[b["attention_mask"].bool()] for x, b in zip(seen, batches)])  # real tokens
    assert stats["per_layer"][name] == pytest.approx(float(h.pow(2).mean().sqrt()), rel=1e-5)
    assert stats["ax_rms"] == pytest.approx(np.mean(list(stats["per_layer"].values())))
    assert stats["batches"] == 2 and len(stats["per_layer"]) == 8
    h = run_experiment(cfg)
    assert h["adapter_stats"]["ax_rms"] > 0
    assert json.loads(Path(cfg.logs_dir, "mrpc", f"{cfg.run_id}.json").read_text())[
        "adapter_stats"] == h["adapter_stats"]
