"""`python -m gpt export RUN OUT.gguf`: a trained run as one GGUF file, for llama.cpp, ollama and LM Studio.

llama.cpp computes GPT-2's architecture natively (`gpt2`), so a run goes into one file that it loads as
it is: the weights, the hyperparameters and GPT-2's BPE tokenizer, written with llama.cpp's own Python
package for the format, `gguf` (this module writes no byte of the layout itself). The file is what
llama.cpp's `convert_hf_to_gguf.py` makes of the run's Hugging Face export (`gpt.gpt2.export`), built
the same way without the round trip through files:

- the tensors are `to_hf_state_dict`'s (query, key and value fused, zero attention biases for a model
  trained without them, the padding rows of the vocabulary left out), `Conv1D` weights transposed back to
  (out, in), and named by gguf's own map of GPT-2's names (`get_tensor_name_map`); the head is tied, so
  no `output.weight` is written and llama.cpp uses `token_embd.weight` for it, as for OpenAI's GPT-2;
- the hyperparameters are read off `to_hf_config`, the keys the converter reads (n_ctx, n_embd, ...);
- the tensor types follow the converter: `--dtype` (f32, f16 or q8_0) for the matrices, float32 for
  norms, biases and the position table;
- the tokenizer is GPT-2's `encoder.json` and `vocab.bpe` (`gpt.tokenizer.bpe_files`) as llama.cpp's
  `gpt2` BPE with GPT-2's pre-tokenizer, `<|endoftext|>` a control token, BOS and EOS, and no BOS added
  in front of a prompt (generate.py adds none). A chat run (`gpt.chat.template`) adds its four markers as
  control tokens, `<|end|>` as the end of a turn, and its template as Jinja in `tokenizer.chat_template`,
  the one its Hugging Face export carries (`gpt.chat.template.jinja_template`).

A model llama.cpp's `gpt2` cannot hold is refused before anything is written: a vocabulary that is not
GPT-2's (the file carries GPT-2's tokenizer), and for q8_0 rows that do not split into its blocks of 32.
The file is written to a temporary file beside OUT and moved into place, so a failed export leaves
nothing behind, and an existing OUT is replaced only with `--overwrite`.
"""

import json
import os
from pathlib import Path

import numpy as np
import torch

from gpt.checkpoint import checkpoint_path, load_checkpoint, load_model  # load_model: the one loader of a run
from gpt.config import config_from_dict
from gpt.errors import UserError
from gpt.gpt2.hf_format import HF_PREFIX, to_hf_config, to_hf_state_dict
from gpt.model import GPTModel, ModelConfig
from gpt.tokenizer import EOT_ID, EOT_TOKEN, bpe_files

SUFFIX = ".gguf"
DTYPES = ("f32", "f16", "q8_0")  # --dtype
DEFAULT_DTYPE = "f16"
Q8_BLOCK = 32  # values per q8_0 block (one float16 scale each): a row must split into whole blocks
ARCH = "gpt2"  # llama.cpp's name for GPT-2's architecture
TOKENIZER_MODEL, TOKENIZER_PRE = "gpt2", "gpt-2"  # byte-level BPE, GPT-2's split of text into words
CONV1D_WEIGHTS = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")  # (in, out) in HF's layout
GPT2_VOCAB = EOT_ID + 1  # 50257 ids: GPT-2's BPE


def gguf_module():
    """The `gguf` package, or a UserError saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise UserError('writing GGUF needs the gguf package: pip install gguf, or pip install -e ".[gguf]"') from None
    return gguf


def wants_gguf(out: str | Path, fmt: str | None) -> bool:
    """True when the export writes GGUF: `--format gguf`, or no `--format` and OUT ending in .gguf."""
    return fmt == "gguf" if fmt is not None else str(out).lower().endswith(SUFFIX)


def check_exportable(cfg: ModelConfig, chat_template: dict | None, dtype: str, source: object) -> None:
    """A UserError naming the setting if the file could not hold `cfg` (or `dtype` could not store it)."""
    markers = chat_template["tokens"] if chat_template is not None else {}
    if cfg.vocab_size != GPT2_VOCAB + len(markers) or sorted(markers.values()) != list(range(GPT2_VOCAB, cfg.vocab_size)):
        kind = f"{GPT2_VOCAB} ids" + (f", {GPT2_VOCAB + len(markers)} with its chat template's markers" if markers else "")
        raise UserError(f"{source} has model.vocab_size {cfg.vocab_size}, and a GGUF file for llama.cpp's gpt2 carries "
                        f"GPT-2's tokenizer ({kind}); export it to Hugging Face's format instead (an OUT_DIR not "
                        "ending in .gguf)")
    if dtype == "q8_0" and cfg.emb_dim % Q8_BLOCK:
        raise UserError(f"--dtype q8_0 stores each row of weights in blocks of {Q8_BLOCK} values, and {source} has "
                        f"model.emb_dim {cfg.emb_dim}, not a multiple of {Q8_BLOCK}; use --dtype f16 or f32")


def gguf_tensors(model: GPTModel) -> dict[str, np.ndarray]:
    """The model's tensors as llama.cpp's gpt2 reads them: float32, by GGUF name, Linear's (out, in) layout."""
    gguf = gguf_module()
    cfg = model.cfg
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, cfg.n_layers)
    out = {}
    with torch.no_grad():
        for name, tensor in to_hf_state_dict(model.state_dict(), cfg).items():
            if name.endswith(CONV1D_WEIGHTS):
                tensor = tensor.t()  # back to (out, in): numpy's row-major (rows, cols) is ggml's {cols, rows}
            new_name = names.get_name(name.removeprefix(HF_PREFIX), try_suffixes=(".weight", ".bias"))
            if new_name is None:  # a tensor gguf's map of GPT-2 does not know: a bug here, not the user's
                raise ValueError(f"no GGUF name for {name}")
            out[new_name] = tensor.contiguous().numpy()
    return out


def tensor_type(gguf, name: str, data: np.ndarray, dtype: str):
    """The GGML type of one tensor, as convert_hf_to_gguf.py picks it: float32 for norms, biases and the
    position table (what llama.cpp computes them in), `dtype` for the matrices."""
    types = gguf.GGMLQuantizationType
    if data.ndim <= 1 or name.endswith("_norm.weight") or name.startswith(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.POS_EMBD]):
        return types.F32
    return {"f32": types.F32, "f16": types.F16, "q8_0": types.Q8_0}[dtype]


def bpe_tokens(vocab_size: int, chat_template: dict | None) -> tuple[list[str], list[str]]:
    """(tokens by id, merges) of GPT-2's BPE, with a chat template's markers after its 50,257 tokens."""
    vocab_bpe, encoder_json = bpe_files()
    encoder = json.loads(Path(encoder_json).read_text(encoding="utf-8"))  # byte-level token text -> id
    markers = chat_template["tokens"] if chat_template is not None else {}  # marker -> id, from 50257 on
    tokens = sorted(encoder, key=encoder.__getitem__) + sorted(markers, key=markers.__getitem__)
    assert len(tokens) == vocab_size and tokens[EOT_ID] == EOT_TOKEN  # as check_exportable ensures
    lines = Path(vocab_bpe).read_text(encoding="utf-8").splitlines()
    merges = [" ".join(line.split()) for line in lines[1:] if line.strip()]  # after the "#version" line
    return tokens, merges


def write_gguf(model: GPTModel, path: Path, dtype: str = DEFAULT_DTYPE, chat_template: dict | None = None,
               name: str = "gpt") -> None:
    """Write `model` (over GPT-2's vocabulary, `check_exportable`) to `path` as a GGUF file for llama.cpp."""
    gguf = gguf_module()
    cfg = model.cfg
    hf = to_hf_config(cfg)  # the keys convert_hf_to_gguf.py reads for GPT-2
    writer = gguf.GGUFWriter(path, ARCH)
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name)
        writer.add_context_length(hf["n_ctx"])
        writer.add_embedding_length(hf["n_embd"])
        writer.add_feed_forward_length(4 * hf["n_embd"])
        writer.add_block_count(hf["n_layer"])
        writer.add_head_count(hf["n_head"])
        writer.add_layer_norm_eps(hf["layer_norm_epsilon"])
        file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                      "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
        writer.add_file_type(file_types[dtype])
        if dtype == "q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

        tokens, merges = bpe_tokens(cfg.vocab_size, chat_template)
        writer.add_tokenizer_model(TOKENIZER_MODEL)
        writer.add_tokenizer_pre(TOKENIZER_PRE)
        writer.add_token_list(tokens)
        control = {EOT_ID, *(chat_template["tokens"].values() if chat_template else ())}
        writer.add_token_types([gguf.TokenType.CONTROL if i in control else gguf.TokenType.NORMAL
                                for i in range(len(tokens))])
        writer.add_token_merges(merges)
        writer.add_bos_token_id(EOT_ID)
        writer.add_eos_token_id(EOT_ID)
        writer.add_add_bos_token(False)  # a prompt is its own tokens, as generate.py encodes it
        writer.add_add_eos_token(False)
        if chat_template is not None:  # a reply ends at <|end|>; the template starts with <|endoftext|>
            from gpt.chat.template import jinja_template  # the chat tool, for a chat run only
            writer.add_eot_token_id(chat_template["tokens"]["<|end|>"])
            writer.add_chat_template(jinja_template())

        for tensor_name, data in gguf_tensors(model).items():
            qtype = tensor_type(gguf, tensor_name, data, dtype)
            writer.add_tensor(tensor_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def publish(out: Path, write) -> None:
    """Call `write(tmp)` for a temporary file beside `out`, then move it to `out` in one step; on any
    failure (or Ctrl-C) the temporary file is removed, and so are the folders made for it."""
    made = [p for p in (out.parent, *out.parent.parents) if not p.exists()]  # deepest first
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        with open(tmp, "rb+") as f:  # on disk before the rename makes it OUT
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except OSError as e:
        _remove(tmp, made)
        raise UserError(f"cannot write {out} ({e.strerror or e}); nothing was written: choose a folder you "
                        "can write to, with room for the file") from None
    except BaseException:
        _remove(tmp, made)
        raise


def _remove(tmp: Path, made: list[Path]) -> None:
    """Remove the temporary file, then the folders made for it (deepest first), if they are empty."""
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        pass
    for folder in made:
        try:
            folder.rmdir()
        except OSError:
            pass


def export_run(run_dir: str | Path, out: str | Path, dtype: str = DEFAULT_DTYPE, overwrite: bool = False) -> Path:
    """Export the checkpoint of `run_dir` (a run folder or checkpoint file) to the GGUF file `out`.

    Everything that can be wrong with the input is found before the weights are read or a file is made.
    """
    out = Path(out).expanduser()
    if out.is_dir():
        raise UserError(f"{out} is a folder; give the GGUF file to write, e.g. {out / 'model.gguf'}")
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; choose another name or pass --overwrite to replace it")
    path = checkpoint_path(run_dir)
    saved = load_checkpoint(path, mmap=True)  # the config and template; the weights stay unread
    cfg = config_from_dict(saved["config"], source=str(path)).model
    template = saved.get("chat_template")
    if template is not None:  # a chat run: this version's template, or the file would render another
        from gpt.chat.template import check_template
        check_template(template, path)
    check_exportable(cfg, template, dtype, path)
    gguf_module()
    model, _ = load_model(path, "cpu")
    publish(out, lambda tmp: write_gguf(model, tmp, dtype, template, name=path.parent.name or path.stem))
    return out
