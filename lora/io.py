"""Save, load and export adapters - safetensors and JSON only, never pickle.

A saved adapter is a folder with ``adapter.safetensors`` (A, B, B0 when non-zero, and the
trained head) and ``adapter_config.json`` (rank, alpha, init, targets, base model name and a
fingerprint of the original target weights). Loading rebuilds W_res = W - s B0 A from the
saved A, B0, so it refuses a base model whose weights differ from the one trained on.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .layer import HEAD_NAMES, add_lora, lora_modules, weight_fingerprint

FORMAT_VERSION = 1
WEIGHTS, CONFIG = "adapter.safetensors", "adapter_config.json"


def _combined_fingerprint(per_layer: dict[str, str]) -> str:
    joined = "\n".join(f"{k}:{v}" for k, v in sorted(per_layer.items()))
    return hashlib.sha256(joined.encode()).hexdigest()[:16]


def _atomic_write(path: Path, write) -> None:
    """write(tmp_path) then rename: a crash never leaves a half-written file under ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _write_json(path: Path, obj) -> None:
    _atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2)))


def _head_state(model, head_names=HEAD_NAMES) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters()
            if n.split(".")[0] in head_names and p.requires_grad}


def save_lora(model, folder, base_model: str | None = None, head: bool = True) -> Path:
    """Write the adapters (and, with ``head``, the trainable classification head) to ``folder``."""
    mods = lora_modules(model)
    if not mods:
        raise RuntimeError("model has no LoRA adapters: nothing to save")
    cfg = dict(model._lora_config)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors, shapes = {}, {}
    for name, m in mods:
        tensors[f"{name}.lora_A"] = m.lora_A
        tensors[f"{name}.lora_B"] = m.lora_B
        if m.lora_B0.any():
            tensors[f"{name}.lora_B0"] = m.lora_B0
        shapes[name] = list(m.base.weight.shape)
    heads = _head_state(model) if head else {}
    tensors.update({f"head.{n}": t for n, t in heads.items()})
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    cfg.update(format_version=FORMAT_VERSION, base_model=base_model, shapes=shapes,
               head=sorted(heads), scale=mods[0][1].scale,
               fingerprint=_combined_fingerprint({n: m.fingerprint for n, m in mods}))
    _atomic_write(folder / WEIGHTS, lambda tmp: save_file(tensors, tmp))
    _write_json(folder / CONFIG, cfg)
    return folder


def _check_safetensors(path: Path) -> None:
    """Refuse anything that is not a safetensors file (a pickle would run code when loaded)."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{" or struct.unpack("<Q", head[:8])[0] > os.path.getsize(path):
        kind = "a pickle" if head[:1] == b"\x80" or head[:2] == b"PK" else "not safetensors"
        raise ValueError(f"{path} is {kind}: only safetensors adapters are loaded (pickles can run "
                         "code); re-save it with save_lora")


def load_lora(model, folder, check_fingerprint: bool = True) -> list[str]:
    """Add the adapters saved in ``folder`` to a fresh base ``model`` and load their weights.
    Refuses shape mismatches and (by default) a base whose target weights differ from the
    one the adapter was trained on."""
    folder = Path(folder)
    if folder.is_file():
        _check_safetensors(folder)
        raise ValueError(f"{folder} is a file: pass the adapter folder that save_lora wrote")
    if not (folder / WEIGHTS).exists() or not (folder / CONFIG).exists():
        others = sorted(p.name for p in folder.glob("*")) if folder.is_dir() else []
        raise FileNotFoundError(f"{folder} holds no {WEIGHTS} + {CONFIG} (found {others}): "
                                "pass a folder written by save_lora")
    _check_safetensors(folder / WEIGHTS)
    cfg = json.loads((folder / CONFIG).read_text())
    tensors = load_file(folder / WEIGHTS)
    modules = dict(model.named_modules())
    per_layer = {}
    for name, shape in cfg["shapes"].items():
        if name not in modules or not hasattr(modules[name], "weight"):
            raise ValueError(f"adapter targets {name!r}, which this model lacks: "
                             "load it into the base model it was trained on")
        w = modules[name].weight
        if list(w.shape) != shape:
            raise ValueError(f"shape mismatch at {name!r}: adapter expects {shape}, model has "
                             f"{list(w.shape)}: load it into the base model it was trained on")
        per_layer[name] = weight_fingerprint(w)
    if check_fingerprint and _combined_fingerprint(per_layer) != cfg["fingerprint"]:
        raise ValueError(f"base weights fingerprint {_combined_fingerprint(per_layer)} != adapter's "
                         f"{cfg['fingerprint']} (trained on {cfg.get('base_model')!r}): wrong base "
                         "model or dtype; load the same base (or pass check_fingerprint=False)")
    saved = {}
    for name in cfg["shapes"]:
        a = tensors[f"{name}.lora_A"]
        b0 = tensors.get(f"{name}.lora_B0", torch.zeros_like(tensors[f"{name}.lora_B"]))
        saved[name] = (a, b0)
    names = add_lora(model, rank=cfg["rank"], alpha=cfg["alpha"], init=cfg["init"],
                     targets=list(cfg["shapes"]), freeze_a=cfg["freeze_a"], dropout=cfg["dropout"],
                     seed=cfg["seed"], rslora=cfg["rslora"], svd_solver=cfg["svd_solver"],
                     niter=cfg["niter"], svd_split=cfg["svd_split"], _tensors=saved)
    with torch.no_grad():
        for name, m in lora_modules(model):
            m.lora_B.copy_(tensors[f"{name}.lora_B"])
        params = dict(model.named_parameters())
        for n in cfg.get("head", []):
            params[n].copy_(tensors[f"head.{n}"])
    return names


def export_peft(model, folder, base_model: str | None = None, task_type: str = "SEQ_CLS",
                head: bool = True) -> Path:
    """Write a PEFT LoRA adapter folder that ``PeftModel.from_pretrained(original_base, folder)``
    loads. With A frozen the change to the *original* weight is

        W_final - W = (W_res + s B A) - (W_res + s B0 A) = s (B - B0) A,

    still rank r, so PEFT gets lora_A = A, lora_B = B - B0 at the same r and alpha (PEFT's own
    PiSSA conversion doubles the rank because it also lets A move)."""
    mods = lora_modules(model)
    if not mods:
        raise RuntimeError("model has no LoRA adapters: nothing to export")
    cfg = model._lora_config
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, m in mods:
        if not m.freeze_a and not torch.equal(m.lora_B0, torch.zeros_like(m.lora_B0)):
            raise ValueError(f"{name!r}: plain LoRA with an SVD init moved A, so the change to W is "
                             "not s (B - B0) A; merge_lora and save the full weights instead")
        tensors[f"base_model.model.{name}.lora_A.weight"] = m.lora_A.detach()
        tensors[f"base_model.model.{name}.lora_B.weight"] = (m.lora_B - m.lora_B0).detach()
    heads = _head_state(model) if head else {}
    for n, p in heads.items():  # PEFT stores modules_to_save under their plain names
        tensors[f"base_model.model.{n}"] = p
    tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
    peft_cfg = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model,
        "r": cfg["rank"], "lora_alpha": cfg["alpha"], "use_rslora": cfg["rslora"],
        "lora_dropout": cfg["dropout"], "bias": "none", "fan_in_fan_out": False,
        "target_modules": [n for n, _ in mods], "init_lora_weights": True,
        "modules_to_save": sorted({n.split(".")[0] for n in heads}) or None,
        "inference_mode": True,
    }
    _atomic_write(folder / "adapter_model.safetensors", lambda tmp: save_file(tensors, tmp))
    _write_json(folder / "adapter_config.json", peft_cfg)
    return folder
