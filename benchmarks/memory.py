"""Memory of one training step, per variant (points 1, 2, 6, 7 of the benchmark issue).

1. Saved activations (section "saved"): the exact bytes autograd keeps for backward in one
   train-mode forward (dropout on), counted with torch.autograd.graph.saved_tensors_hooks by
   lora.saved_activation_bytes (parameters and buffers left out, each storage once). This is
   the memory LoRA-FA is about: it grows with batch x sequence, the weights do not. Also
   which tensors differ between variants (by shape).
7. With it, a plot of saved activations vs batch size (frozen-bwd / PEFT LoRA / ours).
   Section "floor": how much of the frozen-bwd floor is attention maps, and the ratios with
   attention dropout off - why the 0.75 x PEFT LoRA goal holds in one place and not another.
2. Peak process memory of one full training step (section "peak"), each variant in a fresh
   subprocess (no allocator cache or earlier variant pollutes it): on CPU the kernel's RSS
   high-water mark (VmHWM, reset right before the step through /proc/self/clear_refs;
   ru_maxrss where that is unavailable), on a GPU torch.cuda.max_memory_allocated.
6. With it, trainable parameters and optimizer-state bytes after that step.

    python -m benchmarks.memory --threads 1                   # all (~40 min on 2 busy cores)
    python -m benchmarks.memory --models minilm --sections saved
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from collections import Counter

import torch

if __package__ in (None, ""):  # `python benchmarks/memory.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common as C  # noqa: E402

warnings.filterwarnings("ignore")  # PEFT/transformers deprecation chatter

# the PEFT/merged/ours rows depend on the target set; these three do not (built once per model)
SHARED = ("head-only", "frozen-bwd", "full-ft")
PLOT_VARIANTS = ("frozen-bwd", "peft-lora", "ours-svd")
# measured outside the project: RoBERTa-base shape, b16 s128, attention targets, train mode
OUTSIDE_REFERENCE_MIB = {"peft-lora": 1372, "ours-svd": 1228, "merged-lorafa": 1470,
                         "full-ft": 1741}


def diff_text(a: Counter, b: Counter) -> str:
    """'+n x shape dtype' for what a saves beyond b, '-' for what it saves less."""
    parts = []
    for key in sorted(set(a) | set(b), key=str):
        d = a[key] - b[key]
        if d:
            parts.append(f"{d:+d} x {list(key[0])} {key[1]}")
    return "; ".join(parts) or "identical"


# ---------------------------------------------------------------- 1 + 7: saved activations

def saved_tables(models, shapes, plot_batches, plot_seq):
    """One variant in memory at a time (plus the three target-independent ones, kept per model):
    the RoBERTa-shape forwards at b32 s128 hold GiBs of activations."""
    rows, curves, diffs = [], {}, []
    for model_name in models:
        shared = {v: C.build(model_name, v)[0] for v in SHARED}
        for targets in C.TARGETS:
            shapes_here = list(shapes) + ([(16, 128)] if (model_name, targets) == ("roberta", "attention") else [])
            mib, hists = {}, {}
            for v in C.VARIANTS:
                model = shared[v] if v in shared else C.build(model_name, v, targets)[0]
                for b, s in shapes_here:
                    t0 = time.perf_counter()
                    nbytes, hist = C.saved_tensors(model, C.make_batch(model, b, s))
                    mib[v, b, s] = nbytes / 2**20
                    if v in ("ours-svd", "frozen-bwd", "peft-lora"):
                        hists[v, b, s] = hist
                    print(f"  {model_name} {targets} b{b} s{s} {v}: {mib[v, b, s]:.1f} MiB "
                          f"({time.perf_counter() - t0:.1f}s)", flush=True)
                if targets == "all-linear" and v in PLOT_VARIANTS:
                    curves[f"{model_name}/{v}"] = [C.saved_mib(model, C.make_batch(model, b, plot_seq))
                                                   for b in plot_batches]
                for b, s in shapes_here:
                    rows.append(dict(model=model_name, targets=targets, batch=b, seq=s, variant=v,
                                     trainable=C.trainable_params(model)))
                del model
            for r in rows:
                key = (r["variant"], r["batch"], r["seq"])
                if (r["model"], r["targets"]) == (model_name, targets) and "saved_mib" not in r:
                    b, s = r["batch"], r["seq"]
                    r.update(saved_mib=mib[key], x_frozen_bwd=mib[key] / mib["frozen-bwd", b, s],
                             x_peft_lora=mib[key] / mib["peft-lora", b, s],
                             outside_reference_mib=OUTSIDE_REFERENCE_MIB.get(r["variant"])
                             if (b, s) == (16, 128) else None)
            for b, s in shapes_here:  # which tensors make the difference
                diffs.append(dict(model=model_name, targets=targets, batch=b, seq=s,
                                  ours_minus_frozen_bwd=diff_text(hists["ours-svd", b, s],
                                                                  hists["frozen-bwd", b, s]),
                                  peft_lora_minus_ours=diff_text(hists["peft-lora", b, s],
                                                                 hists["ours-svd", b, s])))
        del shared
    return rows, curves, diffs


def goals(rows) -> list[dict]:
    """Goal 1: ours <= 1.01 x frozen-bwd (both target sets); ours <= 0.75 x PEFT LoRA
    (all-linear). Checked on the worst of the four inits, per model and shape."""
    out = []
    keys = sorted({(r["model"], r["targets"], r["batch"], r["seq"]) for r in rows}, key=str)
    for key in keys:
        ours = [r for r in rows if (r["model"], r["targets"], r["batch"], r["seq"]) == key
                and r["variant"].startswith("ours-")]
        worst_floor = max(r["x_frozen_bwd"] for r in ours)
        worst_peft = max(r["x_peft_lora"] for r in ours)
        out.append(dict(model=key[0], targets=key[1], shape=f"b{key[2]} s{key[3]}",
                        ours_x_frozen_bwd=worst_floor, goal_1_01=C.verdict(worst_floor, 1.01),
                        ours_x_peft_lora=worst_peft,
                        goal_0_75=C.verdict(worst_peft, 0.75) if key[1] == "all-linear" else "-"))
    return out


def plot(curves, batches, seq, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = sorted({k.split("/")[0] for k in curves}, key=C.MODELS.index)
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    labels = {"frozen-bwd": "frozen base, backward to the input (the floor)",
              "peft-lora": "PEFT LoRA (r=8)", "ours-svd": "ours: LoRA-FA, unmerged (svd init)"}
    styles = {"frozen-bwd": dict(color="k", ls="--", lw=1.5, zorder=3),
              "peft-lora": dict(color="C3", marker="o", lw=2), "ours-svd": dict(color="C0", marker="s", lw=3)}
    titles = {"minilm": "all-MiniLM-L6-v2 (6 x 384)", "roberta": "RoBERTa-base shape (12 x 768)"}
    for ax, m in zip(axes[0], models):
        for v in ("peft-lora", "ours-svd", "frozen-bwd"):  # the floor last: dashed, on top of ours
            ax.plot(batches, curves[f"{m}/{v}"], label=labels[v], ms=5, **styles[v])
        ax.set_xticks(batches, [str(b) for b in batches])  # linear axis: memory is linear in batch
        ax.set_xlabel(f"batch size (sequence length {seq})")
        ax.set_ylabel("saved activations per training step (MiB)")
        ax.set_title(f"{titles[m]}, all-linear targets")
        ax.set_xlim(0, max(batches) * 1.05)
        ax.set_ylim(0, None)
        ax.grid(alpha=0.3)
        handles, names = ax.get_legend_handles_labels()
        order = [names.index(labels[v]) for v in PLOT_VARIANTS]
        ax.legend([handles[i] for i in order], [names[i] for i in order], fontsize=9, loc="upper left")
    fig.suptitle("Memory autograd keeps for backward (train mode, dropout on)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------- 2 + 6: peak, one subprocess each

def _status_mib(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None


def peak_one(model_name, targets, variant, batch_size, seq) -> dict:
    """Runs inside the subprocess: build, then measure one training step."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, opt = C.build(model_name, variant, targets, device=device)
    batch = C.make_batch(model, batch_size, seq)
    out = dict(model=model_name, targets=targets, variant=variant, batch=batch_size, seq=seq)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
        C.train_step(model, opt, batch)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
        out.update(kind="cuda max_memory_allocated", before_mib=before, peak_mib=peak)
    else:
        try:  # "5" resets the RSS high-water mark (Linux >= 4.0): the peak is then the step's
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            kind = "VmHWM during the step"
        except OSError:
            kind = "ru_maxrss (whole process, includes the build)"
        before = _status_mib("VmRSS")
        C.train_step(model, opt, batch)
        peak = _status_mib("VmHWM") if kind.startswith("VmHWM") else None
        if peak is None:
            kind = "ru_maxrss (whole process, includes the build)"
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        out.update(kind=kind, before_mib=before, peak_mib=peak)
    out.update(step_extra_mib=None if out["before_mib"] is None else out["peak_mib"] - out["before_mib"],
               process_maxrss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               trainable=C.trainable_params(model), optimizer_state_bytes=C.optimizer_state_bytes(opt))
    return out


# glibc malloc raises its mmap threshold each time a big block is freed, after which freed
# tensors stay in the heap and RSS stops tracking live memory (peaks then differed by +-400 MiB
# between runs of the same variant). A fixed threshold keeps every tensor above 64 KiB in its
# own mapping, returned to the OS when freed: the RSS peak is then the live-memory peak.
PEAK_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}


def return_freed_memory_to_the_os() -> None:
    """The same fix for this process (glibc only; elsewhere a no-op): without it the saved
    section's GiB-sized forwards stay in the heap after they are freed (16 GiB RSS, OOM-killed
    on a 24 GiB machine while the peak subprocesses ran)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt(-3, 65536)  # M_MMAP_THRESHOLD = -3
    except (OSError, AttributeError):
        pass


def peak_tables(models, peak_shapes, threads):
    rows = []
    for model_name in models:
        b, s = peak_shapes[model_name]
        jobs = [(t, v) for t in C.TARGETS for v in C.VARIANTS
                if not (v in SHARED and t != C.TARGETS[0])]
        for targets, variant in jobs:
            cmd = [sys.executable, "-m", "benchmarks.memory", "--_peak-one", model_name, targets,
                   variant, str(b), str(s), "--threads", str(threads)]
            t0 = time.perf_counter()
            res = subprocess.run(cmd, capture_output=True, text=True, cwd=C.ROOT, env=PEAK_ENV)
            if res.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
            row = json.loads(res.stdout.strip().splitlines()[-1])
            targets_shown = "any" if variant in SHARED else targets
            row["targets"] = targets_shown
            rows.append(row)
            print(f"  peak {model_name} {targets_shown} {variant}: {row['peak_mib']:.0f} MiB "
                  f"(+{row['step_extra_mib']:.0f} in the step) ({time.perf_counter() - t0:.0f}s)",
                  flush=True)
    return rows


# ---------------------------------------------------------------- why the floor is heavy

def attention_map_mib(hist: Counter, seq: int) -> float:
    """MiB of saved storages shaped [..., seq, seq]: attention probabilities, their dropout
    noise and the dropped-out copy (CPU's SDPA math path with dropout saves all three)."""
    total = 0
    for (shape, dtype), n in hist.items():
        if len(shape) >= 2 and shape[-2:] == (seq, seq):
            total += n * torch.Size(shape).numel() * torch.tensor([], dtype=getattr(torch, dtype)).element_size()
    return total / 2**20


def floor_tables(models, shapes):
    """Goal 2 of point 1 (ours <= 0.75 x PEFT LoRA, all-linear) can only hold if the floor is
    light: ours sits at the floor, so ours / PEFT LoRA >= frozen-bwd / PEFT LoRA. Measure how
    much of the floor is attention maps, and the ratios with attention-probability dropout off
    (hidden dropout still on): a stand-in for a fused attention kernel that keeps no maps."""
    rows = []
    for model_name in models:
        for attn_drop in (None, 0.0):
            config = {} if attn_drop is None else {"attention_probs_dropout_prob": attn_drop}
            for b, s in shapes:
                mib, maps = {}, {}
                for v in ("frozen-bwd", "peft-lora", "ours-svd"):
                    model = C.build(model_name, v, "all-linear", config=config)[0]
                    nbytes, hist = C.saved_tensors(model, C.make_batch(model, b, s))
                    mib[v], maps[v] = nbytes / 2**20, attention_map_mib(hist, s)
                    del model
                rows.append(dict(model=model_name, shape=f"b{b} s{s}",
                                 attention_dropout="0.1 (default)" if attn_drop is None else "0",
                                 frozen_bwd_mib=mib["frozen-bwd"],
                                 attention_maps_share=maps["frozen-bwd"] / mib["frozen-bwd"],
                                 peft_lora_mib=mib["peft-lora"], ours_mib=mib["ours-svd"],
                                 floor_x_peft_lora=mib["frozen-bwd"] / mib["peft-lora"],
                                 ours_x_peft_lora=mib["ours-svd"] / mib["peft-lora"],
                                 goal_0_75=C.verdict(mib["ours-svd"] / mib["peft-lora"], 0.75)))
                print(f"  floor {rows[-1]}", flush=True)
    return rows


# ---------------------------------------------------------------- main

def parse_shape(text):
    b, s = text.lower().split("x")
    return int(b), int(s)


def peak_section(args):
    t_start = time.perf_counter()
    peak_shapes = {"minilm": parse_shape(args.peak_minilm), "roberta": parse_shape(args.peak_roberta)}
    print(f"peak memory, one subprocess per variant: {peak_shapes}", flush=True)
    rows = peak_tables(args.models, peak_shapes, args.threads)
    text = C.table(rows, ["model", "targets", "variant", "batch", "seq", "before_mib",
                          "peak_mib", "step_extra_mib", "trainable", "optimizer_state_bytes"],
                   f"**Peak memory of one training step, fresh process each ({rows[0]['kind']})**")
    print(text)
    path = C.write_json("memory_peak", {"args": vars(args), "rows": rows, "tables_md": text,
                                        "wall_s": time.perf_counter() - t_start})
    print(f"\nwrote {path} ({time.perf_counter() - t_start:.0f}s)", flush=True)


SECTIONS = ("saved", "peak", "floor", "plot")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", nargs="+", default=["saved", "floor", "peak"], choices=SECTIONS,
                   help="saved: points 1 + 7; peak: points 2 + 6; floor: why goal 0.75 holds or not."
                        " Each writes its own results/memory_<section>.json. plot: redraw the PNG "
                        "from memory_saved.json only")
    p.add_argument("--models", nargs="+", default=list(C.MODELS), choices=C.MODELS)
    p.add_argument("--shapes", nargs="+", default=["32x128", "8x512"], help="batch x seq")
    p.add_argument("--peak-minilm", default="32x128", help="batch x seq of the peak-memory step")
    p.add_argument("--peak-roberta", default="8x128")
    p.add_argument("--plot-batches", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--plot-seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--_peak-one", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    if args._peak_one:  # child process: one variant, one step, one JSON line
        m, t, v, b, s = args._peak_one
        print(json.dumps(peak_one(m, t, v, int(b), int(s))))
        return

    return_freed_memory_to_the_os()
    shapes = [parse_shape(s) for s in args.shapes]
    C.RESULTS.mkdir(parents=True, exist_ok=True)
    if "peak" in args.sections:  # first, while this process is still small
        peak_section(args)

    if "saved" in args.sections:
        t_start = time.perf_counter()
        print(f"saved activations: {args.models}, shapes {shapes}", flush=True)
        rows, curves, diffs = saved_tables(args.models, shapes, args.plot_batches, args.plot_seq)
        goal_rows = goals([r for r in rows if (r["batch"], r["seq"]) in shapes])
        png = C.RESULTS / "memory_vs_batch.png"
        plot(curves, args.plot_batches, args.plot_seq, png)
        out = []
        for model_name in args.models:
            for targets in C.TARGETS:
                extra = [(16, 128)] if (model_name, targets) == ("roberta", "attention") else []
                for b, s in shapes + extra:
                    sel = [r for r in rows if (r["model"], r["targets"], r["batch"], r["seq"])
                           == (model_name, targets, b, s)]
                    cols = ["variant", "saved_mib", "x_frozen_bwd", "x_peft_lora", "trainable"]
                    if (b, s) == (16, 128):
                        cols.append("outside_reference_mib")
                    out.append(C.table(sel, cols, f"**{model_name}, {targets} targets, batch {b} x "
                                                  f"seq {s}: saved activations (MiB)**"))
        out.append(C.table(goal_rows, ["model", "targets", "shape", "ours_x_frozen_bwd", "goal_1_01",
                                       "ours_x_peft_lora", "goal_0_75"],
                           "**Goals (worst of the four inits)**"))
        out.append(C.table(diffs, ["model", "targets", "batch", "seq", "ours_minus_frozen_bwd",
                                   "peft_lora_minus_ours"],
                           "**What is saved differently (storages by shape; ours = ours-svd)**"))
        text = "\n".join(out)
        print(text)
        path = C.write_json("memory_saved", {
            "args": vars(args), "saved": rows, "goals": goal_rows, "diffs": diffs,
            "curves": {"batches": args.plot_batches, "seq": args.plot_seq, **curves},
            "tables_md": text, "wall_s": time.perf_counter() - t_start})
        print(f"\nwrote {path} and {png} ({time.perf_counter() - t_start:.0f}s)", flush=True)

    if "plot" in args.sections and "saved" not in args.sections:
        d = json.loads((C.RESULTS / "memory_saved.json").read_text())["curves"]
        plot({k: v for k, v in d.items() if "/" in k}, d["batches"], d["seq"],
             C.RESULTS / "memory_vs_batch.png")

    if "floor" in args.sections:
        t_start = time.perf_counter()
        rows = floor_tables(args.models, shapes)
        text = C.table(rows, ["model", "shape", "attention_dropout", "frozen_bwd_mib",
                              "attention_maps_share", "peft_lora_mib", "ours_mib",
                              "floor_x_peft_lora", "ours_x_peft_lora", "goal_0_75"],
                       "**All-linear targets: how heavy the floor is, with and without attention "
                       "dropout (saved MiB)**")
        print(text)
        path = C.write_json("memory_floor", {"args": vars(args), "rows": rows, "tables_md": text,
                                             "wall_s": time.perf_counter() - t_start})
        print(f"\nwrote {path} ({time.perf_counter() - t_start:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
