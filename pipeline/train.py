"""One train/eval loop for every task and variant, built on accelerate.

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
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import logs as L
from .data import get_task, load_examples, make_collator, resolve_glue_dir, tokenize
from .data import epoch_order, global_batches, shard

VARIANTS = ("full", "lora", "lorafa")
INITS = ("kaiming", "orthogonal", "svd", "svd_minor")
# config fields that do not change the result: may differ between a log and a rerun
NON_SEMANTIC = {"logs_dir", "glue_dir", "quiet", "checkpoint", "eval_batch_size", "cpu"}


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class RunConfig:
    task: str = "mrpc"
    model: str = "minilm"  # 'minilm' | 'mpnet' | hub id | local folder (pipeline.models)
    variant: str = "lorafa"  # 'full' | 'lora' (A trains) | 'lorafa' (A frozen)
    init: str = "svd"  # kaiming | orthogonal | svd | svd_minor (ignored for 'full')
    rank: int = 8
    alpha: float = 16
    targets: str | list = "attention"
    lora_dropout: float = 0.0
    rslora: bool = False
    svd_solver: str = "exact"
    niter: int = 4
    svd_split: str = "sqrt"
    reg_coeff: float = 0.0  # coeff * sum ||B - B0||^2 added to the loss
    lr: float = 5e-4
    head_lr: float | None = None  # separate lr for the classifier head (None: lr)
    epochs: int = 3
    batch_size: int = 32  # global batch per optimizer step (split over processes)
    eval_batch_size: int = 64
    max_length: int = 128
    pad_to_max_length: bool = False  # fixed padding (benchmarks only); default dynamic
    warmup_ratio: float = 0.06
    weight_decay: float = 0.0
    grad_clip: float | None = None
    seed: int = 0
    subsample_train: int | None = None  # first N examples (smoke runs)
    subsample_dev: int | None = None
    dev_split: str = "dev"  # MNLI: dev = dev_matched; also dev_mismatched
    eval_every_steps: int | None = None  # extra evaluations inside epochs
    mixed_precision: str = "no"  # 'no' | 'bf16' | 'fp16' (accelerate)
    cpu: bool = False  # force CPU even with a GPU (always CPU when there is none)
    tag: str = ""  # free suffix for the run id (distinguish otherwise equal configs)
    logs_dir: str = "logs"
    glue_dir: str | None = None  # None: $GLUE_DIR, then ../shared/glue, then the hub
    checkpoint: bool = True  # checkpoint at epoch ends, resume after a kill
    quiet: bool = False

    def __post_init__(self):
        self.task = get_task(self.task).name
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}: use one of {VARIANTS}")
        if self.variant == "full":
            self.init = "none"  # no adapter: keep run ids and sweeps free of fake inits
        elif self.init not in INITS:
            raise ValueError(f"unknown init {self.init!r}: use one of {INITS}")
        if self.batch_size < 1 or self.epochs < 1:
            raise ValueError("batch_size and epochs must be >= 1")

    @property
    def run_id(self) -> str:
        """Readable and deterministic: task-variant-init-rank-lr-seed plus non-default extras."""
        parts = [self.task, self.variant]
        if self.variant != "full":
            parts += [self.init, f"r{self.rank}"]
        parts.append(f"lr{fmt_float(self.lr)}")
        if self.model != "minilm":
            parts.append(Path(self.model).name.replace("_", "-"))
        if self.variant != "full" and self.alpha != 2 * self.rank:
            parts.append(f"a{self.alpha:g}")
        if self.variant != "full" and self.targets != "attention":
            parts.append("t" + (self.targets if isinstance(self.targets, str)
                                else "+".join(self.targets)))
        if self.variant != "full" and self.init.startswith("svd"):
            if self.svd_split != "sqrt":
                parts.append(f"split{self.svd_split}")
            if self.svd_solver != "exact":
                parts.append(f"rsvd{self.niter}")
        if self.reg_coeff:
            parts.append(f"reg{fmt_float(self.reg_coeff)}")
        if self.head_lr is not None:
            parts.append(f"hlr{fmt_float(self.head_lr)}")
        if self.subsample_train:
            parts.append(f"n{self.subsample_train}")
        if self.tag:
            parts.append(self.tag)
        parts.append(f"s{self.seed}")
        return "-".join(str(p) for p in parts)

    def semantic(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in NON_SEMANTIC}

    def differs_from(self, stored: dict) -> str:
        """'' if a stored config (a log's or checkpoint's) gives the same result as this one,
        else 'field: stored -> now' for each field that differs."""
        now, old = self.semantic(), RunConfig.from_dict(stored).semantic()
        return ", ".join(f"{k}: {old[k]!r} -> {now[k]!r}" for k in now if old[k] != now[k])

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def fmt_float(x: float) -> str:
    """Shortest exact scientific form: 3e-04, 1.5e-04 (never rounds two lrs together)."""
    for p in range(8):
        s = f"{x:.{p}e}"
        if float(s) == x:
            return s
    return repr(x)


# ---------------------------------------------------------------- metrics
def compute_metrics(task: str, preds, labels) -> dict:
    """Task metrics with sklearn/scipy. Classification: ``preds`` are class ids; STS-B: scores.
    Constant predictions give correlation 0 (as sklearn's Matthews does), not NaN."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    spec = get_task(task)
    preds, labels = np.asarray(preds), np.asarray(labels)
    out = {}
    for m in spec.metrics:
        if m == "accuracy":
            out[m] = float(accuracy_score(labels, preds))
        elif m == "f1":
            out[m] = float(f1_score(labels, preds, zero_division=0))
        elif m == "matthews":
            out[m] = float(matthews_corrcoef(labels, preds))
        elif m in ("pearson", "spearman"):
            if np.ptp(preds) == 0 or np.ptp(labels) == 0:
                out[m] = 0.0
            else:
                fn = pearsonr if m == "pearson" else spearmanr
                out[m] = float(fn(preds, labels)[0])
    return out


# ---------------------------------------------------------------- model and optimizer
def build_model(cfg: RunConfig, num_labels: int):
    """Tokenizer + model with the variant's adapters and trainable set; returns
    (model, tokenizer, model_path, adapted module names)."""
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
    adapted = []
    if cfg.variant != "full":
        from lora import add_lora, mark_only_lora_as_trainable

        adapted = add_lora(model, rank=cfg.rank, alpha=cfg.alpha, init=cfg.init,
                           targets=cfg.targets, freeze_a=cfg.variant == "lorafa",
                           dropout=cfg.lora_dropout, seed=cfg.seed, rslora=cfg.rslora,
                           svd_solver=cfg.svd_solver, niter=cfg.niter, svd_split=cfg.svd_split)
        mark_only_lora_as_trainable(model, head=True)
    return model, tokenizer, path, adapted


HEAD_PREFIXES = ("classifier", "score")


def make_optimizer(model, cfg: RunConfig):
    """AdamW over trainable params; no weight decay on biases and LayerNorm; the head gets
    ``head_lr`` when set."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        head = name.split(".")[0] in HEAD_PREFIXES
        decay = not (name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name)
        lr = cfg.head_lr if (head and cfg.head_lr is not None) else cfg.lr
        groups.setdefault((lr, decay), []).append(p)
    param_groups = [{"params": ps, "lr": lr, "weight_decay": cfg.weight_decay if decay else 0.0}
                    for (lr, decay), ps in groups.items()]
    return torch.optim.AdamW(param_groups, lr=cfg.lr)


def per_example_loss(logits, labels, regression: bool):
    if regression:
        return F.mse_loss(logits.squeeze(-1).float(), labels.float(), reduction="none")
    return F.cross_entropy(logits.float(), labels, reduction="none")


# ---------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model, features, collator, accelerator, task: str, batch_size: int = 64,
             quiet: bool = False) -> dict:
    """Dev loss + task metrics over all of ``features``; each process scores a contiguous
    shard and the shards are gathered in order, so the result equals a single-process eval."""
    from accelerate.utils import gather_object

    spec = get_task(task)
    model.eval()
    idx = shard(list(range(len(features))), accelerator.process_index,
                accelerator.num_processes)
    preds, losses = [], []
    chunks = [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    for chunk in tqdm(chunks, desc="eval", leave=False,
                      disable=quiet or not accelerator.is_local_main_process):
        batch = collator([features[i] for i in chunk]).to(accelerator.device)
        labels = batch.pop("labels")
        with accelerator.autocast():
            logits = model(**batch).logits
        losses += per_example_loss(logits, labels, spec.is_regression).tolist()
        p = logits.squeeze(-1) if spec.is_regression else logits.argmax(-1)
        preds += p.float().tolist()
    if accelerator.num_processes > 1:
        preds, losses = gather_object(preds), gather_object(losses)
    labels = [f["labels"] for f in features]
    if not spec.is_regression:
        preds = [int(p) for p in preds]
    model.train()
    return {"dev_loss": float(np.mean(losses)), **compute_metrics(task, preds, labels)}


# ---------------------------------------------------------------- checkpoints
def _ckpt_root(cfg: RunConfig) -> Path:
    return Path(cfg.logs_dir) / cfg.task / ".ckpt" / cfg.run_id


def latest_checkpoint(cfg: RunConfig) -> Path | None:
    """The last complete epoch checkpoint (folders are renamed into place when complete)."""
    root = _ckpt_root(cfg)
    done = sorted(root.glob("epoch-*[0-9]"), key=lambda p: int(p.name.split("-")[1]))
    return done[-1] if done else None


def _checkpoint_tensors(model) -> dict:
    """Trainable params + adapter buffers (A when frozen, B0): everything that changes in
    training or that the resumed model must match; the frozen base is rebuilt from the seed."""
    keep = {n for n, p in model.named_parameters() if p.requires_grad}
    sd = model.state_dict()
    keep |= {k for k in sd if ".lora_" in k}
    return {k: sd[k].detach().cpu().contiguous() for k in sorted(keep)}


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {"python": random.getstate(), "numpy_keys": torch.from_numpy(np_state[1].copy()),
            "numpy_rest": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(s: dict) -> None:
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    name, pos, has_gauss, cached = s["numpy_rest"]
    np.random.set_state((name, s["numpy_keys"].numpy(), pos, has_gauss, cached))
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_checkpoint(cfg, accelerator, model, optimizer, scheduler, epoch, step, history):
    """Epoch-end checkpoint: written into ``epoch-K.tmp`` and renamed, so a kill mid-write
    leaves the previous checkpoint as the latest one. Older epochs are deleted."""
    from safetensors.torch import save_file

    root = _ckpt_root(cfg)
    tmp, final = root / f"epoch-{epoch}.tmp", root / f"epoch-{epoch}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    # each process keeps its own RNG stream (dropout); tensors-only file, loaded weights_only
    torch.save(_rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        save_file(_checkpoint_tensors(accelerator.unwrap_model(model)), tmp / "model.safetensors")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                   tmp / "trainer.pt")
        L.atomic_write_json({"epoch": epoch, "step": step, "config": cfg.semantic(),
                             "num_processes": accelerator.num_processes, "history": history},
                            tmp / "state.json")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in root.glob("epoch-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_checkpoint(path: Path, cfg, accelerator, model, optimizer, scheduler) -> dict:
    """Restore model tensors, optimizer, scheduler and this process's RNG; returns state.json."""
    from safetensors.torch import load_file

    state = L.read_log(path / "state.json")
    diff = cfg.differs_from(state["config"])
    if diff:
        raise ValueError(f"checkpoint {path} was made with a different config ({diff}); "
                         "delete it or change logs_dir/tag")
    if state["num_processes"] != accelerator.num_processes:
        raise ValueError(f"checkpoint {path} was made with {state['num_processes']} processes, "
                         f"now {accelerator.num_processes}: resume with the same launch")
    unwrapped = accelerator.unwrap_model(model)
    tensors = load_file(path / "model.safetensors", device=str(accelerator.device))
    missing_from_model = set(tensors) - set(unwrapped.state_dict())
    if missing_from_model:
        raise ValueError(f"checkpoint {path} holds tensors this model lacks: "
                         f"{sorted(missing_from_model)[:3]}")
    unwrapped.load_state_dict(tensors, strict=False)
    trainer = torch.load(path / "trainer.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(trainer["optimizer"])
    scheduler.load_state_dict(trainer["scheduler"])
    _set_rng_state(torch.load(path / f"rng-{accelerator.process_index}.pt", weights_only=True))
    return state


# ---------------------------------------------------------------- the loop
def stored_log(cfg: RunConfig) -> dict | None:
    """The log stored under ``cfg.run_id``, or None. One made with another config (same
    run_id, e.g. other epochs) is an error naming the fields, never taken for this run."""
    path = L.log_path(cfg.logs_dir, cfg.task, cfg.run_id)
    if not path.exists():
        return None
    old = L.read_log(path)
    diff = old.get("config") and cfg.differs_from(old["config"])
    if diff:
        raise ValueError(f"{path} holds a run with a different config ({diff}): delete it, or "
                         "use another logs_dir or tag")
    return old


def run_experiment(config: RunConfig, on_end=None) -> dict:
    """Train and evaluate one config; returns the history dict (schema in pipeline.logs).

    ``on_end(model, accelerator, history)``, if given, is called on every process after the
    last epoch with the unwrapped trained model (e.g. to save or inspect the adapters).

    A complete log with the same config is returned as is (no rerun); a run killed after an
    epoch checkpoint resumes from it. A non-finite loss stops the run: status 'failed', the
    history so far is written and returned."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_linear_schedule_with_warmup

    cfg = config
    spec = get_task(cfg.task)
    path = L.log_path(cfg.logs_dir, cfg.task, cfg.run_id)
    old = stored_log(cfg)
    if old is not None and old.get("status") == "complete":
        old["skipped"] = True
        return old

    # accelerate only treats torchrun/`accelerate launch` env vars as multi-CPU (gloo) when told
    # cpu=True; without a GPU that is the only sensible device anyway
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision,
                              cpu=cfg.cpu or not torch.cuda.is_available())
    rank, world, main = (accelerator.process_index, accelerator.num_processes,
                         accelerator.is_main_process)
    t_session = time.time()
    set_seed(cfg.seed)  # python, numpy, torch (+cuda): head init and dropout are reproducible

    glue_dir = resolve_glue_dir(cfg.glue_dir)
    model, tokenizer, model_path, adapted = build_model(cfg, spec.num_labels)
    train_feats = tokenize(load_examples(cfg.task, "train", glue_dir, cfg.subsample_train),
                           tokenizer, cfg.max_length)
    dev_feats = tokenize(load_examples(cfg.task, cfg.dev_split, glue_dir, cfg.subsample_dev),
                         tokenizer, cfg.max_length)
    collator = make_collator(tokenizer, cfg.pad_to_max_length, cfg.max_length)

    optimizer = make_optimizer(model, cfg)
    steps_per_epoch = math.ceil(len(train_feats) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(cfg.warmup_ratio * total_steps), total_steps)
    # the scheduler is NOT passed to prepare: accelerate would step it once per process,
    # but our step count is already global
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    trainable = [p for p in raw_model.parameters() if p.requires_grad]

    history = {
        "schema_version": L.SCHEMA_VERSION, "run_id": cfg.run_id, "status": "running",
        "error": None, "config": asdict(cfg),
        "env": L.environment(accelerator.device, world, cfg.mixed_precision, model_path),
        "data": {"source": f"folder:{L.portable_path(glue_dir)}" if glue_dir else "hub",
                 "n_train": len(train_feats), "n_dev": len(dev_feats),
                 "dev_split": cfg.dev_split, "steps_per_epoch": steps_per_epoch,
                 "total_steps": total_steps},
        "model": {"num_params": sum(p.numel() for p in raw_model.parameters()),
                  "trainable_params": sum(p.numel() for p in trainable),
                  "adapted_modules": adapted},
        "main_metric": spec.metrics[0],
        "train": {"step": [], "loss": [], "lr": [], **({"penalty": []} if cfg.reg_coeff else {})},
        "epochs": [], "evals": [], "final": {}, "best": {},
        "wall_time_s": 0.0, "started_at": L.now(), "updated_at": L.now(), "resumed_at_epoch": [],
    }
    start_epoch, step, prior_wall = 0, 0, 0.0
    ckpt = latest_checkpoint(cfg) if cfg.checkpoint else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, cfg, accelerator, model, optimizer, scheduler)
        history = state["history"]
        start_epoch, step, prior_wall = state["epoch"], state["step"], history["wall_time_s"]
        history["resumed_at_epoch"].append(start_epoch)
        history["env"] = L.environment(accelerator.device, world, cfg.mixed_precision, model_path)
        if main and not cfg.quiet:
            print(f"[{cfg.run_id}] resuming from {ckpt} (epoch {start_epoch}, step {step})")

    def write():
        history["wall_time_s"] = prior_wall + time.time() - t_session
        history["updated_at"] = L.now()
        L.summarize(history)
        if main:
            L.atomic_write_json(history, path)

    def do_eval(epoch_float):
        rec = {"step": step, "epoch": round(epoch_float, 4),
               **evaluate(model, dev_feats, collator, accelerator, cfg.task,
                          cfg.eval_batch_size, cfg.quiet)}
        history["evals"].append(rec)
        return rec

    write()
    try:
        for epoch in range(start_epoch, cfg.epochs):
            batches = global_batches(epoch_order(len(train_feats), cfg.seed, epoch), cfg.batch_size)
            model.train()
            epoch_losses, t_epoch = [], time.time()
            bar = tqdm(batches, desc=f"{cfg.run_id} ep{epoch + 1}/{cfg.epochs}", leave=False,
                       disable=cfg.quiet or not accelerator.is_local_main_process)
            for bi, gb in enumerate(bar):
                loss_val, penalty = train_step(cfg, spec, accelerator, model, raw_model,
                                               optimizer, scheduler, trainable, collator,
                                               train_feats, gb, rank, world)
                step += 1
                if not math.isfinite(loss_val):
                    raise NonFiniteLoss(f"non-finite loss ({loss_val}) at step {step} (epoch "
                                        f"{epoch + 1}): lower lr or enable grad_clip")
                history["train"]["step"].append(step)
                history["train"]["loss"].append(loss_val)
                history["train"]["lr"].append(scheduler.get_last_lr()[0])
                if cfg.reg_coeff:
                    history["train"]["penalty"].append(penalty)
                epoch_losses.append(loss_val)
                bar.set_postfix(loss=f"{loss_val:.4f}")
                if (cfg.eval_every_steps and step % cfg.eval_every_steps == 0
                        and bi + 1 < len(batches)):
                    do_eval(epoch + (bi + 1) / len(batches))
                    write()
            train_time = time.time() - t_epoch
            rec = do_eval(epoch + 1)
            history["epochs"].append({"epoch": epoch + 1, "step": step,
                                      "train_loss": float(np.mean(epoch_losses)),
                                      "train_time_s": train_time,
                                      **{k: v for k, v in rec.items() if k not in ("step", "epoch")}})
            if main and not cfg.quiet:
                shown = ", ".join(f"{k}={v:.4f}" for k, v in rec.items() if k not in ("step", "epoch"))
                print(f"[{cfg.run_id}] epoch {epoch + 1}/{cfg.epochs} step {step}: {shown}")
            write()
            if cfg.checkpoint and epoch + 1 < cfg.epochs:
                save_checkpoint(cfg, accelerator, model, optimizer, scheduler, epoch + 1, step,
                                history)
    except NonFiniteLoss as e:
        history["status"], history["error"] = "failed", str(e)
        write()
        if main:
            print(f"[{cfg.run_id}] FAILED: {e}")
        return history
    except KeyboardInterrupt:
        write()  # status stays 'running': the sweep resumes it from the last checkpoint
        raise
    except Exception as e:
        history["status"] = "failed"
        history["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        write()
        raise
    history["status"] = "complete"
    write()
    if on_end is not None:
        on_end(raw_model, accelerator, history)
    if main and cfg.checkpoint:
        shutil.rmtree(_ckpt_root(cfg), ignore_errors=True)
        try:
            _ckpt_root(cfg).parent.rmdir()  # the task's .ckpt folder, if no other run uses it
        except OSError:
            pass
    accelerator.wait_for_everyone()
    return history


def train_step(cfg, spec, accelerator, model, raw_model, optimizer, scheduler, trainable,
               collator, feats, gb, rank, world) -> tuple[float, float | None]:
    """One optimizer step on global batch ``gb``; returns (batch mean data loss, penalty).

    Each process sums the per-example losses of its shard and scales by world/len(gb): DDP
    averages gradients over processes, so the result is the gradient of the global mean.
    A process whose shard is empty (last batch smaller than world) runs one example at
    weight 0 so every process still joins the gradient all-reduce."""
    local, weight = shard(gb, rank, world), 1.0
    if not local:
        local, weight = gb[:1], 0.0
    batch = collator([feats[i] for i in local]).to(accelerator.device)
    labels = batch.pop("labels")
    with accelerator.autocast():
        logits = model(**batch).logits
    loss_sum = per_example_loss(logits, labels, spec.is_regression).sum() * weight
    # the global mean loss, known to every process: checked before any update is applied
    batch_loss = (accelerator.reduce(loss_sum.detach().clone(), "sum") / len(gb)).item()
    if not math.isfinite(batch_loss):
        optimizer.zero_grad(set_to_none=True)
        return batch_loss, None
    loss = loss_sum * (world / len(gb))
    penalty = None
    if cfg.reg_coeff:
        from lora import lora_penalty

        pen = lora_penalty(raw_model, cfg.reg_coeff)
        loss = loss + pen
        penalty = pen.item()
    accelerator.backward(loss)
    if cfg.grad_clip:
        accelerator.clip_grad_norm_(trainable, cfg.grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return batch_loss, penalty
