"""GLUE examples from a local folder (original GLUE layout) or the HuggingFace hub, tokenised
with the model's own tokenizer and batched with dynamic padding.

Both sources yield the same examples for a split: dicts ``{"sentence1", "sentence2", "label"}``
(``sentence2`` is None for single-sentence tasks) with HuggingFace GLUE label ids
(e.g. RTE/QNLI entailment=0, not_entailment=1; MNLI entailment=0, neutral=1, contradiction=2;
STS-B a float score in [0, 5]).

Folder source: ``<glue_dir>/<TASK>/{train,dev}.tsv`` as written by download_glue_data.py, read
tab-separated with quoting disabled (GLUE text has unbalanced quotes) and ``utf-8-sig`` (MRPC
files start with a BOM). A file that is empty, not UTF-8, or has a row with the wrong field
count or a label out of range (a class id outside the task's classes, an STS-B score that is
not a finite number in [0, 5]) raises one line naming ``file:line``; nothing is dropped.
"""
from __future__ import annotations

import csv
import hashlib
import io
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from sklearn.model_selection import train_test_split
from transformers import DataCollatorWithPadding

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_GLUE_DIR = REPO_ROOT.parent / "shared" / "glue"  # the offline copy next to the repo
HUB = "hub"  # the glue_dir value (and resolve_glue_dir result) that means the HuggingFace hub


class GlueFormatError(ValueError):
    """A GLUE file has rows that do not parse (wrong field count, unknown label)."""


@dataclass(frozen=True)
class TaskSpec:
    name: str  # our key, lower case: 'mrpc'
    folder: str  # GLUE folder name: 'MRPC'
    hf_name: str  # nyu-mll/glue config name
    num_labels: int  # 1 = regression
    hf_columns: tuple  # (sentence1, sentence2 or None) column names on the hub
    # folder files: column of each field, by header name (or int index for headerless files)
    tsv_columns: tuple  # (sentence1, sentence2 or None, label)
    tsv_header: bool = True
    tsv_fields: int | None = None  # headerless files: the field count (else the header's)
    label_map: dict | None = None  # string label in the tsv -> HF id (None: int or float column)
    splits: dict = field(default_factory=lambda: {"train": "train", "dev": "validation"})
    tsv_files: dict = field(default_factory=lambda: {"train": "train.tsv", "dev": "dev.tsv"})
    metrics: tuple = ("accuracy",)

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1


_NLI2 = {"entailment": 0, "not_entailment": 1}
TASKS = {t.name: t for t in [
    TaskSpec("cola", "CoLA", "cola", 2, ("sentence", None), (3, None, 1), tsv_header=False,
             tsv_fields=4, metrics=("matthews",)),
    TaskSpec("sst2", "SST-2", "sst2", 2, ("sentence", None), ("sentence", None, "label")),
    TaskSpec("mrpc", "MRPC", "mrpc", 2, ("sentence1", "sentence2"),
             ("#1 String", "#2 String", "Quality"), metrics=("accuracy", "f1")),
    TaskSpec("stsb", "STS-B", "stsb", 1, ("sentence1", "sentence2"),
             ("sentence1", "sentence2", -1), metrics=("pearson", "spearman")),  # score is last
    TaskSpec("qqp", "QQP", "qqp", 2, ("question1", "question2"),
             ("question1", "question2", "is_duplicate"), metrics=("accuracy", "f1")),
    TaskSpec("mnli", "MNLI", "mnli", 3, ("premise", "hypothesis"),
             ("sentence1", "sentence2", "gold_label"),
             label_map={"entailment": 0, "neutral": 1, "contradiction": 2},
             splits={"train": "train", "dev": "validation_matched",
                     "dev_matched": "validation_matched",
                     "dev_mismatched": "validation_mismatched"},
             tsv_files={"train": "train.tsv", "dev": "dev_matched.tsv",
                        "dev_matched": "dev_matched.tsv",
                        "dev_mismatched": "dev_mismatched.tsv"}),
    TaskSpec("qnli", "QNLI", "qnli", 2, ("question", "sentence"),
             ("question", "sentence", "label"), label_map=_NLI2),
    TaskSpec("rte", "RTE", "rte", 2, ("sentence1", "sentence2"),
             ("sentence1", "sentence2", "label"), label_map=_NLI2),
    TaskSpec("wnli", "WNLI", "wnli", 2, ("sentence1", "sentence2"),
             ("sentence1", "sentence2", "label")),
]}
_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "validation": "dev",
            "validation_matched": "dev_matched", "validation_mismatched": "dev_mismatched"}


def get_task(task: str) -> TaskSpec:
    key = _ALIASES.get(task.lower(), task.lower())
    if key not in TASKS:
        raise ValueError(f"unknown task {task!r}: choose one of {sorted(TASKS)}")
    return TASKS[key]


def _split_key(spec: TaskSpec, split: str) -> str:
    key = _ALIASES.get(split, split)
    if key not in spec.splits:
        raise ValueError(f"task {spec.name!r} has no split {split!r}: use one of {sorted(spec.splits)}")
    return key


def resolve_glue_dir(glue_dir: str | os.PathLike | None = None) -> Path | str:
    """Where GLUE comes from: ``glue_dir`` if given ('hub' forces the hub), else $GLUE_DIR, else
    the offline copy at ``<repo>/../shared/glue`` if it exists, else the hub. Returns the folder
    or ``HUB``; pass the result on to ``load_examples`` (it resolves to itself)."""
    if glue_dir is None:
        glue_dir = os.environ.get("GLUE_DIR") or (
            str(DEFAULT_GLUE_DIR) if DEFAULT_GLUE_DIR.is_dir() else HUB)
    if str(glue_dir).lower() == HUB:
        return HUB
    path = Path(glue_dir).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"GLUE folder {path} does not exist: set GLUE_DIR / --glue-dir "
                                "to a folder holding <TASK>/train.tsv, or use 'hub'")
    return path


# ---------------------------------------------------------------- labels (both sources)
def label_problem(spec: TaskSpec, label) -> str | None:
    """Why ``label`` (a number) is not a valid label of the task, or None when it is."""
    if spec.is_regression:
        ok = isinstance(label, (int, float)) and math.isfinite(label) and 0 <= label <= 5
        return None if ok else f"score {label!r} is not a finite number in [0, 5]"
    ok = isinstance(label, int) and not isinstance(label, bool) and 0 <= label < spec.num_labels
    return None if ok else f"label {label!r} is not a class id in [0, {spec.num_labels})"


def _parse_label(spec: TaskSpec, raw: str):
    """The label of a tsv field; raises ValueError saying why it is not one."""
    if spec.label_map is not None:
        if raw not in spec.label_map:
            raise ValueError(f"label {raw!r} is not one of {sorted(spec.label_map)}")
        return spec.label_map[raw]
    try:
        label = float(raw) if spec.is_regression else int(raw)
    except ValueError:
        label = raw
    problem = label_problem(spec, label)
    if problem:
        raise ValueError(problem)
    return label


# ---------------------------------------------------------------- folder source
def _read_rows(path: Path) -> list[list[str]]:
    """The tab-separated rows of a file (BOM dropped), one per line; a byte sequence that is not
    UTF-8 is reported with its line."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise GlueFormatError(f"{path}:{line}: not UTF-8 (byte 0x{data[e.start]:02x}); "
                              "re-download the file or convert it to UTF-8") from None
    return list(csv.reader(io.StringIO(text, newline=""), delimiter="\t",
                           quoting=csv.QUOTE_NONE))


def read_tsv(spec: TaskSpec, path: Path) -> list[dict]:
    """Parse one GLUE tsv into examples; a bad row raises GlueFormatError at its line (the first
    one, with the count of bad rows)."""
    if not path.is_file():
        raise FileNotFoundError(f"GLUE file not found: {path} (expected GLUE layout "
                                f"<glue_dir>/{spec.folder}/<split>.tsv; fix GLUE_DIR or use 'hub')")
    rows = _read_rows(path)
    first_line = 1
    s1, s2, lab = spec.tsv_columns
    n_fields = spec.tsv_fields
    if spec.tsv_header and rows:
        header, rows, first_line = rows[0], rows[1:], 2
        try:
            s1, s2, lab = (None if c is None else c if isinstance(c, int) else header.index(c)
                           for c in spec.tsv_columns)
        except ValueError:
            raise GlueFormatError(f"{path}:1: header {header} lacks one of the columns "
                                  f"{[c for c in spec.tsv_columns if isinstance(c, str)]}; "
                                  "re-download the file") from None
        n_fields = len(header)
    if not rows:
        what = "header only" if first_line == 2 else "empty file"
        raise GlueFormatError(f"{path}: no rows ({what}); re-download the file")
    examples, bad = [], []
    for lineno, row in enumerate(rows, start=first_line):
        if len(row) != n_fields:
            bad.append(f"{lineno}: expected {n_fields} tab-separated fields, got {len(row)}")
            continue
        try:
            label = _parse_label(spec, row[lab])
        except ValueError as e:
            bad.append(f"{lineno}: {e}")
            continue
        examples.append({"sentence1": row[s1], "sentence2": None if s2 is None else row[s2],
                         "label": label})
    if bad:
        raise GlueFormatError(f"{path}:{bad[0]} ({len(bad)} bad row(s) of {len(rows)}); fix or "
                              "re-download the file (rows are never dropped)")
    return examples


# ---------------------------------------------------------------- hub source
def _load_hub(spec: TaskSpec, split_key: str) -> list[dict]:
    import datasets  # imported lazily: the folder path needs no network stack

    try:
        ds = datasets.load_dataset("nyu-mll/glue", spec.hf_name, split=spec.splits[split_key])
    except Exception as e:  # offline, unknown config, ...: one line, name the fix
        raise ConnectionError(f"could not load nyu-mll/glue/{spec.hf_name} split "
                              f"{spec.splits[split_key]} from the hub ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); set GLUE_DIR to "
                              "a local GLUE folder instead") from e
    c1, c2 = spec.hf_columns
    out = []
    for i, row in enumerate(ds):
        label = row["label"]
        label = float(label) if spec.is_regression and isinstance(label, (int, float)) else label
        problem = label_problem(spec, label)
        if problem:
            raise GlueFormatError(f"hub nyu-mll/glue/{spec.hf_name}/{spec.splits[split_key]} "
                                  f"row {i}: {problem} (hidden test labels?); use a labelled split")
        out.append({"sentence1": row[c1], "sentence2": None if c2 is None else row[c2],
                    "label": label})
    return out


def load_examples(task: str, split: str = "train", glue_dir=None,
                  subsample: int | None = None) -> list[dict]:
    """Examples of one split from the folder or the hub (``glue_dir``: see resolve_glue_dir;
    ``HUB`` = 'hub' always means the hub). ``subsample``: keep the first N (smoke runs)."""
    spec = get_task(task)
    key = _split_key(spec, split)
    folder = resolve_glue_dir(glue_dir)
    if folder == HUB:
        examples = _load_hub(spec, key)
    else:
        examples = read_tsv(spec, folder / spec.folder / spec.tsv_files[key])
    return examples[:subsample] if subsample else examples


# ---------------------------------------------------------------- validation split
def train_val_split(labels: list, val_fraction: float = 0.1, seed: int = 0, max_val: int = 1000,
                    stratify: bool = True) -> tuple[list[int], list[int]]:
    """Carve a validation set out of the training rows: ``(train_idx, val_idx)``, both
    ascending, disjoint and together all of ``range(len(labels))``. The val size is
    ``min(max_val, round(val_fraction * n))``; with ``stratify`` (classification) each class
    gets its proportional share (scikit-learn's stratified shuffle split). The split depends
    only on (labels, val_fraction, seed, max_val, stratify), so every method and training seed
    sharing a split seed is evaluated on the same rows. ``val_fraction=0`` -> (all rows, [])."""
    n = len(labels)
    if not (isinstance(val_fraction, (int, float)) and 0 <= val_fraction < 1):
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    if not (isinstance(max_val, int) and max_val >= 1):
        raise ValueError(f"max_val must be a positive int, got {max_val!r}")
    if val_fraction == 0:
        return list(range(n)), []
    n_val = min(max_val, round(val_fraction * n))
    if n_val == 0:
        raise ValueError(f"val_fraction={val_fraction} of {n} training rows gives 0 validation "
                         "rows: use more rows, a larger val_fraction, or val_fraction=0")
    if stratify:
        counts = Counter(labels)
        rare = [c for c, k in sorted(counts.items()) if k < 2]
        if rare:
            raise ValueError(f"class {rare[0]!r} has 1 row of {n}: a stratified split needs >= 2 "
                             "per class (one to train on); use more rows or val_fraction=0")
        if not len(counts) <= n_val <= n - len(counts):
            raise ValueError(f"a stratified split of {n} rows with {len(counts)} classes needs "
                             f"{len(counts)} to {n - len(counts)} validation rows, "
                             f"val_fraction={val_fraction} gives {n_val}; use more rows or "
                             "another val_fraction")
    train_idx, val_idx = train_test_split(range(n), test_size=n_val, random_state=seed,
                                          stratify=list(labels) if stratify else None)
    missing = set(labels) - {labels[i] for i in train_idx}  # a rare class, a large fraction
    if stratify and missing:
        raise ValueError(f"val_fraction={val_fraction} of {n} rows leaves class "
                         f"{sorted(missing)[0]!r} with no training row; use a smaller "
                         "val_fraction or more rows")
    return sorted(train_idx), sorted(val_idx)


def split_sha(val_idx: list[int]) -> str:
    """A short fingerprint of the validation rows for the log (sha256 of the comma-joined ids,
    16 hex digits): runs with equal fingerprints were selected on the same rows."""
    return hashlib.sha256(",".join(map(str, val_idx)).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- tokenisation and batching
def tokenize(examples: list[dict], tokenizer, max_length: int = 128) -> list[dict]:
    """One feature dict per example (input_ids, attention_mask, [token_type_ids], labels), not
    padded: padding happens per batch in the collator."""
    s1 = [e["sentence1"] for e in examples]
    pair = bool(examples) and examples[0]["sentence2"] is not None
    enc = tokenizer(s1, [e["sentence2"] for e in examples] if pair else None,
                    truncation=True, max_length=max_length)
    keys = list(enc.keys())
    return [{**{k: enc[k][i] for k in keys}, "labels": e["label"]}
            for i, e in enumerate(examples)]


def make_collator(tokenizer, pad_to_max_length: bool = False, max_length: int = 128):
    """Dynamic padding (to the longest in the batch) unless ``pad_to_max_length``."""
    if pad_to_max_length:
        return DataCollatorWithPadding(tokenizer, padding="max_length", max_length=max_length)
    return DataCollatorWithPadding(tokenizer)


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1000 + epoch)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of one epoch; depends only on (seed, epoch), so a resumed
    run and every DDP process see the same order."""
    return torch.randperm(n, generator=_epoch_generator(seed, epoch)).tolist()


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, epoch: int,
                           chunk_batches: int = 50) -> list[list[int]]:
    """Global batches of similar-length examples, so dynamic padding pads little: shuffle (the
    epoch_order of (seed, epoch)), sort each chunk of ``chunk_batches * batch_size`` examples
    by length, cut it into batches, then shuffle the batch order with the same generator.
    Every index appears exactly once; only the very last batch cut may be smaller."""
    if batch_size < 1 or chunk_batches < 1:
        raise ValueError(f"batch_size and chunk_batches must be >= 1, got {batch_size} and "
                         f"{chunk_batches}")
    g = _epoch_generator(seed, epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()  # == epoch_order(n, seed, epoch)
    chunk = chunk_batches * batch_size
    batches = []
    for start in range(0, len(order), chunk):
        by_length = sorted(order[start:start + chunk], key=lambda i: lengths[i])
        batches += global_batches(by_length, batch_size)
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def global_batches(order: list[int], batch_size: int) -> list[list[int]]:
    """Consecutive global batches (the last one may be smaller; nothing is dropped)."""
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def shard(batch: list[int], rank: int, world: int) -> list[int]:
    """This process's contiguous part of a global batch (sizes differ by at most one)."""
    n, r = divmod(len(batch), world)
    start = rank * n + min(rank, r)
    return batch[start:start + n + (rank < r)]
