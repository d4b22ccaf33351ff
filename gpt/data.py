"""GPT-2 tokens on disk -> sliding-window batches, and the data formats a run can train on.

`TokenWindows` is the sliding window of "LLMs from scratch" (window i starts at `i * stride`; its
target is the window shifted one token) over a prepared token file (`gpt.corpus.prepare` makes
them), and `TrainBatches` the endless, resumable, seeded shuffle over them; `eval_loader` gives the
fixed batches evaluation reads. A data format (`data_format`) is what train.py asks about the data:
plain text (`TextFormat`, here) or conversations (`gpt.chat.format.ChatFormat`, imported only for a
chat run).
"""

import functools
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from gpt.config import DataConfig
from gpt.corpus.prepare import check_max_tokens, prepare
from gpt.distributed import BatchShare, Distributed
from gpt.errors import UserError
from gpt.model import IGNORE_INDEX, ModelConfig
from gpt.sampling import SampleConfig, print_samples

PAD_INPUT_ID = 0  # the inputs of an eval batch's padding rows (`full_batch`): an id in every vocabulary


# --------------------------------------------------------------------------- windows and batches

class TokenWindows(Dataset):
    """Sliding windows over a token file: item i is (x, y) with y = x shifted by one token."""

    def __init__(self, tokens: np.ndarray, max_length: int, stride: int):
        if max_length < 1 or stride < 1:
            raise ValueError("max_length and stride must be at least 1")
        self.tokens = tokens
        self.max_length = max_length
        self.stride = stride

    def __len__(self) -> int:
        # Window i needs tokens [i*stride, i*stride + max_length] inclusive (the +1 target).
        usable = len(self.tokens) - self.max_length - 1
        return usable // self.stride + 1 if usable >= 0 else 0

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range for {len(self)} windows")
        start = i * self.stride
        # Kept as uint16 (as stored): a quarter of int64's bytes to collate, pin and copy to the
        # device; training widens the ids to int64 there (`gpt.training.to_device`).
        chunk = torch.from_numpy(np.array(self.tokens[start:start + self.max_length + 1]))
        return chunk[:-1], chunk[1:]


def load_split(prepared: Path, split: str, max_length: int, stride: int) -> TokenWindows:
    """The windows of `split` ("train" or "val") of a prepared corpus, read through a memmap."""
    tokens = np.memmap(prepared / f"{split}.bin", dtype=np.uint16, mode="r")
    windows = TokenWindows(tokens, max_length, stride)
    if len(windows) == 0:
        raise UserError(
            f"the {split} split of {prepared} has {len(tokens):,} tokens, fewer than one window of "
            f"{max_length + 1}; use more text or a smaller model.context_length"
        )
    return windows


class TrainBatches:
    """Endless shuffled train batches; epoch e is shuffled by seed + e, so runs repeat exactly.

    `epoch` and `batch_in_epoch` say where the stream is; they are all the state it has, so
    `state_dict` / `load_state_dict` put a resumed run on the very next batch.

    With several training processes (`gpt.distributed`), each one is given its `share`: they all follow
    the same stream, and batch i of it (counted from where they start) goes to process i mod
    `world_size`. Together they read what one process would have read, in the same steps, and the
    position a checkpoint records (that of the whole group) means the same for any number of
    processes. With `shares` > 1, `shares` consecutive ranks take each batch together: batch i goes to
    the i mod (world_size / shares)-th of them, and each process yields its 1/shares slice of the
    batch's windows (in rank order).
    """

    def __init__(self, dataset: TokenWindows, batch_size: int, seed: int, num_workers: int = 0,
                 pin_memory: bool = False, share: BatchShare = BatchShare()):
        if len(dataset) < batch_size:
            raise UserError(
                f"the train split has {len(dataset)} windows, fewer than data.batch_size "
                f"{batch_size}; use more text, a smaller batch_size or a smaller stride"
            )
        if share.world_size % share.shares or batch_size % share.shares:
            raise ValueError(f"{share.shares} processes cannot share batches of {batch_size} among {share.world_size}")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.group, self.part = divmod(share.rank, share.shares)  # which ranks take a batch together; our slice of it
        self.groups = share.world_size // share.shares
        self.shares = share.shares
        self.epoch = 0
        self.batch_in_epoch = 0

    @property
    def batches_per_epoch(self) -> int:
        return len(self.dataset) // self.batch_size  # the last partial batch is dropped

    def state_dict(self) -> dict:
        """Where the stream is: the epoch and the batches of it already yielded (by all processes)."""
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a `state_dict`: the next batch is the one that would have come next."""
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])

    def __iter__(self):
        per_epoch = self.batches_per_epoch
        mine = self.epoch * per_epoch + self.batch_in_epoch + self.group  # the stream position of our next batch
        while True:
            epoch, first = divmod(mine, per_epoch)
            positions = range(first, per_epoch, self.groups)
            # The epoch's own generator, never the global RNG (dropout's): a resumed run's masks match an
            # unbroken one's. The loader draws its workers' seed from it, then the shuffle is drawn.
            generator = torch.Generator().manual_seed(self.seed + epoch)
            loader = DataLoader(self.dataset, batch_sampler=self._our_batches(positions, generator), generator=generator,
                                num_workers=self.num_workers, pin_memory=self.pin_memory)
            for position, batch in zip(positions, loader):
                # Once every process has taken its batch of this round, the stream is past it.
                done = epoch * per_epoch + position - self.group + self.groups
                self.epoch, self.batch_in_epoch = divmod(done, per_epoch)
                yield batch
            mine = epoch * per_epoch + positions[-1] + self.groups

    def _our_batches(self, positions: range, generator: torch.Generator) -> Iterator[list[int]]:
        """The window indices of this process's slice of the epoch's batches at `positions`.

        Shuffled at the first batch, when the loader starts, after it has drawn its workers' seed from
        `generator`: the order a shuffling DataLoader seeded with it gives.
        """
        order = torch.randperm(len(self.dataset), generator=generator)
        piece = self.batch_size // self.shares  # windows of each batch this process takes
        for j in positions:
            start = j * self.batch_size + self.part * piece
            yield order[start:start + piece].tolist()


def full_batch(items: list[tuple[torch.Tensor, ...]], batch_size: int) -> tuple[torch.Tensor, ...]:
    """Stack eval windows into a (batch_size, T) batch: a short one gets padding rows that count nowhere.

    Every batch then has one shape, so a compiled model never compiles again for the last one.
    A padding row's inputs are id 0 (in every vocabulary; rows do not see each other, so it moves
    nothing) and its targets IGNORE_INDEX, which the loss skips. Targets come out int64 whatever
    the windows held (the token files' uint16 cannot hold -100; a chat window's already are).
    Packed chat windows' positions (a third tensor) get a padding row of 0..T-1: one span.
    """
    inputs, targets, *positions = (torch.stack(column) for column in zip(*items))  # each (n, T), as stored
    targets = targets.long()
    missing = batch_size - len(items)
    if missing > 0:
        width = inputs.shape[1]
        inputs = torch.cat([inputs, inputs.new_full((missing, width), PAD_INPUT_ID)])
        targets = torch.cat([targets, targets.new_full((missing, width), IGNORE_INDEX)])
        positions = [torch.cat([p, torch.arange(width, dtype=p.dtype).expand(missing, width)]) for p in positions]
    return inputs, targets, *positions


def eval_loader(dataset: Dataset, batch_size: int, max_batches: int | None, rank: int = 0,
                world_size: int = 1) -> DataLoader:
    """A fixed, evenly spread subset of at most `max_batches` batches (None: every window).

    Every batch is (batch_size, T): a short last one is padded with rows whose targets are
    IGNORE_INDEX (`full_batch`), so its mean is that of its windows. `loader.batch_sampler` lists
    the windows of each batch (padding rows are none of them). With several processes, batch i
    goes to process i mod `world_size` (their loss sums are then added up: `gpt.distributed`).
    """
    if max_batches is None or batch_size * max_batches >= len(dataset):
        indices = list(range(len(dataset)))
    else:
        count = batch_size * max_batches
        indices = torch.linspace(0, len(dataset) - 1, count).round().long().unique().tolist()
    batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    # Its own generator: a DataLoader without one draws a seed from the global RNG each time it
    # is iterated, and evaluation must not move the RNG that training's dropout uses.
    return DataLoader(dataset, batch_sampler=batches[rank::world_size], generator=torch.Generator(),
                      collate_fn=functools.partial(full_batch, batch_size=batch_size))


# --------------------------------------------------------------------------- data formats

class TextFormat:
    """`data.format: text`: documents to continue, the loss on every token.

    A data format answers what train.py asks of the data; `gpt.chat.format.ChatFormat` answers the same.
    """

    name = "text"
    chat = False  # task prompts and samples are text to continue, not conversations
    records: dict = {}  # what its checkpoints record beside the run (a chat run's: its template)
    whole_val = ("val loss", "the val split")  # how the final whole-val line names its figure

    def model_config(self, cfg: ModelConfig) -> ModelConfig:
        """The model this format trains, from the one configured: that one."""
        return cfg

    def splits(self, cfg: DataConfig, context: int, dist: Distributed, say: Callable) -> tuple[Dataset, Dataset]:
        """The train and val windows of the configured corpus, prepared first where needed (rank 0 first)."""
        check_max_tokens(cfg, context + 1)  # before any reading: each split needs a window and its target
        prepared = dist.in_turn(lambda: prepare(cfg))  # rank 0 writes the token files, the rest read them
        train = load_split(prepared, "train", context, cfg.stride or context)
        return train, load_split(prepared, "val", context, context)

    def print_sample(self, model: torch.nn.Module, cfg: SampleConfig, device: torch.device) -> None:
        """A continuation of the sample prompt."""
        print_samples(model, cfg.prompt, cfg, device)


DataFormat = TextFormat  # the interface: gpt.chat.format.ChatFormat has the same names


def data_format(name: str) -> DataFormat:
    """The data format `data.format` names; chat's package is imported only for a chat run."""
    if name == "chat":
        from gpt.chat.format import ChatFormat
        return ChatFormat()
    return TextFormat()
