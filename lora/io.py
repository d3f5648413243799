"""Save, load and export adapters - safetensors and JSON only, never pickle.

A saved adapter is a folder with ``adapter.safetensors`` (A, B, B0 and A0 where the init
moved part of W into the adapter, the classification head - always, trained or not, since a
fresh base gets a random one - and any trained biases) and ``adapter_config.json`` (the
adapter settings, targets and shapes, the base model name, a fingerprint of the original
target weights and a sha256 of every tensor). Loading rebuilds W_res = W - s B0 A0 from the
saved tensors, and checks everything before it touches the model.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import struct
import tempfile
from dataclasses import fields
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from . import inits
from .layer import (HEAD_NAMES, LoRASettings, apply_lora, lora_config, lora_modules, plan_lora,
                    weight_fingerprint)

FORMAT_VERSION = 2
WEIGHTS, CONFIG = "adapter.safetensors", "adapter_config.json"
SETTINGS = [f.name for f in fields(LoRASettings)]


def atomic_write(path, write_fn) -> None:
    """``write_fn(tmp_path)`` writes a temp file beside ``path``, which is then fsynced and
    renamed over ``path`` (os.replace is atomic on POSIX): a crash leaves the old file or the
    new one, never half of one. The file keeps the mode of the one it replaces (new: 0o644)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write_fn(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:  # make the rename itself durable
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _write_json(path: Path, obj) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2)))


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes."""
    t = t.detach().contiguous().cpu()
    h = hashlib.sha256(f"{t.dtype}:{list(t.shape)}:".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _combined_fingerprint(per_layer: dict[str, str]) -> str:
    joined = "\n".join(f"{k}:{v}" for k, v in sorted(per_layer.items()))
    return hashlib.sha256(joined.encode()).hexdigest()[:16]


def _is_head(name: str) -> bool:
    return name.split(".")[0] in HEAD_NAMES


def _extra_state(model, what: str) -> tuple[dict, dict]:
    """(head, trained biases outside adapters and head): what a fresh base would not have.
    Refuses other trainable parameters, which neither save_lora nor export_peft stores."""
    head, biases = {}, {}
    wrapped = [f"{name}.base." for name, _ in lora_modules(model)]
    for n, p in model.named_parameters():
        if ".lora_" in n:
            continue
        # a wrapped layer's bias is stored under its name in the plain model: '<layer>.bias'
        n = next((w[:-5] + n[len(w):] for w in wrapped if n.startswith(w)), n)
        if _is_head(n):
            head[n] = p.detach()
        elif p.requires_grad and n.endswith("bias"):
            biases[n] = p.detach()
        elif p.requires_grad:
            raise ValueError(f"{n!r} is trainable but is no adapter, head or bias, so {what} would "
                             "not store it: call mark_only_lora_as_trainable(model) before "
                             "training, or save the full model")
    return head, biases


def _adapter_keys(name: str, settings: LoRASettings) -> list[str]:
    """The tensors saved per adapted layer: A, B, and where the init changed W, B0 (and A0
    when A trains) to rebuild W_res = W - s B0 A0."""
    keys = ["lora_A", "lora_B"]
    if inits.INITS[settings.init].changes_w:
        keys += ["lora_B0"] + ([] if settings.freeze_a else ["lora_A0"])
    return [f"{name}.{k}" for k in keys]


def save_lora(model, folder, base_model: str | None = None) -> Path:
    """Write the adapters, the classification head (always: a fresh base's head is random)
    and any trained biases to ``folder``; ``load_lora`` into a fresh base reproduces the model."""
    cfg, mods = lora_config(model), lora_modules(model)  # lora_config: the adapters agree
    settings = mods[0][1].settings
    head, biases = _extra_state(model, "save_lora")
    state = model.state_dict()
    tensors = {k: state[k] for name, _ in mods for k in _adapter_keys(name, settings)}
    tensors.update({f"head.{n}": t for n, t in head.items()})
    tensors.update({f"bias.{n}": t for n, t in biases.items()})
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    cfg.update(format_version=FORMAT_VERSION, base_model=base_model, scale=settings.scale,
               shapes={name: list(m.base.weight.shape) for name, m in mods},
               head=sorted(head), biases=sorted(biases),
               fingerprint=_combined_fingerprint({n: m.fingerprint for n, m in mods}),
               sha256={k: tensor_sha256(v) for k, v in sorted(tensors.items())})
    folder = Path(folder)
    atomic_write(folder / WEIGHTS, lambda tmp: save_file(tensors, tmp))
    _write_json(folder / CONFIG, cfg)
    return folder


def _check_safetensors(path: Path) -> None:
    """Refuse anything that is not a safetensors file (a pickle would run code when loaded)."""
    with open(path, "rb") as f:
        head = f.read(9)
    header_size = struct.unpack("<Q", head[:8])[0] if len(head) == 9 else None
    if header_size is None or head[8:9] != b"{" or header_size > os.path.getsize(path):
        pickled = head[:1] == b"\x80" or head[:2] == b"PK"
        kind = "a pickle" if pickled else "not safetensors (or truncated)"
        raise ValueError(f"{path} is {kind}: only safetensors adapters are loaded (pickles can run "
                         "code); re-save it with save_lora")


def _read_config(folder: Path) -> dict:
    try:
        cfg = json.loads((folder / CONFIG).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{CONFIG} is not valid JSON ({e}); re-save with save_lora") from None
    if not isinstance(cfg, dict) or cfg.get("format_version") != FORMAT_VERSION:
        version = cfg.get("format_version") if isinstance(cfg, dict) else None
        raise ValueError(f"{CONFIG} has format_version {version!r}, this loader reads "
                         f"{FORMAT_VERSION} (with checksums); re-save with save_lora")
    types = {"targets": list, "shapes": dict, "head": list, "biases": list, "sha256": dict,
             "fingerprint": str, "scale": (int, float), "base_model": object,
             **{k: object for k in SETTINGS}}
    for key, typ in types.items():
        if key not in cfg or not isinstance(cfg[key], typ):
            raise ValueError(f"{CONFIG} lacks a valid {key!r}; re-save with save_lora")
    return cfg


def _read_tensors(folder: Path, cfg: dict) -> dict[str, torch.Tensor]:
    try:
        tensors = load_file(folder / WEIGHTS)
    except Exception as e:  # safetensors raises its own error types for bad headers / sizes
        why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
        raise ValueError(f"{WEIGHTS} is truncated or corrupt ({why}); re-save with save_lora"
                         ) from None
    missing, extra = set(cfg["sha256"]) - set(tensors), set(tensors) - set(cfg["sha256"])
    if missing or extra:
        which = f"missing {sorted(missing)[:3]}" if missing else f"unexpected {sorted(extra)[:3]}"
        raise ValueError(f"{WEIGHTS} does not hold the tensors {CONFIG} lists ({which}); "
                         "re-save with save_lora")
    for k, t in tensors.items():
        if tensor_sha256(t) != cfg["sha256"][k]:
            raise ValueError(f"checksum mismatch for tensor {k!r}: {WEIGHTS} was altered or "
                             "damaged; re-save with save_lora")
    return tensors


def _validate(model, cfg: dict, tensors: dict, check_fingerprint: bool):
    """Every check of load_lora, touching nothing; returns (settings, {name: (A0, B0)})."""
    settings = LoRASettings(**{k: cfg[k] for k in SETTINGS})
    if not math.isclose(cfg["scale"], settings.scale, rel_tol=1e-9):
        raise ValueError(f"config alpha={settings.alpha}, rank={settings.rank}, rslora="
                         f"{settings.rslora} give scale {settings.scale:g}, but the adapter was "
                         f"saved with scale {cfg['scale']:g}: the config was edited")
    if list(cfg["shapes"]) != cfg["targets"]:
        odd = sorted(set(cfg["shapes"]) ^ set(cfg["targets"])) or ["(their order)"]
        raise ValueError(f"config targets ({len(cfg['targets'])}) disagree with its shapes "
                         f"({len(cfg['shapes'])}) at {odd[0]!r}: the config was edited")
    expected = [k for name in cfg["targets"] for k in _adapter_keys(name, settings)]
    expected += [f"head.{n}" for n in cfg["head"]] + [f"bias.{n}" for n in cfg["biases"]]
    if set(expected) != set(tensors):
        diff = sorted(set(expected) - set(tensors)) or sorted(set(tensors) - set(expected))
        raise ValueError(f"init={settings.init!r}, freeze_a={settings.freeze_a} and the config's "
                         f"targets/head call for other tensors than the file holds (first: "
                         f"{diff[0]!r}): the config was edited")
    modules, params = dict(model.named_modules()), dict(model.named_parameters())
    per_layer, saved = {}, {}
    for name, shape in cfg["shapes"].items():
        if not isinstance(modules.get(name), nn.Linear):
            raise ValueError(f"adapter targets {name!r}, which this model lacks (no nn.Linear "
                             "of that name): load it into the base model it was trained on")
        w = modules[name].weight
        if list(w.shape) != shape:
            raise ValueError(f"shape mismatch at {name!r}: adapter expects {shape}, model has "
                             f"{list(w.shape)}: load it into the base model it was trained on")
        a_key = f"{name}.lora_A0" if f"{name}.lora_A0" in tensors else f"{name}.lora_A"
        b0 = tensors.get(f"{name}.lora_B0", torch.zeros(w.shape[0], settings.rank))
        a, b = tensors[f"{name}.lora_A"].shape, tensors[f"{name}.lora_B"].shape
        if (a, b) != ((settings.rank, w.shape[1]), (w.shape[0], settings.rank)):
            raise ValueError(f"tensors of {name!r} have shapes A {list(a)}, B {list(b)} but "
                             f"rank={settings.rank} and the layer is {list(w.shape)}: the config "
                             "was edited")
        saved[name] = (tensors[a_key], b0)
        per_layer[name] = weight_fingerprint(w)
    for kind in ("head", "bias"):
        for n in cfg["head" if kind == "head" else "biases"]:
            t = tensors[f"{kind}.{n}"]
            if n not in params or params[n].shape != t.shape:
                has = list(params[n].shape) if n in params else "no such parameter"
                raise ValueError(f"{kind} tensor {n!r} has shape {list(t.shape)}, the model: {has};"
                                 " load it into a model with the same head (e.g. num_labels)")
    if check_fingerprint and _combined_fingerprint(per_layer) != cfg["fingerprint"]:
        raise ValueError(f"base weights fingerprint {_combined_fingerprint(per_layer)} != "
                         f"adapter's {cfg['fingerprint']} (trained on {cfg['base_model']!r}): "
                         "wrong base model or dtype; load the same base (or pass "
                         "check_fingerprint=False)")
    return settings, saved


def load_lora(model, folder, check_fingerprint: bool = True) -> list[str]:
    """Add the adapters saved in ``folder`` to a fresh base ``model`` and load their weights,
    head and trained biases. Trusts nothing: a config that disagrees with the tensors, a
    checksum mismatch, a truncated file, a missing tensor, a head or target of another shape,
    or (by default) a base whose target weights differ from the one trained on is refused with
    one line naming the folder - before any module is touched."""
    folder = Path(folder)
    if lora_modules(model):
        raise RuntimeError(f"this model already has LoRA adapters: load {folder} into a fresh "
                           "base model (or remove_lora(model) first)")
    if folder.is_file():
        _check_safetensors(folder)
        raise ValueError(f"{folder} is a file: pass the adapter folder that save_lora wrote")
    if not (folder / WEIGHTS).exists() or not (folder / CONFIG).exists():
        others = sorted(p.name for p in folder.glob("*")) if folder.is_dir() else []
        raise FileNotFoundError(f"{folder} holds no {WEIGHTS} + {CONFIG} (found {others}): "
                                "pass a folder written by save_lora")
    _check_safetensors(folder / WEIGHTS)
    try:
        cfg = _read_config(folder)
        tensors = _read_tensors(folder, cfg)
        settings, saved = _validate(model, cfg, tensors, check_fingerprint)
        plan = plan_lora(model, settings, targets=cfg["targets"], tensors=saved)
    except (ValueError, TypeError) as e:
        raise type(e)(f"{folder}: {e}") from None
    # everything checked: only now change the model
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in cfg["head"]:
            params[n].copy_(tensors[f"head.{n}"])
        for n in cfg["biases"]:
            params[n].copy_(tensors[f"bias.{n}"])
        names = apply_lora(model, plan)
        for name, m in lora_modules(model):
            m.lora_B.copy_(tensors[f"{name}.lora_B"])
            m.lora_A.copy_(tensors[f"{name}.lora_A"])
    return names


def export_peft(model, folder, base_model: str | None = None, task_type: str | None = "SEQ_CLS"
                ) -> Path:
    """Write a PEFT LoRA adapter folder that ``PeftModel.from_pretrained(original_base, folder)``
    loads. The change to the *original* weight is

        W_final - W = (W_res + s B A) - (W_res + s B0 A0) = s (B A - B0 A0).

    With A frozen (A = A0) that is s (B - B0) A, still rank r: PEFT gets lora_A = A,
    lora_B = B - B0 at the same r and alpha (PEFT's own PiSSA conversion doubles the rank
    because it also lets A move). Plain LoRA with an init that changed W needs rank 2r:
    lora_A = [A; A0], lora_B = [B, -B0], alpha scaled to keep s. The head is always exported
    (modules_to_save): PEFT's SEQ_CLS model expects it, and a fresh base's head is random."""
    cfg = lora_config(model)
    head, biases = _extra_state(model, "export_peft")
    if biases:
        raise ValueError(f"biases were trained (e.g. {next(iter(biases))!r}): export_peft stores "
                         "adapters and head only; merge_lora and save the full model, or save_lora")
    doubled = not cfg["freeze_a"] and inits.INITS[cfg["init"]].changes_w
    tensors = {}
    for name, m in lora_modules(model):
        a, b = m.lora_A.detach(), (m.lora_B - m.lora_B0).detach()
        if doubled:
            a, b = torch.cat([m.lora_A, m.lora_A0]), torch.cat([m.lora_B, -m.lora_B0], dim=1)
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.detach()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.detach()
    for n, p in head.items():  # PEFT stores modules_to_save under their plain names
        tensors[f"base_model.model.{n}"] = p
    tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
    rank, alpha = cfg["rank"], cfg["alpha"]
    if doubled:  # s = alpha / r (or alpha / sqrt(r)) unchanged at rank 2r
        rank, alpha = 2 * rank, alpha * (math.sqrt(2) if cfg["rslora"] else 2)
    peft_cfg = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model,
        "r": rank, "lora_alpha": alpha, "use_rslora": cfg["rslora"],
        "lora_dropout": cfg["dropout"], "bias": "none", "fan_in_fan_out": False,
        "target_modules": cfg["targets"], "init_lora_weights": True,
        "modules_to_save": sorted({n.split(".")[0] for n in head}) or None,
        "inference_mode": True,
    }
    folder = Path(folder)
    atomic_write(folder / "adapter_model.safetensors", lambda tmp: save_file(tensors, tmp))
    _write_json(folder / "adapter_config.json", peft_cfg)
    return folder
