"""GLUE loading (offline folder and hub path), tokenisation, dynamic padding, batching."""
import csv
from collections import Counter

import pytest
import torch

from pipeline import data as D

# (task, split) -> (rows, label counts) from the offline folder's PROVENANCE.md tables
EXPECTED = {
    ("mrpc", "train"): (3668, {0: 1194, 1: 2474}),
    ("mrpc", "dev"): (408, {0: 129, 1: 279}),
    ("rte", "train"): (2490, {0: 1249, 1: 1241}),  # entailment=0, not_entailment=1
    ("rte", "dev"): (277, {0: 146, 1: 131}),
    ("cola", "train"): (8551, {0: 2528, 1: 6023}),
    ("cola", "dev"): (1043, {0: 322, 1: 721}),
    ("sst2", "dev"): (872, {0: 428, 1: 444}),
    ("wnli", "train"): (635, {0: 323, 1: 312}),
    ("wnli", "dev"): (71, {0: 40, 1: 31}),
    ("qnli", "dev"): (5463, {0: 2702, 1: 2761}),
}


@pytest.mark.parametrize("task,split", sorted(EXPECTED))
def test_folder_counts_and_labels(real_glue_dir, task, split):
    ex = D.load_examples(task, split, real_glue_dir)
    n, counts = EXPECTED[(task, split)]
    assert len(ex) == n
    assert dict(Counter(e["label"] for e in ex)) == counts
    pair = D.get_task(task).hf_columns[1] is not None
    assert all(isinstance(e["sentence1"], str) and e["sentence1"] for e in ex)
    assert all((e["sentence2"] is not None) == pair for e in ex)


def test_folder_stsb_scores(real_glue_dir):
    tr = D.load_examples("stsb", "train", real_glue_dir)
    dev = D.load_examples("stsb", "dev", real_glue_dir)
    assert (len(tr), len(dev)) == (5749, 1500)
    assert round(sum(e["label"] for e in tr) / len(tr), 3) == 2.701
    assert round(sum(e["label"] for e in dev) / len(dev), 3) == 2.364
    assert dev[0] == {"sentence1": "A man with a hard hat is dancing.",
                      "sentence2": "A man wearing a hard hat is dancing.", "label": 5.0}


def test_folder_row_content(real_glue_dir):
    mrpc = D.load_examples("mrpc", "train", real_glue_dir)
    assert mrpc[0]["sentence1"].startswith("Amrozi accused his brother")  # no BOM, no header
    assert mrpc[0]["label"] == 1
    assert '" the witness "' in mrpc[0]["sentence1"]  # quotes kept verbatim (QUOTE_NONE)
    cola = D.load_examples("cola", "dev", real_glue_dir)
    assert cola[-1]["sentence1"] and cola[-1]["label"] in (0, 1)  # last line has no newline
    assert cola[0]["sentence2"] is None


# ---------------------------------------------------------------- the tiny synthetic folder
TINY = [(t, s) for t in ("mrpc", "rte", "cola", "stsb", "sst2", "wnli") for s in ("train", "dev")]


def test_tiny_folder_is_the_same_every_time_it_is_written(glue_dir, tmp_path):
    from tests.fixtures.make_glue import main
    main(tmp_path)
    files = sorted(p.relative_to(glue_dir) for p in glue_dir.rglob("*.tsv"))
    assert files == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.tsv"))
    assert all((glue_dir / f).read_bytes() == (tmp_path / f).read_bytes() for f in files)


@pytest.mark.parametrize("task,split", TINY + [("qnli", "dev")])
def test_tiny_folder_loads_with_both_classes(glue_dir, task, split):
    ex = D.load_examples(task, split, glue_dir)
    assert len(ex) >= (64 if split == "train" else 32)
    labels = {e["label"] for e in ex}
    if D.get_task(task).is_regression:
        assert all(isinstance(y, float) and 0 <= y <= 5 for y in labels) and len(labels) > 5
    else:
        assert labels == {0, 1} and {e["label"] for e in ex[:16]} == {0, 1}  # subsamples too
    pair = D.get_task(task).hf_columns[1] is not None
    assert all(e["sentence1"] and (e["sentence2"] is not None) == pair for e in ex)


def test_tiny_folder_has_the_format_traps(glue_dir):
    mrpc = glue_dir / "MRPC" / "train.tsv"
    assert mrpc.read_bytes().startswith(b"\xef\xbb\xbfQuality\t#1 ID")  # BOM + header
    assert not D.load_examples("mrpc", "train", glue_dir)[0]["sentence1"].startswith("\ufeff")
    rte = glue_dir / "RTE" / "train.tsv"  # stray quotes: default csv quoting would merge rows
    with open(rte, newline="") as f:
        quoted_rows = len(list(csv.reader(f, delimiter="\t"))) - 1
    assert quoted_rows < len(D.load_examples("rte", "train", glue_dir))
    cola = glue_dir / "CoLA" / "dev.tsv"
    assert not cola.read_bytes().endswith(b"\n") and cola.read_text().count("\t") % 3 == 0
    stsb = (glue_dir / "STS-B" / "dev.tsv").read_text().splitlines()
    assert len(stsb[0].split("\t")) == 10 and stsb[0].endswith("\tscore")
    assert not (glue_dir / "QNLI" / "train.tsv").exists()


def test_subsample_keeps_first_n(glue_dir):
    full = D.load_examples("rte", "dev", glue_dir)
    assert D.load_examples("rte", "dev", glue_dir, subsample=10) == full[:10]


def test_missing_file_unknown_task_and_split(glue_dir):
    with pytest.raises(FileNotFoundError, match=r"QNLI/train\.tsv"):
        D.load_examples("qnli", "train", glue_dir)
    with pytest.raises(ValueError, match="unknown task 'foo'"):
        D.load_examples("foo", "train", glue_dir)
    with pytest.raises(ValueError, match="no split 'test'"):
        D.load_examples("mrpc", "test", glue_dir)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.load_examples("mrpc", "train", "/nonexistent/glue")


def _write(folder, task_dir, name, text):
    p = folder / task_dir / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text, encoding="utf-8")
    return p


def test_malformed_rows_raise_with_file_and_line(tmp_path):
    _write(tmp_path, "RTE", "train.tsv", "index\tsentence1\tsentence2\tlabel\n"
           "0\ta\tb\tentailment\n1\tonly three\tfields\n2\tc\td\tentailment\n3\te\tf\tmaybe\n")
    with pytest.raises(D.GlueFormatError) as e:
        D.load_examples("rte", "train", tmp_path)
    msg = str(e.value)
    assert msg == (f"{tmp_path}/RTE/train.tsv:3: expected 4 tab-separated fields, got 3 "
                   "(2 bad row(s) of 4); fix or re-download the file (rows are never dropped)")
    _write(tmp_path, "CoLA", "dev.tsv", "src\t1\t\tok\nsrc\tx\t\tbad label\n")
    with pytest.raises(D.GlueFormatError, match=r"CoLA/dev\.tsv:2: label 'x' is not a class id"):
        D.load_examples("cola", "dev", tmp_path)
    _write(tmp_path, "MRPC", "dev.tsv", "Quality\tWrong\tHeader\n1\ta\tb\n")
    with pytest.raises(D.GlueFormatError, match=r"MRPC/dev\.tsv:1: header .* lacks one of the"):
        D.load_examples("mrpc", "dev", tmp_path)


RTE_HEADER = "index\tsentence1\tsentence2\tlabel\n"
STSB_HEADER = ("index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\t"
               "sentence2\tscore\n")


def stsb_row(score):
    return f"0\tg\tf\t2024\t0\tnone\tnone\ta\tb\t{score}\n"


@pytest.mark.parametrize("task_dir,task,text,message", [
    ("WNLI", "wnli", RTE_HEADER + "0\ta\tb\t1\n1\ta\tb\t2\n",
     r"WNLI/dev\.tsv:3: label 2 is not a class id in \[0, 2\) \(1 bad row\(s\) of 2\)"),
    ("WNLI", "wnli", RTE_HEADER + "0\ta\tb\t-1\n", r"WNLI/dev\.tsv:2: label -1 is not a class id"),
    ("CoLA", "cola", "s\t3\t\tx\n", r"CoLA/dev\.tsv:1: label 3 is not a class id in \[0, 2\)"),
    ("RTE", "rte", RTE_HEADER + "0\ta\tb\tentailed\n",
     r"RTE/dev\.tsv:2: label 'entailed' is not one of \['entailment', 'not_entailment'\]"),
    ("STS-B", "stsb", STSB_HEADER + stsb_row(4.5) + stsb_row("nan"),
     r"STS-B/dev\.tsv:3: score nan is not a finite number in \[0, 5\]"),
    ("STS-B", "stsb", STSB_HEADER + stsb_row("inf"), r"STS-B/dev\.tsv:2: score inf is not a"),
    ("STS-B", "stsb", STSB_HEADER + stsb_row(5.5), r"STS-B/dev\.tsv:2: score 5\.5 is not a finite"),
    ("STS-B", "stsb", STSB_HEADER + stsb_row(-0.25), r"STS-B/dev\.tsv:2: score -0\.25 is not"),
    ("STS-B", "stsb", STSB_HEADER + stsb_row("high"), r"STS-B/dev\.tsv:2: score 'high' is not"),
])
def test_labels_out_of_range_refused_at_their_line(tmp_path, task_dir, task, text, message):
    _write(tmp_path, task_dir, "dev.tsv", text)
    with pytest.raises(D.GlueFormatError, match=message) as e:
        D.load_examples(task, "dev", tmp_path)
    assert "\n" not in str(e.value) and str(e.value).endswith("(rows are never dropped)")


@pytest.mark.parametrize("task_dir,task,text,message", [
    ("RTE", "rte", "", "RTE/dev.tsv: no rows (empty file); re-download the file"),
    ("RTE", "rte", RTE_HEADER, "RTE/dev.tsv: no rows (header only); re-download the file"),
    ("MRPC", "mrpc", "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n",
     "MRPC/dev.tsv: no rows (header only); re-download the file"),
    ("CoLA", "cola", "", "CoLA/dev.tsv: no rows (empty file); re-download the file"),
])
def test_empty_or_header_only_file_refused(tmp_path, task_dir, task, text, message):
    _write(tmp_path, task_dir, "dev.tsv", text)
    with pytest.raises(D.GlueFormatError) as e:
        D.load_examples(task, "dev", tmp_path)
    assert str(e.value) == f"{tmp_path}/{message}"


def test_bad_utf8_names_file_and_line(tmp_path):
    p = tmp_path / "RTE" / "dev.tsv"
    p.parent.mkdir()
    p.write_bytes(RTE_HEADER.encode() + b"0\ta\tb\tentailment\n1\tcaf\xe9\tb\tentailment\n")
    with pytest.raises(D.GlueFormatError) as e:
        D.load_examples("rte", "dev", tmp_path)
    assert str(e.value) == (f"{p}:3: not UTF-8 (byte 0xe9); re-download the file or convert it "
                            "to UTF-8")


def test_extra_field_on_first_row_of_headerless_file(tmp_path):
    # CoLA has no header: the field count comes from the task (4), not from the first row
    _write(tmp_path, "CoLA", "dev.tsv", "s\t1\t\tone\textra\ns\t1\t\ttwo\ns\t0\t*\tthree\n")
    with pytest.raises(D.GlueFormatError, match=r"CoLA/dev\.tsv:1: expected 4 tab-separated "
                       r"fields, got 5 \(1 bad row\(s\) of 3\)"):
        D.load_examples("cola", "dev", tmp_path)


def test_mnli_qqp_folder_layout(tmp_path):
    # MNLI/QQP have no offline copy: check their column and label maps on constructed rows
    hdr = "index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\tlabel1\tgold_label\n"
    _write(tmp_path, "MNLI", "dev_mismatched.tsv", hdr + "0\t1\t1\tx\tp0\th0\tneutral\tneutral\n"
           "1\t1\t1\tx\tp1\th1\tcontradiction\tcontradiction\n2\t1\t1\tx\tp2\th2\te\tentailment\n")
    ex = D.load_examples("mnli", "dev_mismatched", tmp_path)
    assert [e["label"] for e in ex] == [1, 2, 0]
    assert ex[0]["sentence1"] == "p0" and ex[0]["sentence2"] == "h0"
    _write(tmp_path, "QQP", "train.tsv", "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
           "0\t1\t2\tq a?\tq b?\t1\n")
    assert D.load_examples("qqp", "train", tmp_path) == [
        {"sentence1": "q a?", "sentence2": "q b?", "label": 1}]


# ---------------------------------------------------------------- hub path (monkeypatched)
HUB_ROWS = {  # nyu-mll/glue column names and label ids
    ("mnli", "validation_matched"): [{"premise": "p", "hypothesis": "h", "label": 2, "idx": 0}],
    ("mnli", "validation_mismatched"): [{"premise": "pm", "hypothesis": "hm", "label": 1, "idx": 0}],
    ("qqp", "train"): [{"question1": "a?", "question2": "b?", "label": 1, "idx": 0}],
    ("qnli", "validation"): [{"question": "q?", "sentence": "s.", "label": 1, "idx": 0}],
    ("cola", "train"): [{"sentence": "It runs.", "label": 1, "idx": 0}],
    ("sst2", "validation"): [{"sentence": "good .", "label": 1, "idx": 0}],
    ("stsb", "train"): [{"sentence1": "a", "sentence2": "b", "label": 3.8, "idx": 0}],
    ("rte", "train"): [{"sentence1": "s1", "sentence2": "s2", "label": 1, "idx": 0}],
    ("mrpc", "validation"): [{"sentence1": "x", "sentence2": "y", "label": 0, "idx": 0}],
    ("wnli", "train"): [{"sentence1": "w1", "sentence2": "w2", "label": 1, "idx": 0}],
}


@pytest.fixture
def fake_hub(monkeypatch):
    import datasets

    calls = []

    def load_dataset(path, name, split):
        calls.append((path, name, split))
        return datasets.Dataset.from_list(HUB_ROWS[(name, split)])
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


@pytest.mark.parametrize("task,split,expected", [
    ("mnli", "dev", {"sentence1": "p", "sentence2": "h", "label": 2}),
    ("mnli", "dev_mismatched", {"sentence1": "pm", "sentence2": "hm", "label": 1}),
    ("qqp", "train", {"sentence1": "a?", "sentence2": "b?", "label": 1}),
    ("qnli", "dev", {"sentence1": "q?", "sentence2": "s.", "label": 1}),
    ("cola", "train", {"sentence1": "It runs.", "sentence2": None, "label": 1}),
    ("sst2", "validation", {"sentence1": "good .", "sentence2": None, "label": 1}),
    ("stsb", "train", {"sentence1": "a", "sentence2": "b", "label": 3.8}),
])
def test_hub_column_and_label_mapping(fake_hub, task, split, expected):
    assert D.load_examples(task, split, glue_dir="hub") == [expected]
    assert fake_hub[0][0] == "nyu-mll/glue"


def test_hub_and_folder_agree(fake_hub, tmp_path):
    # the same rows through both sources give identical examples and label ids
    _write(tmp_path, "RTE", "train.tsv", "index\tsentence1\tsentence2\tlabel\n0\ts1\ts2\tnot_entailment\n")
    _write(tmp_path, "MRPC", "dev.tsv", "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n0\t1\t2\tx\ty\n")
    _write(tmp_path, "WNLI", "train.tsv", "index\tsentence1\tsentence2\tlabel\n0\tw1\tw2\t1\n")
    for task, split in [("rte", "train"), ("mrpc", "dev"), ("wnli", "train")]:
        assert D.load_examples(task, split, tmp_path) == D.load_examples(task, split, "hub")


def test_hub_unlabelled_rows_raise(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_list(
        [{"sentence1": "a", "sentence2": "b", "label": -1, "idx": 0}]))
    with pytest.raises(D.GlueFormatError, match="label -1"):
        D.load_examples("rte", "train", "hub")


def test_glue_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("GLUE_DIR", str(tmp_path))
    assert D.resolve_glue_dir() == tmp_path
    assert D.resolve_glue_dir("hub") == D.resolve_glue_dir("HUB") == D.HUB
    monkeypatch.delenv("GLUE_DIR")
    monkeypatch.setattr(D, "DEFAULT_GLUE_DIR", tmp_path / "absent")
    assert D.resolve_glue_dir() == D.HUB  # no folder anywhere: the hub
    assert D.resolve_glue_dir(D.resolve_glue_dir(tmp_path)) == tmp_path  # idempotent


def test_hub_choice_reaches_the_loader(monkeypatch, glue_dir):
    # 'hub' resolved once and passed on (as run_experiment does) must load from the hub even
    # though $GLUE_DIR names a folder (it used to resolve to None and fall back to the folder)
    monkeypatch.setenv("GLUE_DIR", str(glue_dir))
    hub_rows = [{"sentence1": "from", "sentence2": "the hub", "label": 0}]
    monkeypatch.setattr(D, "_load_hub", lambda spec, key: hub_rows)
    assert D.load_examples("rte", "train", D.resolve_glue_dir("hub")) == hub_rows
    assert D.load_examples("rte", "train", "hub") == hub_rows
    assert D.load_examples("rte", "train", D.resolve_glue_dir()) != hub_rows  # default: folder


# ---------------------------------------------------------------- tokenisation and batching
@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(minilm_path)


def test_tokenize_pair_single_and_truncation(tokenizer):
    pair = D.tokenize([{"sentence1": "a cat", "sentence2": "a dog", "label": 1}], tokenizer)[0]
    assert pair["labels"] == 1 and 1 in pair["token_type_ids"]  # second segment marked
    assert pair["input_ids"].count(tokenizer.sep_token_id) == 2
    single = D.tokenize([{"sentence1": "a cat", "sentence2": None, "label": 0}], tokenizer)[0]
    assert single["input_ids"].count(tokenizer.sep_token_id) == 1
    long = D.tokenize([{"sentence1": "word " * 300, "sentence2": "other " * 300, "label": 0}],
                      tokenizer, max_length=40)[0]
    assert len(long["input_ids"]) == 40


def test_dynamic_padding(tokenizer):
    feats = D.tokenize([{"sentence1": "short", "sentence2": None, "label": 0},
                        {"sentence1": "a somewhat longer sentence here", "sentence2": None,
                         "label": 1}], tokenizer)
    batch = D.make_collator(tokenizer)(feats)
    longest = max(len(f["input_ids"]) for f in feats)
    assert batch["input_ids"].shape == (2, longest) and longest < 128
    assert batch["attention_mask"].sum().item() == sum(len(f["input_ids"]) for f in feats)
    assert batch["labels"].tolist() == [0, 1]
    fixed = D.make_collator(tokenizer, pad_to_max_length=True, max_length=128)(feats)
    assert fixed["input_ids"].shape == (2, 128)
    reg = D.make_collator(tokenizer)(D.tokenize(
        [{"sentence1": "a", "sentence2": "b", "label": 3.5}], tokenizer))
    assert reg["labels"].dtype.is_floating_point


def test_epoch_order_batches_and_shards():
    o0, o0b, o1 = D.epoch_order(50, 0, 0), D.epoch_order(50, 0, 0), D.epoch_order(50, 0, 1)
    assert o0 == o0b and o0 != o1 and sorted(o0) == list(range(50))
    batches = D.global_batches(o0, 16)
    assert [len(b) for b in batches] == [16, 16, 16, 2]  # nothing dropped
    for b in batches:
        parts = [D.shard(b, r, 3) for r in range(3)]
        assert sum(parts, []) == b  # contiguous, in order, complete
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


# ---------------------------------------------------------------- validation split
def labels_of(n, p1=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=g) < p1).long().tolist()


@pytest.mark.parametrize("n,val_fraction,max_val,n_val", [
    (1000, 0.1, 1000, 100), (24, 0.1, 1000, 2), (20000, 0.1, 1000, 1000), (1000, 0.25, 50, 50),
    (35, 0.1, 1000, 4)])  # round(3.5) = 4
def test_split_sizes_disjoint_covering_ascending(n, val_fraction, max_val, n_val):
    tr, va = D.train_val_split(labels_of(n), val_fraction, seed=0, max_val=max_val)
    assert len(va) == n_val and len(tr) == n - n_val
    assert tr == sorted(tr) and va == sorted(va) and sorted(tr + va) == list(range(n))


def test_split_is_stratified_by_label():
    y = [0] * 600 + [1] * 300 + [2] * 100  # grouped by class: a plain head cut would fail
    tr, va = D.train_val_split(y, 0.1, seed=3)
    assert Counter(y[i] for i in va) == {0: 60, 1: 30, 2: 10}
    for seed in range(5):
        y = labels_of(997, p1=0.3, seed=seed)
        _, va = D.train_val_split(y, 0.2, seed=seed)
        share = sum(y[i] for i in va) / len(va)
        assert abs(share - sum(y) / len(y)) <= 1 / len(va)  # within one row of proportional


def test_split_depends_on_its_seed_only():
    y = labels_of(500)
    a = D.train_val_split(y, 0.1, seed=0)
    torch.manual_seed(123)  # the training seed and any global RNG use: no effect
    import random
    import numpy as np
    random.seed(7)
    np.random.seed(7)
    assert D.train_val_split(y, 0.1, seed=0) == a
    assert D.train_val_split(list(y), 0.1, seed=0, stratify=True) == a
    assert D.train_val_split(y, 0.1, seed=1) != a
    other = D.train_val_split(y, 0.1, seed=1)[1]
    assert D.split_sha(a[1]) == D.split_sha(list(a[1])) != D.split_sha(other)
    assert len(D.split_sha(a[1])) == 16 and int(D.split_sha(a[1]), 16) >= 0


def test_split_regression_and_zero_fraction():
    scores = [i / 20 for i in range(100)]  # STS-B: floats, no stratification
    tr, va = D.train_val_split(scores, 0.1, seed=0, stratify=False)
    assert len(va) == 10 and sorted(tr + va) == list(range(100))
    assert D.train_val_split(scores, 0, stratify=False) == (list(range(100)), [])
    assert D.train_val_split([0, 1], 0.0) == ([0, 1], [])


@pytest.mark.parametrize("labels,kw,message", [
    ([0, 1] * 10, dict(val_fraction=1.0), r"^val_fraction must be in \[0, 1\), got 1\.0$"),
    ([0, 1] * 10, dict(val_fraction=-0.1), r"^val_fraction must be in \[0, 1\), got -0\.1$"),
    ([0, 1] * 10, dict(max_val=0), r"^max_val must be a positive int, got 0$"),
    ([0, 1] * 2, dict(val_fraction=0.1), r"^val_fraction=0\.1 of 4 training rows gives 0 "
     r"validation rows: use more rows, a larger val_fraction, or val_fraction=0$"),
    ([0] * 20 + [1], dict(), r"^class 1 has 1 row of 21: a stratified split needs >= 2 per class"),
    ([0, 1] * 5 + [2] * 2, dict(val_fraction=0.1), r"^a stratified split of 12 rows with 3 "
     r"classes needs 3 to 9 validation rows, val_fraction=0\.1 gives 1; "),
    ([0] * 2 + [1] * 998, dict(val_fraction=0.99, max_val=10**6),
     r"^val_fraction=0\.99 of 1000 rows leaves class 0 with no training row"),
])
def test_split_refuses(labels, kw, message):
    with pytest.raises(ValueError, match=message):
        D.train_val_split(labels, **kw)


# ---------------------------------------------------------------- length-grouped batches
def padded_tokens(batches, lengths):
    return sum(max(lengths[i] for i in b) * len(b) for b in batches)


def test_length_grouped_batches_cover_sort_and_shuffle():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 120, (1003,), generator=g).tolist()
    bs, chunk = 8, 10
    batches = D.length_grouped_batches(lengths, bs, seed=1, epoch=2, chunk_batches=chunk)
    assert sorted(sum(batches, [])) == list(range(1003))  # every index exactly once
    assert len(batches) == -(-1003 // bs) and sorted(map(len, batches))[1:] == [bs] * 125
    assert batches == D.length_grouped_batches(lengths, bs, seed=1, epoch=2, chunk_batches=chunk)
    assert batches != D.length_grouped_batches(lengths, bs, seed=1, epoch=3, chunk_batches=chunk)
    assert batches != D.length_grouped_batches(lengths, bs, seed=2, epoch=2, chunk_batches=chunk)
    # the chunks are the epoch_order's: each chunk's batches hold exactly its examples
    order = D.epoch_order(1003, 1, 2)
    chunks = [set(order[i:i + bs * chunk]) for i in range(0, 1003, bs * chunk)]
    assert all(any(set(b) <= c for c in chunks) for b in batches)
    # sorted within a chunk: batches do not overlap in length, unlike the plain order
    plain = D.global_batches(order, bs)
    assert padded_tokens(batches, lengths) < 0.75 * padded_tokens(plain, lengths)
    # the batch order is shuffled, not sorted by length
    firsts = [min(lengths[i] for i in b) for b in batches]
    assert firsts != sorted(firsts) and firsts != sorted(firsts, reverse=True)


def test_length_grouped_batches_edges():
    assert D.length_grouped_batches([], 4, 0, 0) == []
    assert D.length_grouped_batches([3], 4, 0, 0) == [[0]]
    with pytest.raises(ValueError, match=r"^batch_size and chunk_batches must be >= 1, got 0 "):
        D.length_grouped_batches([1, 2], 0, 0, 0)
