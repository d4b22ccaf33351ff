import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# The tests never reach huggingface.co: a dataset that is not local fails at once, where datasets
# would otherwise retry for ~20 s. Set before anything imports huggingface_hub or datasets.
os.environ["HF_HUB_OFFLINE"] = "1"

from gpt.model import GPTModel, ModelConfig  # noqa: E402
from gpt.optim import Muon  # noqa: E402
from gpt.training import Run, TrainState  # noqa: E402


class MuonOneByOne(Muon):
    """`gpt.optim.Muon` orthogonalising one matrix at a time, as torch.optim.Muon does: what the tests
    compare with torch's bit for bit, and with the batched iteration."""

    def _same_shapes(self, params: list[torch.Tensor]) -> list[list[int]]:
        return [[i] for i in range(len(params))]


class SavesOnly:
    """`train()`'s `save` in a test: `record(state)` at every save (no file)."""

    def __init__(self, record: Callable[[TrainState], object]):
        self.record = record

    def __call__(self, run: Run) -> None:
        self.record(run.state)


def randomised(cfg: ModelConfig, seed: int = 0) -> GPTModel:
    """A model with every parameter random (LayerNorms and biases too), padding rows kept zero: a swapped
    or mis-split tensor then changes the logits instead of hiding behind a constant."""
    torch.manual_seed(seed)
    model = GPTModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.3)
        model.tok_emb.weight[cfg.vocab_size:] = 0.0
    return model


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


def random_hf_gpt2(vocab_size: int, n_positions: int):
    """A small transformers GPT-2 (2 layers, 2 heads, 32 wide) with every weight random.

    Random LayerNorms and biases too (not 1 and 0, as initialised): a swapped or mis-split
    tensor then changes the logits instead of hiding behind a constant.
    """
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=n_positions,
                                     vocab_size=vocab_size, bos_token_id=vocab_size - 1,
                                     eos_token_id=vocab_size - 1)
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if ".ln_" in name and name.endswith("weight") else 0.0, 0.3)
    return model.eval()


def saved_hf_gpt2(tmp_path_factory, vocab_size: int):
    """(model, folder): `random_hf_gpt2` with 64 positions, written with save_pretrained."""
    model = random_hf_gpt2(vocab_size=vocab_size, n_positions=64)
    folder = tmp_path_factory.mktemp(f"hf-vocab-{vocab_size}")
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="session")
def hf_small_vocab(tmp_path_factory):
    """Vocabulary 1000 (padded to 1024 here)."""
    return saved_hf_gpt2(tmp_path_factory, 1000)


@pytest.fixture(scope="session")
def hf_gpt2_vocab(tmp_path_factory):
    """The full GPT-2 vocabulary."""
    return saved_hf_gpt2(tmp_path_factory, 50257)
