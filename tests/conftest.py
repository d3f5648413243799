"""Shared fixtures: the embedded MiniLM (real weights) and a tiny random RoBERTa."""
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub in tests

from transformers import (AutoModelForSequenceClassification, RobertaConfig,  # noqa: E402
                          RobertaForSequenceClassification, logging)

from pipeline.models import resolve_model  # noqa: E402

logging.set_verbosity_error()


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
