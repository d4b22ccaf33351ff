"""A small, readable GPT: causal attention, a GPT-2 style model, data, training and sampling."""

from gpt.attention import CausalAttention
from gpt.model import GPTModel, ModelConfig

__all__ = ["CausalAttention", "GPTModel", "ModelConfig"]
