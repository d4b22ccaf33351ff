import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpt.model import GPTModel, ModelConfig  # noqa: E402


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return ModelConfig(vocab_size=101, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)


@pytest.fixture
def tiny_model(tiny_cfg) -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(tiny_cfg)


@pytest.fixture
def corpus_file(tmp_path) -> Path:
    """A small UTF-8 corpus: a few thousand tokens of varied text."""
    lines = [f"Line {i}: the quick brown fox, number {i * 7 % 13}, jumps; café ünïcode." for i in range(400)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
