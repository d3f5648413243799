"""Shared fixtures: the embedded MiniLM (real weights) and a tiny random RoBERTa."""
import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

# Tiny models on a shared 2-core machine: one thread per process is several times faster
# (less contention) and is inherited by the notebook kernels and subprocess workers.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub in tests

from transformers import (AutoModelForSequenceClassification, RobertaConfig,  # noqa: E402
                          RobertaForSequenceClassification, logging)

from pipeline.models import resolve_model  # noqa: E402

logging.set_verbosity_error()
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def minilm_path():
    return resolve_model("minilm")


@pytest.fixture
def minilm(minilm_path):
    """A fresh MiniLM classifier (eval mode, seeded head) for each call."""
    def make(num_labels=2):
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(
            minilm_path, num_labels=num_labels).eval()
    return make


TINY_ROBERTA = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64, max_position_embeddings=66, num_labels=2)


@pytest.fixture
def tiny_roberta():
    def make(seed=0):
        torch.manual_seed(seed)
        return RobertaForSequenceClassification(RobertaConfig(**TINY_ROBERTA)).eval()
    return make


@pytest.fixture
def token_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 100, (4, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # one padded row so masking paths run too
    return {"input_ids": ids, "attention_mask": mask}


# ==== pipeline fixtures (owner: pipeline; data/train/logs tests) ===========================
# Tests read GLUE from a tiny synthetic folder that tests/fixtures/make_glue.py writes for this
# session (made-up sentences, nothing of GLUE is stored in the repo), so the suite runs on a
# fresh clone with no GLUE copy and no network. $GLUE_DIR is pointed at it for the session
# (notebooks and subprocesses resolve the default folder too); the real folder is only reached
# through `real_glue_dir`, for the full row/label counts.
from tests.fixtures.make_glue import main as _make_glue  # noqa: E402

_TINY_ROOT = Path(tempfile.mkdtemp(prefix="svd-lorafa-glue-"))
atexit.register(shutil.rmtree, _TINY_ROOT, ignore_errors=True)
TINY_GLUE = _TINY_ROOT / "glue"
_make_glue(TINY_GLUE)
REAL_GLUE = Path(os.environ.get("GLUE_DIR") or ROOT.parent / "shared" / "glue")
os.environ["GLUE_DIR"] = str(TINY_GLUE)


@pytest.fixture(scope="session")
def glue_dir():
    """The tiny synthetic GLUE-layout folder (72 train / 40 dev rows per task, QNLI dev only)."""
    return TINY_GLUE


@pytest.fixture(scope="session")
def real_glue_dir():
    """The real GLUE folder ($GLUE_DIR, else ../shared/glue); the test is skipped without it."""
    if not (REAL_GLUE / "MRPC" / "train.tsv").is_file():
        pytest.skip(f"no GLUE folder at {REAL_GLUE}: set GLUE_DIR to run the full row/label counts")
    return REAL_GLUE


TINY_BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64, max_position_embeddings=128)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, minilm_path):
    """Factory: a folder holding a tiny random BERT *base* (so any num_labels loads with a
    fresh head) plus the real MiniLM tokenizer; ``dropout=0`` makes runs exactly comparable
    across DDP layouts."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    made = {}

    def make(dropout=0.1):
        if dropout not in made:
            tok = AutoTokenizer.from_pretrained(minilm_path)
            folder = tmp_path_factory.mktemp(f"tiny-bert-d{dropout}")
            torch.manual_seed(0)
            cfg = BertConfig(vocab_size=tok.vocab_size, hidden_dropout_prob=dropout,
                             attention_probs_dropout_prob=dropout, **TINY_BERT)
            BertModel(cfg).save_pretrained(folder)
            tok.save_pretrained(folder)
            made[dropout] = str(folder)
        return made[dropout]
    return make
# ==== end pipeline fixtures ================================================================
