"""The sweep: any grid of RunConfig fields, shards of the whole grid, a CLI built from the
fields, one `error:` line (exit 2) for every bad input, failures reported at the end (exit 1),
lock files so two workers never run a config twice, and leftovers cleaned up."""
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pytest

from pipeline import logs as L
from pipeline import sweep as S
from pipeline.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]


def ids(configs):
    return [c.run_id for c in configs]


# ---------------------------------------------------------------- the grid and its shards
def test_grid_is_any_product_of_fields_in_a_stable_order():
    cfgs = S.grid({"reg_coeff": [0.0, 0.1], "seed": [0, 1]}, epochs=2)
    assert [(c.reg_coeff, c.seed) for c in cfgs] == [(0.0, 0), (0.0, 1), (0.1, 0), (0.1, 1)]
    assert all(c.epochs == 2 for c in cfgs)
    # 'full' ignores init and rank: one run per lr, not one per (init, rank, lr)
    cfgs = S.grid({"variant": ["full", "lorafa"], "init": ["kaiming", "svd"], "rank": [4, 8],
                   "lr": [1e-4]})
    assert ids(cfgs) == ["mrpc-full-lr1e-04-s0", "mrpc-lorafa-kaiming-r4-lr1e-04-s0",
                         "mrpc-lorafa-kaiming-r8-lr1e-04-s0", "mrpc-lorafa-svd-r4-lr1e-04-s0",
                         "mrpc-lorafa-svd-r8-lr1e-04-s0"]
    # a scalar is a one-value axis; a list-valued field (targets) takes a list per value
    cfgs = S.grid({"targets": [["query", "value"], "attention"], "lr": 1e-3})
    assert [c.targets for c in cfgs] == [["query", "value"], "attention"]
    with pytest.raises(ValueError, match="unknown RunConfig field 'lrs': did you mean 'lr'"):
        S.grid({"lrs": [1e-3]})
    with pytest.raises(ValueError, match="both as an axis and a common setting"):
        S.grid({"lr": [1e-3]}, lr=1e-4)


def test_grid_refuses_two_configs_that_share_a_run_id():
    # run ids name the usual axes; an epochs axis used to collapse silently to its first value
    with pytest.raises(ValueError, match=r"share the run id 'mrpc-lorafa-svd-r8-lr5e-04-s0' "
                                         r"\(epochs: 1 -> 2\): give each its own tag"):
        S.grid({"epochs": [1, 2]})
    # 'full' repeats over adapter settings are the same run, not a conflict
    assert len(S.grid({"variant": ["full"], "rank": [4, 8], "alpha": [8, 16]})) == 1


def test_alpha_defaults_to_twice_each_rank_of_a_rank_axis():
    cfgs = S.grid({"rank": [4, 8, 16]})
    assert [c.alpha for c in cfgs] == [8, 16, 32]
    assert all("-a" not in c.run_id for c in cfgs)


def test_shard_splits_the_whole_grid(tmp_path, capsys):
    # the bug: sharding inside each rank's loop gave `--rank 4 8 16 --shard 1/2` zero runs
    argv = ["--rank", "4", "8", "16", "--logs-dir", str(tmp_path), "--dry-run"]
    every = []
    for k in (0, 1):
        assert S.main(argv + ["--shard", f"{k}/2"]) == 0
        lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[")]
        every.append([ln.split()[1].rstrip(":") for ln in lines])
    assert [len(e) for e in every] == [2, 1]
    assert sorted(every[0] + every[1]) == sorted(ids(S.grid({"rank": [4, 8, 16]})))


def test_run_variants_keeps_the_notebook_order(tmp_path):
    kw = dict(inits={"lora": ["kaiming"], "lorafa": ["orthogonal", "svd"]},
              lrs={"full": 1e-4, "lora": 1e-3, "lorafa": 5e-3}, seeds=[0, 1],
              logs_dir=str(tmp_path), dry_run=True)
    got = [r["run_id"] for r in S.run_variants("mrpc", ["full", "lora", "lorafa"], **kw)]
    assert got[:4] == ["mrpc-full-lr1e-04-s0", "mrpc-lora-kaiming-r8-lr1e-03-s0",
                       "mrpc-lorafa-orthogonal-r8-lr5e-03-s0", "mrpc-lorafa-svd-r8-lr5e-03-s0"]
    assert len(got) == 8 and all(r.endswith("-s1") for r in got[4:])
    reg = S.run_sweep("mrpc", "lorafa", "svd", 8, 1e-3, [0, 1], axes={"reg_coeff": [0, 0.1]},
                      logs_dir=str(tmp_path), dry_run=True)
    assert len(reg) == 4 and sum("-reg1e-01-" in r["run_id"] for r in reg) == 2


# ---------------------------------------------------------------- the CLI from RunConfig
def test_every_runconfig_field_is_a_flag_with_its_help():
    parser = S.build_parser()
    flags = {s: a for a in parser._actions for s in a.option_strings}
    for f in fields(RunConfig):
        action = flags[f"--{f.name.replace('_', '-')}"]
        assert action.dest == f.name and action.help.startswith(f.metadata["help"])
    a = vars(parser.parse_args(["--seeds", "0", "1", "--rank", "4", "8", "--lr", "1e-3",
                                "--head-lr", "none", "--targets", "query,value", "attention",
                                "--no-checkpoint", "--rslora"]))
    assert a["seed"] == [0, 1] and a["rank"] == [4, 8] and a["lr"] == [1e-3]
    assert a["head_lr"] == [None] and a["targets"] == [["query", "value"], "attention"]
    assert a["checkpoint"] is False and a["rslora"] is True
    assert "epochs" not in a  # fields not given keep RunConfig's default


# ---------------------------------------------------------------- bad input: one line, exit 2
def _sweep(capsys, *argv):
    """main(argv) -> (exit code, stderr); argparse's refusals exit from inside main."""
    capsys.readouterr()  # drop what fixtures printed
    try:
        code = S.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err.strip()


def _tiny(glue_dir, logs, model, *extra):
    return ["--model", model, "--glue-dir", glue_dir, "--logs-dir", logs, "--epochs", 1,
            "--batch-size", 8, "--subsample-train", 16, "--subsample-dev", 8, "--quiet", *extra]


def _bad_log(logs, text):
    path = logs / "mrpc" / f"{RunConfig().run_id}.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())


BAD_INPUTS = {  # name: (argv after the common ones, what the error line must say)
    "subsample 0": (["--subsample-train", 0], "subsample_train must be an int >= 1"),
    "subsample < 0": (["--subsample-dev", -4], "subsample_dev must be an int >= 1"),
    "max_length 0": (["--max-length", 0], "max_length must be an int >= 1"),
    "warmup 1": (["--warmup-ratio", 1.0], "warmup_ratio must be in [0, 1)"),
    "warmup < 0": (["--warmup-ratio", -0.1], "warmup_ratio must be in [0, 1)"),
    "fp16 on cpu": (["--mixed-precision", "fp16", "--cpu"], "'fp16' needs a GPU"),
    "unknown init": (["--init", "gaussian"], "unknown init 'gaussian'"),
    "not an int": (["--rank", "eight"], "argument --rank: invalid int value: 'eight'"),
    "bad shard": (["--shard", "2/2"], "'2/2' is not K/N with 0 <= K < N"),
    "unknown flag": (["--lrs", "1e-3"], "unrecognized arguments: --lrs"),
    "abbreviated flag": (["--epoch", "2"], "unrecognized arguments: --epoch"),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_settings_one_error_line_exit_2(name, tmp_path, capsys):
    extra, says = BAD_INPUTS[name]
    code, err = _sweep(capsys, "--logs-dir", tmp_path / "logs", *extra)
    assert code == 2 and err.startswith("error: ") and "\n" not in err and says in err, err
    assert not (tmp_path / "logs").exists()  # refused before anything was written


def test_bad_files_one_error_line_exit_2(glue_dir, tmp_path, tiny_bert_dir, capsys):
    model, logs = tiny_bert_dir(), tmp_path / "logs"
    (tmp_path / "empty_glue").mkdir()
    (tmp_path / "a_file").write_text("")
    cases = [  # (argv, what the line names)
        (_tiny(tmp_path / "empty_glue", logs, model), "GLUE file not found: "),
        (_tiny(tmp_path / "no_glue", logs, model), "GLUE folder "),
        (_tiny(glue_dir, logs, tmp_path / "no_model"), "no_model"),
        (_tiny(glue_dir, tmp_path / "a_file" / "logs", model), "is not writable"),
    ]
    for argv, says in cases:
        code, err = _sweep(capsys, *argv)
        assert code == 2 and err.startswith("error: ") and "\n" not in err and says in err, err


@pytest.mark.parametrize("text, says", [("{not json", "not valid JSON"),
                                        ("[1, 2]", "not a run log"),
                                        ('{"status": "complete", "config": 3}', "not a run log"),
                                        ('{"config": {}}', "not a run log"),
                                        (b"\xff\xfe{}", "not valid JSON"),
                                        ('{"status": "complete", "config": {"epochs": "x"}}',
                                         "its config is not a valid RunConfig (epochs must")])
def test_bad_stored_log_one_error_line_exit_2(text, says, tmp_path, capsys):
    _bad_log(tmp_path, text)
    code, err = _sweep(capsys, "--logs-dir", tmp_path, "--dry-run")
    assert code == 2 and err.startswith("error: ") and "\n" not in err and says in err, err
    assert f"{RunConfig().run_id}.json" in err


def test_unreachable_hub_one_error_line_exit_2(tmp_path, tiny_bert_dir, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    code, err = _sweep(capsys, *_tiny("hub", tmp_path / "logs", tiny_bert_dir()))
    assert code == 2 and err.startswith("error: ") and "\n" not in err and "hub" in err, err


def test_debug_shows_the_traceback_and_a_subprocess_exits_2(tmp_path):
    _bad_log(tmp_path, "[]")
    cmd = [sys.executable, "-m", "pipeline.sweep", "--logs-dir", str(tmp_path), "--dry-run"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "not a run log" in out.stderr
    out = subprocess.run(cmd + ["--debug"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "Traceback" in out.stderr


# ---------------------------------------------------------------- failed runs: exit 1
def _write_log(cfg, status, error=None):
    h = {"schema_version": 2, "run_id": cfg.run_id, "status": status, "error": error,
         "config": cfg.__dict__, "final": {}}
    L.atomic_write_json(h, L.log_path(cfg.logs_dir, cfg.task, cfg.run_id))
    return h


def test_a_failed_run_is_reported_and_exits_1_now_and_later(tmp_path, capsys, monkeypatch):
    argv = ["--seeds", "0", "1", "--logs-dir", str(tmp_path)]
    monkeypatch.setattr(S, "resolve_model", lambda m: m)

    def run(cfg):
        if cfg.seed == 1:  # as run_experiment does: the log says failed, then it raises
            _write_log(cfg, "failed", "RuntimeError: CUDA error: an illegal memory access")
            raise RuntimeError("CUDA error: an illegal memory access")
        return _write_log(cfg, "failed", "non-finite loss (nan) at step 3")
    monkeypatch.setattr(S, "run_experiment", run)
    assert S.main(argv) == 1  # the crash of seed 1 did not stop the sweep: both reported
    out = capsys.readouterr().out
    assert "2 runs, 0 complete, 2 failed" in out
    assert "failed: mrpc-lorafa-svd-r8-lr5e-04-s0: non-finite loss (nan) at step 3" in out
    assert "failed: mrpc-lorafa-svd-r8-lr5e-04-s1: RuntimeError: CUDA error" in out
    # a later sweep skips the failed run, and still says so and exits 1
    monkeypatch.setattr(S, "run_experiment", lambda cfg: pytest.fail("reran a failed run"))
    assert S.main(argv) == 1
    out = capsys.readouterr().out
    assert "failed earlier: mrpc-lorafa-svd-r8-lr5e-04-s0: non-finite loss" in out
    assert "failed earlier: mrpc-lorafa-svd-r8-lr5e-04-s1: RuntimeError: CUDA error" in out
    assert "--retry-failed" in out
    monkeypatch.setattr(S, "run_experiment", lambda cfg: _write_log(cfg, "complete"))
    assert S.main(argv + ["--retry-failed"]) == 0
    assert "2 complete, 0 failed" in capsys.readouterr().out


# ---------------------------------------------------------------- claims (lock files)
def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _lock(tmp_path, pid, host=None, **more):
    lock = tmp_path / "run.lock"
    lock.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), **more}))
    return lock


def test_claim_is_exclusive_and_takes_over_only_stale_locks(tmp_path):
    lock = tmp_path / "run.lock"
    assert S.claim(lock) == (True, "")
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    S.release(lock)
    assert not lock.exists()
    live = _lock(tmp_path, os.getppid())
    assert S.claim(live) == (False, f"claimed by pid {os.getppid()}")
    S.release(live)  # not ours: left alone
    assert json.loads(live.read_text())["pid"] == os.getppid()
    far = _lock(tmp_path, 1, host="elsewhere")
    claimed, note = S.claim(far)
    assert not claimed and f"on elsewhere (delete {far} if that sweep is gone)" in note
    dead = _dead_pid()
    stale = _lock(tmp_path, dead)
    assert S.claim(stale) == (True, f"took over the stale lock of pid {dead} (gone)")
    assert json.loads(stale.read_text())["pid"] == os.getpid()
    S.release(stale)
    # a live pid that started after the lock was written (reused, e.g. after a reboot)
    reused = _lock(tmp_path, os.getppid(), started="1")
    assert S.claim(reused) == (True, f"took over the stale lock of pid {os.getppid()} (gone)")
    S.release(reused)
    # a lock still empty: held while its writer may be writing it, taken over once old
    empty = tmp_path / "run.lock"
    empty.write_text("")
    assert S.claim(empty) == (False, f"claimed ({empty} is being written)")
    old = time.time() - 2 * S.LEFTOVER_AGE_S
    os.utime(empty, (old, old))
    assert S.claim(empty) == (True, "took over the stale lock of pid ? (gone)")
    assert os.listdir(tmp_path) == ["run.lock"]


def test_a_run_claimed_by_a_live_worker_is_left_to_it(tmp_path, capsys, monkeypatch):
    cfg = RunConfig(logs_dir=str(tmp_path))
    (tmp_path / "mrpc").mkdir()
    S._lock_path(cfg).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    monkeypatch.setattr(S, "run_experiment", lambda cfg: pytest.fail("ran a claimed run"))
    assert S.main(["--logs-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"{cfg.run_id}: claimed by pid {os.getppid()}, skipped" in out
    assert "1 claimed by other workers" in out
    assert S.main(["--logs-dir", str(tmp_path), "--dry-run"]) == 0  # shows who runs what
    assert f"{cfg.run_id}: todo (claimed by pid {os.getppid()})" in capsys.readouterr().out


def test_two_workers_on_one_grid_never_run_a_config_twice(glue_dir, tmp_path, tiny_bert_dir):
    logs = tmp_path / "logs"
    argv = [sys.executable, "-m", "pipeline.sweep", "--init", "kaiming", "orthogonal", "svd",
            "--seeds", "0", "1", *map(str, _tiny(glue_dir, logs, tiny_bert_dir()))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [w.communicate(timeout=600) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [o[1][-2000:] for o in outs]
    ran = [ln.split()[1].rstrip(":") for out, _ in outs for ln in out.splitlines()
           if ln.endswith(": running")]
    logs_written = sorted(p.stem for p in (logs / "mrpc").glob("*.json"))
    assert len(logs_written) == 6 and sorted(ran) == logs_written  # each exactly once
    assert all(L.read_log(logs / "mrpc" / f"{r}.json")["status"] == "complete" for r in ran)
    assert not list((logs / "mrpc").glob("*.lock"))  # released


# ---------------------------------------------------------------- leftovers
def test_next_sweep_removes_leftovers_but_not_those_of_live_runs(tmp_path, monkeypatch):
    folder = tmp_path / "mrpc"
    done, live, killed = (RunConfig(seed=s, logs_dir=str(tmp_path)) for s in (0, 1, 2))
    _write_log(done, "complete")
    _write_log(live, "running")
    _write_log(killed, "running")
    (folder / f"{live.run_id}.lock").write_text(json.dumps({"pid": os.getppid(),
                                                            "host": socket.gethostname()}))
    old = time.time() - 2 * S.LEFTOVER_AGE_S
    temps = {r.run_id: folder / f".{r.run_id}.json.x1y2z3.tmp" for r in (done, live, killed)}
    fresh = folder / f".{done.run_id}.preds.npz.a1b2c3"
    for p in [*temps.values(), fresh]:
        p.write_text("half")
    for p in temps.values():
        os.utime(p, (old, old))
    for r in (done, live, killed):
        (folder / ".ckpt" / r.run_id / "epoch-1").mkdir(parents=True)
    removed = S.clean_leftovers(folder)
    assert sorted(removed) == sorted([temps[done.run_id], temps[killed.run_id],
                                      folder / ".ckpt" / done.run_id])
    assert temps[live.run_id].exists() and fresh.exists()  # a live run's, a write in flight
    assert (folder / ".ckpt" / killed.run_id / "epoch-1").is_dir()  # resumes from it
    # the next sweep does it before its first run
    (folder / ".ckpt" / done.run_id).mkdir(parents=True)
    monkeypatch.setattr(S, "run_experiment", lambda cfg: _write_log(cfg, "complete"))
    assert S.main(["--seeds", "0", "--logs-dir", str(tmp_path)]) == 0
    assert not (folder / ".ckpt" / done.run_id).exists()


def test_a_ddp_sweep_takes_one_decision_for_all_its_processes(glue_dir, tmp_path, tiny_bert_dir):
    logs = tmp_path / "logs"
    kw = dict(model=tiny_bert_dir(), glue_dir=str(glue_dir), logs_dir=str(logs), epochs=1,
              batch_size=8, subsample_train=16, subsample_dev=8)
    taken = RunConfig(init="orthogonal", **kw)  # claimed by a live worker (this test)
    (logs / "mrpc").mkdir(parents=True)
    S._lock_path(taken).write_text(json.dumps({"pid": os.getpid(),
                                               "host": socket.gethostname()}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(29600 + os.getpid() % 1000)}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", env["MASTER_PORT"], "-m", "pipeline.sweep",
                          "--init", "kaiming", "orthogonal", "svd",
                          *map(str, _tiny(glue_dir, logs, kw["model"]))],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"{taken.run_id}: claimed by pid {os.getpid()}, skipped" in out.stdout
    assert "sweep: 3 runs, 2 complete, 0 failed, 1 claimed by other workers" in out.stdout
    for init in ("kaiming", "svd"):
        h = L.read_log(L.log_path(logs, "mrpc", RunConfig(init=init, **kw).run_id))
        assert h["status"] == "complete" and h["env"]["num_processes"] == 2
    assert not L.log_path(logs, "mrpc", taken.run_id).exists()


def test_full_runs_of_grids_at_other_ranks_are_the_same_run(tmp_path, monkeypatch):
    # 'full' has no adapter: a later sweep at another rank (or alpha, targets) finds its log
    monkeypatch.setattr(S, "resolve_model", lambda m: m)
    monkeypatch.setattr(S, "run_experiment", lambda cfg: _write_log(cfg, "complete"))
    assert S.main(["--variant", "full", "lorafa", "--rank", "4", "--logs-dir", str(tmp_path)]) == 0
    monkeypatch.setattr(S, "run_experiment", lambda cfg: pytest.fail(f"reran {cfg.run_id}"))
    assert S.main(["--variant", "full", "--rank", "8", "16", "--alpha", "3", "--targets", "qv",
                   "--logs-dir", str(tmp_path)]) == 0


CLAIMER = """
import json, os, sys, time
sys.path.insert(0, {root!r})
from pathlib import Path
from pipeline.sweep import claim
lock, ready, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
(ready / str(os.getpid())).touch()
while len(list(ready.iterdir())) < n:  # start together, once every worker has its imports
    time.sleep(0.002)  # (sleeping, not spinning: a loaded machine still finishes the imports)
print(json.dumps(claim(lock)))
time.sleep(1)  # hold the claim while the others look
"""


def test_only_one_of_several_workers_takes_over_a_stale_lock(tmp_path):
    script, ready, n = tmp_path / "claim.py", tmp_path / "ready", 4
    script.write_text(CLAIMER.format(root=str(ROOT)))
    ready.mkdir()
    lock = _lock(tmp_path, _dead_pid())
    procs = [subprocess.Popen([sys.executable, str(script), str(lock), str(ready), str(n)],
                              stdout=subprocess.PIPE, text=True) for _ in range(n)]
    got = [json.loads(p.communicate(timeout=600)[0]) for p in procs]
    assert sum(claimed for claimed, _ in got) == 1, got
    # the winner took the stale lock over, or found it already moved away by a loser; the
    # losers saw the new owner, or its lock while it was being written
    assert all(note == "" or note.startswith("took over") for won, note in got if won), got
    assert all(note.startswith(("claimed by pid", "claimed (")) for won, note in got
               if not won), got
    winner = next(p for p, (won, _) in zip(procs, got) if won)
    assert json.loads(lock.read_text())["pid"] == winner.pid
    assert not list(tmp_path.glob(".*.stale"))  # the stale lock is gone, not parked
