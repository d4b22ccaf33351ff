"""LoRA: fine-tune a pretrained GPT through small low-rank adapters, its own weights frozen.

`train.lora` wraps the chosen linears of every block in a `LoRALinear`: y = W x + b + (alpha / rank)
B A dropout(x), W and b frozen, A initialised as nn.Linear's own and B at zero, so the model starts
as its base exactly. A chat run's new token rows are a small trainable `NewTokenRows`, spliced into
the frozen tied embedding by a parametrization. Checkpoints hold only what trains, plus a record of
the base (`train.init_from` and a sha256 of its weights), so a changed base is refused; every reader
gets a plain `GPTModel` with the adapters merged in. Muon is refused: an orthogonalised update of a
rank-8 factor is not the low-rank step LoRA is tuned for.

A seam of `gpt.checkpoint`'s builder: it imports this package only for a run with `train.lora`, and
hands `lora_model` and `merged_model` a function that builds the base, so nothing here builds a model.
"""

import hashlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from gpt.config import GPT2_SIZES, LoRAConfig, SCRATCH, TrainConfig
from gpt.errors import UserError
from gpt.model import GPTModel

LORA_BASE = "lora_base"  # the checkpoint key of the base's record (`base_record`)


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update: base(x) + scale * B(A(dropout(x)))."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        kind = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_a = nn.Linear(base.in_features, rank, bias=False, **kind)  # (rank, in): nn.Linear's init
        self.lora_b = nn.Linear(rank, base.out_features, bias=False, **kind)  # (out, rank)
        nn.init.zeros_(self.lora_b.weight)  # B A = 0: the adapted model starts as its base
        self.dropout = nn.Dropout(dropout)
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_b(self.lora_a(self.dropout(x))) * self.scale

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain nn.Linear computing the same: weight W + scale * B A, the base's bias."""
        linear = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                           device=self.base.weight.device, dtype=self.base.weight.dtype)
        linear.weight.copy_(self.base.weight + (self.lora_b.weight @ self.lora_a.weight) * self.scale)
        if self.base.bias is not None:
            linear.bias.copy_(self.base.bias)
        return linear


class NewTokenRows(nn.Module):
    """A parametrization: the frozen (padded_vocab, emb_dim) embedding with rows `start`..`start + n`
    replaced by this module's trainable `rows` (n, emb_dim); the other rows are the frozen ones."""

    def __init__(self, start: int, rows: torch.Tensor):
        super().__init__()
        self.start = start
        self.rows = nn.Parameter(rows.detach().clone())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.cat([weight[:self.start], self.rows, weight[self.start + len(self.rows):]])


def add_adapters(model: GPTModel, cfg: LoRAConfig, new_rows: range = range(0)) -> GPTModel:
    """Freeze every weight of `model` and give it trainable adapters, in place: a `LoRALinear` for each
    of `cfg`'s linears in every block, and trainable token rows `new_rows` (ids the base lacks).

    A and B are drawn from torch's RNG, so a seeded run gets the same adapters every time.
    """
    model.requires_grad_(False)
    for block in model.trf_blocks:
        for path in cfg.paths():
            parent_path, _, name = path.rpartition(".")
            parent = block.get_submodule(parent_path)
            setattr(parent, name, LoRALinear(getattr(parent, name), cfg.rank, cfg.alpha, cfg.dropout))
    if len(new_rows):
        rows = NewTokenRows(new_rows.start, model.tok_emb.weight[new_rows.start:new_rows.stop])
        # One module on both: the embedding and the tied head keep sharing every row, the new ones included.
        parametrize.register_parametrization(model.tok_emb, "weight", rows)
        parametrize.register_parametrization(model.out_head, "weight", rows)
    return model


def is_adapted(model: nn.Module) -> bool:
    """True for a model `add_adapters` gave adapters (and not yet merged)."""
    return any(isinstance(m, LoRALinear) for m in model.modules())


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train, by name: a LoRA model's adapters and new token rows, no base weight."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `trainable_state`'s tensors back into `model`; a RuntimeError naming the first that does not fit."""
    wanted = set(trainable_state(model))
    missing, unexpected = sorted(wanted - set(state)), sorted(set(state) - wanted)
    if missing or unexpected:
        raise RuntimeError("the adapters differ:\n" + (f'missing "{missing[0]}"' if missing
                                                        else f'unexpected "{unexpected[0]}"'))
    model.load_state_dict(state, strict=False)  # the frozen base is not in `state`; a wrong shape still raises


@torch.no_grad()
def merge(model: GPTModel) -> GPTModel:
    """`model` with its adapters folded in, in place: a plain GPTModel again (every LoRALinear an
    nn.Linear of W + scale B A, the new token rows part of the tied embedding), every weight trainable."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_path, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_path), child, module.merged())
    if parametrize.is_parametrized(model.tok_emb):
        weight = model.tok_emb.weight.clone()  # (padded_vocab, emb_dim): the frozen rows and the new ones
        parametrize.remove_parametrizations(model.tok_emb, "weight", leave_parametrized=False)
        parametrize.remove_parametrizations(model.out_head, "weight", leave_parametrized=False)
        model.tok_emb.weight = nn.Parameter(weight)
        model.out_head.weight = model.tok_emb.weight  # tied again
    return model.requires_grad_(True)


def fingerprint(model: nn.Module) -> str:
    """sha256 over every parameter of `model` (name, dtype, shape and bytes, tied ones once): the
    identity of a LoRA run's base, taken as it was loaded, before adapters."""
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        digest.update(f"{name} {p.dtype} {tuple(p.shape)}\n".encode())
        digest.update(p.detach().cpu().contiguous().flatten().view(torch.uint8).numpy())
    return digest.hexdigest()


def base_record(init_from: str, base: nn.Module, new_rows: range) -> dict:
    """What a LoRA run's checkpoints record of its base (under `LORA_BASE`)."""
    return {"init_from": init_from, "sha256": fingerprint(base), "new_token_rows": [new_rows.start, new_rows.stop]}


def adapters_line(model: nn.Module, cfg: LoRAConfig) -> str:
    """One line: where the adapters are and how many parameters train, of how many."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    rows = sum(p.numel() for name, p in model.named_parameters() if name.endswith(".rows"))
    new_rows = f" and {rows // model.cfg.emb_dim} new token rows" if rows else ""
    return (f"LoRA: rank {cfg.rank}, alpha {cfg.alpha:g} on {', '.join(cfg.paths())} of {model.cfg.n_layers} blocks"
            f"{new_rows}: {trainable:,} trainable parameters ({100 * trainable / total:.2f}% of {total:,}), "
            "the rest frozen")


def lora_model(cfg: TrainConfig, build_base: Callable[[], GPTModel], new_rows: range,
               resumed: tuple[Path, dict] | None = None) -> tuple[GPTModel, dict]:
    """A LoRA run's model (`build_base()`: `cfg.init_from`'s weights, frozen, with fresh adapters and trainable
    token rows `new_rows`) and the record of its base that its checkpoints keep (`base_record`).

    With `resumed`, a checkpoint read from a path, the base must be the one it records: a UserError if
    it cannot be loaded or its weights changed (the adapters only mean something on their own base).
    """
    if cfg.init_from == SCRATCH:
        raise UserError("train.lora tunes adapters on pretrained weights, and train.init_from is scratch (random "
                        f"weights, which adapters cannot teach); set train.init_from to {', '.join(GPT2_SIZES)}, a "
                        "run folder or Hugging Face weights, or leave train.lora out to train every weight")
    saved = resumed[1].get(LORA_BASE) if resumed is not None else None
    if resumed is not None and not (isinstance(saved, dict) and {"init_from", "sha256"} <= set(saved)):
        raise UserError(f"{resumed[0]} is a LoRA run's checkpoint without the record of its base ({LORA_BASE}); "
                        "the file was damaged or edited: use another checkpoint")
    try:
        base = build_base()
    except UserError as e:
        if resumed is None:
            raise
        raise UserError(f"{resumed[0]} holds LoRA adapters, not a whole model, and their base cannot be loaded: "
                        f"{e}") from None
    record = base_record(cfg.init_from, base, new_rows)
    if saved is not None and saved["sha256"] != record["sha256"]:
        raise UserError(f"{resumed[0]} holds LoRA adapters for train.init_from {saved['init_from']!r} with weights of "
                        f"sha256 {saved['sha256'][:12]}..., and {cfg.init_from!r} now has other weights "
                        f"(sha256 {record['sha256'][:12]}...); put back the weights the adapters were tuned on, or "
                        "fine-tune again on these")
    return add_adapters(base, cfg.lora, new_rows), record


def saved_rows(state: dict) -> range:
    """The new token rows a LoRA run's checkpoint `state` records of its base (none if it records none)."""
    saved = state.get(LORA_BASE)
    rows = saved.get("new_token_rows") if isinstance(saved, dict) else None
    return range(*rows) if isinstance(rows, list) and len(rows) == 2 else range(0)


def merged_model(cfg: TrainConfig, build_base: Callable[[], GPTModel], state: dict, path: Path,
                 load_weights: Callable[[nn.Module, dict, Path], None]) -> GPTModel:
    """A LoRA run's model from its checkpoint `state` read from `path`: the base, checked, with the saved
    adapters loaded (`load_weights`) and merged in, a plain GPTModel."""
    model, _ = lora_model(cfg, build_base, saved_rows(state), (path, state))
    load_weights(model, state["model"], path)
    return merge(model)
