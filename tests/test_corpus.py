"""pyllmc.corpus: the first run's text, found or fetched at run time and cached as token shards.

Nothing here downloads: the download is replaced by a stand-in (the local copy of tiny Shakespeare,
or a failure, to play a machine offline), every cache lives in the test's tmp_path
(PYLLMC_CACHE_DIR), and the stdlib corpus is built from a few of the standard library's packages
copied into tmp_path (the whole library takes ~20 s; the recipe is the same).
"""

import json
import shutil
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from pyllmc import corpus
from pyllmc.data import DistributedDataLoader, read_shard
from pyllmc.tokenizer import EOT_TOKEN, GPT2Tokenizer, TrimmedGPT2Tokenizer, decode

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
STDLIB_PACKAGES = ("email", "json", "logging", "urllib", "http")  # 48 modules (CPython 3.11), 40 needed
STDLIB = corpus.stdlib_root()  # the real one, before any test stands in another


def shakespeare() -> Path:
    path = DATA / "tinyshakespeare.txt"
    if not path.exists():
        pytest.skip(f"reference data {path.name} not found in {DATA} (the offline data folder beside the repo)")
    return path


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Every cache of this module in tmp_path; no PYLLMC_DATA_DIR from the environment."""
    monkeypatch.setenv("PYLLMC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("PYLLMC_DATA_DIR", raising=False)
    return tmp_path / "cache"


@pytest.fixture
def offline(monkeypatch):
    """The download fails as on a machine without a network."""
    def no_network(url, timeout=None):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(corpus.urllib.request, "urlopen", no_network)


class _Response:
    def __init__(self, raw):
        self.raw = raw

    def read(self):
        return self.raw

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.fixture
def served(monkeypatch):
    """The download answers with these bytes (set served.raw); the URLs asked for are in served.urls."""
    class Server:
        raw, urls = b"", []

    def urlopen(url, timeout=None):
        Server.urls.append(url)
        return _Response(Server.raw)

    monkeypatch.setattr(corpus.urllib.request, "urlopen", urlopen)
    return Server


def small_stdlib(root: Path, reverse=False) -> Path:
    """A few packages of the real standard library under `root` (copied in reverse order with
    reverse=True: the corpus must not depend on the order files are listed in)."""
    source = STDLIB
    files = [p for package in STDLIB_PACKAGES for p in sorted((source / package).rglob("*.py"))]
    for path in reversed(files) if reverse else files:
        target = root / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    (root / "test").mkdir()
    (root / "test" / "test_skipped.py").write_text('"""Tests are not part of the corpus, never."""\n')
    return root


def shard_bytes(prepared):
    return prepared.train.read_bytes(), prepared.val.read_bytes()


# ---------------------------------------------------------------------------------------
# the stdlib corpus


def test_extract_english_takes_docstrings_and_comment_blocks():
    source = b'''#!/usr/bin/env python3
# -*- coding: utf-8 -*-
"""A module that shows what is kept.

It has two paragraphs."""

import os  # a trailing comment is code's, not prose

# A block of comments
# that runs over two lines.
x = 1
#x=2
TEMPLATE = """
# this is inside a string, not a comment
"""


class Thing:
    """A class with a docstring of several words."""

    def method(self):
        # An indented comment block, kept on its own.
        return "ok"

    def undocumented(self):
        pass
'''
    text = corpus.extract_english(source)
    assert text.split("\n\n") == [
        "A module that shows what is kept.", "It has two paragraphs.",
        "A block of comments\nthat runs over two lines.",
        "A class with a docstring of several words.",
        "An indented comment block, kept on its own.",
    ]
    with pytest.raises(SyntaxError):
        corpus.extract_english(b"def broken(:\n")


def test_stdlib_documents_are_in_path_order_without_tests(tmp_path):
    root = small_stdlib(tmp_path / "lib")
    documents, names = corpus.stdlib_documents(root)
    assert names == sorted(names) and len(names) == len(documents) >= 2 * corpus.STDLIB_VAL_EVERY
    assert not any(n.startswith("test/") for n in names)
    assert "email/message.py" in names and "json/decoder.py" in names
    assert all(d.strip() for d in documents)
    assert corpus.stdlib_documents(root) == (documents, names)  # the same twice


def test_stdlib_corpus_is_deterministic_and_cached(tmp_path, monkeypatch, cache):
    lib = small_stdlib(tmp_path / "lib")
    monkeypatch.setattr(corpus, "stdlib_root", lambda: lib)
    first = corpus.prepare("stdlib")
    assert first.made_now and first.corpus == "stdlib" and first.tokenizer == GPT2Tokenizer()
    assert first.directory == cache / "data" / corpus.stdlib_key() / "gpt2"
    assert corpus.stdlib_key().startswith(f"stdlib-{sys.implementation.name}-{sys.version_info.major}."
                                          f"{sys.version_info.minor}.{sys.version_info.micro}-")
    documents, names = corpus.stdlib_documents(lib)
    # every 20th module is val, each document EOT + its tokens
    val, train = np.asarray(read_shard(first.val)), np.asarray(read_shard(first.train))
    assert (val == EOT_TOKEN).sum() == len(documents[::20]) and val[0] == EOT_TOKEN
    assert (val == EOT_TOKEN).sum() + (train == EOT_TOKEN).sum() == len(documents)
    assert decode(val[1:np.flatnonzero(val == EOT_TOKEN)[1]].tolist()) == documents[0]
    manifest = json.loads((first.directory / "stdlib_manifest.json").read_text())
    assert manifest["tokenizer"] == {"name": "gpt2"} and manifest["config"]["modules"] == len(documents)
    assert [(e["file"], e["max_token_id"]) for e in manifest["shards"]] == [("stdlib_val.bin", int(val.max())),
                                                                          ("stdlib_train.bin", int(train.max()))]

    # cached: a second prepare reads nothing of the library
    def must_not_run(*a, **k):
        raise AssertionError("the cached corpus was rebuilt")

    with monkeypatch.context() as m:
        m.setattr(corpus, "stdlib_documents", must_not_run)
        again = corpus.prepare("stdlib")
    assert not again.made_now and shard_bytes(again) == shard_bytes(first)

    # another machine (a fresh cache, the files written in another order) builds the same bytes
    monkeypatch.setenv("PYLLMC_CACHE_DIR", str(tmp_path / "other-cache"))
    lib2 = small_stdlib(tmp_path / "lib2", reverse=True)
    monkeypatch.setattr(corpus, "stdlib_root", lambda: lib2)
    elsewhere = corpus.prepare("stdlib")
    assert elsewhere.made_now and elsewhere.train != first.train
    assert shard_bytes(elsewhere) == shard_bytes(first)


def test_trimmed_stdlib_corpus(tmp_path, monkeypatch):
    lib = small_stdlib(tmp_path / "lib")
    monkeypatch.setattr(corpus, "stdlib_root", lambda: lib)
    gpt2 = corpus.prepare("stdlib")
    trimmed = corpus.prepare("stdlib", trim_vocab=512)
    assert isinstance(trimmed.tokenizer, TrimmedGPT2Tokenizer) and trimmed.tokenizer.vocab_size == 512
    assert trimmed.directory == gpt2.directory.parent / "gpt2-trimmed-512"
    for split in ("val", "train"):
        ids, original = read_shard(getattr(trimmed, split)), read_shard(getattr(gpt2, split))
        assert ids.max() < 512
        assert trimmed.tokenizer.decode(ids) == decode(original.tolist())  # lossless
    # the manifest declares the trimmed tokenizer, which the loader's files lead back to
    from pyllmc.data import declared_tokenizer
    from pyllmc.tokenizer import from_spec

    spec, _ = declared_tokenizer([trimmed.train, trimmed.val])
    assert from_spec(spec) == trimmed.tokenizer
    assert not corpus.prepare("stdlib", trim_vocab=512).made_now


def test_a_python_without_its_sources_says_what_to_do(tmp_path, monkeypatch):
    (tmp_path / "lib").mkdir()
    monkeypatch.setattr(corpus, "stdlib_root", lambda: tmp_path / "lib")
    with pytest.raises(corpus.CorpusUnavailable, match="Python source of only 0 modules.*give a text file"):
        corpus.prepare("stdlib")


# ---------------------------------------------------------------------------------------
# tiny Shakespeare: downloaded once into the cache, or a local copy; offline, the stdlib


def test_offline_the_first_run_says_so_in_one_line_and_takes_the_stdlib(tmp_path, monkeypatch, offline):
    lib = small_stdlib(tmp_path / "lib")
    monkeypatch.setattr(corpus, "stdlib_root", lambda: lib)
    said = []
    prepared = corpus.prepare("auto", say=said.append)
    assert prepared.corpus == "stdlib" and prepared.made_now
    assert len(said) == 1 and "\n" not in said[0], said
    assert said[0].startswith("offline: could not download tiny Shakespeare from https://")
    assert "Temporary failure in name resolution" in said[0]
    assert said[0].endswith("standard library instead")
    # asked for tiny Shakespeare by name, offline is an error that says what to do
    with pytest.raises(corpus.CorpusUnavailable, match=r"Offline\? Put a copy of tinyshakespeare\.txt in a folder "
                                                       r"and set PYLLMC_DATA_DIR to it, or give the file itself"):
        corpus.prepare("tinyshakespeare", say=said.append)


def test_tinyshakespeare_is_downloaded_once_into_the_cache(served, cache):
    served.raw = shakespeare().read_bytes()
    prepared = corpus.prepare("auto", say=pytest.fail)  # online: no notice
    assert served.urls == [corpus.TINYSHAKESPEARE_URL]
    assert (cache / "data" / "tinyshakespeare.txt").read_bytes() == served.raw
    assert prepared.corpus == "tinyshakespeare" and prepared.made_now and "downloaded from" in prepared.description
    assert prepared.directory.is_relative_to(cache)
    val, train = read_shard(prepared.val), read_shard(prepared.train)
    assert (len(val), len(train)) == (32768, 305260)  # llm.c's split
    again = corpus.prepare("auto")
    assert served.urls == [corpus.TINYSHAKESPEARE_URL] and not again.made_now and "cached from" in again.description


def test_a_download_that_is_not_tinyshakespeare_is_refused(served, cache, tmp_path, monkeypatch):
    served.raw = b"<html>captive portal</html>"
    with pytest.raises(corpus.Offline, match="is not tiny Shakespeare \\(sha256 .*a proxy's page\\?\\)"):
        corpus.download_tinyshakespeare()
    assert not (cache / "data" / "tinyshakespeare.txt").exists()


def test_a_local_copy_in_pyllmc_data_dir_is_prepared_in_the_cache(tmp_path, monkeypatch, offline, cache):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copyfile(shakespeare(), data / "input.txt")
    monkeypatch.setenv("PYLLMC_DATA_DIR", str(data))
    prepared = corpus.prepare("auto", say=pytest.fail)
    assert prepared.corpus == "tinyshakespeare" and "($PYLLMC_DATA_DIR)" in prepared.description
    assert prepared.directory.is_relative_to(cache)
    assert sorted(p.name for p in data.iterdir()) == ["input.txt"]  # the folder is only read
    same = corpus.prepare(str(shakespeare()))  # the same text given as a file: the same shards
    assert same.train == prepared.train and not same.made_now


def test_prepared_shards_in_pyllmc_data_dir_are_used_as_they_are(tmp_path, monkeypatch, offline, cache):
    from pyllmc.data import write_shard

    data = tmp_path / "data"
    data.mkdir()
    tokens = corpus.tokenize_sections(shakespeare().read_text(encoding="utf-8")[:200_000])
    write_shard(data / "tiny_shakespeare_val.bin", tokens[:5000])
    write_shard(data / "tiny_shakespeare_train.bin", tokens[5000:])
    monkeypatch.setenv("PYLLMC_DATA_DIR", str(data))
    prepared = corpus.prepare("auto", say=pytest.fail)
    assert prepared.train == data / "tiny_shakespeare_train.bin" and prepared.tokenizer == GPT2Tokenizer()
    trimmed = corpus.prepare("auto", trim_vocab=300, say=pytest.fail)  # derived in the cache
    assert trimmed.directory.is_relative_to(cache) and trimmed.tokenizer.vocab_size == 300
    assert trimmed.tokenizer.decode(read_shard(trimmed.train)) == decode(tokens[5000:].tolist())


def test_a_text_file_of_ones_own(tmp_path):
    text = "\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog." for i in range(400))
    path = tmp_path / "my notes.txt"
    path.write_text(text)
    prepared = corpus.prepare(str(path))
    assert prepared.corpus.startswith("my_notes") and "the text my notes.txt" in prepared.description
    val, train = read_shard(prepared.val), read_shard(prepared.train)
    assert len(val) == (len(val) + len(train)) // 10  # its first 10%
    assert decode(np.concatenate([val, train])[np.concatenate([val, train]) != EOT_TOKEN].tolist()) == text
    (tmp_path / "tiny.txt").write_text("To be.")
    with pytest.raises(corpus.CorpusUnavailable, match=r"tiny\.txt has only 4 tokens: too few for a validation split and training \(at least 10\)"):
        corpus.prepare(str(tmp_path / "tiny.txt"))
    with pytest.raises(corpus.CorpusUnavailable, match="neither auto, tinyshakespeare, stdlib nor an existing"):
        corpus.prepare(str(tmp_path / "missing.txt"))


def test_a_preparation_killed_midway_leaves_no_half_made_cache(tmp_path, monkeypatch, cache):
    path = tmp_path / "t.txt"
    path.write_text("\n\n".join(f"Line {i} of a text that is long enough." for i in range(300)))
    real = corpus.write_split

    def killed(directory, *a, **k):
        real(directory, *a, **k)
        raise KeyboardInterrupt  # after the shards, before the folder is renamed into place

    monkeypatch.setattr(corpus, "write_split", killed)
    with pytest.raises(KeyboardInterrupt):
        corpus.prepare(str(path))
    assert [p for p in (cache / "data").rglob("*") if p.is_file()] == []
    monkeypatch.setattr(corpus, "write_split", real)
    prepared = corpus.prepare(str(path))
    assert prepared.made_now
    DistributedDataLoader(str(prepared.train), 2, 16)  # the manifest's sha256 and the shard agree


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    from pyllmc import cuda_sim

    monkeypatch.setenv("PYLLMC_CACHE_DIR", str(tmp_path / "a"))
    assert corpus.cache_dir() == tmp_path / "a"
    assert cuda_sim.cache_dir() == tmp_path / "a" / "cuda_sim"  # the simulator's builds: the same cache
    monkeypatch.delenv("PYLLMC_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert corpus.cache_dir() == tmp_path / "xdg" / "pyllmc"
    assert cuda_sim.cache_dir() == tmp_path / "xdg" / "pyllmc" / "cuda_sim"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert corpus.cache_dir() == tmp_path / "home" / ".cache" / "pyllmc"


def test_the_data_script_writes_into_the_cache_by_default(tmp_path, cache):
    import os

    env = {**os.environ, "PYLLMC_CACHE_DIR": str(cache)}
    script = REPO / "dev" / "data" / "tinyshakespeare.py"
    result = subprocess.run([sys.executable, str(script), "--input", str(shakespeare()), "--trim_vocab", "1024"],
                            capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"train: {cache}" in result.stdout and "gpt2-trimmed-1024" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # nothing beside it
    # --output_dir is corpus.write_tinyshakespeare (in this process): the same tokens there
    out = tmp_path / "out"
    assert corpus.write_tinyshakespeare(out, shakespeare(), 1024) == (out / "tiny_shakespeare_train.bin",
                                                                     out / "tiny_shakespeare_val.bin")
    cached = next((cache / "data").glob("tinyshakespeare-*/gpt2-trimmed-1024"))
    for name in ("tiny_shakespeare_val.bin", "tiny_shakespeare_train.bin"):
        assert (out / name).read_bytes() == (cached / name).read_bytes()
