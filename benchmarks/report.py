"""Compact Markdown tables for benchmarks/README.md, from the JSON the other scripts wrote
(benchmarks/results/*.json). Nothing is measured here.

    python -m benchmarks.report            # prints every table it has results for
"""
from __future__ import annotations

import json
import sys

if __package__ in (None, ""):  # `python benchmarks/report.py`
    sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(
        __import__("os").path.abspath(__file__))))
from benchmarks import common as C  # noqa: E402


def load(name):
    path = C.RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def grid(rows, row_key, col_keys, cell, row_order, col_title, first="variant"):
    """Pivot: one line per row_key value, one column per col_keys value."""
    cols = sorted({col_keys(r) for r in rows}, key=lambda c: [list(col_keys(r) for r in rows).index(c)])
    lines = ["| " + " | ".join([first] + [col_title(c) for c in cols]) + " |",
             "|" + "|".join("---" for _ in range(len(cols) + 1)) + "|"]
    for k in row_order:
        cells = []
        for c in cols:
            hit = [r for r in rows if row_key(r) == k and col_keys(r) == c]
            cells.append(cell(hit[0]) if hit else "")
        if any(cells):
            lines.append("| " + " | ".join([k] + cells) + " |")
    return "\n".join(lines)


def machine(d):
    m = d["machine"]
    return (f"_{m['time']}, torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}, "
            f"{m['device']}, {m['threads']} thread(s), {m['cpu_count']} cores, "
            f"1-min load {m['load_avg_1m']:.1f}_")


def main():
    out = []
    saved = load("memory_saved")
    if saved:
        rows = [r for r in saved["saved"] if (r["batch"], r["seq"]) != (16, 128)]
        for model in C.MODELS:
            sel = [r for r in rows if r["model"] == model]
            if not sel:
                continue
            out.append(f"\n**{model}: saved activations, MiB · x frozen-bwd · x PEFT LoRA** {machine(saved)}\n")
            out.append(grid(sel, lambda r: r["variant"], lambda r: (r["targets"], r["batch"], r["seq"]),
                            lambda r: f"{r['saved_mib']:.0f} · {r['x_frozen_bwd']:.3f} · {r['x_peft_lora']:.3f}",
                            C.VARIANTS, lambda c: f"{c[0]} b{c[1]} s{c[2]}"))
        ref = [r for r in saved["saved"] if (r["batch"], r["seq"]) == (16, 128)]
        if ref:
            out.append("\n**Check against the reference measured outside the project (RoBERTa shape, "
                       "b16 s128, attention targets), MiB**\n")
            out.append(C.table([r for r in ref if r["outside_reference_mib"]],
                               ["variant", "saved_mib", "outside_reference_mib"]))
        out.append("\n" + C.table(saved["goals"], ["model", "targets", "shape", "ours_x_frozen_bwd",
                                                  "goal_1_01", "ours_x_peft_lora", "goal_0_75"],
                                  "**Goals of point 1 (worst of the four inits)**"))
    floor = load("memory_floor")
    if floor:
        out.append("\n" + C.table(floor["rows"], ["model", "shape", "attention_dropout",
                                                  "frozen_bwd_mib", "attention_maps_share",
                                                  "peft_lora_mib", "ours_mib", "floor_x_peft_lora",
                                                  "ours_x_peft_lora", "goal_0_75"],
                                  f"**Why 0.75 x PEFT LoRA fails: the floor (all-linear targets)** "
                                  f"{machine(floor)}"))
    peak = load("memory_peak")
    if peak:
        rows = peak["rows"]
        shapes = {r["model"]: f"b{r['batch']} s{r['seq']}" for r in rows}
        out.append(f"\n**Peak memory of one training step, MiB: peak RSS (+ the step's own "
                   f"growth); {rows[0]['kind']}; " + ", ".join(f"{m} {s}" for m, s in shapes.items())
                   + f"** {machine(peak)}\n")
        expand = []  # the target-independent rows count for both target sets
        for r in rows:
            ts = C.TARGETS if r["targets"] == "any" else (r["targets"],)
            expand += [{**r, "targets": t} for t in ts]
        out.append(grid(expand, lambda r: r["variant"], lambda r: (r["model"], r["targets"]),
                        lambda r: f"{r['peak_mib']:.0f} (+{r['step_extra_mib']:.0f})", C.VARIANTS,
                        lambda c: f"{c[0]} {c[1]}"))
        out.append("\n**Trainable parameters · optimizer state (MiB)**\n")
        out.append(grid(expand, lambda r: r["variant"], lambda r: (r["model"], r["targets"]),
                        lambda r: f"{r['trainable']:,} · {r['optimizer_state_bytes'] / 2**20:.2f}",
                        C.VARIANTS, lambda c: f"{c[0]} {c[1]}"))
    step = load("step_time")
    if step:
        rows = step["rows"]
        out.append(f"\n**Step time, median s · x frozen-bwd · x PEFT LoRA · x PEFT LoRA-FA "
                   f"(median of {step['args']['steps']} after {step['args']['warmup']} warm-up, "
                   f"round-robin)** {machine(step)}\n")
        out.append(grid(rows, lambda r: r["variant"], lambda r: (r["model"], r["targets"], r["batch"], r["seq"]),
                        lambda r: f"{r['median_s']:.2f} · {r['x_frozen_bwd']:.2f} · "
                                  f"{r['x_peft_lora']:.2f} · {r['x_peft_lorafa']:.2f}",
                        C.VARIANTS, lambda c: f"{c[0]} {c[1]} b{c[2]} s{c[3]}"))
        out.append("\n" + C.table(step["goals"], ["model", "targets", "shape", "ours_x_frozen-bwd",
                                                 "ours_x_peft-lora", "ours_x_peft-lorafa"],
                                  "**Goals of point 3 (ours: all four inits' steps pooled)**"))
    init = load("init_svd")
    if init:
        out.append(f"\n{init['tables_md']}\n\n{machine(init)}")
    for path in sorted(C.RESULTS.glob("time_to_quality*.json")):
        ttq = load(path.stem)
        out.append(f"\n{ttq['tables_md']}\n\n{machine(ttq)}")
    print("\n".join(out))


if __name__ == "__main__":
    main()
