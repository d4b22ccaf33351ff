"""`python -m gpt export RUN_DIR OUT_DIR`: a trained run as a Hugging Face GPT-2 model folder.

OUT_DIR gets `config.json` and `model.safetensors` in the layout `GPT2LMHeadModel` reads
(`gpt/gpt2/hf_format.py`), so `transformers.GPT2LMHeadModel.from_pretrained(OUT_DIR)` gives the same
logits as the run's own model; so do `train.init_from: OUT_DIR` and `generate.py --checkpoint
OUT_DIR` here. For a model over the full GPT-2 vocabulary it also gets the tokenizer files
`GPT2Tokenizer` reads (`vocab.json` and `merges.txt` are GPT-2's `encoder.json` and
`vocab.bpe`, the files this project tokenises with), so `pipeline("text-generation", OUT_DIR)`
works as it is. A chat run (`gpt.chat.template`) carries its template too: its four marker tokens (ids
50257..50260) as added special tokens and a Jinja `chat_template` in `tokenizer_config.json`, so
`tokenizer.apply_chat_template(messages, add_generation_prompt=True)` gives the ids chat.py feeds
the model. A non-empty OUT_DIR is left alone unless `--overwrite` is given.

An OUT ending in .gguf (or `--format gguf`) writes one GGUF file for llama.cpp instead:
`gpt/gpt2/gguf_export.py`.
"""

import json
import shutil
import sys
from pathlib import Path

from gpt.checkpoint import checkpoint_path, load_checkpoint, load_model
from gpt.errors import ArgumentParser, UserError, run_cli
from gpt.gpt2.hf_format import to_hf_config, to_hf_state_dict
from gpt.model import GPTModel
from gpt.tokenizer import EOT_ID, EOT_TOKEN, bpe_files

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILES = {"vocab.json": "encoder.json", "merges.txt": "vocab.bpe"}  # theirs: ours
TOKENIZER_CONFIG = "tokenizer_config.json"  # a chat run's: its template's tokens and chat_template


def chat_tokenizer_config(template: dict) -> dict:
    """`tokenizer_config.json` for a chat run: the template's markers as added special tokens (their
    ids follow GPT-2's 50,257, as here) and the template as a Jinja `chat_template`, so
    `tokenizer.apply_chat_template` gives the ids `gpt.chat.template.render_prompt` gives (for content that
    spells no marker: Hugging Face's tokenizer turns such text into the marker, ours keeps it text)."""
    from gpt.chat.template import jinja_template  # the chat tool, for a chat run only
    tokens = {EOT_TOKEN: EOT_ID, **template["tokens"]}
    end = next(t for t in template["tokens"] if t == "<|end|>")
    return {
        "tokenizer_class": "GPT2Tokenizer", "model_max_length": None, "add_prefix_space": False,
        "bos_token": EOT_TOKEN, "eos_token": end, "unk_token": EOT_TOKEN, "pad_token": EOT_TOKEN,
        "added_tokens_decoder": {str(i): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                          "normalized": False, "single_word": False} for t, i in tokens.items()},
        "chat_template": jinja_template(), "gpt_chat_template": template,
    }


def export_model(model: GPTModel, out_dir: Path, chat_template: dict | None = None) -> list[Path]:
    """Write `model` to `out_dir` as a Hugging Face GPT-2 model; return the files written.

    A chat model (`chat_template` from its checkpoint) also gets `tokenizer_config.json` with the
    template's tokens and a Jinja chat template (`chat_tokenizer_config`).
    """
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise UserError("exporting needs safetensors: pip install safetensors (the [hf] extra)") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    written = [out_dir / CONFIG_FILE, out_dir / WEIGHTS_FILE]
    chat = chat_template is not None and cfg.vocab_size == EOT_ID + 1 + len(chat_template["tokens"])
    hf_config = to_hf_config(cfg)
    if chat:  # generation ends a reply at the end-of-turn token
        hf_config["eos_token_id"] = chat_template["tokens"]["<|end|>"]
    written[0].write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
    # metadata format=pt: transformers checks it to know the tensors are PyTorch's.
    save_file(to_hf_state_dict(model.state_dict(), cfg), str(written[1]), metadata={"format": "pt"})
    if cfg.vocab_size == EOT_ID + 1 or chat:  # the GPT-2 BPE vocabulary: ship its tokenizer too
        ours = dict(zip(("vocab.bpe", "encoder.json"), map(Path, bpe_files())))
        for theirs, name in TOKENIZER_FILES.items():
            written.append(Path(shutil.copyfile(ours[name], out_dir / theirs)))
    if chat:
        written.append(out_dir / TOKENIZER_CONFIG)
        written[-1].write_text(json.dumps(chat_tokenizer_config(chat_template), indent=2) + "\n", encoding="utf-8")
    return written


def export_run(run_dir: str | Path, out_dir: str | Path, overwrite: bool) -> list[Path]:
    """Export the checkpoint of `run_dir` (a run folder or checkpoint file) to `out_dir`."""
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} is a file; give a folder to export into")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"{out_dir} is not empty; choose a new folder or pass --overwrite")
    model, _ = load_model(run_dir, "cpu")
    template = load_checkpoint(checkpoint_path(run_dir)).get("chat_template")
    try:
        return export_model(model, out_dir, template)
    except OSError as e:
        raise UserError(f"cannot write to {out_dir} ({e.strerror}); choose a folder you can write to") from None


def main(argv: list[str] | None = None) -> int:
    from gpt.gpt2 import gguf_export  # GGUF: OUT ending in .gguf, or --format gguf

    parser = ArgumentParser(prog="python -m gpt export",
                            description="Write a trained run as a Hugging Face GPT-2 model "
                            "(config.json + model.safetensors) that transformers can load, or as one GGUF "
                            "file for llama.cpp, ollama and LM Studio (OUT ending in .gguf).")
    parser.add_argument("run_dir", help="a run folder (train.out_dir) or a checkpoint file")
    parser.add_argument("out_dir", metavar="OUT", help="the folder to write the Hugging Face model into, "
                        "or the .gguf file to write")
    parser.add_argument("--format", choices=("hf", "gguf"),
                        help="hf (a folder) or gguf (one file); by default gguf for an OUT ending in .gguf")
    parser.add_argument("--dtype", choices=gguf_export.DTYPES,
                        help=f"GGUF only: the weights' type (default {gguf_export.DEFAULT_DTYPE})")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty out_dir, or replace OUT.gguf")
    args = parser.parse_args(argv)

    def work() -> None:
        if gguf_export.wants_gguf(args.out_dir, args.format):
            dtype = args.dtype or gguf_export.DEFAULT_DTYPE
            out = gguf_export.export_run(args.run_dir, args.out_dir, dtype, args.overwrite)
            print(f"wrote {out} ({dtype}, {out.stat().st_size / 1e6:,.1f} MB)")
            return
        if args.dtype is not None:
            raise UserError(f"--dtype is for a GGUF file (OUT ending in .gguf, or --format gguf); the Hugging "
                            f"Face export into {args.out_dir} writes float32")
        files = export_run(args.run_dir, args.out_dir, args.overwrite)
        print(f"wrote {', '.join(f.name for f in files)} to {Path(args.out_dir)}")

    return run_cli(work)


if __name__ == "__main__":
    sys.exit(main())
