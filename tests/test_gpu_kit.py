"""The GPU kit (pipeline.gpu): pack, verify, upcast, and the device run's entry point as a CPU
dry run (a tiny model packed in place of MiniLM, the tiny GLUE fixture) with `datasets` and
papermill blocked, as on the GPU machine; then unpack."""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline import gpu
from pipeline.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]
BLOCKER = '''import sys
class _Block:  # the GPU machine has neither package
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("datasets", "papermill"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: not on the GPU machine)")
sys.meta_path.insert(0, _Block())
'''


@pytest.fixture(scope="module")
def tiny_pack(tmp_path_factory, tiny_bert_dir, glue_dir):
    dest = tmp_path_factory.mktemp("pack") / ".gpu"
    gpu.pack(dest, glue_dir, model_dir=tiny_bert_dir(dropout=0.0))
    return dest


@pytest.fixture
def blocked_env(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]),
            "HF_HUB_OFFLINE": "1"}


def test_pack_manifest_and_verify(tiny_pack, tiny_bert_dir):
    manifest = gpu.verify(tiny_pack)
    files = manifest["files"]
    assert {"minilm/model.safetensors", "minilm/config.json", "glue/MRPC/train.tsv",
            "glue/SST-2/dev.tsv", "glue/STS-B/train.tsv"} <= set(files)
    assert manifest["total_bytes"] == sum(f["bytes"] for f in files.values()) <= gpu.PACK_LIMIT
    packed = load_file(tiny_pack / "minilm" / "model.safetensors")
    assert {v.dtype for v in packed.values() if v.is_floating_point()} == {torch.float16}
    dev = tiny_pack / "glue" / "RTE" / "dev.tsv"
    data = dev.read_bytes()
    try:
        dev.write_bytes(data.replace(b"\t1", b"\t0", 1) if b"\t1" in data else data + b"x")
        with pytest.raises(ValueError, match="run `make gpu-pack` again"):
            gpu.verify(tiny_pack)
    finally:
        dev.write_bytes(data)
    gpu.verify(tiny_pack)


def test_pack_refuses_a_missing_task_file(tmp_path, tiny_bert_dir, glue_dir):
    with pytest.raises(FileNotFoundError, match="the pack needs train.tsv and dev.tsv"):
        gpu.pack(tmp_path / "p", glue_dir, tasks=("mrpc", "qnli"), model_dir=tiny_bert_dir(0.0))
    assert not (tmp_path / "p").exists() and not (tmp_path / "p.tmp").exists()


def test_real_pack_holds_what_the_study_reads(tmp_path, tiny_bert_dir, real_glue_dir):
    """SST-2 train is packed as the study's 10k subsample only: the same rows as the full file."""
    from pipeline.data import load_examples

    dest = tmp_path / ".gpu"
    gpu.pack(dest, real_glue_dir, model_dir=tiny_bert_dir(dropout=0.0))
    for task in gpu.S.STUDY.tasks:
        n = gpu.S.STUDY.subsample_train.get(task)
        for split in ("train", "dev"):
            keep = n if split == "train" else None
            assert load_examples(task, split, dest / "glue", keep) == \
                load_examples(task, split, real_glue_dir, keep), (task, split)
    assert len(load_examples("sst2", "train", dest / "glue")) == 10_000


def test_fp32_copy_is_the_packed_weights_upcast(tiny_pack, tmp_path, tiny_bert_dir):
    out = gpu.fp32_model(tiny_pack, tmp_path / "fp32")
    w32 = load_file(out / "model.safetensors")
    w16 = load_file(tiny_pack / "minilm" / "model.safetensors")
    orig = load_file(Path(tiny_bert_dir(dropout=0.0)) / "model.safetensors")
    for k, v in w32.items():
        if k.endswith("word_embeddings.weight"):  # pruned rows: the test below
            continue
        assert v.dtype == torch.float32 and torch.equal(v, w16[k].float())
        assert torch.allclose(v, orig[k], rtol=1e-3, atol=1e-4)  # fp16 rounding only
    assert (out / "tokenizer.json").is_file() or (out / "vocab.txt").is_file()


def test_missing_pack_and_no_gpu_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="make gpu-pack"):
        gpu.verify(tmp_path)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="use --smoke for the CPU dry run"):
            gpu.run(tmp_path, out=tmp_path / "out")


def test_pipeline_imports_without_datasets_and_papermill(blocked_env):
    check = subprocess.run([sys.executable, "-c", "import datasets"], env=blocked_env,
                           capture_output=True, text=True)
    assert check.returncode != 0 and "blocked" in check.stderr  # the blocker works
    mods = "pipeline, pipeline.study, pipeline.gpu, pipeline.analysis, pipeline.stats, " \
           "pipeline.sweep, benchmarks.gpu, lora"
    res = subprocess.run([sys.executable, "-c", f"import {mods}"], env=blocked_env, cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]


def test_dry_run_end_to_end_then_unpack(tiny_pack, tmp_path, blocked_env):
    """The device run's one entry point, on CPU: benchmark (tiny), lr selection and main grid
    of the smoke study with 2 workers, archive; `datasets` and papermill blocked throughout."""
    out, work = tmp_path / "out", tmp_path / "work"
    res = subprocess.run([sys.executable, "-m", "pipeline.gpu", "--pack", str(tiny_pack),
                          "--out", str(out), "--budget-s", "900", "--smoke", "--workers", "2",
                          "--work", str(work)], env=blocked_env, cwd=ROOT, capture_output=True,
                         text=True, timeout=1200)  # ends when the study does
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "GPU kit summary" in res.stdout
    assert (out / "summary.txt").read_text().startswith("== GPU kit summary")
    archive = out / gpu.ARCHIVE
    assert archive.stat().st_size <= gpu.ARCHIVE_LIMIT
    with tarfile.open(archive) as tar:
        summary = json.load(tar.extractfile("summary.json"))
    n = len(METHODS)  # methods: one lr each in the smoke study, one seed
    assert summary["counts"] == {"lr": {"mrpc": {"complete": n}},
                                 "main": {"mrpc": {"complete": n}}}, summary["counts"]
    assert summary["bench"]["goals"] and not summary["bench"]["errors"]
    assert summary["complete_before"] == 0

    root = tmp_path / "repo"
    moved = gpu.unpack(archive, root)
    # a second device run resuming the same work folder: nothing left to run, the earlier runs
    # are counted apart (not as this run's throughput), and its summary does not overwrite
    res2 = subprocess.run([sys.executable, "-m", "pipeline.gpu", "--pack", str(tiny_pack),
                           "--out", str(tmp_path / "out2"), "--budget-s", "300", "--smoke",
                           "--workers", "1", "--work", str(work), "--no-bench"],
                          env=blocked_env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res2.returncode == 0, res2.stdout[-2000:] + res2.stderr[-2000:]
    assert f"complete runs 0 (+{2 * n} from earlier)" in res2.stdout
    gpu.unpack(tmp_path / "out2" / gpu.ARCHIVE, root)
    first, second = (json.loads((root / f"benchmarks/results/gpu/run_summary_{i}.json")
                                .read_text()) for i in (1, 2))
    assert first["complete_before"] == 0 and second["complete_before"] == 2 * n
    assert moved["logs/study_gpu"] == 2 * n and moved["logs/study_gpu_lr"] == 2 * n  # + preds
    logs = sorted((root / "logs/study_gpu/mrpc").glob("*.json"))
    assert len(logs) == n
    for p in logs:
        h = json.loads(p.read_text())
        assert h["status"] == "complete" and h["config"]["mixed_precision"] == "bf16"
        text = p.read_text()
        assert str(tmp_path) not in text and str(tiny_pack) not in text  # no machine paths
    sel = json.loads((root / "figures/gpu/lr_selection.json").read_text())
    assert set(sel["choices"]["mrpc"]) == set(METHODS)
    bench = json.loads((root / "benchmarks/results/gpu/gpu_bench.json").read_text())
    assert bench["device"] == "cpu" and bench["rows"]
    from pipeline import analysis

    runs = analysis.load_logs(root / "logs/study_gpu")
    assert len(runs) == n and set(runs["status"]) == {"complete"}


def test_stop_ends_a_worker_group_that_ignores_sigterm():
    import time

    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    p = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    time.sleep(1.0)  # let it install the handler
    t = time.time()
    gpu._stop([p], grace_s=1.0)
    assert p.returncode is not None and time.time() - t < 10


def test_runs_per_minute_by_worker_count():
    progress = [(50, 6, 0, 90), (60, 6, 2, 90), (120, 6, 8, 70), (180, 8, 14, 95),
                (240, 8, 24, 96)]  # (t, workers, complete, util)
    # 6 workers: 60..120 s, 6 runs; 8: 180..240 s, 10 runs (120..180 spans the change: out)
    assert gpu._rate_by_workers(progress) == {6: 6.0, 8: 10.0}


def test_unpack_refuses_unsafe_members(tmp_path):
    bad = tmp_path / "bad.tar.gz"
    evil = tmp_path / "evil.txt"
    evil.write_text("x")
    with tarfile.open(bad, "w:gz") as tar:
        tar.add(evil, "../evil.txt")
    with pytest.raises(ValueError, match="unsafe member"):
        gpu.unpack(bad, tmp_path / "root")
    with pytest.raises(FileNotFoundError, match="give ARCHIVE="):
        gpu.unpack(tmp_path / "none.tar.gz", tmp_path / "root")


def test_pack_keeps_every_embedding_row_the_packed_data_uses(tiny_pack, tiny_bert_dir, tmp_path):
    """Pruned word-embedding rows: every id the study's tokenisation of the packed data gives is
    kept (same values as float16 of the source), the others come back as zero rows."""
    from safetensors.torch import load_file as load
    from transformers import AutoTokenizer

    from pipeline.data import load_examples, tokenize

    manifest = gpu.verify(tiny_pack)
    src = load(Path(tiny_bert_dir(dropout=0.0)) / "model.safetensors")
    key = next(k for k in src if k.endswith("word_embeddings.weight"))
    assert manifest["word_embedding_rows_kept"] < manifest["vocab_size"] == src[key].shape[0]
    up = load(gpu.fp32_model(tiny_pack, tmp_path / "fp32") / "model.safetensors")
    assert set(up) == set(src) and up[key].shape == src[key].shape
    tok = AutoTokenizer.from_pretrained(tiny_pack / "minilm")
    used = set()
    for task in gpu.S.STUDY.tasks:
        for split in ("train", "dev"):
            for f in tokenize(load_examples(task, split, tiny_pack / "glue"), tok, 128):
                used.update(f["input_ids"])
    used = sorted(used | set(tok.all_special_ids))
    torch.testing.assert_close(up[key][used], src[key][used].half().float(), rtol=0, atol=0)
    unused = torch.ones(src[key].shape[0], dtype=torch.bool)
    unused[used] = False
    assert unused.any() and not up[key][unused].any()
    assert len(used) == manifest["word_embedding_rows_kept"]


def test_a_run_continues_the_repos_earlier_device_runs(tmp_path):
    """seed_work copies unpacked logs (logs/study_gpu{,_lr}/<task>/*) to where the workers look
    (logs/study{,_lr}/<task>/*), so complete runs are skipped, not run again."""
    root, work = tmp_path / "repo", tmp_path / "work"
    for sub, name in (("logs/study_gpu/mrpc", "a.json"), ("logs/study_gpu/mrpc", "a.preds.npz"),
                      ("logs/study_gpu_lr/cola", "b.json")):
        (root / sub).mkdir(parents=True, exist_ok=True)
        (root / sub / name).write_text(json.dumps({"status": "complete"}))
    assert gpu.seed_work(work, root) == 2
    assert (work / "logs/study/mrpc/a.json").is_file()
    assert (work / "logs/study/mrpc/a.preds.npz").is_file()
    assert gpu._count(work / "logs") == {"lr": {"cola": {"complete": 1}},
                                         "main": {"mrpc": {"complete": 1}}}
    assert gpu.seed_work(tmp_path / "w2", tmp_path / "empty") == 0


def test_run_refuses_tasks_the_pack_lacks(tmp_path, tiny_bert_dir, glue_dir):
    dest = tmp_path / ".gpu"
    gpu.pack(dest, glue_dir, tasks=("mrpc",), model_dir=tiny_bert_dir(dropout=0.0))
    assert gpu.verify(dest)["tasks"] == ["mrpc"]
    with pytest.raises(ValueError, match=r"--tasks \['rte'\] not in the pack"):
        gpu.run(dest, out=tmp_path / "out", smoke=True, tasks=["mrpc", "rte"], bench=False)
