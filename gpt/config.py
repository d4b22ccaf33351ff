"""The whole configuration: four sections, each a dataclass.

    model:  gpt.model.ModelConfig (the architecture, beside the model)
    data:   DataConfig (below)          train: TrainConfig (below), with its LoRAConfig
    sample: gpt.sampling.SampleConfig (beside the sampler)

Defaults live only in those dataclasses; a YAML file (`yaml.safe_load`) sets what differs, and the
command line overrides fields as `--section.field=value` (`--train.lora.rank=8` for a nested one).
Loading is strict: an unknown key or a wrong type is an error naming the key and where it came from.
`DataConfig` and `TrainConfig` live here because several parts read each (the loop, the optimizers,
the data formats, LoRA); the loader comes after them.
"""

import dataclasses
import difflib
import types
import typing
from dataclasses import InitVar, dataclass, field
from pathlib import Path

import yaml

from gpt.attention import ATTENTION_IMPLS, DEFAULT_IMPL
from gpt.errors import UserError
from gpt.model import ModelConfig
from gpt.precision import DTYPES
from gpt.sampling import SampleConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
MOVED_TO_TRAIN = ("init_from", "attn_impl")  # once model settings: a run's, not the architecture's
OPTIMIZERS = ("adamw", "muon")  # what train.optimizer can name: gpt/optim.py builds them
FORMATS = ("text", "chat")  # what data.format can name: gpt.data.data_format picks the one a run reads
SHAKESPEARE = "shakespeare"  # the built-in corpus (gpt/corpus/shakespeare.py)
SCRATCH = "scratch"  # train.init_from for random weights; the others: gpt/checkpoint.py, build_model
GPT2_SIZES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # OpenAI's weights (gpt/gpt2/pretrained.py)


@dataclass
class DataConfig:
    """Which corpus to train on, how to prepare it and how to batch it."""

    format: str = "text"  # text (documents to continue) or chat (conversations: gpt/chat/template.py, gpt/chat/data.py)
    corpus: str = SHAKESPEARE  # "shakespeare", "shakespeare-chat" (format: chat), a .txt/.md/.jsonl/.jsonl.gz/.parquet file, a folder of them, or hf:NAME[:CONFIG]
    val_corpus: str | None = None  # a validation source of its own (any kind above), used whole; None: val_fraction of corpus
    text_field: str = "text"  # the field (JSONL, hf:) or column (Parquet) that holds each record's text
    hf_split: str = "train"  # the split an hf: source is read from
    max_tokens: int | None = None  # prepare at most this many tokens of corpus (its first ones); None: all
    num_proc: int | None = None  # processes that tokenise; None: one per core
    prepared_dir: str | None = None  # token files go here; default data/<corpus name>[-<hash>]/
    val_fraction: float = 0.1  # the last 10% of the tokens are the validation split (without val_corpus)
    stride: int | None = None  # window step in tokens; default: the context length (no overlap)
    batch_size: int = 16  # windows per micro-batch
    num_workers: int = 0  # DataLoader worker processes
    pack: bool = True  # chat: several conversations a window, each attending only to itself (gpt/chat/data.py)

    def __post_init__(self):
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be between 0 and 1, got {self.val_fraction}")
        if self.stride is not None and self.stride < 1:
            raise ValueError(f"data.stride must be at least 1, got {self.stride}")
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size must be at least 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be 0 or more, got {self.num_workers}")
        for name in ("max_tokens", "num_proc"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be at least 1 (or null), got {getattr(self, name)}")
        if self.format not in FORMATS:
            raise ValueError(f"data.format must be {' or '.join(FORMATS)}, got {self.format!r}")
        if not self.text_field or not self.hf_split:
            raise ValueError("data.text_field and data.hf_split must not be empty")


# The linears of a block that may take adapters, by the names `train.lora.targets` uses: each name's
# path in a block (`TransformerBlock`), and the two groups of them.
LINEARS = {"W_query": "att.W_query", "W_key": "att.W_key", "W_value": "att.W_value", "out_proj": "att.out_proj",
           "ff.fc": "ff.fc", "ff.proj": "ff.proj"}

GROUPS = {"attention": ("W_query", "W_key", "W_value", "out_proj"), "mlp": ("ff.fc", "ff.proj")}



@dataclass
class LoRAConfig:
    """Low-rank adapters instead of full fine-tuning (`train.lora`)."""

    rank: int = 8  # the adapters' inner dimension r
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.05  # on the adapters' input only
    targets: list[str] = field(default_factory=lambda: ["attention", "mlp"])  # groups or names of LINEARS

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"train.lora.rank must be at least 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"train.lora.alpha must be more than 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"train.lora.dropout must be in [0, 1), got {self.dropout}")
        unknown = [name for name in self.targets if name not in GROUPS and name not in LINEARS]
        if unknown or not self.targets:
            what = f"names {unknown[0]!r}, which is not a linear of the model" if unknown else "is empty"
            raise ValueError(f"train.lora.targets {what}; give {', '.join(GROUPS)} (groups) or "
                             f"{', '.join(LINEARS)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def paths(self) -> list[str]:
        """The targets as paths in a block (`att.W_query`, ...), each once, in the block's order."""
        names = {n for target in self.targets for n in GROUPS.get(target, (target,))}
        return [path for name, path in LINEARS.items() if name in names]


@dataclass
class TrainConfig:
    """Optimisation, evaluation and where the run is written."""

    out_dir: str = "runs/default"  # checkpoints go to <out_dir>/latest.pt and best.pt
    max_iters: int = 2000  # optimizer steps
    init_from: str = SCRATCH  # the starting weights: scratch, gpt2[-medium/-large/-xl], a run, or HF weights: gpt/gpt2/pretrained.py
    attn_impl: str = DEFAULT_IMPL  # attention through sdpa (the fused kernel) or explicit (the reference math): same weights, same results
    eval_interval: int = 200  # evaluate (and save) every this many steps, and at the end
    eval_iters: int = 20  # batches per periodic loss estimate
    whole_val_at_end: bool = True  # at the end, the val loss over every window: the figure to compare runs by
    learning_rate: float = 6e-4  # AdamW's peak (with muon: for embeddings, biases, LayerNorms), after warmup
    min_lr: float = 6e-5  # end of the cosine decay
    warmup_iters: int = 100
    weight_decay: float = 0.1  # on 2-D weights only
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    optimizer: str = "muon"  # muon (Muon for the blocks' matrices, AdamW for the rest) or adamw: gpt/optim.py
    muon_lr: float = 0.02  # Muon's peak lr; the schedule scales it like learning_rate
    muon_momentum: float = 0.95  # Nesterov momentum of Muon's updates
    muon_weight_decay: float = 0.0  # decoupled, on the matrices Muon updates
    grad_accum_steps: int = 1  # micro-batches per optimizer step, over all processes together
    seed: int = 1337
    device: str = "auto"  # auto picks cuda, then mps, then cpu
    dtype: str = "auto"  # auto, float32, bfloat16 or float16 (autocast; see pick_dtype)
    compile: bool | str = "auto"  # torch.compile: true, false, or auto (on for CUDA only)
    activation_checkpointing: bool = False  # recompute each block's activations in backward: less memory, more compute
    tensorboard: bool = False  # also log each evaluation to <out_dir>/tensorboard (gpt/metrics.py)
    eval_tasks: list[str] = field(default_factory=list)  # multiple-choice tasks scored at each evaluation: hellaswag, shakespeare-next-words or a JSONL file (gpt/tools/multiple_choice.py)
    eval_task_items: int | None = None  # score this fixed subset of each task's items; None: all of them
    lora: LoRAConfig | None = None  # low-rank adapters on a frozen init_from model instead of full fine-tuning: gpt/lora/

    def __post_init__(self):
        if not self.init_from:
            raise ValueError("train.init_from is empty; use scratch, a GPT-2 size or a path")
        if self.attn_impl not in ATTENTION_IMPLS:
            raise ValueError(f"train.attn_impl must be one of {', '.join(ATTENTION_IMPLS)}, got {self.attn_impl!r}")
        for name in ("max_iters", "eval_interval", "eval_iters", "grad_accum_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup_iters < 0:
            raise ValueError(f"train.warmup_iters must be 0 or more, got {self.warmup_iters}")
        if self.learning_rate <= 0 or self.min_lr < 0 or self.min_lr > self.learning_rate:
            raise ValueError("train.learning_rate must be > 0 and train.min_lr in [0, learning_rate]")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("train.grad_clip and train.weight_decay must be 0 or more")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"train.dtype must be auto, {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"train.optimizer must be {' or '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.muon_lr <= 0 or not 0 <= self.muon_momentum < 1 or self.muon_weight_decay < 0:
            raise ValueError("train.muon_lr must be > 0, train.muon_momentum in [0, 1) and "
                             "train.muon_weight_decay 0 or more")
        if self.compile not in (True, False, "auto"):
            raise ValueError(f"train.compile must be true, false or auto, got {self.compile!r}")
        if self.eval_task_items is not None and self.eval_task_items < 1:
            raise ValueError(f"train.eval_task_items must be at least 1 (or null), got {self.eval_task_items}")
        if self.lora is not None:
            self.lora.__post_init__()
            if self.optimizer == "muon":  # why not: gpt/lora/__init__.py
                raise ValueError("train.lora trains its adapters with AdamW, and train.optimizer is muon (for "
                                 "whole matrices); set train.optimizer: adamw")


@dataclass
class Config:
    """Everything a run needs; each part goes only to the code that owns it."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    given: InitVar[dict[str, set[str]] | None] = None

    def __post_init__(self, given: dict[str, set[str]] | None):
        # The keys the YAML and command line set, per section. Not a field, so never saved or
        # compared: a pretrained model takes the architecture fields nobody set from its weights.
        self.given_keys = given or {}


SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(Config)}


def resolve_config_path(name: str) -> Path:
    """`name` as given if it exists, else `configs/<name>` (so `--config small.yaml` works)."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    candidate = CONFIG_DIR / name
    if candidate.is_file():
        return candidate
    available = ", ".join(sorted(p.name for p in CONFIG_DIR.glob("*.yaml")))
    raise UserError(f"config {name!r} not found (looked in . and {CONFIG_DIR}); available: {available}")


def _coerce(value: object, annotation: object, where: str) -> object:
    """`value` checked against a field's type (int, float, bool, str, `X | None` or a list of str)."""
    if typing.get_origin(annotation) is list:  # a list of names; one name alone is a list of one
        names = [value] if isinstance(value, str) else value
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise UserError(f"{where} must be a list of names, got {value!r}")
        return list(names)
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if value is None:
        if type(None) in options:
            return None
        raise UserError(f"{where} must not be empty (null)")
    for kind in options:
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is float and isinstance(value, str):
            try:  # YAML 1.1 reads "1e-3" as a string; accept what Python reads as a number
                return float(value)
            except ValueError:
                pass
        if kind is str and isinstance(value, str):
            return value
    names = " or ".join("null" if k is type(None) else k.__name__ for k in options)
    raise UserError(f"{where} must be {names}, got {value!r}")


def _nested(annotation: object) -> type | None:
    """The dataclass of a field typed `SomeConfig | None` (a section within the section), else None."""
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    return next((kind for kind in options if dataclasses.is_dataclass(kind)), None)


def _apply(section: object, section_name: str, values: dict, source: str) -> None:
    """Set `values` on one section dataclass, checking each key and type."""
    hints = typing.get_type_hints(type(section))
    for key, value in values.items():
        if section_name == "model" and key in MOVED_TO_TRAIN:
            raise UserError(f"model.{key} in {source} is a setting of the run, not of the architecture: "
                            f"write it as train.{key}")
        if key not in hints:
            # A near miss only (n_layer, max_iter): at difflib's default 0.6, lr would suggest lora.
            close = difflib.get_close_matches(str(key), hints, n=1, cutoff=0.7)
            hint = f"; did you mean {section_name}.{close[0]}?" if close else (
                f"; known keys: {', '.join(hints)}")
            raise UserError(f"unknown key {section_name}.{key} in {source}{hint}")
        nested = _nested(hints[key])
        if nested is not None and value is not None:
            if not isinstance(value, dict):
                raise UserError(f"{section_name}.{key} in {source} must be a mapping of "
                                f"{', '.join(typing.get_type_hints(nested))} (or null to turn it off), got {value!r}")
            inner = getattr(section, key) or nested()  # on what earlier layers set, else the defaults
            _apply(inner, f"{section_name}.{key}", value, source)
            value = inner
        else:
            value = _coerce(value, hints[key], f"{section_name}.{key} in {source}")
        setattr(section, key, value)


def _check_sections(raw: object, source: str) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"{source} must be a mapping of sections ({', '.join(SECTIONS)})")
    for name, values in raw.items():
        if name not in SECTIONS:
            raise UserError(f"unknown section {name!r} in {source}; sections are {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise UserError(f"section {name!r} in {source} must be a mapping of key: value")
    return raw


def _join_spaced(items: list[str]) -> list[str]:
    """['--a.b', '3'] -> ['--a.b=3'], so both `--a.b=3` and `--a.b 3` work."""
    joined: list[str] = []
    for item in items:
        if joined and "=" not in joined[-1] and not item.startswith("--"):
            joined[-1] = f"{joined[-1]}={item}"
        else:
            joined.append(item)
    return joined


def parse_overrides(overrides: list[str]) -> dict:
    """['--train.max_iters=20', ...] -> {'train': {'max_iters': 20}} (values read as YAML)."""
    result: dict = {}
    for item in _join_spaced(overrides):
        if not item.startswith("--"):
            raise UserError(f"unexpected argument {item!r}; overrides are --section.key=value "
                            "and a config file goes after --config")
        body = item[2:]
        key, sep, text = body.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise UserError(f"cannot read override {item!r}; write it as --section.key=value")
        if section not in SECTIONS:
            raise UserError(f"unknown section in override {item!r}; sections are {', '.join(SECTIONS)}")
        *outer, field_name = name.split(".")  # --train.lora.rank: field rank of train's field lora
        owner: object = SECTIONS[section]
        for part in outer:
            owner = _nested(typing.get_type_hints(owner).get(part)) if owner is not None else None
        hints = typing.get_type_hints(owner) if owner is not None else {}
        if hints.get(field_name) in (str, str | None) and text not in ("null", "~"):
            value: object = text  # strings stay as typed: --data.corpus=2024 is a path
        else:
            try:
                value = yaml.safe_load(text)
            except yaml.YAMLError:
                value = text
        values = result.setdefault(section, {})
        for part in outer:
            if not isinstance(values.get(part), dict):  # --train.lora.rank=8 after --train.lora=null: on again
                values[part] = {}
            values = values[part]
        values[field_name] = value
    return result


def build_config(layers: list[tuple[dict, str]]) -> Config:
    """A Config from the defaults plus each (values, source) layer in order, then validated."""
    sections = {name: factory() for name, factory in SECTIONS.items()}
    given: dict[str, set[str]] = {name: set() for name in SECTIONS}
    for values, source in layers:
        for name, section_values in _check_sections(values, source).items():
            _apply(sections[name], name, section_values, source)
            given[name].update(section_values)
    try:
        for section in sections.values():
            section.__post_init__()  # re-run each dataclass's own checks on the final values
    except ValueError as e:
        sources = " and ".join(source for _, source in layers) or "the defaults"
        raise UserError(f"{e} (in {sources})") from None
    return Config(**sections, given=given)


def load_config(name: str | None, overrides: list[str] = ()) -> Config:
    """Defaults <- YAML file `name` (if given) <- `--section.key=value` overrides."""
    layers = []
    if name is not None:
        path = resolve_config_path(name)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark else ""
            raise UserError(f"{path} is not valid YAML{at}; fix the syntax") from None
        except UnicodeDecodeError:
            raise UserError(f"{path} is not UTF-8 text; save it as UTF-8") from None
        layers.append((raw, str(path)))
    if overrides:
        layers.append((parse_overrides(list(overrides)), "the command line"))
    return build_config(layers)


def config_from_dict(values: dict, source: str = "checkpoint") -> Config:
    """The `Config` a checkpoint stores as plain data (`dataclasses.asdict`), with the same strict checks.

    A checkpoint written before `init_from` and `attn_impl` moved to the train section has them in model."""
    if isinstance(values, dict) and isinstance(values.get("model"), dict) and isinstance(values.get("train"), dict):
        moved = {key: values["model"][key] for key in MOVED_TO_TRAIN if key in values["model"]}
        values = {**values, "model": {k: v for k, v in values["model"].items() if k not in moved},
                  "train": {**moved, **values["train"]}}
    return build_config([(values, source)])
