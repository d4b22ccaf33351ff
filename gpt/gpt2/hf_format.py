"""Hugging Face's GPT-2 format, both ways: its `config.json` and weight layout <-> ours.

OpenAI's released GPT-2 weights, as Hugging Face hosts them, and anything `GPT2LMHeadModel`
saves, compute exactly what `GPTModel` computes (pre-LayerNorm blocks, tanh GELU = `gelu_new`,
LayerNorm eps 1e-5, tied head). Only the layout differs:

- its `Conv1D` layers store weights as (in, out), the transpose of `nn.Linear`'s (out, in);
- query, key and value are one fused `c_attn` of (emb, 3 * emb): columns [0, E) are the
  query, [E, 2E) the key, [2E, 3E) the value;
- the head is tied to `wte` and not stored (or stored as the same values); our embedding has
  zero padding rows past `vocab_size`, which are never written out;
- the position table has `n_positions` rows; a model with a shorter `context_length` keeps the
  first ones (positions past the context are never looked up).

GPT-2 always has attention biases; a model trained with `qkv_bias: false` is written with zero
ones, which computes the same thing. Names map one to one, in `BLOCK_LINEARS` and `BLOCK_NORMS`.
"""

import torch

from gpt.errors import UserError
from gpt.model import ModelConfig

HF_PREFIX = "transformer."  # GPT2LMHeadModel's body; OpenAI's own upload has no prefix
# Per block, ours -> theirs. Linear weights are transposed on the way; LayerNorms copied.
BLOCK_LINEARS = {"att.out_proj": "attn.c_proj", "ff.fc": "mlp.c_fc", "ff.proj": "mlp.c_proj"}
BLOCK_NORMS = {"norm1": "ln_1", "norm2": "ln_2"}
GPT2_HEADS = {768: 12, 1024: 16, 1280: 20, 1600: 25}  # n_embd -> n_head of the released sizes
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")  # both are the tanh approximation nn.GELU uses
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, what GPTModel uses


def normalise_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensor names without the `transformer.` prefix, and without stored attention masks."""
    out = {}
    for name, tensor in state.items():
        name = name.removeprefix(HF_PREFIX)
        # Older files store each layer's causal mask as a buffer (attn.bias, attn.masked_bias).
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        out[name] = tensor
    return out


def check_supported(hf_config: dict, source: str) -> None:
    """A UserError if `config.json` describes a GPT-2 variant that GPTModel does not compute."""
    problems = []
    if hf_config.get("model_type", "gpt2") != "gpt2":
        problems.append(f"model_type {hf_config['model_type']!r} (only gpt2)")
    if hf_config.get("activation_function", "gelu_new") not in TANH_GELUS:
        problems.append(f"activation_function {hf_config['activation_function']!r} (only gelu_new)")
    if abs(hf_config.get("layer_norm_epsilon", LAYER_NORM_EPS) - LAYER_NORM_EPS) > 1e-12:
        problems.append(f"layer_norm_epsilon {hf_config['layer_norm_epsilon']} (only {LAYER_NORM_EPS})")
    n_inner = hf_config.get("n_inner")
    if n_inner is not None and n_inner != 4 * hf_config.get("n_embd", 0):
        problems.append(f"n_inner {n_inner} (only 4 * n_embd)")
    if hf_config.get("scale_attn_by_inverse_layer_idx") or not hf_config.get("scale_attn_weights", True):
        problems.append("a non-standard attention scaling")
    if hf_config.get("tie_word_embeddings") is False:
        problems.append("an untied output head")
    if problems:
        raise UserError(f"{source} is a GPT-2 variant this model does not compute: {'; '.join(problems)}")


def architecture_from_config(hf_config: dict, source: str) -> dict:
    """Our architecture fields from a GPT-2 `config.json`."""
    check_supported(hf_config, source)
    try:
        return {"vocab_size": int(hf_config["vocab_size"]), "context_length": int(hf_config["n_positions"]),
                "emb_dim": int(hf_config["n_embd"]), "n_heads": int(hf_config["n_head"]),
                "n_layers": int(hf_config["n_layer"]), "qkv_bias": True}
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{source} is not a GPT-2 config.json (bad or missing {e})") from None


def architecture_from_weights(state: dict[str, torch.Tensor], source: str) -> dict:
    """Our architecture fields from the tensor shapes alone (a weights file with no config.json).

    The head count is not in any shape: it is taken from the four released GPT-2 sizes.
    """
    state = normalise_keys(state)
    if "wte.weight" not in state or "wpe.weight" not in state:
        raise UserError(f"{source} holds no wte/wpe tensors; it is not GPT-2 weights")
    vocab_size, emb_dim = state["wte.weight"].shape
    n_layers = len({name.split(".")[1] for name in state if name.startswith("h.")})
    if emb_dim not in GPT2_HEADS:
        raise UserError(f"{source} is {emb_dim} wide, not one of the released GPT-2 sizes, so its "
                        "head count is unknown; put its config.json beside it")
    return {"vocab_size": vocab_size, "context_length": state["wpe.weight"].shape[0], "emb_dim": emb_dim,
            "n_heads": GPT2_HEADS[emb_dim], "n_layers": n_layers, "qkv_bias": True}


def from_hf_state_dict(hf_state: dict[str, torch.Tensor], cfg: ModelConfig, source: str) -> dict[str, torch.Tensor]:
    """A GPTModel `state_dict` (for `cfg`) from Hugging Face GPT-2 tensors."""
    hf = normalise_keys(hf_state)
    try:
        return _convert_from_hf(hf, cfg)
    except KeyError as e:
        raise UserError(f"{source} has no tensor {e.args[0]!r}; it is not GPT-2 weights of the size its "
                        "config describes") from None


def _convert_from_hf(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    emb, vocab = cfg.emb_dim, cfg.vocab_size
    wte = hf["wte.weight"]
    if "lm_head.weight" in hf and not torch.equal(hf["lm_head.weight"], wte):
        raise UserError("the weights have an output head that differs from wte; only a tied head is supported")
    tok = torch.zeros(cfg.padded_vocab_size, emb, dtype=wte.dtype)
    tok[:vocab] = wte  # padding rows stay zero, as GPTModel keeps them
    state = {"tok_emb.weight": tok, "out_head.weight": tok,
             "pos_emb.weight": hf["wpe.weight"][:cfg.context_length],
             "final_norm.weight": hf["ln_f.weight"], "final_norm.bias": hf["ln_f.bias"]}
    for i in range(cfg.n_layers):
        ours, theirs = f"trf_blocks.{i}.", f"h.{i}."
        # (E, 3E) in x out -> three (E, E), each transposed to Linear's out x in.
        weights = hf[theirs + "attn.c_attn.weight"].split(emb, dim=1)
        biases = hf[theirs + "attn.c_attn.bias"].split(emb)
        for name, weight, bias in zip(("W_query", "W_key", "W_value"), weights, biases):
            state[f"{ours}att.{name}.weight"] = weight.t()
            state[f"{ours}att.{name}.bias"] = bias
        for our_name, their_name in BLOCK_LINEARS.items():
            state[f"{ours}{our_name}.weight"] = hf[f"{theirs}{their_name}.weight"].t()
            state[f"{ours}{our_name}.bias"] = hf[f"{theirs}{their_name}.bias"]
        for our_name, their_name in BLOCK_NORMS.items():
            state[f"{ours}{our_name}.weight"] = hf[f"{theirs}{their_name}.weight"]
            state[f"{ours}{our_name}.bias"] = hf[f"{theirs}{their_name}.bias"]
    return state


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face GPT-2 tensors (as `save_pretrained` names them) from a GPTModel `state_dict`."""
    emb = cfg.emb_dim
    hf = {"wte.weight": state["tok_emb.weight"][:cfg.vocab_size], "wpe.weight": state["pos_emb.weight"],
          "ln_f.weight": state["final_norm.weight"], "ln_f.bias": state["final_norm.bias"]}
    for i in range(cfg.n_layers):
        ours, theirs = f"trf_blocks.{i}.", f"h.{i}."
        names = ("W_query", "W_key", "W_value")
        hf[theirs + "attn.c_attn.weight"] = torch.cat([state[f"{ours}att.{n}.weight"].t() for n in names], dim=1)
        zeros = torch.zeros(emb, dtype=state[f"{ours}att.W_query.weight"].dtype)
        hf[theirs + "attn.c_attn.bias"] = torch.cat([state.get(f"{ours}att.{n}.bias", zeros) for n in names])
        for our_name, their_name in BLOCK_LINEARS.items():
            hf[f"{theirs}{their_name}.weight"] = state[f"{ours}{our_name}.weight"].t()
            hf[f"{theirs}{their_name}.bias"] = state[f"{ours}{our_name}.bias"]
        for our_name, their_name in BLOCK_NORMS.items():
            hf[f"{theirs}{their_name}.weight"] = state[f"{ours}{our_name}.weight"]
            hf[f"{theirs}{their_name}.bias"] = state[f"{ours}{our_name}.bias"]
    # Own, contiguous memory for each: safetensors refuses views and shared storage.
    return {HF_PREFIX + name: t.detach().to("cpu", torch.float32).contiguous().clone() for name, t in hf.items()}


def to_hf_config(cfg: ModelConfig) -> dict:
    """A `config.json` for `GPT2LMHeadModel` describing `cfg`."""
    eot = 50256  # <|endoftext|>; only meaningful when the vocabulary has it
    config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        # n_ctx beside n_positions, as OpenAI's GPT-2 config.json has it: llama.cpp's convert_hf_to_gguf.py
        # reads n_ctx (and stops with KeyError: 'n_ctx' without it); transformers reads n_positions.
        "vocab_size": cfg.vocab_size, "n_positions": cfg.context_length, "n_ctx": cfg.context_length,
        "n_embd": cfg.emb_dim,
        "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": LAYER_NORM_EPS,
        "resid_pdrop": cfg.dropout("shortcut"), "embd_pdrop": cfg.dropout("emb"), "attn_pdrop": cfg.dropout("attn"),
        "initializer_range": 0.02, "scale_attn_weights": True, "tie_word_embeddings": True,
        "use_cache": True,
    }
    if eot < cfg.vocab_size:
        config.update(bos_token_id=eot, eos_token_id=eot)
    return config
