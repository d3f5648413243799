"""Grid sweeps: task x variant x init x rank x lr x seed, skipping runs already complete and
resuming killed ones from their last epoch checkpoint.

    python -m pipeline.sweep --task mrpc --variant lorafa --init kaiming svd --rank 8 \
        --lr 1e-4 5e-4 --seeds 0 1 2 --epochs 2 [--glue-dir DIR] [--subsample-train N] \
        [--logs-dir logs] [--quiet]

Multi-process DDP (every process walks the same grid; ``--batch-size`` stays the global batch):
``accelerate launch --multi_gpu --num_processes 2 -m pipeline.sweep ...`` or
``torchrun --nproc_per_node 2 -m pipeline.sweep ...``; on a machine without GPUs both run on
CPU with gloo (note: ``accelerate launch --cpu`` starts ONE process in accelerate 1.15).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from dataclasses import fields

from .train import RunConfig, run_experiment, stored_log


def _print(*a):
    # under torchrun / accelerate launch every process walks the grid: only rank 0 talks
    if int(os.environ.get("RANK", "0")) == 0:
        print(*a, flush=True)


def grid(tasks, variants, inits, ranks, lrs, seeds, **common) -> list[RunConfig]:
    """Configs of the grid in a stable order; 'full' ignores init and rank (deduplicated)."""
    seen, out = set(), []
    for task, variant, init, rank, lr, seed in itertools.product(
            tasks, variants, inits, ranks, lrs, seeds):
        cfg = RunConfig(task=task, variant=variant, init=init, rank=rank, lr=lr, seed=seed,
                        **common)
        if cfg.run_id not in seen:
            seen.add(cfg.run_id)
            out.append(cfg)
    return out


def _status(cfg: RunConfig) -> str | None:
    """The stored log's status (None: no log, or unreadable JSON); a stored log made with
    another config raises (``stored_log``)."""
    try:
        old = stored_log(cfg)
    except (json.JSONDecodeError, UnicodeDecodeError):  # a corrupt file: run it again
        return None
    return old.get("status") if old else None


def _as_list(x):
    return [x] if isinstance(x, (str, int, float)) else list(x)


def run_configs(configs: list[RunConfig], retry_failed: bool = False, dry_run: bool = False,
                shard: tuple[int, int] | None = None) -> list[dict]:
    """Run ``configs`` in order, skipping complete runs (and failed ones unless
    ``retry_failed``). ``shard=(k, n)`` keeps every n-th config from the k-th: n worker
    processes, each given its own k, split one grid between them without overlap."""
    if shard is not None:
        k, n = shard
        if not 0 <= k < n:
            raise ValueError(f"shard {k}/{n}: need 0 <= k < n")
        configs = configs[k::n]
    statuses = [_status(cfg) for cfg in configs]  # a conflicting log stops the sweep up front
    results = []
    for i, (cfg, status) in enumerate(zip(configs, statuses), 1):
        head = f"[{i}/{len(configs)}] {cfg.run_id}"
        if dry_run:
            _print(f"{head}: {status or 'todo'}")
            results.append({"run_id": cfg.run_id, "status": status, "skipped": True})
            continue
        if status == "complete" or (status == "failed" and not retry_failed):
            _print(f"{head}: {status}, skipped")
            results.append({"run_id": cfg.run_id, "status": status, "skipped": True})
            continue
        _print(f"{head}: {'resuming' if status == 'running' else 'running'}")
        t = time.time()
        h = run_experiment(cfg)
        results.append({"run_id": cfg.run_id, "status": h["status"], "skipped": False,
                        "final": h.get("final", {}), "seconds": round(time.time() - t, 1)})
        _print(f"{head}: {h['status']} {h.get('final', {})} ({time.time() - t:.0f}s)")
    return results


def run_sweep(tasks=("mrpc",), variants=("lorafa",), inits=("svd",), ranks=(8,), lrs=(5e-4,),
              seeds=(0,), retry_failed: bool = False, dry_run: bool = False, shard=None,
              **common) -> list[dict]:
    """Run every config of the grid; ``common`` are other RunConfig fields (epochs, logs_dir,
    glue_dir, subsample_train, quiet, ...). Complete runs are skipped (their stored history is
    returned), failed ones too unless ``retry_failed``. Returns one summary dict per run."""
    configs = grid(_as_list(tasks), _as_list(variants), _as_list(inits), _as_list(ranks),
                   _as_list(lrs), _as_list(seeds), **common)
    return run_configs(configs, retry_failed, dry_run, shard)


def run_variants(tasks, variants, inits, lrs, seeds=(0,), ranks=(8,), retry_failed=False,
                 dry_run=False, shard=None, **common) -> list[dict]:
    """``run_sweep`` with an init list and an lr per variant, as the experiment notebooks use:

        run_variants("mrpc", ["full", "lora", "lorafa"],
                     inits={"lora": ["kaiming"], "lorafa": ["orthogonal", "svd"]},
                     lrs={"full": 5e-5, "lora": 1e-3, "lorafa": 5e-3}, seeds=[0, 1, 2])

    Runs go seed by seed (all variants of seed 0 first), so a sweep cut short still holds
    complete comparisons. 'full' needs no init."""
    variants = _as_list(variants)
    missing = [v for v in variants if v not in lrs or (v != "full" and v not in inits)]
    if missing:
        raise ValueError(f"variants {missing} have no lr (or no init list): give lrs[variant] "
                         "and, for adapters, inits[variant]")
    configs = [cfg for seed in _as_list(seeds) for v in variants
               for cfg in grid(_as_list(tasks), [v], _as_list(inits.get(v, ["svd"])),
                               _as_list(ranks), _as_list(lrs[v]), [seed], **common)]
    return run_configs(configs, retry_failed, dry_run, shard)


def _shard(s):
    k, _, n = s.partition("/")
    return int(k), int(n)


def _none_int(s):
    return None if s.lower() == "none" else int(s)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m pipeline.sweep", description=__doc__.split("\n")[0])
    p.add_argument("--task", nargs="+", default=["mrpc"])
    p.add_argument("--variant", nargs="+", default=["lorafa"], choices=["full", "lora", "lorafa"])
    p.add_argument("--init", nargs="+", default=["svd"],
                   choices=["kaiming", "orthogonal", "svd", "svd_minor"])
    p.add_argument("--rank", nargs="+", type=int, default=[8])
    p.add_argument("--lr", nargs="+", type=float, default=[5e-4])
    p.add_argument("--seeds", "--seed", nargs="+", type=int, default=[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--alpha", type=float, default=None, help="default: 2 * rank")
    p.add_argument("--targets", default="attention")
    p.add_argument("--svd-split", default="sqrt", choices=["sqrt", "b"],
                   help="svd inits: sqrt(S) on each side (PiSSA) or all of S in B (A orthonormal)")
    p.add_argument("--svd-solver", default="exact", choices=["exact", "randomized"])
    p.add_argument("--reg-coeff", type=float, default=0.0)
    p.add_argument("--head-lr", type=float, default=None)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--warmup-ratio", type=float, default=0.06)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=None)
    p.add_argument("--subsample-train", type=_none_int, default=None)
    p.add_argument("--subsample-dev", type=_none_int, default=None)
    p.add_argument("--dev-split", default="dev")
    p.add_argument("--eval-every-steps", type=_none_int, default=None)
    p.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    p.add_argument("--tag", default="")
    p.add_argument("--logs-dir", default="logs")
    p.add_argument("--glue-dir", default=None,
                   help="GLUE folder (default $GLUE_DIR, then ../shared/glue; 'hub' = HF hub)")
    p.add_argument("--no-checkpoint", action="store_true")
    p.add_argument("--retry-failed", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="list the grid and its status only")
    p.add_argument("--shard", type=_shard, default=None, metavar="K/N",
                   help="run every N-th config from the K-th (N workers, K = 0..N-1)")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    common = dict(model=a.model, targets=a.targets, svd_split=a.svd_split,
                  svd_solver=a.svd_solver, reg_coeff=a.reg_coeff, head_lr=a.head_lr,
                  epochs=a.epochs, batch_size=a.batch_size, eval_batch_size=a.eval_batch_size,
                  max_length=a.max_length, warmup_ratio=a.warmup_ratio,
                  weight_decay=a.weight_decay, grad_clip=a.grad_clip,
                  subsample_train=a.subsample_train, subsample_dev=a.subsample_dev,
                  dev_split=a.dev_split, eval_every_steps=a.eval_every_steps,
                  mixed_precision=a.mixed_precision, tag=a.tag, logs_dir=a.logs_dir,
                  glue_dir=a.glue_dir, checkpoint=not a.no_checkpoint, quiet=a.quiet)
    assert set(common) <= {f.name for f in fields(RunConfig)}
    results = []
    # alpha defaults to 2 * rank (scale 2 for every rank), so sweep ranks one at a time
    for rank in a.rank:
        alpha = a.alpha if a.alpha is not None else 2 * rank
        results += run_sweep(a.task, a.variant, a.init, [rank], a.lr, a.seeds, alpha=alpha,
                             retry_failed=a.retry_failed, dry_run=a.dry_run, shard=a.shard,
                             **common)
    failed = [r["run_id"] for r in results if r["status"] == "failed" and not r["skipped"]]
    done = sum(r["status"] == "complete" for r in results)
    _print(f"sweep: {len(results)} runs, {done} complete, {len(failed)} failed "
           f"{failed if failed else ''}".rstrip())
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as e:  # bad input or a conflicting stored log: one line, not a traceback
        sys.exit(f"error: {e}")
