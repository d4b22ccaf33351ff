import inspect

import tiktoken_ext.openai_public as openai_public

from gpt import tokenizer
from gpt.tokenizer import EOT_ID, TextStream, get_tokenizer


def test_pinned_hashes_are_tiktokens_own():
    source = inspect.getsource(openai_public.gpt2)
    assert f'vocab_bpe_hash="{tokenizer.VOCAB_BPE_SHA256}"' in source
    assert f'encoder_json_hash="{tokenizer.ENCODER_JSON_SHA256}"' in source


def test_known_ids():
    enc = get_tokenizer()
    assert enc.n_vocab == 50257
    assert enc.eot_token == EOT_ID == 50256
    assert enc.encode("Hello world") == [15496, 995]
    # The example from chapter 2 of "LLMs from scratch".
    text = "Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace."
    assert enc.encode(text, allowed_special={"<|endoftext|>"}) == [
        15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252, 18250, 8812, 2114,
        286, 617, 34680, 27271, 13,
    ]


def test_round_trips():
    enc = get_tokenizer()
    for text in ["", "To be, or not to be: that is the question.\n", "naïve café — 日本語 🎭",
                 "  leading and trailing  \n\n\t", "<|endoftext|> as plain text"]:
        assert enc.decode(enc.encode_ordinary(text)) == text
    assert enc.encode_ordinary("<|endoftext|>") != [EOT_ID]


def test_files_cached_and_verified():
    get_tokenizer()
    for name, digest in (("vocab.bpe", tokenizer.VOCAB_BPE_SHA256),
                         ("encoder.json", tokenizer.ENCODER_JSON_SHA256)):
        path = tokenizer.BPE_DIR / name
        assert path.is_file()
        assert tokenizer.sha256_of(path) == digest


def test_text_stream_holds_back_split_characters_and_skips_ids_past_the_bpe():
    enc = get_tokenizer()
    ids = enc.encode_ordinary("naïve 🎭 café")  # the mask's 4 bytes come in three tokens
    stream = TextStream()
    pieces = [stream.piece(i) for i in ids]
    assert pieces == ["na", "ïve", " ", "", "🎭", " café"]
    assert stream.piece(enc.n_vocab) == "" and stream.end() == ""  # a chat template marker: not text
    cut = TextStream()
    assert cut.piece(ids[2]) == " " and cut.end() == "\ufffd"  # the rest of a character never came
