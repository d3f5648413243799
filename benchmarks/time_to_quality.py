"""Time to quality, end to end (point 5 of the benchmark issue): one MRPC epoch + dev
evaluation on the embedded MiniLM, two ways.

    usual recipe   HuggingFace Trainer + PEFT LoRA (r=8, alpha=16, dropout 0), every input
                   padded to 128 tokens (padding="max_length"), A and B both train
    ours           pipeline.run_experiment: LoRA-FA with the svd init, dynamic padding (each
                   batch padded to its longest pair)

Same model, targets (the four attention linears), batch size 32, one epoch, AdamW, linear
schedule with 6% warmup, no weight decay, the same training examples. Each method may have its
own learning rate (defaults: the best of each in the project's MRPC lr sweep, logs/lr_sweep).
Wall-clock covers everything a user waits for: model load, adapter init, tokenisation,
training and the dev evaluation. Seeds run alternately (peft, ours, ours, peft, ...) so a
busy spell on the machine hits both.

    python -m benchmarks.time_to_quality --subsample 500          # ~10 min on 2 busy cores
    python -m benchmarks.time_to_quality                          # full MRPC, ~1 h there
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

if __package__ in (None, ""):  # `python benchmarks/time_to_quality.py`
    sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(
        __import__("os").path.abspath(__file__))))
from benchmarks import common as C  # noqa: E402

warnings.filterwarnings("ignore")

BATCH, EPOCHS, MAX_LEN, WARMUP = 32, 1, 128, 0.06


def run_ours(seed, lr, subsample, glue_dir) -> dict:
    from pipeline.train import RunConfig, run_experiment
    with tempfile.TemporaryDirectory() as logs:  # a fresh dir: run_experiment reuses old logs
        cfg = RunConfig(task="mrpc", model="minilm", variant="lorafa", init="svd", rank=C.RANK,
                        alpha=C.ALPHA, targets="attention", lr=lr, epochs=EPOCHS, batch_size=BATCH,
                        max_length=MAX_LEN, warmup_ratio=WARMUP, weight_decay=0.0, seed=seed,
                        subsample_train=subsample, glue_dir=glue_dir, logs_dir=logs,
                        checkpoint=False, quiet=True)
        t0 = time.perf_counter()
        h = run_experiment(cfg)
        total = time.perf_counter() - t0
    last = h["epochs"][-1]
    return dict(total_s=total, train_s=sum(e["train_time_s"] for e in h["epochs"]),
                accuracy=last["accuracy"], f1=last["f1"], n_train=h["data"]["n_train"],
                n_dev=h["data"]["n_dev"], trainable=h["model"]["trainable_params"])


def run_peft_trainer(seed, lr, subsample, glue_dir) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, Trainer,
                              TrainingArguments, set_seed)
    from transformers.utils import logging as hf_logging

    import lora
    from pipeline.data import load_examples, make_collator, tokenize
    from pipeline.models import resolve_model
    from pipeline.train import compute_metrics

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    set_seed(seed)
    path = resolve_model("minilm")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    names = lora.find_targets(model, "attention")  # the pipeline's default targets
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=C.RANK, lora_alpha=C.ALPHA,
                                             lora_dropout=0.0, target_modules=names))
    train = tokenize(load_examples("mrpc", "train", glue_dir, subsample), tok, MAX_LEN)
    dev = tokenize(load_examples("mrpc", "dev", glue_dir), tok, MAX_LEN)
    steps = math.ceil(len(train) / BATCH) * EPOCHS
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=BATCH, per_device_eval_batch_size=64,
            learning_rate=lr, num_train_epochs=EPOCHS, lr_scheduler_type="linear",
            warmup_steps=int(WARMUP * steps),  # the pipeline rounds the same way
            weight_decay=0.0, optim="adamw_torch",  # the pipeline's optimizer (torch AdamW)
            save_strategy="no", eval_strategy="no", logging_strategy="no", report_to="none",
            use_cpu=not torch.cuda.is_available(), seed=seed, disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=train,
                          data_collator=make_collator(tok, pad_to_max_length=True,
                                                      max_length=MAX_LEN))
        t_train = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - t_train
        pred = trainer.predict(dev)
    preds = np.asarray(pred.predictions).argmax(-1)
    metrics = compute_metrics("mrpc", preds, [f["labels"] for f in dev])
    return dict(total_s=time.perf_counter() - t0, train_s=train_s, n_train=len(train),
                n_dev=len(dev), trainable=C.trainable_params(model), **metrics)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subsample", type=int, default=None, help="first N training examples")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--lr-ours", type=float, default=5e-3)
    p.add_argument("--lr-peft", type=float, default=1e-3)
    p.add_argument("--glue-dir", default=None, help="default: $GLUE_DIR, then ../shared/glue")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    runners = {"peft-lora + Trainer, pad 128": (run_peft_trainer, args.lr_peft),
               "ours: pipeline, LoRA-FA svd, dynamic pad": (run_ours, args.lr_ours)}
    rows = []
    for i, seed in enumerate(args.seeds):
        order = list(runners) if i % 2 == 0 else list(runners)[::-1]
        for name in order:
            fn, lr = runners[name]
            r = dict(method=name, seed=seed, lr=lr, **fn(seed, lr, args.subsample, args.glue_dir))
            rows.append(r)
            print(f"  {name} seed {seed}: {r['total_s']:.0f}s total, {r['train_s']:.0f}s training, "
                  f"acc {r['accuracy']:.4f} f1 {r['f1']:.4f}", flush=True)

    peft_name, ours_name = list(runners)
    med = {n: statistics.median(r["total_s"] for r in rows if r["method"] == n) for n in runners}
    for r in rows:
        r["x_peft_total"] = r["total_s"] / med[peft_name]
    mean = {n: {k: statistics.mean(r[k] for r in rows if r["method"] == n)
                for k in ("total_s", "train_s", "accuracy", "f1")} for n in runners}
    ratio = med[ours_name] / med[peft_name]
    no_worse = all(mean[ours_name][k] >= mean[peft_name][k] for k in ("accuracy", "f1"))
    summary = [dict(method=n, **mean[n], median_total_s=med[n]) for n in runners]
    goal = dict(ours_x_peft_wall=ratio, wall_goal=C.verdict(ratio, 0.5),
                metric_no_worse="yes" if no_worse else "no",
                goal="met" if ratio <= 0.5 and no_worse else "NOT met")
    size = f"{rows[0]['n_train']} train (of 3668){' subsample' if args.subsample else ''}, " \
           f"{rows[0]['n_dev']} dev"
    text = "\n".join([
        C.table(rows, ["method", "seed", "lr", "total_s", "train_s", "accuracy", "f1", "trainable",
                       "x_peft_total"], f"**MRPC, MiniLM, 1 epoch + dev eval, {size}, batch {BATCH}**"),
        C.table(summary, ["method", "median_total_s", "total_s", "train_s", "accuracy", "f1"],
                "**Mean over seeds (total_s, train_s, accuracy, f1) and median total**"),
        C.table([goal], ["ours_x_peft_wall", "wall_goal", "metric_no_worse", "goal"],
                "**Goal: ours <= 0.5 x the wall-clock at no worse dev accuracy and F1 (seed means)**")])
    print(text)
    name = f"time_to_quality_n{args.subsample}" if args.subsample else "time_to_quality"
    path = C.write_json(name, {"args": vars(args), "rows": rows, "summary": summary,
                                            "goal": goal, "tables_md": text,
                                            "wall_s": time.perf_counter() - t_start})
    print(f"\nwrote {path} ({time.perf_counter() - t_start:.0f}s)")


if __name__ == "__main__":
    main()
