"""Length-grouped batching (pipeline.data.length_grouped_batches) vs plain dynamic padding on
MRPC train with the MiniLM tokenizer (max_length 128):

1. tokens processed per epoch (real + padding), exact, for several epochs and chunk sizes;
2. the time of one pass over the first ``--timed-batches`` batches of each epoch-0 order with
   MiniLM LoRA-FA (orthogonal A, rank 8; forward + backward + AdamW step), the two orders
   interleaved batch by batch so machine load hits both alike.

    python -m benchmarks.length_grouped [--batch-size 32] [--timed-batches 30] [--threads 1]

Needs the GLUE folder ($GLUE_DIR, else ../shared/glue; or --glue-dir). Writes
benchmarks/results/length_grouped.json.
"""
from __future__ import annotations

import argparse
import time

import torch

from benchmarks import common as C
from pipeline.data import (epoch_order, global_batches, length_grouped_batches, load_examples,
                           make_collator, resolve_glue_dir, tokenize)


def padded_tokens(batches, lengths) -> int:
    """Tokens the model processes with dynamic padding: each batch is padded to its longest."""
    return sum(max(lengths[i] for i in b) * len(b) for b in batches)


def orders(lengths, batch_size, seed, epoch, chunk_batches=50) -> dict:
    return {"plain": global_batches(epoch_order(len(lengths), seed, epoch), batch_size),
            "grouped": length_grouped_batches(lengths, batch_size, seed, epoch, chunk_batches)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--chunk-batches", type=int, default=50)
    p.add_argument("--timed-batches", type=int, default=30)
    p.add_argument("--epochs", type=int, default=5, help="epochs whose token counts are averaged")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--glue-dir", default=None, help="default: $GLUE_DIR, then ../shared/glue")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    model, opt = C.build("minilm", "ours-orthogonal")  # train mode, LoRA-FA + head trainable
    from transformers import AutoTokenizer

    from pipeline.models import resolve_model
    tok = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    source = resolve_glue_dir(args.glue_dir)
    feats = tokenize(load_examples("mrpc", "train", source), tok, max_length=128)
    lengths = [len(f["input_ids"]) for f in feats]
    bs = args.batch_size

    # 1. exact token counts per epoch
    rows = []
    for chunk in sorted({10, args.chunk_batches, -(-len(lengths) // bs)}):
        per_epoch = [orders(lengths, bs, args.seed, e, chunk) for e in range(args.epochs)]
        plain = sum(padded_tokens(o["plain"], lengths) for o in per_epoch) / args.epochs
        grouped = sum(padded_tokens(o["grouped"], lengths) for o in per_epoch) / args.epochs
        rows.append({"chunk_batches": chunk, "real tokens": sum(lengths),
                     "plain padded": plain, "grouped padded": grouped,
                     "grouped / plain": grouped / plain})
    main_row = next(r for r in rows if r["chunk_batches"] == args.chunk_batches)

    # 2. one interleaved pass over the first timed batches of each order (epoch 0)
    collate = make_collator(tok)
    epoch0 = orders(lengths, bs, args.seed, 0, args.chunk_batches)
    for b in epoch0["plain"][:2]:  # warm-up, untimed
        C.train_step(model, opt, collate([feats[i] for i in b]))
    seconds = {"plain": 0.0, "grouped": 0.0}
    for k in range(args.timed_batches):
        for name in (("plain", "grouped") if k % 2 == 0 else ("grouped", "plain")):
            batch = collate([feats[i] for i in epoch0[name][k]])
            t = time.perf_counter()
            C.train_step(model, opt, batch)
            seconds[name] += time.perf_counter() - t
    timed = [{"order": name, "batches": args.timed_batches, "seconds": seconds[name],
              "padded tokens": padded_tokens(epoch0[name][:args.timed_batches], lengths),
              "ms / padded token": 1e3 * seconds[name]
              / padded_tokens(epoch0[name][:args.timed_batches], lengths)}
             for name in ("plain", "grouped")]
    time_ratio = seconds["grouped"] / seconds["plain"]
    token_ratio_timed = timed[1]["padded tokens"] / timed[0]["padded tokens"]

    sections = [
        C.table(rows, list(rows[0]), f"MRPC train ({len(lengths)} examples, batch {bs}): tokens "
                f"per epoch, mean of {args.epochs} epochs (exact)"),
        C.table(timed, list(timed[0]), f"one pass over the first {args.timed_batches} batches "
                "of epoch 0, MiniLM LoRA-FA (fwd + bwd + AdamW step), interleaved"),
        f"\npadded tokens per epoch, grouped / plain (chunk {args.chunk_batches}): "
        f"{main_row['grouped / plain']:.3f}\ntime, grouped / plain ({args.timed_batches} "
        f"batches each): {time_ratio:.3f} (their padded tokens: {token_ratio_timed:.3f})"]
    C.finish("length_grouped", sections, args, t_start, tokens=rows, timed=timed,
             token_ratio=main_row["grouped / plain"], time_ratio=time_ratio,
             token_ratio_timed=token_ratio_timed,
             glue_source="hub" if source == "hub" else source.name)


if __name__ == "__main__":
    main()
