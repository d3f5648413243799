"""Grid sweeps over any RunConfig fields: complete runs are skipped, killed ones resume from their
last epoch checkpoint, and each run is claimed with a lock file so several workers can share one
grid and one logs folder without running anything twice.

    python -m pipeline.sweep --task mrpc --variant lorafa --init orthogonal svd --rank 4 8 \
        --lr 1e-4 5e-4 --seeds 0 1 2 --epochs 2 [--shard K/N] [--dry-run] [--debug]

Every RunConfig field is a flag (``--help`` lists them with their help text); a field given
several values is an axis of the grid. Exit status: 0 when every run is complete (or claimed by
another live worker), 1 when a run failed (now or in an earlier sweep; ``--retry-failed`` runs
it again), 2 on a bad input, reported as one ``error:`` line (``--debug`` shows the traceback).

Multi-process DDP (every process walks the same grid; ``--batch-size`` stays the global batch):
``accelerate launch --multi_gpu --num_processes 2 -m pipeline.sweep ...`` or
``torchrun --nproc_per_node 2 -m pipeline.sweep ...``; on a machine without GPUs both run on
CPU with gloo (note: ``accelerate launch --cpu`` starts ONE process in accelerate 1.15).
"""
from __future__ import annotations

import argparse
import difflib
import itertools
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import typing
from dataclasses import MISSING, fields
from pathlib import Path

from . import logs as L
from .config import RunConfig
from .models import resolve_model
from .train import run_experiment, stored_log

# a bad input: the sweep stops with one line (missing file, unreachable hub, bad setting, ...)
USER_ERRORS = (ValueError, OSError)
# a temp file of an atomic write, or a lock file still empty, older than this was left by a
# killed process (a live one writes and renames within milliseconds)
LEFTOVER_AGE_S = 60


def _print(*a, file=None):
    # under torchrun / accelerate launch every process walks the grid: only rank 0 talks
    if int(os.environ.get("RANK", "0")) == 0:
        print(*a, flush=True, file=file)


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple, range)) else [x]


# ---------------------------------------------------------------- the grid
def grid(axes: dict, **common) -> list[RunConfig]:
    """Every combination of ``axes`` ({RunConfig field: values}, the first axis outermost) with
    the ``common`` fields. 'full' ignores the adapter settings (init, rank, ...), so its repeats
    are dropped (by run_id); two different configs with one run id (an axis the id does not
    name, e.g. epochs) are refused.

        grid({"init": ["orthogonal", "svd"], "lr": [1e-4, 5e-4], "seed": [0, 1]}, epochs=2)
    """
    names = [f.name for f in fields(RunConfig)]
    for name in [*axes, *common]:
        if name not in names:
            near = difflib.get_close_matches(name, names, n=1)
            raise ValueError(f"unknown RunConfig field {name!r}"
                             + (f": did you mean {near[0]!r}?" if near else
                                f": use one of {names}"))
    if set(axes) & set(common):
        raise ValueError(f"{sorted(set(axes) & set(common))} given both as an axis and a "
                         "common setting: give it once")
    seen, out = {}, []
    for values in itertools.product(*(_as_list(v) for v in axes.values())):
        cfg = RunConfig(**common, **dict(zip(axes, values)))
        first = seen.setdefault(cfg.run_id, cfg)
        if first is cfg:
            out.append(cfg)
            continue
        diff = cfg.differs_from(first.semantic())  # run ids name the usual axes, not all fields
        if diff:
            raise ValueError(f"two configs of this grid share the run id {cfg.run_id!r} "
                             f"({diff}): give each its own tag (one sweep per value) or logs_dir")
    return out


def run_sweep(tasks=("mrpc",), variants=("lorafa",), inits=("svd",), ranks=(8,), lrs=(5e-4,),
              seeds=(0,), retry_failed: bool = False, dry_run: bool = False, shard=None,
              axes: dict | None = None, **common) -> list[dict]:
    """Run the grid task x variant x init x rank x lr x seed (x any further ``axes``, e.g.
    ``{"reg_coeff": [0, 0.1]}``); ``common`` are other RunConfig fields (epochs, logs_dir, ...).
    Returns one summary dict per run (see ``run_configs``)."""
    axes = {"task": tasks, "variant": variants, "init": inits, "rank": ranks, "lr": lrs,
            "seed": seeds, **(axes or {})}
    return run_configs(grid(axes, **common), retry_failed, dry_run, shard)


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
               for cfg in grid({"task": tasks, "variant": v, "init": inits.get(v, "svd"),
                                "rank": ranks, "lr": lrs[v], "seed": seed}, **common)]
    return run_configs(configs, retry_failed, dry_run, shard)


# ---------------------------------------------------------------- running a list of configs
def run_configs(configs: list[RunConfig], retry_failed: bool = False, dry_run: bool = False,
                shard: tuple[int, int] | None = None, debug: bool = False) -> list[dict]:
    """Run ``configs`` in order. Complete runs are skipped, failed ones too unless
    ``retry_failed``; a run claimed by another live worker (its lock file) is left to it.
    ``shard=(k, n)`` keeps every n-th config from the k-th of the whole list: n workers, each
    given its own k, split one grid without overlap.

    A run that crashes is recorded as failed and the sweep goes on (``debug``: re-raised); a bad
    input (ValueError, OSError: missing file, conflicting log, ...) stops it. Returns one dict
    per config: run_id, status ('complete' | 'failed' | 'running' | None | 'locked'), skipped,
    and error / final / seconds where known."""
    if shard is not None:
        k, n = shard
        if not 0 <= k < n:
            raise ValueError(f"shard {k}/{n}: need 0 <= K < N")
        configs = configs[k::n]
    # an unreadable, foreign or conflicting log stops the sweep up front (stored_log)
    logs = [stored_log(cfg) for cfg in configs]
    if not dry_run:
        _preflight(configs)
    results = []
    for i, (cfg, old) in enumerate(zip(configs, logs), 1):
        head = f"[{i}/{len(configs)}] {cfg.run_id}"
        status = old and old.get("status")
        lock = _lock_path(cfg)
        if dry_run or _done(status, retry_failed):
            owner = _owner(lock) if dry_run else None
            held = f" (claimed by pid {owner.get('pid', '?')})" if owner is not None else ""
            _print(f"{head}: {status or 'todo'}" + (held if dry_run else ", skipped"))
            results.append(_summary(cfg, old, skipped=True))
            continue
        claimed, note = _on_main(lambda: claim(lock))
        if not claimed:
            _print(f"{head}: {note}, skipped")
            results.append({"run_id": cfg.run_id, "status": "locked", "skipped": True})
            continue
        try:
            # another worker may have finished it between the first read and the claim
            old = _on_main(lambda: stored_log(cfg))
            status = old and old.get("status")
            if _done(status, retry_failed):
                _print(f"{head}: {status}, skipped")
                results.append(_summary(cfg, old, skipped=True))
                continue
            _print(f"{head}: {'resuming' if status == 'running' else 'running'}"
                   + (f" ({note})" if note else ""))
            t = time.time()
            try:
                h = run_experiment(cfg)
            except USER_ERRORS:
                raise
            except Exception as e:  # the run's log says 'failed'; the sweep goes on
                if debug:
                    raise
                h = {"status": "failed", "error": f"{type(e).__name__}: {_first_line(e)}"}
            results.append({**_summary(cfg, h, skipped=False),
                            "seconds": round(time.time() - t, 1)})
            _print(f"{head}: {h['status']} {h.get('error') or h.get('final', {})} "
                   f"({time.time() - t:.0f}s)")
        finally:
            _on_main(lambda: release(lock))
    return results


def _preflight(configs: list[RunConfig]) -> None:
    """Refuse what would fail later (a bad model, a mixed precision this machine cannot run,
    an unwritable logs dir) before the first run; clear the leftovers of earlier sweeps."""
    for model in sorted({cfg.model for cfg in configs}):
        resolve_model(model)
    for cfg in configs:
        cfg.check_device()
    for folder in sorted({Path(cfg.logs_dir) / cfg.task for cfg in configs}):
        check_writable(folder)
        _on_main(lambda: clean_leftovers(folder))


def _done(status, retry_failed) -> bool:
    return status == "complete" or (status == "failed" and not retry_failed)


def _summary(cfg, h, skipped) -> dict:
    h = h or {}
    return {"run_id": cfg.run_id, "status": h.get("status"), "skipped": skipped,
            "error": h.get("error"), "final": h.get("final", {})}


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _on_main(fn):
    """fn() on the main process; under a multi-process launch every process gets its result,
    so all of them take the same decision (run or skip) on every config."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return fn()
    import torch
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    # as in run_experiment: without a GPU, only cpu=True makes accelerate join the launch
    out = [fn() if PartialState(cpu=not torch.cuda.is_available()).is_main_process else None]
    return broadcast_object_list(out)[0]


# ---------------------------------------------------------------- claims and leftovers
def _lock_path(cfg: RunConfig) -> Path:
    return Path(cfg.logs_dir) / cfg.task / f"{cfg.run_id}.lock"


def _owner(lock: Path) -> dict | None:
    try:
        owner = json.loads(lock.read_text())
        if isinstance(owner, dict):
            return owner
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        pass
    try:  # being written right now, or its writer died before writing: its age tells which
        return {"unreadable_since": lock.stat().st_mtime}
    except FileNotFoundError:
        return None


def _started(pid: int) -> str | None:
    """When process ``pid`` started (Linux clock ticks since boot; None elsewhere): tells a
    reused pid (after a reboot, say) from the process that wrote a lock."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _me() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": _started(os.getpid())}


def _alive(owner: dict) -> bool:
    """False only when the owner is surely gone: same host, and no such process or one that
    started at another time (or a lock left unwritten for long)."""
    if "unreadable_since" in owner:
        return time.time() - owner["unreadable_since"] < LEFTOVER_AGE_S
    if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return True
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, another user's
    started = _started(owner["pid"])
    return not (owner.get("started") and started and owner["started"] != started)


def claim(lock: Path) -> tuple[bool, str]:
    """Claim a run by creating ``lock`` exclusively (O_CREAT | O_EXCL), holding our pid and
    host. Returns (True, '') when claimed, (True, 'took over ...') when a stale lock (same
    host, process gone) was replaced, (False, note naming the live owner) otherwise."""
    took_over = ""
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _owner(lock)
            if owner is None:
                continue  # released in between: try again
            if _alive(owner):
                return False, _holder(owner, lock)
            # stale: rename it away (only one worker wins the rename), then claim it afresh
            grave = lock.with_name(f".{lock.name}.{os.getpid()}.stale")
            try:
                os.rename(lock, grave)
            except FileNotFoundError:
                continue
            moved = _owner(grave)
            if moved != owner:  # we moved a fresh claim made in between: give it back
                os.rename(grave, lock)
                return False, _holder(moved or {}, lock)
            grave.unlink()
            took_over = f"took over the stale lock of pid {owner.get('pid', '?')} (gone)"
            continue
        with os.fdopen(fd, "w") as f:
            json.dump({**_me(), "since": L.now()}, f)
        return True, took_over
    return False, f"could not claim {lock} (it keeps changing)"


def _holder(owner: dict, lock: Path) -> str:
    if "unreadable_since" in owner:
        return f"claimed ({lock} is being written)"
    if owner.get("host") != socket.gethostname():
        return (f"claimed by pid {owner.get('pid')} on {owner.get('host')} (delete {lock} if "
                "that sweep is gone)")
    return f"claimed by pid {owner.get('pid')}"


def release(lock: Path) -> None:
    owner = _owner(lock)
    if owner and all(owner.get(k) == v for k, v in _me().items()):
        lock.unlink(missing_ok=True)


def clean_leftovers(folder: Path) -> list[Path]:
    """Remove what killed or finished runs left in one task's logs folder: temp files of atomic
    writes (``.<name>.<random>[.tmp]``) and checkpoints of complete runs. Runs claimed by a live
    worker are left alone. Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    live = {p.name[:-len(".lock")] for p in folder.glob("*.lock")
            if (o := _owner(p)) is None or _alive(o)}
    removed = []
    for p in folder.glob(".*.*"):
        run = next((r for r in live if p.name[1:].startswith(r + ".")), None)
        if p.is_file() and run is None and time.time() - p.stat().st_mtime > LEFTOVER_AGE_S:
            p.unlink(missing_ok=True)
            removed.append(p)
    ckpts = folder / ".ckpt"
    for d in sorted(ckpts.glob("*")) if ckpts.is_dir() else []:
        log = folder / f"{d.name}.json"
        try:
            done = d.name not in live and L.read_log(log).get("status") == "complete"
        except (OSError, ValueError, AttributeError):
            done = False
        if done:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    if ckpts.is_dir() and not any(ckpts.iterdir()):
        ckpts.rmdir()
    return removed


def check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise OSError(f"logs dir {folder} is not writable ({e.strerror or e}): choose another "
                      "--logs-dir") from None


# ---------------------------------------------------------------- the command line
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other bad input
        self.exit(2, f"error: {message} (see --help)\n")


def _converter(hint):
    """Parse one command-line value for a field annotated ``hint`` ('none' for an optional
    field; a comma list for a field that may be a list, e.g. targets=query,value)."""
    args = typing.get_args(hint) or (hint,)
    base = next(a for a in args if a is not type(None))

    def convert(s: str):
        if type(None) in args and s.lower() == "none":
            return None
        if list in args and "," in s:
            return s.split(",")
        return base(s)
    convert.__name__ = base.__name__  # argparse says "invalid int value: 'x'"
    return convert


def build_parser() -> argparse.ArgumentParser:
    """One flag per RunConfig field, help text from the field's metadata['help']: several
    values make a grid axis, booleans are --flag / --no-flag."""
    p = _Parser(prog="python -m pipeline.sweep", description=__doc__.split("\n\n")[0],
                allow_abbrev=False,  # a typo must not land on another field
                usage="%(prog)s [--FIELD VALUE [VALUE ...] ...] [--shard K/N] [--dry-run] "
                      "[--retry-failed] [--debug]")
    runs = p.add_argument_group("run settings (RunConfig fields; several values = a grid axis)")
    hints = typing.get_type_hints(RunConfig)
    for f in fields(RunConfig):
        names = [f"--{f.name.replace('_', '-')}"] + (["--seeds"] if f.name == "seed" else [])
        default = f.default if f.default is not MISSING else "(computed)"
        help_ = f.metadata.get("help", "")
        if list in typing.get_args(hints[f.name]):
            help_ += "; a list is written a,b"
        if "default" not in help_:
            help_ += f" (default: {default})"
        if hints[f.name] is bool:
            runs.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction,
                              default=argparse.SUPPRESS, help=help_)
        else:
            runs.add_argument(*names, dest=f.name, nargs="+", type=_converter(hints[f.name]),
                              default=argparse.SUPPRESS, metavar=f.name.upper(), help=help_)
    sweep = p.add_argument_group("sweep")
    sweep.add_argument("--retry-failed", action="store_true", help="run failed runs again")
    sweep.add_argument("--dry-run", action="store_true", help="list the grid and its status")
    sweep.add_argument("--shard", type=parse_shard, default=None, metavar="K/N",
                       help="run every N-th config of the whole grid from the K-th (N workers, "
                            "K = 0..N-1)")
    sweep.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def parse_shard(s: str) -> tuple[int, int]:
    """'K/N' -> (K, N) for --shard (any CLI that splits a grid between N workers)."""
    k, sep, n = s.partition("/")
    if not (sep and k.isdigit() and n.isdigit() and int(k) < int(n)):
        raise argparse.ArgumentTypeError(f"{s!r} is not K/N with 0 <= K < N (e.g. 0/2)")
    return int(k), int(n)


def main(argv=None) -> int:
    args = vars(build_parser().parse_args(argv))
    sweep = {k: args.pop(k) for k in ("retry_failed", "dry_run", "shard", "debug")}
    try:
        configs = grid(args)  # every field given is an axis; the rest keep RunConfig's defaults
        results = run_configs(configs, **sweep)
    except KeyboardInterrupt:
        _print("sweep: interrupted; the next sweep resumes killed runs from their last "
               "checkpoint", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        if sweep["debug"]:
            raise
        _print(f"error: {_first_line(e)}", file=sys.stderr)
        return 2
    failed = [r for r in results if r["status"] == "failed"]
    done = sum(r["status"] == "complete" for r in results)
    locked = sum(r["status"] == "locked" for r in results)
    _print(f"sweep: {len(results)} runs, {done} complete, {len(failed)} failed, "
           f"{locked} claimed by other workers")
    for r in failed:
        _print(f"  failed{' earlier' if r['skipped'] else ''}: {r['run_id']}: {r['error']}")
    if any(r["skipped"] for r in failed):
        _print("  (--retry-failed runs them again)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
