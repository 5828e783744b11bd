"""A BPE tokenizer trained on your own text with sentencepiece, as llama2.c trains its TinyStories
vocabularies; and llama2.c's `tokenizer.bin`.

    tok = train_tokenizer(stories, vocab_size=4096, out_path="tok4096.model")
    tok = SentencePieceTokenizer.load("tok4096.model")          # or from_spec(tok.spec())
    tok.encode("Once upon a time"), tok.decode(ids)
    tok.encode_document(story)        # [BOS] + tokens: how every story is stored in the shards
    write_llama2c_tokenizer(tok, "tok4096.bin")               # what llama2.c's run.c reads
    read_llama2c_tokenizer("tok4096.bin")                     # -> (max_token_length, pieces, scores)

Why sentencepiece (and not Hugging Face `tokenizers`, or rustbpe + tiktoken as nanochat does): the Llama
family's tokenizers are sentencepiece models (Meta's Llama 2 tokenizer.model, llama2.c's tok512 and
tok4096), and llama2.c's C inference (run.c) encodes prompts with a re-implementation of sentencepiece's
BPE: pieces over Unicode codepoints, byte fallback, then merging the adjacent pair whose merged piece has
the highest score until none is in the vocabulary. A sentencepiece BPE model gives the ids that run.c
gives, and its .model file is the one llama2.c's own tools read. The library is a single
self-contained binary wheel (no dependencies) for every Python and platform we support; the other two
routes would need a second implementation of sentencepiece's conventions (the "▁" space marker,
<0xXX> byte pieces, scores) and still not be byte-identical with llama2.c's files.

Training options: llama2.c's (tinystories.py train_vocab), which follow Meta's Llama 2 tokenizer:
BPE; byte_fallback (a character outside the vocabulary becomes its UTF-8 bytes, pieces <0x00>..<0xFF>,
so every text encodes and decodes losslessly, never to <unk>); split_digits (each digit its own token);
character_coverage 1.0 (every character of the training text gets a piece); allow_whitespace_only_pieces;
the "identity" normalization (no Unicode normalization) with the dummy-prefix space (llama2.c's other two
options, self_test_sample_size 0 and unk_surface " ⁇ ", are sentencepiece's defaults: not passed). Ids
0, 1, 2 are <unk>, <s> (BOS), </s> (EOS), then the 256 byte pieces (ids 3..258), then the merges,
scored 0, -1, -2, ... in the order they were learned. One departure from llama2.c:
remove_extra_whitespaces is off (llama2.c leaves sentencepiece's default, on, which trims each text and
collapses runs of spaces, so "a  b" does not round-trip and run.c's encoder, which collapses nothing,
disagrees with it there); Meta's Llama 2 tokenizer has it off too. The vocabulary needs at least 259 ids
(the control and byte pieces) plus one per distinct character of the training text.

The training text, as llama2.c feeds it: each document stripped of surrounding whitespace and cut into
lines, one sentencepiece "sentence" per non-empty line (so a newline itself is encoded with the byte
piece <0x0A>).

Identity. A tokenizer is its model: the spec (recorded in shard manifests, checkpoints and logs) holds
the .model file's bytes (base64; the file is about 60 KB at 4,096 ids), so from_spec() rebuilds it
anywhere and the fingerprint changes with any piece or score. The bytes are made canonical first: what
sentencepiece records of the training run itself (the input file names, the output prefix, the number of
threads) is dropped, so that the same text and options give the same tokenizer, and the same
fingerprint, on any machine (with the same sentencepiece release). Nothing that encoding or decoding
reads is touched.

llama2.c's tokenizer.bin (written by its tokenizer.py export, read by run.c), all little-endian:
    uint32 max_token_length                  the longest piece, in bytes
    then per id 0..vocab_size-1: float32 score, uint32 length, the piece's bytes (UTF-8, no terminator)
with the export's conventions: BOS is stored as "\\n<s>\\n", EOS as "\\n</s>\\n", every "▁" (sentencepiece's
space marker, U+2581) as " ", and byte pieces as the six characters "<0xXX>" (run.c's decoder turns them
into the byte). The file does not hold the vocabulary size (run.c takes it from the model's header):
the reader reads entries to the end of the file.
"""

from __future__ import annotations

import base64
import binascii
import functools
import os
import struct
from pathlib import Path
from typing import Iterable, NamedTuple

import numpy as np

from pyllmc.tokenizer import Tokenizer, register

NAME = "sentencepiece"
SPACE_MARK = "\u2581"  # "▁": sentencepiece's whitespace symbol
CONTROL_PIECES = 3  # <unk>, <s>, </s>
BYTE_PIECES = 256
MIN_VOCAB_SIZE = CONTROL_PIECES + BYTE_PIECES  # plus one piece per distinct character of the text
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2

# llama2.c's options (tinystories.py train_vocab), but remove_extra_whitespaces (module docstring)
TRAINING_OPTIONS = {
    "model_type": "bpe",
    "character_coverage": 1.0,
    "split_digits": True,
    "allow_whitespace_only_pieces": True,
    "byte_fallback": True,
    "normalization_rule_name": "identity",
    "remove_extra_whitespaces": False,
    "unk_id": UNK_ID,
    "bos_id": BOS_ID,
    "eos_id": EOS_ID,
    "pad_id": -1,
}

# ModelProto field 2 is the TrainerSpec; of its fields, these describe the training run, not the model:
# input (1), model_prefix (2), num_threads (16)
_TRAINER_SPEC_FIELD = 2
_RUN_FIELDS = frozenset({1, 2, 16})


class SentencePieceUnavailableError(ImportError):
    """The sentencepiece package is not installed."""


@functools.cache
def _spm():
    try:
        import sentencepiece
    except ImportError as e:
        raise SentencePieceUnavailableError(
            "the sentencepiece tokenizer needs the sentencepiece package: pip install sentencepiece") from e
    return sentencepiece


# ---------------------------------------------------------------------------------------------
# canonical model bytes: a minimal protobuf walk (tag = field number << 3 | wire type)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _fields(data: bytes):
    """(field number, wire type, the field's bytes with its tag, payload of a length-delimited field)."""
    pos = 0
    while pos < len(data):
        start = pos
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        payload = None
        if wire == 0:
            _, pos = _read_varint(data, pos)
        elif wire == 1:
            pos += 8
        elif wire == 2:
            length, pos = _read_varint(data, pos)
            payload = data[pos:pos + length]
            pos += length
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(data):
            raise ValueError("truncated field")
        yield number, wire, data[start:pos], payload


def canonical_model(model: bytes) -> bytes:
    """The model's bytes without the TrainerSpec fields that describe the training run (input, model_prefix,
    num_threads); ValueError when the bytes are not a protobuf message."""
    out = []
    for number, wire, raw, payload in _fields(model):
        if number == _TRAINER_SPEC_FIELD and wire == 2:
            kept = b"".join(r for n, _, r, _ in _fields(payload) if n not in _RUN_FIELDS)
            raw = _varint(_TRAINER_SPEC_FIELD << 3 | 2) + _varint(len(kept)) + kept
        out.append(raw)
    return b"".join(out)


# ---------------------------------------------------------------------------------------------
# the tokenizer


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model (a trained BPE vocabulary; module docstring). Documents are stored as
    llama2.c stores its stories, BOS followed by the tokens, so BOS is this tokenizer's document
    separator (eot) and the token samples start from (run.c's start token, 1)."""

    name = NAME

    def __init__(self, model: bytes):
        try:
            self.model = canonical_model(bytes(model))
            self.sp = _spm().SentencePieceProcessor(model_proto=self.model)
        except (ValueError, RuntimeError) as e:
            raise ValueError(f"not a sentencepiece model ({type(e).__name__}: {e})") from e
        self.vocab_size = int(self.sp.get_piece_size())
        self.bos = int(self.sp.bos_id())
        self.eos = int(self.sp.eos_id())
        self.eot = self.bos if self.bos >= 0 else None

    def __reduce__(self):  # pickles as its model (worker processes, copies)
        return (type(self), (self.model,))

    @classmethod
    def load(cls, path) -> "SentencePieceTokenizer":
        """A .model file (ours, llama2.c's tok512.model / tok4096.model, Meta's tokenizer.model)."""
        path = Path(path)
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise ValueError(f"cannot read the sentencepiece model {path}: {e}") from e
        try:
            return cls(raw)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e

    @classmethod
    def from_spec(cls, spec: dict) -> "SentencePieceTokenizer":
        try:
            raw = base64.b64decode(spec["model"], validate=True)
        except (binascii.Error, TypeError) as e:
            raise ValueError(f"malformed spec of tokenizer {NAME!r}: its \"model\" is not base64 ({e})") from e
        tok = cls(raw)
        if "vocab_size" in spec and spec["vocab_size"] != tok.vocab_size:
            raise ValueError(f"malformed spec of tokenizer {NAME!r}: it says vocab_size {spec['vocab_size']}, "
                             f"its model has {tok.vocab_size} pieces")
        return tok

    def save(self, path) -> Path:
        """Write the .model file (atomically); sentencepiece's own tools and llama2.c read it."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(self.model)
        tmp.replace(path)
        return path

    def spec(self) -> dict:
        return {"name": NAME, "vocab_size": self.vocab_size, "model": base64.b64encode(self.model).decode("ascii")}

    def encode(self, text: str) -> list[int]:
        """The tokens of `text`, no BOS (with the dummy-prefix space: "Once" -> "▁Once")."""
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str], num_threads: int = 0) -> list[list[int]]:
        """encode() of many texts in sentencepiece's thread pool (num_threads 0: its default)."""
        return self.sp.encode(list(texts), num_threads=num_threads or None)

    def encode_document(self, text: str) -> list[int]:
        """A document as llama2.c stores a story: BOS, then its tokens."""
        return [self.bos] + self.encode(text)

    def decode(self, ids) -> str:
        """sentencepiece's decoding: BOS/EOS vanish, byte pieces become their bytes (invalid UTF-8 as
        U+FFFD), "▁" becomes a space, and the leading space of the text is dropped."""
        return self.sp.decode(self.check_ids(ids).tolist())

    def piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(int(token_id))

    def score(self, token_id: int) -> float:
        return float(self.sp.get_score(int(token_id)))

    def is_byte(self, token_id: int) -> bool:
        return bool(self.sp.is_byte(int(token_id)))


register(NAME, SentencePieceTokenizer.from_spec)


def training_sentences(documents: Iterable[str]):
    """The sentences sentencepiece trains on, as llama2.c writes them: each document stripped, one
    sentence per non-empty line."""
    for doc in documents:
        for line in doc.strip().split("\n"):
            if line:
                yield line


def train_tokenizer(texts: Iterable, vocab_size: int, out_path=None, num_threads: int | None = None,
                    max_sentence_length: int = 4192) -> SentencePieceTokenizer:
    """Train a BPE vocabulary of `vocab_size` ids on `texts` (documents as str, or paths of text files,
    each one document) with llama2.c's options (TRAINING_OPTIONS); write the .model to `out_path` when
    given. Lines longer than max_sentence_length bytes are skipped (sentencepiece's default, 4192).
    ValueError when vocab_size does not fit the text."""
    spm = _spm()
    if isinstance(texts, (str, bytes, os.PathLike)):
        raise ValueError("train_tokenizer takes an iterable of documents or of paths, not one string or path")
    if not isinstance(vocab_size, int) or vocab_size <= MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be an integer above {MIN_VOCAB_SIZE} ({CONTROL_PIECES} control pieces "
                         f"and {BYTE_PIECES} byte pieces, plus one per distinct character of the text), "
                         f"got {vocab_size!r}")

    def documents():
        for item in texts:
            yield Path(item).read_text(encoding="utf-8") if isinstance(item, os.PathLike) else item

    seen = {"sentences": 0, "chars": set()}

    def sentences():
        for line in training_sentences(documents()):
            seen["sentences"] += 1
            seen["chars"].update(line)
            yield line

    buffer = _BytesSink()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=sentences(), model_writer=buffer, vocab_size=vocab_size,
                                       num_threads=num_threads or os.cpu_count() or 1,
                                       max_sentence_length=max_sentence_length, minloglevel=2, **TRAINING_OPTIONS)
    except RuntimeError as e:
        if not seen["sentences"]:
            raise ValueError("train_tokenizer: the texts hold no non-empty line to train on") from e
        distinct = len(seen["chars"] - {" "})  # the space is "▁"
        need = MIN_VOCAB_SIZE + distinct + 1
        raise ValueError(f"cannot train a {vocab_size}-id vocabulary on this text: {e}. The text has {distinct} "
                         f"distinct characters, each needing a piece beside the {MIN_VOCAB_SIZE} control and byte "
                         f"pieces (at least about {need} ids), and must hold enough distinct merges to fill the "
                         f"rest (more text, or a smaller vocab_size)") from e
    tok = SentencePieceTokenizer(buffer.data)
    if out_path is not None:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        tok.save(out_path)
    return tok


class _BytesSink:
    """The file-like object sentencepiece's trainer writes the model to."""

    def __init__(self):
        self.data = b""

    def write(self, data):
        self.data += data


# ---------------------------------------------------------------------------------------------
# llama2.c's tokenizer.bin


class Llama2cVocab(NamedTuple):
    max_token_length: int
    pieces: list[bytes]
    scores: np.ndarray  # float32


def llama2c_pieces(tok: SentencePieceTokenizer) -> list[bytes]:
    """Each id's piece as llama2.c's export stores it (module docstring)."""
    pieces = []
    for i in range(tok.vocab_size):
        if i == tok.bos:
            text = "\n<s>\n"
        elif i == tok.eos:
            text = "\n</s>\n"
        else:
            text = tok.piece(i)
        pieces.append(text.replace(SPACE_MARK, " ").encode("utf-8"))
    return pieces


def write_llama2c_tokenizer(tok: SentencePieceTokenizer, path) -> Path:
    """Write llama2.c's tokenizer.bin for `tok` (atomically)."""
    pieces = llama2c_pieces(tok)
    chunks = [struct.pack("<I", max(len(p) for p in pieces))]
    for i, piece in enumerate(pieces):
        chunks.append(struct.pack("<fI", tok.score(i), len(piece)) + piece)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(b"".join(chunks))
    tmp.replace(path)
    return path


def read_llama2c_tokenizer(path, vocab_size: int | None = None) -> Llama2cVocab:
    """Read a tokenizer.bin: every entry to the end of the file, or exactly vocab_size of them (run.c reads
    as many as the model's vocabulary and ignores the rest). ValueError naming the file and the entry when
    it is truncated or inconsistent."""
    path = Path(path)
    data = path.read_bytes()
    if len(data) < 4:
        raise ValueError(f"{path} is not a llama2.c tokenizer file: {len(data)} bytes, shorter than its header")
    (max_len,) = struct.unpack_from("<I", data, 0)
    pos, pieces, scores = 4, [], []
    while pos < len(data) and (vocab_size is None or len(pieces) < vocab_size):
        if pos + 8 > len(data):
            raise ValueError(f"{path}: entry {len(pieces)} is truncated (its score and length need 8 bytes, "
                             f"{len(data) - pos} left)")
        score, length = struct.unpack_from("<fI", data, pos)
        pos += 8
        if length > max_len or pos + length > len(data):
            raise ValueError(f"{path}: entry {len(pieces)} says {length} bytes, but the file's longest piece is "
                             f"{max_len} bytes and {len(data) - pos} bytes are left")
        pieces.append(data[pos:pos + length])
        scores.append(score)
        pos += length
    if vocab_size is not None and len(pieces) < vocab_size:
        raise ValueError(f"{path} holds {len(pieces)} pieces, fewer than the vocabulary's {vocab_size}")
    if pieces and pos == len(data) and max(len(p) for p in pieces) != max_len:  # the whole file read
        raise ValueError(f"{path}: its header says the longest piece has {max_len} bytes, the longest has "
                         f"{max(len(p) for p in pieces)}")
    return Llama2cVocab(int(max_len), pieces, np.asarray(scores, dtype=np.float32))
