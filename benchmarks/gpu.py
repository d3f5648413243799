"""GPU benchmark of the kit (issue 12 a): peak memory and step time of one training step on a
RoBERTa-base-shaped model built from its config (random weights), bf16 autocast over fp32
weights, batch 32 x 128 and 16 x 512, attention and all-linear targets.

Variants (benchmarks.common builds them): frozen-bwd (base frozen, input grads on: the floor),
head-only, full-ft, peft-lora, peft-lorafa (lora_A frozen), ours (LoRA-FA, orthogonal init;
every init runs the same forward). All variants of a shape live on the GPU together and are
timed in 3 interleaved repeats (20 steps each after warm-up, CUDA events); memory is measured
once per variant as the peak of one step (reset_peak_memory_stats, max_memory_allocated) with
the other models' resident bytes taken out, so each number is what that variant alone needs.

    python -m benchmarks.gpu --out bench.json [--budget-s 90]
    python -m benchmarks.gpu --out bench.json --cpu-smoke   # tiny config, wall time (dry run)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

if __package__ in (None, ""):  # `python benchmarks/gpu.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common as C  # noqa: E402

warnings.filterwarnings("ignore")

SHARED = ("frozen-bwd", "head-only", "full-ft")  # independent of the target set
ADAPTERS = ("peft-lora", "peft-lorafa", "ours-orthogonal")
SHAPES = ((32, 128), (16, 512))
TINY = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128)  # the CPU dry run's model
GOALS = {"mem_x_frozen_bwd": 1.02, "mem_x_peft_lora_all_linear": 0.80,
         "time_x_frozen_bwd": 1.05, "time_x_peft_lora": 1.00}


def series_names() -> list[tuple[str, str]]:
    """(variant, targets) pairs of one table; the shared variants once, under 'any'."""
    return [(v, "any") for v in SHARED] + [(v, t) for t in C.TARGETS for v in ADAPTERS]


class Clock:
    """Step timer: CUDA events on a GPU, wall time on CPU."""

    def __init__(self, device):
        self.cuda = device == "cuda"

    def time_steps(self, fn, n) -> list[float]:
        if not self.cuda:
            out = []
            for _ in range(n):
                t = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t)
            return out
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(n)]
        for a, b in ev:
            a.record()
            fn()
            b.record()
        torch.cuda.synchronize()
        return [a.elapsed_time(b) / 1e3 for a, b in ev]


def resident_bytes(model, opt) -> int:
    """Bytes this variant keeps between steps: parameters, buffers, optimizer state (each
    storage once; gradients are set to None after every step)."""
    seen, total = set(), 0
    tensors = [*model.parameters(), *model.buffers(),
               *(t for s in opt.state.values() for t in s.values() if torch.is_tensor(t))]
    for t in tensors:
        if t.device.type == "cuda":
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return total


def peak_step_mib(step, model, opt) -> tuple[float, float]:
    """(peak MiB of one step for this variant alone, MiB the step adds on top of what stays)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    return (resident_bytes(model, opt) + extra) / 2**20, extra / 2**20


def measure_shape(built, shape, device, steps, warmup, repeats, clock, deadline):
    """Rows of one shape: every built variant, interleaved repeats; stops at ``deadline``."""
    batch = C.make_batch(next(iter(built.values()))[0], *shape)

    def stepper(model, opt):
        def step():
            with torch.autocast(device_type=device, dtype=torch.bfloat16):
                loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    names = list(built)
    times = {k: [] for k in names}
    mem = {}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
        for key in order:
            if time.time() > deadline:
                break
            step = stepper(*built[key])
            for _ in range(warmup if r == 0 else 1):
                step()
            if r == 0 and device == "cuda":
                mem[key] = peak_step_mib(step, *built[key])
            times[key].append(statistics.median(clock.time_steps(step, steps)))
    rows = []
    for (variant, targets) in names:
        t = times[variant, targets]
        if not t:
            continue
        peak, extra = mem.get((variant, targets), (None, None))
        med = statistics.median(t)
        rows.append(dict(batch=shape[0], seq=shape[1], variant=variant, targets=targets,
                         step_ms=med * 1e3, spread=(max(t) - min(t)) / med,
                         repeats_ms=[x * 1e3 for x in t], peak_mib=peak, step_extra_mib=extra,
                         trainable=C.trainable_params(built[variant, targets][0])))
    return rows


def goals(rows) -> list[dict]:
    out = []
    for b, s in sorted({(r["batch"], r["seq"]) for r in rows}):
        get = {(r["variant"], r["targets"]): r for r in rows if (r["batch"], r["seq"]) == (b, s)}
        floor = get.get(("frozen-bwd", "any"))
        for t in C.TARGETS:
            ours, peft = get.get(("ours-orthogonal", t)), get.get(("peft-lora", t))
            if not (ours and floor):
                continue
            g = dict(shape=f"b{b} s{s}", targets=t)
            if ours["peak_mib"] is not None:
                g["mem_x_frozen_bwd"] = ours["peak_mib"] / floor["peak_mib"]
                if peft and t == "all-linear":
                    g["mem_x_peft_lora_all_linear"] = ours["peak_mib"] / peft["peak_mib"]
            g["time_x_frozen_bwd"] = ours["step_ms"] / floor["step_ms"]
            if peft:
                g["time_x_peft_lora"] = ours["step_ms"] / peft["step_ms"]
            for k, limit in GOALS.items():
                if k in g:
                    g[k + "_goal"] = f"<= {limit}: {C.verdict(g[k], limit)}"
            out.append(g)
    return out


def profile_ours(built, shape, device, n=5) -> str:
    """Where ours spends its step (torch.profiler, top ops by device time)."""
    from torch.profiler import ProfilerActivity, profile

    model, opt = built["ours-orthogonal", "all-linear"]
    batch = C.make_batch(model, *shape)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(n):
            with torch.autocast(device_type=device, dtype=torch.bfloat16):
                loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
    # torch >= 2.4 names it device_time_total (cuda_time_total is its deprecated alias)
    key = "device_time_total" if device == "cuda" else "cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=15)


def run(out: Path, budget_s: float = 90.0, cpu_smoke: bool = False) -> dict:
    t0 = time.time()
    deadline = t0 + budget_s
    device = "cuda" if torch.cuda.is_available() and not cpu_smoke else "cpu"
    config = {} if device == "cuda" else TINY
    shapes = SHAPES if device == "cuda" else ((4, 32), (2, 64))
    steps, warmup, repeats = (20, 3, 3) if device == "cuda" else (2, 1, 2)
    torch.manual_seed(0)
    built, errors = {}, {}
    for variant, targets in series_names():
        try:
            built[variant, targets] = C.build("roberta", variant, C.TARGETS[0] if targets == "any"
                                              else targets, device=device, config=config)
        except Exception as e:  # e.g. a PEFT without create_lorafa_optimizer: skip, say why
            errors[f"{variant}/{targets}"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
    build_s = time.time() - t0
    clock, rows = Clock(device), []
    for shape in shapes:
        rows += measure_shape(built, shape, device, steps, warmup, repeats, clock, deadline)
    goal_rows = goals(rows)
    prof = None
    missed = any("NOT" in v for g in goal_rows for k, v in g.items()
                 if k.startswith("time_") and k.endswith("_goal"))
    if missed and ("ours-orthogonal", "all-linear") in built and time.time() < deadline - 5:
        try:
            prof = profile_ours(built, shapes[0], device)
        except Exception as e:  # the numbers above matter more than the profile
            prof = f"profiler failed: {type(e).__name__}: {e}"
    cols = ["batch", "seq", "variant", "targets", "step_ms", "spread", "peak_mib",
            "step_extra_mib", "trainable"]
    text = "\n".join([
        C.table(rows, cols, f"**RoBERTa-base shape ({device}, bf16 autocast): step time "
                            f"(median of {repeats} x {steps} steps) and peak memory per step**"),
        C.table(goal_rows, ["shape", "targets", *(k for g in GOALS for k in (g, g + "_goal"))],
                "**Goals (ours = LoRA-FA orthogonal)**")])
    payload = {"machine": C.machine_info(), "device": device, "shapes": shapes,
               "steps": steps, "warmup": warmup, "repeats": repeats, "config": config or
               "RobertaConfig() (base), max_position_embeddings 514", "rows": rows,
               "goals": goal_rows, "errors": errors, "profile_ours": prof, "tables_md": text,
               "build_s": build_s, "wall_s": time.time() - t0,
               "complete": time.time() <= deadline}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1))
    print(text, flush=True)
    if errors:
        print(f"variants not built: {errors}", flush=True)
    return payload


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=C.RESULTS / "gpu" / "gpu_bench.json")
    p.add_argument("--budget-s", type=float, default=90.0,
                   help="stop timing new variants after this many seconds")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny model on CPU, wall time, no memory (the kit's dry run)")
    a = p.parse_args(argv)
    run(a.out, a.budget_s, a.cpu_smoke)


if __name__ == "__main__":
    main()
