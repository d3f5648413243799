"""SVD init: time and quality (point 4 of the benchmark issue).

Methods, all at rank 8 on every linear of the encoder (attention + FFN):
    ours exact            lora.add_lora(init="svd")                       torch.linalg.svd
    ours randomized nN    add_lora(init="svd", svd_solver="randomized", niter=N), N = 1, 2, 4
                          (torch.svd_lowrank with q = r + 10 oversampling)
    peft pissa            LoraConfig(init_lora_weights="pissa")            torch.linalg.svd
    peft pissa_niter_4    LoraConfig(init_lora_weights="pissa_niter_4")    svd_lowrank, q = r

Time: end to end (add_lora / get_peft_model on a fresh copy of the base, median of
``--repeats``, methods round-robin) and the solver alone (the SVD calls only, same arguments),
so overhead outside the SVD is visible. Quality: for each weight W the relative error

    ||W - s B A||_F^2 / sum_{i > r} sigma_i^2      (1 = the Eckart-Young optimum)

and, stricter, the error of the rank-r part itself, ||s B A - W_r||_F / ||W_r||_F, with W_r
the exact truncation. Real weights: the embedded MiniLM. The RoBERTa shape is randomly
initialised: its flat spectrum is the hard case for a randomized SVD.

    python -m benchmarks.init_svd
    python -m benchmarks.init_svd --models minilm --repeats 5
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings

import torch

if __package__ in (None, ""):  # `python benchmarks/init_svd.py`
    sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(
        __import__("os").path.abspath(__file__))))
from benchmarks import common as C  # noqa: E402
import lora  # noqa: E402
from lora import inits  # noqa: E402

warnings.filterwarnings("ignore")

METHODS = {  # name -> (library, keyword arguments)
    "ours exact": ("ours", dict(svd_solver="exact")),
    "ours randomized n1": ("ours", dict(svd_solver="randomized", niter=1)),
    "ours randomized n2": ("ours", dict(svd_solver="randomized", niter=2)),
    "ours randomized n4": ("ours", dict(svd_solver="randomized", niter=4)),
    "peft pissa": ("peft", dict(init_lora_weights="pissa")),
    "peft pissa_niter_4": ("peft", dict(init_lora_weights="pissa_niter_4")),
}


def apply(method, model, names):
    """Initialise adapters on ``model`` in place; returns the (wrapped) model."""
    lib, kw = METHODS[method]
    if lib == "ours":
        lora.add_lora(model, rank=C.RANK, alpha=C.ALPHA, init="svd", targets=names, **kw)
        return model
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)  # PEFT's svd_lowrank draws from the global RNG
    cfg = LoraConfig(task_type="SEQ_CLS", r=C.RANK, lora_alpha=C.ALPHA, lora_dropout=0.0,
                     target_modules=names, **kw)
    return get_peft_model(model, cfg)


def solver_only(method, weights):
    """Seconds spent in the SVD calls alone, with the arguments each library uses."""
    lib, kw = METHODS[method]
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for w in weights:
        if lib == "ours":
            inits._svd_components(w, C.RANK, minor=False, solver=kw["svd_solver"],
                                  niter=kw.get("niter", 4), generator=g)
        elif kw["init_lora_weights"] == "pissa":
            torch.linalg.svd(w, full_matrices=False)
        else:
            torch.svd_lowrank(w, C.RANK, niter=4)  # PEFT: q = r, no oversampling
    return time.perf_counter() - t0


def low_rank_parts(method, model, names):
    """name -> s B A (float64) from the initialised model."""
    out = {}
    if METHODS[method][0] == "ours":
        mods = dict(lora.lora_modules(model))
        for n in names:
            out[n] = mods[n].delta().double()
    else:
        for n in names:
            layer = model.base_model.model.get_submodule(n)
            b, a = layer.lora_B["default"].weight, layer.lora_A["default"].weight
            out[n] = (layer.scaling["default"] * b.detach().double() @ a.detach().double())
    return out


def truncations(weights):
    """Per weight, in float64: the exact top-r triplets and the discarded energy
    sum_{i > r} sigma_i^2 (the Eckart-Young optimum of ||W - W_r||_F^2). Computed once."""
    out = []
    for w in weights:
        w = w.double()
        tall = w.shape[0] >= w.shape[1]  # LAPACK is much faster on tall matrices
        u, s, vh = torch.linalg.svd(w if tall else w.T, full_matrices=False)
        if not tall:  # svd of W^T: swap the roles back
            u, vh = vh.T, u.T
        out.append((u[:, :C.RANK], s[:C.RANK], vh[:C.RANK], s[C.RANK:].pow(2).sum()))
    return out


def quality(weights, refs, parts):
    """Per-weight errors vs Eckart-Young: (energy ratio, rank-r part relative error)."""
    ratios, part_errs = [], []
    for w, (u, s, vh, discarded), p in zip(weights, refs, parts):
        best = (u * s) @ vh
        ratios.append(((w.double() - p).pow(2).sum() / discarded).item())
        part_errs.append(((p - best).norm() / best.norm()).item())
    return ratios, part_errs


def run_model(model_name, repeats):
    base = C.load_base(model_name)
    names = lora.find_targets(base, "all-linear")
    weights = [base.get_submodule(n).weight.detach().clone() for n in names]
    shapes = sorted({tuple(w.shape) for w in weights})
    print(f"{model_name}: {len(names)} weights, shapes {shapes}", flush=True)
    refs = truncations(weights)
    e2e, solver = {m: [] for m in METHODS}, {m: [] for m in METHODS}
    errs = {}
    for rep in range(repeats + 1):  # round 0 warms up (first-call costs) and gives the quality
        order = list(METHODS)[rep % len(METHODS):] + list(METHODS)[:rep % len(METHODS)]
        for m in order:
            model = copy.deepcopy(base)
            t0 = time.perf_counter()
            model = apply(m, model, names)
            t = time.perf_counter() - t0
            if rep == 0:  # score now: keeping every method's float64 s B A costs GiBs
                parts = low_rank_parts(m, model, names)
                errs[m] = quality(weights, refs, [parts[n] for n in names])
                del parts
            else:
                e2e[m].append(t)
                solver[m].append(solver_only(m, weights))
            del model
        if rep:
            print(f"  repeat {rep}/{repeats}: " + ", ".join(f"{m} {e2e[m][-1]:.2f}s" for m in METHODS),
                  flush=True)
    rows = []
    exact = {lib: statistics.median(e2e[f"{lib} exact" if lib == "ours" else "peft pissa"])
             for lib in ("ours", "peft")}
    exact_solver = statistics.median(solver["ours exact"])
    for m in METHODS:
        ratios, part_errs = errs[m]
        t = statistics.median(e2e[m])
        rows.append(dict(model=model_name, n_weights=len(names), method=m, init_s=t, solver_s=statistics.median(solver[m]),
                         x_ours_exact=t / exact["ours"],
                         solver_x_ours_exact=statistics.median(solver[m]) / exact_solver,
                         err_max=max(ratios), err_mean=statistics.mean(ratios),
                         part_err_max=max(part_errs), all_init_s=e2e[m]))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(C.MODELS), choices=C.MODELS)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    rows = []
    for model_name in args.models:
        rows += run_model(model_name, args.repeats)
    goals = []
    for r in rows:
        if r["method"].startswith("ours randomized"):
            goals.append(dict(model=r["model"], method=r["method"],
                              time_x_exact=f"{r['x_ours_exact']:.3f} ({C.verdict(r['x_ours_exact'], 0.2)})",
                              solver_x_exact=f"{r['solver_x_ours_exact']:.3f} "
                                             f"({C.verdict(r['solver_x_ours_exact'], 0.2)})",
                              err_max=f"{r['err_max']:.5f} ({C.verdict(r['err_max'], 1.01)})"))
    out = []
    for model_name in args.models:
        sel = [r for r in rows if r["model"] == model_name]
        out.append(C.table(sel, ["method", "init_s", "x_ours_exact", "solver_s", "solver_x_ours_exact",
                                 "err_max", "err_mean", "part_err_max"],
                           f"**{model_name}: SVD init of all {sel[0]['n_weights']} encoder linears, rank {C.RANK} (seconds, median of {args.repeats})**"))
    out.append(C.table(goals, ["model", "method", "time_x_exact", "solver_x_exact", "err_max"],
                       "**Goals: randomized <= 0.2 x exact time, error <= 1.01 x optimum**"))
    C.finish("init_svd", out, args, t_start, rows=rows, goals=goals)


if __name__ == "__main__":
    main()
