"""Epoch-end checkpoints (tensors, optimizer, scheduler, RNG streams, history) for resume.

A checkpoint is a folder ``<logs_dir>/<task>/.ckpt/<run_id>/epoch-K`` written as ``epoch-K.tmp``
and renamed when complete, so a kill mid-write leaves the previous one as the latest:

    model.safetensors   trainable tensors + adapter buffers (A when frozen, B0)
    best.safetensors    trainable tensors at the val-best step (the selected model)
    trainer.pt          optimizer and scheduler state (tensors only, loaded weights_only)
    rng-<proc>.pt       each process's RNG streams (python, numpy, torch, cuda)
    state.json          epoch, step, config, number of processes, history so far

The frozen base weights are not saved: they are rebuilt from the model and the seed.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from . import logs as L


def ckpt_root(cfg) -> Path:
    return Path(cfg.logs_dir) / cfg.task / ".ckpt" / cfg.run_id


def latest_checkpoint(cfg) -> Path | None:
    """The last complete epoch checkpoint, or None."""
    done = sorted(ckpt_root(cfg).glob("epoch-*[0-9]"), key=lambda p: int(p.name.split("-")[1]))
    return done[-1] if done else None


def remove_checkpoints(cfg) -> None:
    """Delete a run's checkpoints (and the task's .ckpt folder if no other run uses it)."""
    root = ckpt_root(cfg)
    shutil.rmtree(root, ignore_errors=True)
    try:
        root.parent.rmdir()
    except OSError:
        pass


def trainable_tensors(model) -> dict:
    """Copies of the trainable parameters (what the val-best model differs from the final in)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_tensors(model, tensors: dict) -> None:
    """Copy ``tensors`` (name -> tensor) into ``model``'s parameters and buffers in place."""
    own = dict(model.state_dict(keep_vars=True))
    with torch.no_grad():
        for n, t in tensors.items():
            own[n].copy_(t)


def _checkpoint_tensors(model) -> dict:
    """Trainable params + adapter buffers (A when frozen, B0): everything that changes in
    training or that the resumed model must match."""
    keep = {n for n, p in model.named_parameters() if p.requires_grad}
    sd = model.state_dict()
    keep |= {k for k in sd if ".lora_" in k}
    return {k: sd[k].detach().cpu().contiguous() for k in sorted(keep)}


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"python": random.getstate(), "numpy_keys": torch.from_numpy(np_state[1].copy()),
            "numpy_rest": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(s: dict) -> None:
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    name, pos, has_gauss, cached = s["numpy_rest"]
    np.random.set_state((name, s["numpy_keys"].numpy(), pos, has_gauss, cached))
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_checkpoint(cfg, accelerator, model, optimizer, scheduler, epoch: int, step: int,
                    history: dict, best: dict | None) -> None:
    """Write the epoch-``epoch`` checkpoint (``best``: the val-best trainable tensors) and
    delete the older ones."""
    from safetensors.torch import save_file

    root = ckpt_root(cfg)
    tmp, final = root / f"epoch-{epoch}.tmp", root / f"epoch-{epoch}"
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    # each process keeps its own RNG stream (dropout)
    torch.save(rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
    if main:
        save_file(_checkpoint_tensors(accelerator.unwrap_model(model)), tmp / "model.safetensors")
        if best is not None:
            save_file({k: v.cpu().contiguous() for k, v in best.items()},
                      tmp / "best.safetensors")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                   tmp / "trainer.pt")
        L.atomic_write_json({"epoch": epoch, "step": step, "config": cfg.semantic(),
                             "num_processes": accelerator.num_processes, "history": history},
                            tmp / "state.json")
    accelerator.wait_for_everyone()
    if main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in root.glob("epoch-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_checkpoint(path: Path, cfg, accelerator, model, optimizer, scheduler):
    """Restore tensors, optimizer, scheduler and this process's RNG after checking that the
    checkpoint belongs to this config and launch. Returns (state.json, val-best tensors|None)."""
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
    device = str(accelerator.device)
    tensors = load_file(path / "model.safetensors", device=device)
    missing = set(tensors) - set(unwrapped.state_dict())
    if missing:
        raise ValueError(f"checkpoint {path} holds tensors this model lacks: "
                         f"{sorted(missing)[:3]}; delete it")
    load_tensors(unwrapped, tensors)
    best_file = path / "best.safetensors"
    best = load_file(best_file, device=device) if best_file.exists() else None
    trainer = torch.load(path / "trainer.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(trainer["optimizer"])
    scheduler.load_state_dict(trainer["scheduler"])
    set_rng_state(torch.load(path / f"rng-{accelerator.process_index}.pt", weights_only=True))
    return state, best
