"""One train/eval loop for every task and variant, built on accelerate.

The protocol: a validation split carved from train (``val_fraction``; seeded by ``split_seed``
alone, so every method and training seed sees the same split) is evaluated every
``eval_every_steps`` and at epoch ends; it alone selects the checkpoint (the val-best step of
the main metric) and stops early (``patience``). GLUE dev is the test set: evaluated at the
val-best step and at the end, its per-example outputs at the val-best step saved beside the
log. ``val_fraction=0`` is the pilot protocol (evaluate and select on GLUE dev, no test).

The same code runs on CPU, one GPU, or ``accelerate launch`` (DDP). ``batch_size`` is the
GLOBAL batch per optimizer step: every process takes its contiguous part of each global batch
and the loss is weighted so the averaged DDP gradient equals the single-process gradient of the
batch mean. Data order depends only on (seed, epoch), so DDP, single-process and resumed runs
see the same batches.

    from pipeline.train import RunConfig, run_experiment
    history = run_experiment(RunConfig(task="mrpc", variant="lorafa", init="svd", lr=5e-4))
"""
from __future__ import annotations

import math
import time
from functools import partial

import numpy as np
import torch
from tqdm.auto import tqdm

from . import checkpoints as C
from . import logs as L
from .config import NON_SEMANTIC, VARIANTS, RunConfig, fmt_float  # noqa: F401 (re-exported)
from .data import (HUB, epoch_order, get_task, global_batches, length_grouped_batches,
                   load_examples, make_collator, resolve_glue_dir, shard, split_sha, tokenize,
                   train_val_split)
from .metrics import (adapter_input_rms, compute_metrics, constant_metrics,  # noqa: F401
                      evaluate, per_example_loss)


class NonFiniteLoss(RuntimeError):
    pass


# ---------------------------------------------------------------- data
def load_splits(cfg: RunConfig, tokenizer):
    """(train, val, test) features and the log's "data" record. val is carved from train
    (``train_val_split``, stratified for classification); test is GLUE dev. With
    val_fraction=0, val is GLUE dev and there is no test."""
    spec = get_task(cfg.task)
    glue_dir = resolve_glue_dir(cfg.glue_dir)
    train = load_examples(cfg.task, "train", glue_dir, cfg.subsample_train)
    dev = tokenize(load_examples(cfg.task, cfg.dev_split, glue_dir, cfg.subsample_dev),
                   tokenizer, cfg.max_length)
    train_idx, val_idx = train_val_split([e["label"] for e in train], cfg.val_fraction,
                                         seed=cfg.split_seed, max_val=cfg.val_max,
                                         stratify=not spec.is_regression)
    feats = tokenize(train, tokenizer, cfg.max_length)
    train_f, val_f = [feats[i] for i in train_idx], [feats[i] for i in val_idx]
    val_f, test_f = (val_f, dev) if val_idx else (dev, [])
    if not train_f:
        raise ValueError(f"no training rows left after holding out {len(val_idx)} for "
                         "validation: raise subsample_train or lower val_fraction")
    info = {"source": f"folder:{L.portable_path(glue_dir)}" if glue_dir != HUB else HUB,
            "n_train": len(train_f), "n_val": len(val_f) if val_idx else 0,
            "n_test": len(test_f), "eval_split": "val" if val_idx else "dev",
            "dev_split": cfg.dev_split, "split_seed": cfg.split_seed,
            "val_fraction": cfg.val_fraction,
            "val_ids_sha": split_sha(val_idx) if val_idx else None}
    train_labels = [f["labels"] for f in train_f]
    info["constant"] = {name: constant_metrics(cfg.task, train_labels, [f["labels"] for f in fs])
                        for name, fs in (("val", val_f), ("test", test_f)) if fs}
    return train_f, val_f, test_f, info


def epoch_batches(cfg: RunConfig, train_feats, epoch: int) -> list[list[int]]:
    """The global batches of one epoch; depend only on (seed, epoch)."""
    if cfg.length_grouped:
        return length_grouped_batches([len(f["input_ids"]) for f in train_feats],
                                      cfg.batch_size, cfg.seed, epoch)
    return global_batches(epoch_order(len(train_feats), cfg.seed, epoch), cfg.batch_size)


# ---------------------------------------------------------------- model and optimizer
def load_model(cfg: RunConfig, num_labels: int):
    """(model, tokenizer, model path): the pretrained encoder with a fresh head, seeded by
    the caller."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from .models import resolve_model

    path = resolve_model(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected, not news
    if cfg.quiet:
        hf_logging.disable_progress_bar()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    finally:
        hf_logging.set_verbosity(verbosity)
        if cfg.quiet:
            hf_logging.enable_progress_bar()
    return model, tokenizer, path


def batch_loss(model, batch, regression: bool):
    """Mean per-example loss of a collated batch (labels inside)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return per_example_loss(model(**inputs).logits, batch["labels"], regression).mean()


def add_adapters(cfg: RunConfig, model, batches=None) -> list[str]:
    """The variant's adapters and trainable set (nothing for 'full'); returns the adapted
    module names. init='gradient' estimates dL/dW on ``batches`` first (collated, with
    labels): A spans the top right singular vectors of that gradient."""
    if cfg.variant == "full":
        return []
    from lora import add_lora, estimate_gradients, mark_only_lora_as_trainable

    gradients = None
    if cfg.init == "gradient":
        loss_fn = partial(batch_loss, regression=get_task(cfg.task).is_regression)
        gradients = estimate_gradients(model, loss_fn, batches, targets=cfg.targets,
                                       center=cfg.gradient_center)
    adapted = add_lora(model, rank=cfg.rank, alpha=cfg.alpha, init=cfg.init,
                       targets=cfg.targets, freeze_a=cfg.variant == "lorafa",
                       dropout=cfg.lora_dropout, seed=cfg.seed, rslora=cfg.rslora,
                       svd_solver=cfg.svd_solver, niter=cfg.niter, svd_split=cfg.svd_split,
                       gradients=gradients, gradient_step=cfg.gradient_step)
    mark_only_lora_as_trainable(model, head=True)
    return adapted


def make_optimizer(model, cfg: RunConfig, total_steps: int):
    """AdamW over trainable params (no weight decay on biases and LayerNorm; the head gets
    ``head_lr`` when set) and its linear warmup-then-decay schedule."""
    from transformers import get_linear_schedule_with_warmup

    from lora.layer import HEAD_NAMES

    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        head = name.split(".")[0] in HEAD_NAMES
        decay = not (name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name)
        lr = cfg.head_lr if (head and cfg.head_lr is not None) else cfg.lr
        groups.setdefault((lr, decay), []).append(p)
    param_groups = [{"params": ps, "lr": lr, "weight_decay": cfg.weight_decay if decay else 0.0}
                    for (lr, decay), ps in groups.items()]
    optimizer = torch.optim.AdamW(param_groups, lr=cfg.lr)
    return optimizer, get_linear_schedule_with_warmup(
        optimizer, int(cfg.warmup_ratio * total_steps), total_steps)


def stored_log(cfg: RunConfig) -> dict | None:
    """The log stored under ``cfg.run_id``, or None. One made with another config (same
    run_id, e.g. other epochs) is an error naming the fields, never taken for this run."""
    path = L.log_path(cfg.logs_dir, cfg.task, cfg.run_id)
    if not path.exists():
        return None
    fix = "delete or fix the file, or use another logs_dir"
    try:
        old = L.read_log(path)
    except ValueError as e:  # not JSON, not UTF-8
        raise ValueError(f"{path}: not valid JSON ({str(e).splitlines()[0]}): {fix}") from None
    if not isinstance(old, dict) or not isinstance(old.get("config"), dict) \
            or old.get("status") not in ("running", "complete", "failed"):
        raise ValueError(f"{path}: not a run log (want a JSON object with a 'config' object and "
                         f"a 'status'): {fix}")
    try:
        diff = cfg.differs_from(old["config"])
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: its config is not a valid RunConfig ({e}): {fix}") from None
    if diff:
        raise ValueError(f"{path} holds a run with a different config ({diff}): delete it, or "
                         "use another logs_dir or tag")
    return old


# ---------------------------------------------------------------- the run
def run_experiment(config: RunConfig, on_end=None) -> dict:
    """Train and evaluate one config; returns the history dict (schema in pipeline.logs).

    ``on_end(model, accelerator, history)``, if given, is called on every process at the end
    with the unwrapped model in its final state (``history["selection"]`` names the val-best
    step).

    A complete log with the same config is returned as is (no rerun); a run killed after an
    epoch checkpoint resumes from it. A non-finite loss stops the run: status 'failed', the
    history so far is written and returned."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    cfg = config
    spec = get_task(cfg.task)
    path = L.log_path(cfg.logs_dir, cfg.task, cfg.run_id)
    old = stored_log(cfg)
    if old is not None and old.get("status") == "complete":
        C.remove_checkpoints(cfg)  # a kill between the last write and the cleanup
        return {**old, "skipped": True}
    cfg.check_device()

    # -- device and seeds. accelerate treats torchrun env vars as multi-CPU (gloo) only when
    # told cpu=True; without a GPU that is the only sensible device anyway
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision,
                              cpu=cfg.cpu or not torch.cuda.is_available())
    nproc, main = accelerator.num_processes, accelerator.is_main_process
    t_session = time.time()
    set_seed(cfg.seed)  # python, numpy, torch (+cuda): head init and dropout are reproducible

    # -- data: train, val (carved from train), test (GLUE dev)
    model, tokenizer, model_path = load_model(cfg, spec.num_labels)
    train_feats, val_feats, test_feats, data_info = load_splits(cfg, tokenizer)
    collator = make_collator(tokenizer, cfg.pad_to_max_length, cfg.max_length)
    steps_per_epoch = math.ceil(len(train_feats) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    data_info.update(steps_per_epoch=steps_per_epoch, total_steps=total_steps)

    # -- adapters. The first batches of epoch 0 estimate the gradient (init="gradient") and
    # measure ||A x|| at init; both run in eval mode and draw nothing from the RNG
    first_ids = [] if cfg.variant == "full" else epoch_batches(cfg, train_feats, 0)[
        :cfg.gradient_batches]
    first = [collator([train_feats[i] for i in b]).to(accelerator.device) for b in first_ids]
    adapted = add_adapters(cfg, model.to(accelerator.device), first)
    adapter_stats = adapter_input_rms(model, first) if adapted else None

    # -- optimizer and schedule. The scheduler is NOT passed to prepare: accelerate would
    # step it once per process, but our step count is already global
    optimizer, scheduler = make_optimizer(model, cfg, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    trainable = [p for p in raw_model.parameters() if p.requires_grad]

    # -- the log, or the checkpoint to continue from
    env = L.environment(accelerator.device, nproc, cfg.mixed_precision, model_path)
    history = L.new_history(cfg, env, data_info, raw_model, adapted, spec.metrics[0])
    history["adapter_stats"] = adapter_stats
    if cfg.init == "gradient":  # which training rows estimated dL/dW
        ids = sorted(i for b in first_ids for i in b)
        history["gradient_init"] = {"batches": len(first), "examples": len(ids),
                                    "ids_sha": split_sha(ids)}
    start_epoch, step, best = 0, 0, None
    ckpt = C.latest_checkpoint(cfg) if cfg.checkpoint else None
    if ckpt is not None:
        state, best = C.load_checkpoint(ckpt, cfg, accelerator, model, optimizer, scheduler)
        start_epoch, step = state["epoch"], state["step"]
        history = L.resumed_history(state["history"], old, start_epoch)
        history["env"] = env
        history["data"].setdefault("constant", data_info["constant"])  # older checkpoints
        if main and not cfg.quiet:
            print(f"[{cfg.run_id}] resuming from {ckpt} (epoch {start_epoch}, step {step})")
    write = L.LogWriter(path, history["wall_time_s"], t_session, enabled=main)
    write(history)

    # -- training
    stop = False
    try:
        for epoch in range(start_epoch, cfg.epochs):
            batches = epoch_batches(cfg, train_feats, epoch)
            model.train()
            epoch_losses, t_epoch = [], time.time()
            bar = tqdm(batches, desc=f"{cfg.run_id} ep{epoch + 1}/{cfg.epochs}", leave=False,
                       disable=cfg.quiet or not accelerator.is_local_main_process)
            for bi, gb in enumerate(bar):
                # one optimizer step on the global batch
                loss, penalty = train_step(cfg, accelerator, model, optimizer, scheduler,
                                           trainable, collator, train_feats, gb)
                step += 1
                if not math.isfinite(loss):
                    raise NonFiniteLoss(f"non-finite loss ({loss}) at step {step} (epoch "
                                        f"{epoch + 1}): lower lr or enable grad_clip")
                L.record_step(history, step, loss, scheduler.get_last_lr()[0], penalty)
                epoch_losses.append(loss)
                bar.set_postfix(loss=f"{loss:.4f}")

                # evaluate val every eval_every_steps and at the epoch end; keep the val-best
                # tensors; stop when patience runs out
                end_of_epoch = bi + 1 == len(batches)
                if not end_of_epoch and not (cfg.eval_every_steps
                                             and step % cfg.eval_every_steps == 0):
                    continue
                rec = L.record_eval(history, step, epoch + (bi + 1) / len(batches),
                                    evaluate(model, val_feats, collator, accelerator, cfg.task,
                                             cfg.eval_batch_size, cfg.quiet))
                if history["selection"]["step"] == step:
                    best = C.trainable_tensors(raw_model)
                stop = cfg.patience is not None and L.evals_since_best(history) >= cfg.patience
                if stop:
                    history["stopped_early"] = {"step": step, "epoch": rec["epoch"]}
                write(history)
                if stop:
                    break

            # epoch record, progress line, checkpoint
            L.record_epoch(history, epoch + 1, step, float(np.mean(epoch_losses)),
                           time.time() - t_epoch, history["final"])
            if main and not cfg.quiet:
                shown = ", ".join(f"{k}={v:.4f}" for k, v in history["final"].items())
                print(f"[{cfg.run_id}] epoch {epoch + 1}/{cfg.epochs} step {step}: {shown}")
            write(history)
            if stop:
                break
            if cfg.checkpoint and epoch + 1 < cfg.epochs:
                C.save_checkpoint(cfg, accelerator, model, optimizer, scheduler, epoch + 1,
                                  step, history, best)

        # -- test (GLUE dev) at the val-best step and at the end; outputs saved beside the log
        if test_feats:
            history["test"], outputs = measure_test(cfg, accelerator, model, test_feats,
                                                    collator, best, history["selection"]["step"],
                                                    step)
            if cfg.save_predictions and main:
                history["predictions"] = L.write_predictions(
                    path, outputs, [f["labels"] for f in test_feats])
    except BaseException as e:
        if not isinstance(e, KeyboardInterrupt):  # interrupted stays 'running': it resumes
            history["status"] = "failed"
            history["error"] = str(e) if isinstance(e, NonFiniteLoss) else (
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        write(history)
        if not isinstance(e, NonFiniteLoss):
            raise
        if main:
            print(f"[{cfg.run_id}] FAILED: {e}")
        return history

    # -- done: the complete log, then the checkpoints go
    history["status"] = "complete"
    write(history)
    if on_end is not None:
        on_end(raw_model, accelerator, history)
    if main and cfg.checkpoint:
        C.remove_checkpoints(cfg)
    accelerator.wait_for_everyone()
    return history


def measure_test(cfg, accelerator, model, test_feats, collator, best: dict, best_step: int,
                 step: int):
    """GLUE dev at the end and with the val-best tensors ``best`` (the final ones restored
    after); returns ({"at_best": {...}, "final": {...}}, outputs at the val-best step)."""
    kw = dict(batch_size=cfg.eval_batch_size, quiet=cfg.quiet, return_outputs=True)
    final, outputs = evaluate(model, test_feats, collator, accelerator, cfg.task, **kw)
    at_best = final
    if best_step != step:  # the val-best model is an earlier one
        raw_model = accelerator.unwrap_model(model)
        final_state = C.trainable_tensors(raw_model)
        C.load_tensors(raw_model, best)
        at_best, outputs = evaluate(model, test_feats, collator, accelerator, cfg.task, **kw)
        C.load_tensors(raw_model, final_state)
    return {"at_best": {"step": best_step, **at_best}, "final": {"step": step, **final}}, outputs


def train_step(cfg, accelerator, model, optimizer, scheduler, trainable, collator, feats,
               gb) -> tuple[float, float | None]:
    """One optimizer step on global batch ``gb``; returns (batch mean data loss, penalty).

    Each process sums the per-example losses of its shard and scales by nproc/len(gb): DDP
    averages gradients over processes, so the result is the gradient of the global mean.
    A process whose shard is empty (last batch smaller than nproc) runs one example at
    weight 0 so every process still joins the gradient all-reduce."""
    nproc = accelerator.num_processes
    local, weight = shard(gb, accelerator.process_index, nproc), 1.0
    if not local:
        local, weight = gb[:1], 0.0
    batch = collator([feats[i] for i in local]).to(accelerator.device)
    labels = batch.pop("labels")
    with accelerator.autocast():
        logits = model(**batch).logits
    loss_sum = per_example_loss(logits, labels, get_task(cfg.task).is_regression).sum() * weight
    # the global mean loss, known to every process: checked before any update is applied
    batch_mean = (accelerator.reduce(loss_sum.detach().clone(), "sum") / len(gb)).item()
    if not math.isfinite(batch_mean):
        optimizer.zero_grad(set_to_none=True)
        return batch_mean, None
    loss = loss_sum * (nproc / len(gb))
    penalty = None
    if cfg.reg_coeff:
        from lora import lora_penalty

        pen = lora_penalty(accelerator.unwrap_model(model), cfg.reg_coeff)
        loss = loss + pen
        penalty = pen.item()
    accelerator.backward(loss)
    if cfg.grad_clip:
        accelerator.clip_grad_norm_(trainable, cfg.grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return batch_mean, penalty
