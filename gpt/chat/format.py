"""`data.format: chat`: conversations, the loss on the assistant's replies only.

The data format train.py asks when a run is chat-tuned (`gpt.data.data_format` imports this module
only then): the template's marker tokens join the model's vocabulary (`gpt.chat.template`), the
splits are conversations packed into windows (`gpt.chat.data`), the checkpoints record the template,
and the sample is a reply.
"""

from collections.abc import Callable

import torch
from torch.utils.data import Dataset

from gpt.chat.data import load_chat_splits
from gpt.chat.template import TEMPLATE, chat_model_config, reply
from gpt.config import DataConfig
from gpt.distributed import Distributed
from gpt.model import ModelConfig
from gpt.sampling import SampleConfig


class ChatFormat:
    """Conversations in the chat template: what `gpt.data.TextFormat` answers, for chat."""

    name = "chat"
    chat = True  # task prompts and samples are conversations
    records = {"chat_template": TEMPLATE}
    whole_val = ("val loss (replies only)", "the val conversations")

    def model_config(self, cfg: ModelConfig) -> ModelConfig:
        """`cfg` with the template's markers as token ids of their own."""
        return chat_model_config(cfg)

    def splits(self, cfg: DataConfig, context: int, dist: Distributed, say: Callable) -> tuple[Dataset, Dataset]:
        """The train and val conversations, one a window or packed (prepared first where needed)."""
        splits = load_chat_splits(cfg, context, dist)
        for split, windows in zip(("train", "val"), splits):
            say(windows.describe(split))
        return splits

    def print_sample(self, model: torch.nn.Module, cfg: SampleConfig, device: torch.device) -> None:
        """A reply to the sample prompt, as its first turn of a conversation."""
        print(f"> {cfg.prompt}")
        reply(model, [{"role": "user", "content": cfg.prompt}], cfg, device,
              torch.Generator(device=device).manual_seed(cfg.seed), write=lambda text: print(text, end="", flush=True))
        print()
