"""Time one MRPC training epoch (MiniLM, LoRA-FA) with dynamic padding vs fixed padding to
max_length=128, in one process, and report the ratio (goal: dynamic / fixed <= 0.5).

    python benchmarks/padding_epoch.py [--subsample 256] [--glue-dir DIR] [--batch-size 32]

Only the training steps are timed (the ``train_time_s`` of the run's epoch record), not model
loading, tokenisation or evaluation. Writes benchmarks/results/padding_epoch.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.data import resolve_glue_dir  # noqa: E402
from pipeline.train import RunConfig, run_experiment  # noqa: E402


def epoch_seconds(logs_dir, pad_to_max_length, args, subsample=None) -> dict:
    cfg = RunConfig(task="mrpc", model=args.model, variant="lorafa", init=args.init,
                    rank=8, alpha=16, lr=5e-4, epochs=1, batch_size=args.batch_size,
                    max_length=128, pad_to_max_length=pad_to_max_length,
                    subsample_train=subsample or args.subsample, subsample_dev=8,
                    glue_dir=args.glue_dir, logs_dir=str(logs_dir), checkpoint=False,
                    quiet=True, tag="fixed" if pad_to_max_length else "dynamic")
    h = run_experiment(cfg)
    return {"train_time_s": h["epochs"][0]["train_time_s"], "steps": h["data"]["steps_per_epoch"],
            "n_train": h["data"]["n_train"], "device": h["env"]["device"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--subsample", type=int, default=None, help="first N train examples (default all 3668)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--model", default="minilm")
    p.add_argument("--init", default="svd")
    p.add_argument("--glue-dir", default=None)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "padding_epoch.json"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        epoch_seconds(Path(tmp) / "warmup", False, args, subsample=2 * args.batch_size)  # untimed
        dyn = epoch_seconds(Path(tmp) / "dyn", False, args)
        fixed = epoch_seconds(Path(tmp) / "fixed", True, args)
    ratio = dyn["train_time_s"] / fixed["train_time_s"]
    print(f"{'padding':<10}{'examples':>10}{'steps':>8}{'epoch s':>10}")
    for name, r in (("dynamic", dyn), ("fixed-128", fixed)):
        print(f"{name:<10}{r['n_train']:>10}{r['steps']:>8}{r['train_time_s']:>10.2f}")
    print(f"ratio dynamic/fixed = {ratio:.3f} (goal <= 0.5: {'met' if ratio <= 0.5 else 'NOT met'})")
    result = {"task": "mrpc", "model": args.model, "variant": "lorafa", "init": args.init,
              "batch_size": args.batch_size, "subsample": args.subsample,
              "glue_dir": str(resolve_glue_dir(args.glue_dir)), "device": dyn["device"],
              "platform": platform.platform(), "dynamic": dyn, "fixed": fixed,
              "ratio": ratio, "goal_met": ratio <= 0.5}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
