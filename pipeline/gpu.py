"""The GPU kit (issue 12): one short, prepared run on a GPU machine that has no network, no
`datasets` and no copy of the embedded model — everything comes from a packed folder.

    python -m pipeline.gpu pack [--dest .gpu] [--glue-dir DIR]     # here (make gpu-pack)
    python -m pipeline.gpu --pack .gpu --out $OUT --budget-s 520    # there: the one run
    python -m pipeline.gpu --pack .gpu --out DIR --budget-s 110 --smoke --workers 2   # CPU dry run
    python -m pipeline.gpu unpack ARCHIVE                           # here (make gpu-unpack)

The pack (<= 46 MiB, every file's sha256 in MANIFEST.json; with the working tree it must fit
the device call's 64 MiB): the embedded MiniLM with its weights stored as float16 (half the
bytes) and only the word-embedding rows of tokens the packed data produces (70% of them), its
tokenizer and config, and the GLUE train/dev files of the study's tasks (SST-2 train: only the
first 10k rows, the study's fixed subsample). At the run the weights are upcast to a float32
copy (left-out rows as zeros) before anything loads them: training keeps fp32 master weights
and computes in bf16 autocast.

The run: (a) the memory / step-time benchmark (benchmarks.gpu, <= 90 s), (b) the study of
pipeline.study (lr selection, then the main grid at 10 seeds, task by task in priority order)
as worker processes sharing the GPU and its runs (the sweep's run claims; more workers join
while the GPU has idle time, and the summary gives runs per minute at each N); no run is
launched after 80% of the budget and every worker is stopped 10 s before its end, keeping each
finished log; (c) one archive of logs, selection table and benchmark JSON in --out, and a
one-screen summary (also --out/summary.txt).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from . import logs as L
from . import study as S

PACK_LIMIT = 46 * 2**20
DEVICE_TREE_LIMIT = 64 * 2**20  # the device call's working tree, carried pack included
ARCHIVE_LIMIT = 16 * 2**20
ARCHIVE = "gpu_results.tar.gz"
MODEL_DIR, GLUE_DIR, MANIFEST = "minilm", "glue", "MANIFEST.json"
REPO_ROOT = Path(__file__).resolve().parents[1]
KEPT_ROWS = "kept_rows:"  # prefix of the row ids stored beside a pruned word-embedding matrix
MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "vocab.txt")
# where `unpack` puts each part of the archive (relative to the repo root)
UNPACK = {"logs/study": "logs/study_gpu", "logs/study_lr": "logs/study_gpu_lr",
          "figures": "figures/gpu", "bench": "benchmarks/results/gpu"}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- pack (here)
def _used_token_ids(tokenizer, glue: Path, tasks) -> list[int]:
    """Every token id the packed data can produce (special tokens included): the study's
    tokenisation truncates, which only drops ids, so the untruncated texts cover it."""
    from .data import load_examples

    ids = set(tokenizer.all_special_ids)
    for task in tasks:
        for split in ("train", "dev"):
            for e in tokenizer([t for ex in load_examples(task, split, glue)
                                for t in (ex["sentence1"], ex["sentence2"]) if t is not None],
                               add_special_tokens=False)["input_ids"]:
                ids.update(e)
    return sorted(ids)


def _fill_pack(tmp: Path, src: Path, glue: Path, tasks) -> dict:
    """The pack's files; returns what it records of the model. Word-embedding rows of tokens
    the packed data never produces are left out (with the kept row ids beside them, restored
    as zero rows at load): their values never reach any computation of the study, and the
    pack, with the working tree, must fit the device call's 64 MiB."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    from .data import get_task

    (tmp / MODEL_DIR).mkdir(parents=True)
    for name in MODEL_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, tmp / MODEL_DIR / name)
    for task in tasks:
        spec = get_task(task)
        (tmp / GLUE_DIR / spec.folder).mkdir(parents=True)
        for split in ("train.tsv", "dev.tsv"):
            src_file, dst_file = glue / spec.folder / split, tmp / GLUE_DIR / spec.folder / split
            if not src_file.is_file():
                raise FileNotFoundError(f"{src_file} not found: the pack needs train.tsv and "
                                        f"dev.tsv of {list(tasks)}")
            keep = S.STUDY.subsample_train.get(task) if split == "train.tsv" else None
            if keep is None:
                shutil.copy2(src_file, dst_file)
            else:  # the study reads only the first rows (SST-2: a fixed 10k): pack just those
                with open(src_file, "rb") as f:
                    lines = f.read().split(b"\n")
                if lines and not lines[-1]:  # a file shorter than keep: no empty last row
                    lines.pop()
                dst_file.write_bytes(b"\n".join(lines[:keep + spec.tsv_header]) + b"\n")
    weights = load_file(src / "model.safetensors")
    word = [k for k in weights if k.endswith("word_embeddings.weight")]
    if len(word) != 1:
        raise ValueError(f"{src}: expected one word_embeddings.weight, found {word}")
    word = word[0]
    kept = _used_token_ids(AutoTokenizer.from_pretrained(tmp / MODEL_DIR), tmp / GLUE_DIR, tasks)
    vocab = weights[word].shape[0]
    weights[word] = weights[word][kept]
    weights[KEPT_ROWS + word] = torch.tensor(kept, dtype=torch.int32)
    save_file({k: v.to(torch.float16) if v.is_floating_point() else v
               for k, v in weights.items()}, tmp / MODEL_DIR / "model.safetensors",
              metadata={"format": "pt", "note": "float16 storage; upcast to float32 at load",
                        "vocab_size": str(vocab)})
    return {"word_embedding_rows_kept": len(kept), "vocab_size": vocab}


def pack(dest=".gpu", glue_dir=None, tasks=S.TASKS, model_dir=None) -> dict:
    """Write the pack folder (replaced as a whole, atomically); returns its manifest.
    ``model_dir``: another model folder in place of the embedded MiniLM (tests)."""
    from .data import resolve_glue_dir
    from .models import minilm_path

    glue = resolve_glue_dir(glue_dir)
    if glue is None:
        raise FileNotFoundError("the pack needs a local GLUE folder: set GLUE_DIR or "
                                "--glue-dir (the hub is not packed)")
    src, dest = Path(model_dir or minilm_path()), Path(dest)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        rows = _fill_pack(tmp, src, glue, tasks)
        files = {str(p.relative_to(tmp)): {"sha256": _sha256(p), "bytes": p.stat().st_size}
                 for p in sorted(tmp.rglob("*")) if p.is_file()}
        total = sum(f["bytes"] for f in files.values())
        if total > PACK_LIMIT:
            raise ValueError(f"the pack would be {total / 2**20:.1f} MiB, over the "
                             f"{PACK_LIMIT / 2**20:.0f} MiB limit: pack fewer tasks")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    manifest = {"files": files, "total_bytes": total, "tasks": list(tasks),
                "model": f"{'all-MiniLM-L6-v2' if model_dir is None else src.name}, float16 "
                         "storage (upcast to float32 at load)", **rows,
                "source_weights_sha256": _sha256(src / "model.safetensors")}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    print(f"pack {dest}: {len(files)} files, {total / 2**20:.1f} MiB "
          f"(limit {PACK_LIMIT / 2**20:.0f}), sha256 in {dest / MANIFEST}")
    return manifest


def _tree_bytes() -> int | None:
    """Bytes of what a device call sends besides the carried pack: tracked and untracked,
    not ignored files (None outside a git checkout)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], capture_output=True, check=True,
                             cwd=REPO_ROOT).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return sum((REPO_ROOT / f).stat().st_size for f in out.decode().split("\0")
               if f and (REPO_ROOT / f).is_file())


def verify(pack_dir) -> dict:
    """Check every file of the manifest (size and sha256); returns the manifest."""
    pack_dir = Path(pack_dir)
    if not (pack_dir / MANIFEST).is_file():
        raise FileNotFoundError(f"{pack_dir / MANIFEST} not found: run `make gpu-pack` and "
                                "send the folder with the run (carry)")
    manifest = json.loads((pack_dir / MANIFEST).read_text())
    for rel, f in manifest["files"].items():
        p = pack_dir / rel
        if not p.is_file() or p.stat().st_size != f["bytes"] or _sha256(p) != f["sha256"]:
            raise ValueError(f"{p}: missing or not the packed file (size/sha256 differ): run "
                             "`make gpu-pack` again")
    return manifest


def fp32_model(pack_dir, dest) -> Path:
    """The packed float16 MiniLM upcast to a float32 copy (the master weights of training)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    src, dest = Path(pack_dir) / MODEL_DIR, Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with safe_open(src / "model.safetensors", "pt") as f:  # one read: tensors and metadata
        weights, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    for key in [k for k in weights if k.startswith(KEPT_ROWS)]:  # zero rows where none were kept
        rows, word = weights.pop(key).long(), key[len(KEPT_ROWS):]
        vocab = int(meta["vocab_size"])
        full = torch.zeros(vocab, weights[word].shape[1], dtype=weights[word].dtype)
        full[rows] = weights[word]
        weights[word] = full
    save_file({k: v.float() if v.is_floating_point() else v for k, v in weights.items()},
              dest / "model.safetensors", metadata={"format": "pt"})
    for p in src.iterdir():
        if p.name != "model.safetensors":
            shutil.copy2(p, dest / p.name)
    assert all(v.dtype != torch.float16 for v in load_file(dest / "model.safetensors").values())
    return dest


# ---------------------------------------------------------------- the run (there)
def _gpu_util() -> float | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=5)
        return float(out.stdout.split()[0]) if out.returncode == 0 else None
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


def _count(logs_root: Path) -> dict:
    """{'lr'|'main': {task: {status: n}}} of the logs written so far."""
    out = {}
    for phase, sub in (("lr", "study_lr"), ("main", "study")):
        for p in (logs_root / sub).glob("*/*.json"):
            try:
                status = json.loads(p.read_text()).get("status")
            except (json.JSONDecodeError, OSError):
                continue
            t = out.setdefault(phase, {}).setdefault(p.parent.name, {})
            t[status] = t.get(status, 0) + 1
    return out


def _stop(procs, grace_s=5.0):
    """SIGTERM each worker's process group, SIGKILL what is left after ``grace_s``."""
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    end = time.time() + grace_s
    while time.time() < end and any(p.poll() is None for p in procs):
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def _benchmark(work: Path, env, budget_s: float, cpu_smoke: bool) -> dict:
    out = work / "bench" / "gpu_bench.json"
    cmd = [sys.executable, "-m", "benchmarks.gpu", "--out", str(out), "--budget-s",
           str(budget_s)] + (["--cpu-smoke"] if cpu_smoke else [])
    cores = str(os.cpu_count() or 1)  # alone on the machine: every core builds the models
    env = {**env, "OMP_NUM_THREADS": cores, "MKL_NUM_THREADS": cores}
    with open(work / "bench.log", "w") as log:
        try:
            rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                timeout=budget_s + 45).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    if not out.is_file():
        tail = (work / "bench.log").read_text()[-600:]
        return {"error": f"benchmark exit {rc}; log tail: {tail}"}
    return json.loads(out.read_text())


def seed_work(work: Path, root: Path) -> int:
    """Copy the finished logs of earlier device runs (``root``/logs/study_gpu{,_lr}, as unpack
    left them in the repo) into the scratch folder, so this run goes on where they stopped:
    the workers skip complete runs. Returns how many logs were copied."""
    n = 0
    for sub, dst in UNPACK.items():
        if not sub.startswith("logs/"):
            continue
        for p in sorted((Path(root) / dst).glob("*/*")):
            target = Path(work) / sub / p.relative_to(Path(root) / dst)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, target)
            n += p.suffix == ".json"
    return n


def run(pack_dir=".gpu", out=None, budget_s=520.0, workers=6, smoke=False, tasks=None,
        work=None, bench=True, max_workers=12, resume_from=None) -> dict:
    """The whole device run; returns the summary (also in the archive). ``tasks``: default the
    pack's; ``resume_from``: a repo root whose unpacked GPU logs this run continues."""
    import torch

    t0 = time.time()
    gpu = torch.cuda.is_available()
    if not gpu and not smoke:
        raise ValueError("no CUDA device: the GPU study needs one; use --smoke for the CPU "
                         "dry run")
    if out is None:
        raise ValueError("--out is required (on the device: --out $OUT)")
    launch_stop, hard_stop = t0 + 0.8 * budget_s, t0 + budget_s - 10
    manifest = verify(pack_dir)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(work) if work else Path(tempfile.mkdtemp(prefix="svd-lorafa-gpu-"))
    tasks = list(tasks or [t for t in (S.SMOKE if smoke else S.STUDY).tasks
                           if t in manifest["tasks"]])  # the spec's order, packed ones
    missing = sorted(set(tasks) - set(manifest["tasks"]))
    if missing:
        raise ValueError(f"--tasks {missing} not in the pack ({manifest['tasks']}): pack them "
                         "(make gpu-pack GPU_TASKS=...) or leave them out")
    resumed = seed_work(work, resume_from) if resume_from else 0
    pack_dir = Path(pack_dir).resolve()
    model = fp32_model(pack_dir, work / "minilm-fp32")
    max_workers = max(workers, max_workers)
    threads = max(1, (os.cpu_count() or 2) // max_workers)
    env = {**os.environ, "SVD_LORAFA_MINILM": str(model), "GLUE_DIR": str(pack_dir / GLUE_DIR),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]
                                        ).rstrip(os.pathsep)
    summary = {"device": torch.cuda.get_device_name(0) if gpu else "cpu", "smoke": smoke,
               "budget_s": budget_s, "workers": workers, "threads_per_worker": threads,
               "pack_mib": manifest["total_bytes"] / 2**20, "tasks": tasks,
               "resumed_logs": resumed}
    print(f"gpu kit: {summary['device']}, pack verified ({summary['pack_mib']:.1f} MiB), "
          f"tasks {' '.join(tasks)}, {resumed} logs of earlier device runs to continue, "
          f"model upcast to fp32 in {time.time() - t0:.0f}s", flush=True)

    # (a) benchmark, alone on the GPU; (b) the study; (c) the archive, whatever happened
    try:
        if bench:
            b = _benchmark(work, env, 90.0 if gpu else 60.0, cpu_smoke=not gpu)
            summary["bench"] = {"goals": b.get("goals"),
                                "errors": b.get("errors") or b.get("error"),
                                "wall_s": b.get("wall_s")}
            print(f"benchmark done at {time.time() - t0:.0f}s", flush=True)
        summary.update(_study(work, env, workers, max_workers, smoke, tasks, launch_stop,
                              hard_stop, gpu, t0))
    except BaseException as e:
        summary["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        summary["wall_s"] = round(time.time() - t0)
        archive = write_archive(work, out / ARCHIVE, summary)
        summary["archive_mib"] = round(archive.stat().st_size / 2**20, 2)
        text = summary_text(summary)
        (out / "summary.txt").write_text(text + "\n")
        print(text, flush=True)
    return summary


RAMP_UTIL, RAMP_EVERY_S = 80.0, 30.0  # add 2 workers while the GPU is busy less than this


def _study(work, env, workers, max_workers, smoke, tasks, launch_stop, hard_stop, gpu,
           t0) -> dict:
    """The study's worker processes, each in its own process group, sharing the runs through
    the sweep's claims (each takes the next run no live worker holds). ``workers`` start; while
    the GPU is busy less than RAMP_UTIL % two more join (up to ``max_workers``), so the run
    measures runs per minute at each N. They run in the scratch folder with relative paths, so
    no machine path lands in a log. No launch after ``launch_stop``; all stopped at
    ``hard_stop``."""
    logs_root = work / "logs"
    argv = ["--logs-dir", "logs/study", "--lr-logs-dir", "logs/study_lr", "--figures-dir",
            "figures", "--gpu"] + (["--smoke"] if smoke else []) \
        + (["--tasks", *tasks] if tasks else [])
    study = [sys.executable, "-m", "pipeline.study"]
    procs, logs, utils, progress = [], [], [], []

    def spawn():
        logs.append(open(work / f"worker-{len(procs)}.log", "w"))
        procs.append(subprocess.Popen(
            [*study, "all", *argv, "--deadline-s", f"{max(0.0, launch_stop - time.time()):.0f}"],
            env=env, stdout=logs[-1], stderr=subprocess.STDOUT, start_new_session=True,
            cwd=work))

    t_study = last_ramp = time.time()
    n_before = _complete(_count(logs_root))  # a resumed run (--work with earlier logs) has some
    try:
        for _ in range(workers):
            spawn()
        while any(p.poll() is None for p in procs) and time.time() < hard_stop:
            time.sleep(min(10.0, max(0.1, hard_stop - time.time())))
            util = _gpu_util() if gpu else None
            if util is not None:
                utils.append(util)
            n_done = _complete(_count(logs_root))
            progress.append((round(time.time() - t_study), len(procs), n_done, util))
            print(f"  t={time.time() - t0:4.0f}s {len(procs)} workers, complete runs {n_done}"
                  + (f", GPU util {util:.0f}%" if util is not None else ""), flush=True)
            recent = [u for _, _, _, u in progress[-3:] if u is not None]
            if (len(recent) == 3 and sum(recent) / 3 < RAMP_UTIL and len(procs) < max_workers
                    and time.time() - last_ramp >= RAMP_EVERY_S
                    and time.time() < launch_stop - 90):
                for _ in range(min(2, max_workers - len(procs))):
                    spawn()
                last_ramp = time.time()
        killed = sum(p.poll() is None for p in procs)
    finally:
        _stop(procs)
        for log in logs:
            log.close()
    study_s = time.time() - t_study
    out = {}
    # the final table from every finished lr run (workers may have been stopped first)
    try:
        with open(work / "select.log", "w") as log:
            rc = subprocess.run([*study, "select", *argv], env=env, stdout=log,
                                stderr=subprocess.STDOUT, cwd=work, timeout=60).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    if rc:
        out["selection_error"] = f"exit {rc}: " + (work / "select.log").read_text()[-300:]
    else:
        choices = S.read_selection(work / "figures")
        out["selected_lrs"] = {t: {m: c["lr"] for m, c in ch.items()} for t, ch in choices.items()}
    counts = _count(logs_root)
    n_complete = _complete(counts)
    out.update(study_s=round(study_s), counts=counts, complete_runs=n_complete,
               complete_before=n_before,
               runs_per_min=round((n_complete - n_before) / (study_s / 60), 2)
               if study_s else None,
               runs_per_min_by_workers=_rate_by_workers(progress),
               gpu_util_mean=round(sum(utils) / len(utils), 1) if utils else None,
               progress=progress, workers_started=len(procs),
               workers_stopped_at_deadline=killed,
               worker_exit_codes=[p.returncode for p in procs])
    return out


def _rate_by_workers(progress) -> dict:
    """{N workers: complete runs per minute while N ran} from (t, N, complete, util) samples;
    the first minute (imports, first runs) is left out."""
    spans = {}
    for (t1, n1, c1, _), (t2, n2, c2, _) in zip(progress, progress[1:]):
        if n1 == n2 and t1 >= 60:
            d = spans.setdefault(n1, [0, 0])
            d[0], d[1] = d[0] + c2 - c1, d[1] + t2 - t1
    return {n: round(c / (t / 60), 2) for n, (c, t) in spans.items() if t > 0}


def _complete(counts: dict) -> int:
    return sum(v.get("complete", 0) for phase in counts.values() for v in phase.values())


def _thin(h: dict, every: int) -> dict:
    """The log with its per-step train arrays kept at every ``every``-th step."""
    if every > 1 and isinstance(h.get("train"), dict):
        h["train"] = {k: v[every - 1::every] if isinstance(v, list) else v
                      for k, v in h["train"].items()}
        h["train_thinned_every"] = every
    return h


def write_archive(work: Path, path: Path, summary: dict) -> Path:
    """tar.gz of the finished logs (complete or failed; killed runs are left out), their
    predictions, the selection table, the benchmark JSON, worker log tails and the summary;
    per-step train arrays are thinned if it would exceed 16 MiB."""
    for every in (1, 4, 16, 64):
        tmp = path.with_name(path.name + ".tmp")
        left_out = []
        with tarfile.open(tmp, "w:gz") as tar:
            def add_bytes(name, data: bytes):
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(data), int(time.time())
                tar.addfile(info, io.BytesIO(data))

            for log in sorted((work / "logs").glob("*/*/*.json")):
                try:
                    h = json.loads(log.read_text())
                except (json.JSONDecodeError, OSError):
                    h = {}
                if h.get("status") not in ("complete", "failed"):
                    left_out.append(log.stem)
                    continue
                rel = log.relative_to(work)
                add_bytes(str(rel), L.to_json(_thin(h, every)).encode())
                preds = log.with_name(log.stem + ".preds.npz")
                if preds.is_file():
                    tar.add(preds, str(rel.with_name(preds.name)))
            for p in sorted((work / "figures").glob("*")) + sorted((work / "bench").glob("*")):
                tar.add(p, str(p.relative_to(work)))
            for p in sorted(work.glob("*.log")):
                add_bytes(f"worker_logs/{p.name}", p.read_bytes()[-200_000:])
            summary.update(killed_runs_left_out=left_out, train_thinned_every=every)
            add_bytes("summary.json", json.dumps(summary, indent=1).encode())
        if tmp.stat().st_size <= ARCHIVE_LIMIT:
            os.replace(tmp, path)
            return path
    os.replace(tmp, path)
    summary["archive_over_limit"] = True
    return path


def summary_text(s: dict) -> str:
    """One screen: the benchmark goals, runs per task and phase, throughput, the archive."""
    lines = [f"== GPU kit summary: {s['device']}{' (smoke)' if s['smoke'] else ''}, "
             f"{s.get('wall_s')}s of {s['budget_s']:.0f}s, {s['workers']} workers at the start "
             f"(up to {s.get('workers_started')}) x {s['threads_per_worker']} threads"]
    if s.get("error"):
        lines.append(f"  ERROR: {s['error'][:300]}")
    b = s.get("bench") or {}
    for g in b.get("goals") or []:
        lines.append(f"  bench {g['shape']} {g['targets']}: " + ", ".join(
            f"{k} {v:.3f} ({g[k + '_goal'].split(': ')[1]})" for k, v in g.items()
            if k + "_goal" in g))
    if b.get("errors"):
        lines.append(f"  bench errors: {str(b['errors'])[:300]}")
    for phase, tasks in sorted((s.get("counts") or {}).items()):
        lines.append(f"  {phase}: " + "; ".join(
            f"{t} " + " ".join(f"{k}={v}" for k, v in sorted(c.items())) for t, c in tasks.items()))
    if "complete_runs" in s:
        lines.append(f"  complete runs {s['complete_runs'] - s.get('complete_before', 0)} "
                     f"(+{s.get('complete_before', 0)} from earlier) in {s['study_s']}s = "
                     f"{s['runs_per_min']} runs/min (by workers: {s['runs_per_min_by_workers']});"
                     f" GPU util mean {s['gpu_util_mean']}%; "
                     f"workers stopped at the deadline {s['workers_stopped_at_deadline']}; "
                     f"killed runs left out {len(s.get('killed_runs_left_out', []))}")
    for task, lrs in (s.get("selected_lrs") or {}).items():
        lines.append(f"  {task} lrs: " + ", ".join(f"{m} {lr:g}" if lr else f"{m} -"
                                                   for m, lr in lrs.items()))
    if s.get("selection_error"):
        lines.append(f"  selection: {s['selection_error'][-200:]}")
    lines.append(f"  archive {ARCHIVE}: {s.get('archive_mib')} MiB "
                 f"(train arrays every {s.get('train_thinned_every')} step)")
    return "\n".join(lines)


# ---------------------------------------------------------------- unpack (here)
def unpack(archive, root=".") -> dict:
    """Put the archive's logs under logs/study_gpu{,_lr}/, the selection table under
    figures/gpu/ and the benchmark JSON under benchmarks/results/gpu/. Returns {part: n files}."""
    archive, root = Path(archive), Path(root)
    if not archive.is_file():
        raise FileNotFoundError(f"{archive} not found: give ARCHIVE=<path of {ARCHIVE}>")
    moved = {}
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(archive) as tar:
        for m in tar.getmembers():
            if m.name.startswith(("/", "..")) or ".." in Path(m.name).parts or not (
                    m.isfile() or m.isdir()):
                raise ValueError(f"{archive}: unsafe member {m.name!r}; not unpacked")
        tar.extractall(tmp, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        for src, dst in UNPACK.items():
            for p in sorted(Path(tmp, src).rglob("*")):
                if p.is_file():
                    target = root / dst / p.relative_to(Path(tmp, src))
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(p, target)
                    moved[dst] = moved.get(dst, 0) + 1
        if Path(tmp, "summary.json").is_file():
            (root / UNPACK["bench"]).mkdir(parents=True, exist_ok=True)
            n = 1  # one summary per device run: run_summary_1.json, _2, ... (never overwritten)
            while (root / UNPACK["bench"] / f"run_summary_{n}.json").exists():
                n += 1
            shutil.copy2(Path(tmp, "summary.json"), root / UNPACK["bench"] / f"run_summary_{n}.json")
    print("unpacked: " + ", ".join(f"{n} files -> {d}/" for d, n in moved.items()))
    return moved


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["pack"]:
        p = argparse.ArgumentParser(prog="python -m pipeline.gpu pack")
        p.add_argument("--dest", default=".gpu")
        p.add_argument("--glue-dir", default=None)
        p.add_argument("--tasks", nargs="+", default=list(S.TASKS),
                       help="the tasks to pack (the run defaults to these)")
        a = p.parse_args(argv[1:])
        total = pack(a.dest, a.glue_dir, tuple(a.tasks))["total_bytes"]
        tree = _tree_bytes()  # what the device call sends besides the pack
        if tree is not None:
            print(f"working tree {tree / 2**20:.1f} MiB + pack = {(tree + total) / 2**20:.1f} "
                  f"MiB of the device call's {DEVICE_TREE_LIMIT / 2**20:.0f}")
            if tree + total > DEVICE_TREE_LIMIT:
                raise ValueError(f"pack + working tree = {(tree + total) / 2**20:.1f} MiB, over "
                                 f"the device call's {DEVICE_TREE_LIMIT / 2**20:.0f}: pack fewer "
                                 "tasks (make gpu-pack GPU_TASKS='mrpc cola')")
        return 0
    if argv[:1] == ["unpack"]:
        p = argparse.ArgumentParser(prog="python -m pipeline.gpu unpack")
        p.add_argument("archive")
        p.add_argument("--root", default=".")
        a = p.parse_args(argv[1:])
        unpack(a.archive, a.root)
        return 0
    p = argparse.ArgumentParser(prog="python -m pipeline.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--pack", default=".gpu", help="the folder `make gpu-pack` wrote")
    p.add_argument("--out", default=os.environ.get("OUT"), help="where the archive goes "
                                                                "(default $OUT)")
    p.add_argument("--budget-s", type=float, default=520.0,
                   help="whole run; no launch after 80%%, workers stopped 10 s before the end")
    p.add_argument("--workers", type=int, default=6, help="study processes at the start")
    p.add_argument("--max-workers", type=int, default=12,
                   help="more join, two at a time, while the GPU is busy < 80%% of the time")
    p.add_argument("--tasks", nargs="+", default=None)
    p.add_argument("--smoke", action="store_true", help="the tiny study (CPU dry run)")
    p.add_argument("--work", default=None, help="scratch folder (default: a new temp folder)")
    p.add_argument("--no-bench", action="store_true")
    p.add_argument("--fresh", action="store_true", help="do not continue the repo's earlier "
                   "device runs (logs/study_gpu{,_lr}); --smoke never does")
    a = p.parse_args(argv)
    if a.workers < 1 or a.budget_s <= 0:
        p.error("--workers must be >= 1 and --budget-s > 0")
    run(a.pack, a.out, a.budget_s, a.workers, a.smoke, a.tasks, a.work, not a.no_bench,
        a.max_workers, None if a.fresh or a.smoke else REPO_ROOT)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
