"""Why does init="gradient" fail on MRPC? Diagnostics without training, and the table of the
short training runs in logs/gradient_init/.

    python -m benchmarks.gradient_init diagnose     # -> benchmarks/results/gradient_init.json
    python -m benchmarks.gradient_init table        # -> figures/gradient_init.md

``diagnose`` takes the first ``gradient_batches`` training batches of a run (the batches the
gradient init itself uses: same split, seed and order), estimates G = dL/dW for every
attention linear of MiniLM through the randomly initialised head, and compares frozen A's:

    orthogonal        random orthonormal rows (the LoRA-FA reference)
    gradient          top-r right singular vectors of G
    gradient-center   ... of G with centred inputs (estimate_gradients(center=True))
    gradient-prior    ... of G with the batch mean of dL/dlogits removed (the class prior)

Per A and layer, from the input moments over the real tokens of those batches:
``ax_rms`` = sqrt(E[(a_i x)^2]) (what B's effective step scales with), ``ax_std`` the same
around the mean (the part of A x that varies between tokens), ``cos_mean`` = |cos| of A's top
row with the mean input mu, and ``kept`` = ||G_c A^T||^2 / ||G_c||^2, the share of the centred
gradient that B can act on through A. Means over the 24 targets (by layer kind too).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results" / "gradient_init.json"
TABLE = ROOT / "figures" / "gradient_init.md"
LOGS = ROOT / "logs" / "gradient_init"
KINDS = ("query", "key", "value", "output")
STATS = ("ax_rms", "ax_std", "cos_mean", "kept")


def _kind(name):
    return "output" if name.endswith("output.dense") else name.split(".")[-1]


def prior_free_loss(model, batch):
    """Cross-entropy whose gradient at the logits has its batch mean removed: the per-example
    (p_i - y_i) minus its mean, i.e. without the class-prior shift a random head starts with."""
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    loss = torch.nn.functional.cross_entropy(logits, batch["labels"])
    with torch.no_grad():
        prior = (logits.softmax(-1) - torch.nn.functional.one_hot(
            batch["labels"], logits.shape[-1]).to(logits.dtype)).mean(0)
    return loss - (logits.mean(0) * prior).sum()


def input_moments(model, names, batches):
    """Per target: (mean input mu, second moment E[x x^T]) over the real tokens."""
    sums = {n: [0.0, 0.0] for n in names}
    count = [0.0]
    mask = [None]

    def hook(mod, inputs, _, name):
        x = inputs[0].detach().double()[mask[0]]  # (tokens, d_in), padding left out
        sums[name][0] = sums[name][0] + x.sum(0)
        sums[name][1] = sums[name][1] + x.T @ x

    handles = [model.get_submodule(n).register_forward_hook(
        lambda m, i, o, n=n: hook(m, i, o, n)) for n in names]
    model.eval()
    try:
        with torch.no_grad():
            for b in batches:
                mask[0] = b["attention_mask"].bool()
                count[0] += float(mask[0].sum())
                model(**{k: v for k, v in b.items() if k != "labels"})
    finally:
        for h in handles:
            h.remove()
    return {n: (s / count[0], m / count[0]) for n, (s, m) in sums.items()}


def a_stats(a, mu, second, g_c):
    a = a.double()
    cov = second - torch.outer(mu, mu)
    r = a.shape[0]
    return {"ax_rms": float(torch.trace(a @ second @ a.T) / r) ** 0.5,
            "ax_std": float(torch.trace(a @ cov @ a.T) / r) ** 0.5,
            "cos_mean": float(abs(a[0] @ mu) / mu.norm()),
            "kept": float((g_c.double() @ a.T).pow(2).sum() / g_c.double().pow(2).sum())}


def diagnose(args):
    from lora import estimate_gradients, find_targets
    from lora.inits import orthogonal
    from pipeline.config import RunConfig
    from pipeline.data import get_task, make_collator
    from pipeline.train import batch_loss, epoch_batches, load_model, load_splits

    cfg = RunConfig(task="mrpc", init="gradient", subsample_train=args.subsample_train,
                    seed=args.seed, quiet=True)
    torch.manual_seed(cfg.seed)  # the head init of the run (run_experiment's set_seed)
    model, tokenizer, _ = load_model(cfg, get_task(cfg.task).num_labels)
    train_f, _, _, _ = load_splits(cfg, tokenizer)
    collate = make_collator(tokenizer, cfg.pad_to_max_length, cfg.max_length)
    batches = [collate([train_f[i] for i in b]) for b in
               epoch_batches(cfg, train_f, 0)[:cfg.gradient_batches]]
    names = find_targets(model, cfg.targets)
    loss = lambda m, b: batch_loss(m, b, regression=False)  # noqa: E731
    grads = {"gradient": estimate_gradients(model, loss, batches),
             "gradient-center": estimate_gradients(model, loss, batches, center=True),
             "gradient-prior": estimate_gradients(model, prior_free_loss, batches)}
    moments = input_moments(model, names, batches)
    gen = torch.Generator().manual_seed(cfg.seed)
    rows = {}
    for n in names:
        w = model.get_submodule(n).weight.detach()
        mu, second = moments[n]
        g_c = grads["gradient-center"][n]
        a = {"orthogonal": orthogonal(w, cfg.rank, 1.0, generator=gen)[0]}
        for key, g in grads.items():
            a[key] = torch.linalg.svd(g[n], full_matrices=False)[2][:cfg.rank]
        rows[n] = {key: a_stats(ak, mu, second, g_c) for key, ak in a.items()}
    summary = {}
    for key in rows[names[0]]:
        for stat in rows[names[0]][key]:
            vals = {k: [rows[n][key][stat] for n in names if _kind(n) == k] for k in KINDS}
            summary.setdefault(key, {})[stat] = sum(rows[n][key][stat] for n in names) / len(names)
            summary[key].update({f"{stat}_{k}": sum(v) / len(v) for k, v in vals.items() if v})
    out = {"config": {"task": cfg.task, "subsample_train": cfg.subsample_train, "seed": cfg.seed,
                      "gradient_batches": cfg.gradient_batches, "rank": cfg.rank},
           "summary": summary, "per_layer": rows}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=1))
    for key, s in summary.items():
        print(f"{key:16s} " + " ".join(f"{k}={s[k]:.3f}" for k in STATS))
    return out


def variant(cfg: dict) -> str:
    """The table's name of a run's frozen A (the diagnostics use the same names)."""
    name = cfg["init"]
    return f"{name}-center" if name == "gradient" and cfg.get("gradient_center") else name


def val_majority(cfg: dict) -> float:
    """Accuracy of always predicting the majority class on a run's validation rows."""
    from collections import Counter

    from pipeline.data import load_examples, resolve_glue_dir, train_val_split

    labels = [e["label"] for e in load_examples(cfg["task"], "train",
                                                resolve_glue_dir(cfg["glue_dir"]),
                                                cfg["subsample_train"])]
    _, val = train_val_split(labels, cfg["val_fraction"], seed=cfg["split_seed"],
                             max_val=cfg["val_max"])
    return max(Counter(labels[i] for i in val).values()) / len(val)


def table(logs=LOGS, results=RESULTS, out=TABLE) -> str:
    """figures/gradient_init.md: one row per run in ``logs`` (val protocol), with the
    no-training diagnostics of its A (from ``results``, when ``diagnose`` has run)."""
    import numpy as np

    from pipeline.analysis import iter_logs

    diag = json.loads(Path(results).read_text())["summary"] if Path(results).exists() else {}
    diag_seed = json.loads(Path(results).read_text())["config"]["seed"] if diag else None
    rows, majority = [], None
    for path, h in iter_logs(logs):
        cfg, m = h["config"], h["main_metric"]
        sel, test = h.get("selection") or {}, (h.get("test") or {}).get("at_best") or {}
        d = diag.get(variant(cfg), {}) if cfg["seed"] == diag_seed else {}
        if h.get("predictions") and (path.parent / h["predictions"]).exists():
            labels = np.load(path.parent / h["predictions"])["label"]
            majority = float(np.bincount(labels).max() / len(labels))
        cells = [variant(cfg), f"{cfg['lr']:g}", f"{cfg['seed']}", h["status"],
                 f"{(h.get('data') or {}).get('total_steps', '-')}",
                 f"{sel['value']:.3f} @ {sel['step']}" if sel else "-",
                 f"{h['best']['loss']['value']:.4f}" if h.get("best") else "-",
                 f"{test[m]:.3f}" if m in test else "-",
                 f"{test['f1']:.3f}" if "f1" in test else "-",
                 f"{h['adapter_stats']['ax_rms']:.2f}" if h.get("adapter_stats") else "-",
                 f"{cfg['lr'] * h['adapter_stats']['ax_rms']:.1e}" if h.get("adapter_stats")
                 else "-",
                 *(f"{d[k]:.2f}" if k in d else "-" for k in ("ax_std", "cos_mean",
                                                               "cos_mean_output", "kept"))]
        rows.append(((cells[0], cfg["lr"], cfg["seed"]), cells))
    head = ["A (init)", "lr", "seed", "status", "steps", "val acc (best @ step)", "val loss (min)",
            "test acc at val-best", "test F1 at val-best", "A·x RMS (run)", "lr × A·x RMS",
            "A·x std (diag)", "abs cos(a1, mu)", "abs cos, attn output", "share of G_c kept"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for _, r in sorted(rows)]
    cfg0 = json.loads(Path(results).read_text())["config"] if diag else {}
    note = [f"Generated by `python -m benchmarks.gradient_init table` from {Path(logs).name}/ "
            "logs (MiniLM, MRPC, LoRA-FA r8, val protocol; one or two seeds: anecdotes, not "
            "estimates). Diagnostics columns: seed-0 runs only (the head init, "
            "hence G, depends on the seed)."]
    if majority is not None:
        note.append(f"Majority class: {val_majority(h['config']):.3f} accuracy on val, "
                    f"{majority:.3f} on test.")
    if cfg0:
        note.append(f"Diagnostics: the first {cfg0['gradient_batches']} training batches of "
                    f"the n={cfg0['subsample_train']} seed-{cfg0['seed']} run, means over the "
                    "24 attention linears (A·x RMS is the same number, measured by the run "
                    "at init; lr × A·x RMS is the scale of B's Adam step at the output: the "
                    "effective lr); abs cos(a1, mu) = A's top row vs the mean input; "
                    "share kept = ||G_c A^T||^2 / ||G_c||^2 (centred gradient). Variant "
                    "'gradient-prior' (dL/dlogits minus its batch mean) is diagnosed only: "
                    + ", ".join(f"{k}={v:.2f}" for k, v in diag.get("gradient-prior", {}).items()
                                if k in STATS or k == "cos_mean_output") + ".")
    text = "# Gradient-aligned frozen A on MRPC\n\n" + "\n".join(lines) + "\n\n" + \
        " ".join(note) + "\n"
    Path(out).write_text(text)
    print(text)
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("diagnose", help="no-training diagnostics of the frozen A's")
    d.add_argument("--subsample-train", type=int, default=2000)
    d.add_argument("--seed", type=int, default=0)
    sub.add_parser("table", help="figures/gradient_init.md from the logs and the diagnostics")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    return diagnose(args) if args.cmd == "diagnose" else table()


if __name__ == "__main__":
    main()
