"""dev/data/tinystories.py (pyllmc.tinystories): stories in every input form -> a trained sentencepiece
vocabulary -> uint16 shards whose manifest declares it; llama2.c's layout of the stories (BOS + tokens)."""

import io
import json
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from pyllmc import tinystories
from pyllmc.data import DistributedDataLoader, declared_tokenizer, read_shard
from pyllmc.sentencepiece_tokenizer import SentencePieceTokenizer, train_tokenizer
from pyllmc.tokenizer import from_spec

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
NAMES = ["Lily", "Tom", "Ben", "Mia", "Sue", "Max", "Anna", "Sam"]
THINGS = ["ball", "cat", "tree", "boat", "cake", "dog", "kite", "box", "bird", "hat"]
DOINGS = ["saw", "found", "liked", "wanted", "lost", "painted", "shared", "hugged"]


def stories(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        who, friend, what = rng.choice(NAMES), rng.choice(NAMES), rng.choice(THINGS)
        out.append(f"Once upon a time, {who} {rng.choice(DOINGS)} a big {what}. {who} was {int(rng.integers(2, 9))} "
                   f"years old.\n\n{friend} said, \"Can I play with your {what}?\" {who} smiled and said yes. "
                   f"They played with the {what} all day, and they were happy.")
    return out


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PYLLMC_CACHE_DIR", str(tmp_path / "cache"))


def write_json_shards(folder: Path, per_file=(60, 60, 60)) -> list[list[str]]:
    """TinyStories' layout: dataNN.json, each a list of {"story": ...} (with other fields, as the real files)."""
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    for i, n in enumerate(per_file):
        texts = stories(n, seed=i)
        rows = [{"story": "  " + t + "\n", "instruction": {"words": ["x"]}, "source": "GPT-4"} for t in texts]
        (folder / f"data{i:02d}.json").write_text(json.dumps(rows))
        made.append(texts)
    return made


def shard_stories(out: Path, tok) -> list[str]:
    files = sorted(out.glob("tinystories_*.bin"), key=lambda p: p.name[-10:])  # by index: val is shard 0
    tokens = np.concatenate([read_shard(p) for p in files]).astype(np.int64)
    starts = np.flatnonzero(tokens == tok.bos)
    assert starts[0] == 0  # every story begins with BOS
    return [tok.decode(part) for part in np.split(tokens, starts[1:])]


def test_json_folder_end_to_end(tmp_path, capsys):
    made = write_json_shards(tmp_path / "json")
    out = tmp_path / "out"
    manifest = tinystories.main(["--input", str(tmp_path / "json"), "--vocab_size", "400", "--vocab_files", "1",
                                 "--shard_size", "4000", "--output_dir", str(out), "--num_threads", "1"])
    printed = capsys.readouterr().out
    assert "train on them: --input_bin" in printed and "tok400.bin" in printed
    files = sorted(out.glob("tinystories_*.bin"))
    assert [f.name for f in files][:2] == ["tinystories_train_000001.bin", "tinystories_train_000002.bin"]
    assert (out / "tinystories_val_000000.bin").is_file() and len(files) == len(manifest["shards"]) >= 3
    # the manifest declares the tokenizer, which is the trained model written beside the shards
    spec, where = declared_tokenizer([str(f) for f in files])
    assert where == out / "tinystories_manifest.json" and spec == manifest["tokenizer"]
    tok = from_spec(spec)
    assert tok == SentencePieceTokenizer.load(out / "tok400.model") and tok.vocab_size == 400
    # trained on the first file's stories only (--vocab_files 1), as llama2.c's options make it
    assert tok == train_tokenizer(made[0], 400, num_threads=1)
    # every story, stripped, is BOS + its tokens, in order, across the shard boundaries
    assert shard_stories(out, tok) == [s for texts in made for s in texts]
    assert [e["tokens"] for e in manifest["shards"]][:-1] == [4000] * (len(files) - 1)
    assert all(e["max_token_id"] < 400 for e in manifest["shards"])
    # llama2.c's tokenizer file beside it
    from pyllmc.sentencepiece_tokenizer import llama2c_pieces, read_llama2c_tokenizer

    assert read_llama2c_tokenizer(out / "tok400.bin").pieces == llama2c_pieces(tok)
    # the training loader takes them, checking each against the manifest
    loader = DistributedDataLoader(str(out / "tinystories_train_*.bin"), B=2, T=64)
    x, y = loader.next_batch()
    assert x.shape == (2, 64) and int(x.max()) < 400 and bool((x == tok.bos).any())
    # the same command again reuses the finished folder
    again = tinystories.main(["--input", str(tmp_path / "json"), "--vocab_size", "400", "--vocab_files", "1",
                              "--shard_size", "4000", "--output_dir", str(out), "--num_threads", "1"])
    assert "already prepared" in capsys.readouterr().out and again == manifest


def test_other_settings_need_overwrite_and_a_given_tokenizer(tmp_path, capsys):
    write_json_shards(tmp_path / "json", per_file=(40, 40))
    out = tmp_path / "out"
    args = ["--input", str(tmp_path / "json"), "--shard_size", "3000", "--output_dir", str(out), "--num_threads", "1"]
    tinystories.main(args + ["--vocab_size", "400"])
    with pytest.raises(SystemExit, match="other settings or input.*--overwrite"):
        tinystories.main(args + ["--vocab_size", "390"])
    given = SentencePieceTokenizer.load(out / "tok400.model")
    given.save(tmp_path / "mine.model")
    manifest = tinystories.main(args + ["--tokenizer", str(tmp_path / "mine.model"), "--overwrite"])
    assert from_spec(manifest["tokenizer"]) == given
    assert manifest["config"]["tokenizer"] == {"given": given.fingerprint}


def test_tar_gz_and_text_inputs(tmp_path):
    made = write_json_shards(tmp_path / "json", per_file=(40, 40))
    archive = tmp_path / "TinyStories_all_data.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for f in sorted((tmp_path / "json").iterdir()):
            tar.add(f, arcname=f.name)
        info = tarfile.TarInfo("../escape.json")  # only base names are ever written
        info.size = 2
        tar.addfile(info, io.BytesIO(b"[]"))
    manifest = tinystories.main(["--input", str(archive), "--vocab_size", "400", "--shard_size", "2000",
                                 "--num_threads", "1"])
    cache = Path(tinystories.data_cache_dir())
    unpacked = [p for p in cache.glob("tinystories-TinyStories_all_data-*/json")]
    assert len(unpacked) == 1 and sorted(p.name for p in unpacked[0].glob("*.json")) == ["data00.json", "data01.json",
                                                                                          "escape.json"]
    assert not (cache / "escape.json").exists()
    folder = unpacked[0].parent / "tok400"
    tok = from_spec(manifest["tokenizer"])
    assert shard_stories(folder, tok) == [s for texts in made for s in texts]

    # a .txt of stories separated by <|endoftext|> lines (TinyStoriesV2's form), or by blank lines
    texts = [s.replace("\n\n", " ") for s in stories(80, seed=5)]
    v2 = tmp_path / "v2.txt"
    v2.write_text("\n<|endoftext|>\n".join(texts) + "\n<|endoftext|>\n")
    assert tinystories.split_stories(v2.read_text()) == texts
    plain = tmp_path / "plain.txt"
    plain.write_text("\n\n \n".join(texts))
    assert tinystories.split_stories(plain.read_text()) == texts
    assert tinystories.split_stories("a\n\nb<|endoftext|>c") == ["a\n\nb", "c"]
    out = tmp_path / "from_txt"
    manifest = tinystories.main(["--input", str(v2), "--vocab_size", "400", "--output_dir", str(out),
                                 "--shard_size", "2000", "--num_threads", "1"])
    assert shard_stories(out, from_spec(manifest["tokenizer"])) == texts


def test_default_shard_size_for_small_inputs(tmp_path):
    path = tmp_path / "stories.txt"
    path.write_text("\n\n".join(stories(400, seed=7)))
    size = tinystories.local_shard_size([path])
    assert size == (len("".join(tinystories.split_stories(path.read_text()))) // 40) // 100 * 100
    manifest = tinystories.main(["--input", str(path), "--vocab_size", "400", "--num_threads", "1"])
    assert len(manifest["shards"]) >= 5 and manifest["config"]["shard_size"] == size


@pytest.mark.parametrize("content, message", [
    ({"story": "x"}, "expected a JSON list"),
    ([{"text": "x"}], "item 0 is not a story"),
    ("not json", "not valid JSON"),
])
def test_bad_json_is_refused(tmp_path, content, message):
    path = tmp_path / "data00.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(SystemExit, match=message):
        tinystories.main(["--input", str(path), "--vocab_size", "400", "--shard_size", "100"])


def test_bad_input_gives_clear_errors(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        tinystories.main(["--input", str(tmp_path / "missing.txt")])
    (tmp_path / "stories.csv").write_text("a,b\n")
    with pytest.raises(SystemExit, match="unsupported input"):
        tinystories.main(["--input", str(tmp_path / "stories.csv")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no .json or .txt files"):
        tinystories.main(["--input", str(tmp_path / "empty")])
    (tmp_path / "broken.tar.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(SystemExit, match="cannot unpack"):
        tinystories.main(["--input", str(tmp_path / "broken.tar.gz")])
    small = tmp_path / "small.txt"
    small.write_text("\n\n".join(stories(50, seed=1)))
    with pytest.raises(SystemExit, match="too few for a validation shard"):
        tinystories.main(["--input", str(small), "--vocab_size", "400"])
    with pytest.raises(SystemExit, match=r"1 shard\(s\).*pass --shard_size"):
        tinystories.main(["--input", str(small), "--vocab_size", "400", "--shard_size", "10000000"])
    with pytest.raises(SystemExit, match="distinct characters"):
        tinystories.main(["--input", str(small), "--vocab_size", "280", "--shard_size", "1000"])
    with pytest.raises(SystemExit, match="cannot read the sentencepiece model"):
        tinystories.main(["--input", str(small), "--tokenizer", str(tmp_path / "none.model"), "--shard_size", "1000"])


def test_download_is_the_canonical_archive(tmp_path, monkeypatch):
    """The download cannot run here (no network): its address is llama2.c's, and a failure says what to do."""
    assert tinystories.TINYSTORIES_URL == ("https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/"
                                           "TinyStories_all_data.tar.gz")
    asked = []

    def offline(url, timeout):
        asked.append(url)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tinystories.urllib.request, "urlopen", offline)
    with pytest.raises(SystemExit, match=r"(?s)could not download TinyStories.*Offline\? Give a local copy"):
        tinystories.main([])
    assert asked == [tinystories.TINYSTORIES_URL]
    assert not list((Path(tinystories.data_cache_dir()) / "tinystories").glob("*.tar.gz"))


def test_shakespeare_as_stories(tmp_path):
    """Real text from the shared data folder: blank-line sections as stories, llama2.c's 512-id vocabulary."""
    path = DATA / "tinyshakespeare.txt"
    if not path.exists():
        pytest.skip(f"reference data tinyshakespeare.txt not found in {DATA}")
    manifest = tinystories.main(["--input", str(path), "--vocab_size", "512", "--output_dir", str(tmp_path / "out"),
                                 "--num_threads", "1"])
    tok = from_spec(manifest["tokenizer"])
    total = sum(e["tokens"] for e in manifest["shards"])
    chars = len("".join(tinystories.split_stories(path.read_text(encoding="utf-8"))))
    assert 1.5 < chars / total < 3.0 and tok.vocab_size == 512  # 512 ids: short pieces, but well past characters
