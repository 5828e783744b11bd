"""llm.c token shards, the distributed loader, and the data preparation scripts."""

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pyllmc.data import (
    HEADER_INTS,
    MANIFEST_SUFFIX,
    SHARD_MAGIC,
    SHARD_MAGIC_U32,
    SHARD_VERSION,
    SHARD_VERSION_U32,
    DistributedDataLoader,
    ShardFormatError,
    check_token_ids,
    declared_tokenizer,
    file_sha256,
    max_token_id,
    read_shard,
    read_shard_header,
    recorded_shards,
    shard_digest,
    shard_info,
    write_shard,
    write_shard_entry,
)
from pyllmc import fineweb
from pyllmc.tokenizer import EOT_TOKEN, decode, encode, encode_document

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def data_file(name: str) -> Path:
    path = DATA / name
    if not path.exists():
        pytest.skip(f"reference data {name} not found in {DATA} (the offline data folder beside the repo)")
    return path


# ---------------------------------------------------------------------------------------
# shards


def test_shard_round_trip(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 2**16, size=1001)
    tokens[:2] = (0, 65535)
    path = tmp_path / "s.bin"
    write_shard(path, tokens.tolist())
    assert path.stat().st_size == 4 * HEADER_INTS + 2 * 1001
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    assert header[:3].tolist() == [SHARD_MAGIC, SHARD_VERSION, 1001] and not header[3:].any()
    got = read_shard(path)
    assert got.dtype == np.uint16
    np.testing.assert_array_equal(got, tokens)
    assert read_shard_header(path) == 1001
    assert os.listdir(tmp_path) == ["s.bin"]  # no temporary file left behind

    write_shard(path, np.zeros(0, dtype=np.int64))  # replaces the file; empty is allowed
    assert read_shard(path).shape == (0,)


@pytest.mark.parametrize("bad", [[1, 65536], [-1, 3], [0.5, 1.0], [[1, 2]]])
def test_write_shard_rejects_bad_tokens(tmp_path, bad):
    path = tmp_path / "s.bin"
    with pytest.raises(ValueError, match="s.bin"):
        write_shard(path, np.asarray(bad))
    assert not list(tmp_path.iterdir())  # nothing written


def _corrupt(path: Path, how: str) -> None:
    raw = bytearray(path.read_bytes())
    header = np.frombuffer(raw, dtype="<i4", count=HEADER_INTS).copy()
    if how == "magic":
        header[0] = 20240326  # a model checkpoint's magic
    elif how == "version":
        header[1] = 2
    elif how == "count":
        header[2] += 1  # the header claims more tokens than the file holds
    elif how == "negative":
        header[2] = -5
    raw[: 4 * HEADER_INTS] = header.tobytes()
    if how == "truncated":
        raw = raw[:-3]
    elif how == "too_long":
        raw += b"\0\0"
    elif how == "short_header":
        raw = raw[:100]
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("how, message", [
    ("magic", "magic number 20240326, expected 20240520"),
    ("version", "version 2"),
    ("count", "truncated"),
    ("negative", "negative token count"),
    ("truncated", "truncated"),
    ("too_long", "longer than its header says"),
    ("short_header", "shorter than the 1024-byte header"),
])
def test_read_shard_format_errors(tmp_path, how, message):
    path = tmp_path / "broken.bin"
    write_shard(path, np.arange(50))
    _corrupt(path, how)
    with pytest.raises(ShardFormatError, match=message) as info:
        read_shard(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_read_shard_missing_file(tmp_path):
    with pytest.raises(ShardFormatError, match="nope.bin"):
        read_shard(tmp_path / "nope.bin")


# ---------------------------------------------------------------------------------------
# uint32 shards (llm.c's version 7) beside uint16 ones; token ids against a vocabulary


def test_uint32_shard_round_trip(tmp_path):
    tokens = np.random.default_rng(1).integers(0, 2**32, size=777, dtype=np.int64)
    tokens[:3] = (0, 2**16, 2**32 - 1)  # past uint16, and the largest uint32
    path = tmp_path / "s.bin"
    digest = write_shard(path, tokens, dtype="uint32")
    assert path.stat().st_size == 4 * HEADER_INTS + 4 * 777
    assert digest == file_sha256(path)
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    assert header[:3].tolist() == [SHARD_MAGIC_U32, SHARD_VERSION_U32, 777] and not header[3:].any()
    assert np.fromfile(path, dtype="<u4", offset=4 * HEADER_INTS).tolist() == tokens.tolist()  # little-endian body
    got = read_shard(path)
    assert got.dtype == np.uint32
    np.testing.assert_array_equal(got, tokens)
    assert shard_info(path) == (777, np.dtype("<u4")) and read_shard_header(path) == 777
    assert max_token_id(path) == 2**32 - 1
    assert os.listdir(tmp_path) == ["s.bin"]


@pytest.mark.parametrize("bad", [[1, 2**32], [-1, 3], [0.5, 1.0]])
def test_write_uint32_shard_rejects_bad_tokens(tmp_path, bad):
    with pytest.raises(ValueError, match=r"s\.bin"):
        write_shard(tmp_path / "s.bin", np.asarray(bad), dtype="uint32")
    with pytest.raises(ValueError, match=r"shard dtype for .*s\.bin must be one of \['uint16', 'uint32'\], got 'uint8'"):
        write_shard(tmp_path / "s.bin", [1, 2], dtype="uint8")
    assert not list(tmp_path.iterdir())


def test_an_id_past_uint16_asks_for_uint32_shards(tmp_path):
    with pytest.raises(ValueError, match=r"\[0, 65536\) to fit uint16 shards.*write uint32 shards: dtype='uint32'"):
        write_shard(tmp_path / "s.bin", [5, 128256])  # a Llama-3 id
    write_shard(tmp_path / "s.bin", [5, 128256], dtype="uint32")
    assert read_shard(tmp_path / "s.bin").tolist() == [5, 128256]


@pytest.mark.parametrize("how, message", [
    ("magic", "magic number 20240326, expected 20240520 \\(uint16 tokens\\) or 20240801 \\(uint32 tokens\\)"),
    ("version", "magic 20240801 with version 2.*version 7 for this magic"),
    ("version1", "magic 20240801 with version 1"),  # uint32's magic with uint16's version: not a known kind
    ("count", "truncated"),
    ("negative", "negative token count"),
    ("truncated", "truncated"),
    ("too_long", "longer than its header says"),
    ("short_header", "shorter than the 1024-byte header"),
])
def test_read_uint32_shard_format_errors(tmp_path, how, message):
    path = tmp_path / "broken.bin"
    write_shard(path, np.arange(50), dtype="uint32")
    if how == "version1":
        raw = bytearray(path.read_bytes())
        raw[4:8] = np.array([1], dtype="<i4").tobytes()
        path.write_bytes(bytes(raw))
    else:
        _corrupt(path, how)
    with pytest.raises(ShardFormatError, match=message) as info:
        read_shard(path)
    assert str(path) in str(info.value)


def test_a_uint16_shard_with_uint32s_version_is_refused(tmp_path):
    path = tmp_path / "s.bin"
    write_shard(path, np.arange(50))
    raw = bytearray(path.read_bytes())
    raw[4:8] = np.array([7], dtype="<i4").tobytes()
    path.write_bytes(bytes(raw))
    with pytest.raises(ShardFormatError, match="magic 20240520 with version 7.*version 1 for this magic"):
        read_shard(path)


def test_one_loader_reads_uint16_and_uint32_shards_each_by_its_header(tmp_path):
    """The mixing rule: a shard's header says how wide its ids are, so one loader walks uint16 and
    uint32 shards alike, batches are int64 either way, and the vocabulary check covers all of them."""
    small = np.arange(100) % 60000
    large = 70000 + np.arange(100)  # ids only uint32 holds
    write_shard(tmp_path / "d_train_000000.bin", small)
    write_shard(tmp_path / "d_train_000001.bin", large, dtype="uint32")
    loader = DistributedDataLoader(str(tmp_path / "d_train_*.bin"), 2, 8)
    assert loader.token_dtypes == ["uint16", "uint32"]
    assert_batches_equal(loader, expected_batches([small, large], 2, 8, 0, 1, [[0, 1]]))
    assert loader.max_token_id() == (70099, str(tmp_path / "d_train_000001.bin"))
    loader.check_token_ids(70100)
    with pytest.raises(ShardFormatError, match=r"d_train_000001\.bin holds token id 70000 at position 0 "):
        loader.check_token_ids(65536)


def test_token_id_past_the_vocabulary_names_shard_and_position(tmp_path):
    tokens = np.arange(300) % 256
    tokens[123] = 300
    tokens[200] = 999
    path = tmp_path / "audio_train_000001.bin"
    write_shard(path, tokens, dtype="uint32")
    with pytest.raises(ShardFormatError, match=r"audio_train_000001\.bin holds token id 300 at position 123 \(of "
                                               r"300\), but the vocabulary has 256 ids \(0\.\.255\); the shard's "
                                               r"largest id is 999") as info:
        check_token_ids(path, 256)
    assert isinstance(info.value, ValueError)
    check_token_ids(path, 1000)  # every id fits
    assert max_token_id(path) == 999
    write_shard(tmp_path / "empty.bin", [], dtype="uint32")
    assert max_token_id(tmp_path / "empty.bin") == -1
    check_token_ids(tmp_path / "empty.bin", 1)


def test_the_token_scan_crosses_chunks(tmp_path, monkeypatch):
    import pyllmc.data as data

    monkeypatch.setattr(data, "_SCAN_CHUNK", 7)  # many chunks: the position is the shard's, not the chunk's
    tokens = np.zeros(50, dtype=np.int64)
    tokens[38] = 12
    write_shard(tmp_path / "s.bin", tokens)
    assert max_token_id(tmp_path / "s.bin") == 12
    with pytest.raises(ShardFormatError, match="token id 12 at position 38 "):
        check_token_ids(tmp_path / "s.bin", 10)


def test_declared_tokenizer_reads_the_manifest(tmp_path):
    write_shard(tmp_path / "a_val.bin", np.arange(40))
    write_shard(tmp_path / "a_train.bin", np.arange(40))
    assert declared_tokenizer([tmp_path / "a_val.bin"]) == (None, None)  # no manifest
    spec = {"name": "mulaw", "sample_rate": 8000}
    manifest = tmp_path / f"a{MANIFEST_SUFFIX}"
    manifest.write_text(json.dumps({"tokenizer": spec, "shards": [{"file": "a_val.bin"}, {"file": "a_train.bin"}]}))
    assert declared_tokenizer([tmp_path / "a_val.bin", tmp_path / "a_train.bin"]) == (spec, manifest)
    # an older manifest names its tokenizer in its config
    manifest.write_text(json.dumps({"config": {"tokenizer": "gpt2"}, "shards": [{"file": "a_val.bin"}]}))
    assert declared_tokenizer([tmp_path / "a_val.bin"]) == ({"name": "gpt2"}, manifest)
    # shards of two tokenizers, or declared and undeclared ones, are not one stream
    with pytest.raises(ShardFormatError, match="not of one tokenizer"):
        declared_tokenizer([tmp_path / "a_val.bin", tmp_path / "a_train.bin"])
    manifest.write_text(json.dumps({"tokenizer": "gpt2", "shards": [{"file": "a_val.bin"}]}))
    with pytest.raises(ShardFormatError, match="malformed tokenizer"):
        declared_tokenizer([tmp_path / "a_val.bin"])


# ---------------------------------------------------------------------------------------
# loader


def make_shards(folder: Path, sizes, prefix="data_train") -> list[np.ndarray]:
    """Shards whose tokens are distinct across all shards, so every batch says where it came from."""
    shards, offset = [], 0
    for i, n in enumerate(sizes):
        tokens = (offset + np.arange(n)) % 60000
        offset += n
        write_shard(folder / f"{prefix}_{i:06d}.bin", tokens)
        shards.append(tokens)
    return shards


def expected_batches(shards, B, T, rank, world_size, orders):
    """llm.c's walk, written out: per epoch, per shard in that epoch's order, every full
    global window of world_size*B*T+1 tokens, each rank taking its B*T+1 slice."""
    BT = B * T
    for order in orders:
        for s in order:
            tokens = shards[s]
            for pos in range(0, len(tokens) - world_size * BT, world_size * BT):
                chunk = torch.from_numpy(tokens[pos + rank * BT : pos + rank * BT + BT + 1].astype(np.int64))
                yield chunk[:-1].view(B, T), chunk[1:].view(B, T)


def assert_batches_equal(loader, expected):
    for step, (x_exp, y_exp) in enumerate(expected):
        x, y = loader.next_batch()
        assert x.dtype == torch.int64 and y.dtype == torch.int64 and x.device.type == "cpu"
        assert torch.equal(x, x_exp) and torch.equal(y, y_exp), f"batch {step}"


def test_batches_are_manual_slices(tmp_path):
    shards = make_shards(tmp_path, [100])
    loader = DistributedDataLoader(str(tmp_path / "*.bin"), B=2, T=8)
    x, y = loader.next_batch()
    assert x.shape == (2, 8) and y.shape == (2, 8)
    assert torch.equal(x.flatten(), torch.from_numpy(shards[0][:16]).long())
    assert torch.equal(y.flatten(), torch.from_numpy(shards[0][1:17]).long())
    x2, _ = loader.next_batch()  # the next window starts where the last inputs ended
    assert torch.equal(x2.flatten(), torch.from_numpy(shards[0][16:32]).long())
    assert loader.num_tokens == 100 and len(loader.files) == 1


def test_two_ranks_take_disjoint_slices_of_one_window(tmp_path):
    shards = make_shards(tmp_path, [81, 150])
    B, T = 2, 5
    ranks = [DistributedDataLoader(str(tmp_path / "*.bin"), B, T, rank=r, world_size=2) for r in range(2)]
    for _ in range(6):  # crosses into the second shard
        (x0, y0), (x1, y1) = (loader.next_batch() for loader in ranks)
        window = torch.cat([x0.flatten(), x1.flatten(), y1.flatten()[-1:]])
        assert torch.equal(y0.flatten()[-1], x1.flatten()[0])  # adjacent, not overlapping
        assert len(set(x0.flatten().tolist()) & set(x1.flatten().tolist())) == 0
        assert torch.equal(window[1:], torch.cat([y0.flatten(), y1.flatten()]))
    for r in range(2):
        loader = DistributedDataLoader(str(tmp_path / "*.bin"), B, T, rank=r, world_size=2)
        assert_batches_equal(loader, expected_batches(shards, B, T, r, 2, [[0, 1]] * 3))


def test_shard_rotation_and_epoch_wrap(tmp_path):
    shards = make_shards(tmp_path, [50, 33, 64])
    B, T = 1, 8
    loader = DistributedDataLoader(str(tmp_path / "*.bin"), B, T)
    per_shard = [(len(s) - 1) // (B * T) for s in shards]  # full windows per shard: 6, 4, 7
    assert per_shard == [6, 4, 7]
    for _ in range(per_shard[0]):
        loader.next_batch()
    assert loader.current_file.endswith("000001.bin") and loader.position == 0
    for _ in range(per_shard[1] + per_shard[2]):
        loader.next_batch()
    assert loader.epoch == 1 and loader.current_file.endswith("000000.bin")
    loader.reset()
    assert_batches_equal(loader, expected_batches(shards, B, T, 0, 1, [[0, 1, 2]] * 3))
    assert loader.epoch == 3


def test_file_list_is_sorted(tmp_path):
    make_shards(tmp_path, [40, 40, 40])
    files = sorted(str(p) for p in tmp_path.iterdir())
    loader = DistributedDataLoader(list(reversed(files)), B=1, T=4)
    assert loader.files == files


def _epoch_orders(loader, epochs):
    """The shard order the loader walks in each epoch (one batch per shard with these sizes)."""
    orders = []
    for _ in range(epochs):
        order = []
        for _ in loader.files:
            x, _ = loader.next_batch()
            order.append(int(x[0, 0]) // 1000)
        orders.append(order)
    return orders


def test_seeded_shard_order(tmp_path):
    for i in range(6):  # one batch of B*T=8 per shard; the first token tells the shard
        write_shard(tmp_path / f"d_{i:06d}.bin", 1000 * i + np.arange(9))
    pattern = str(tmp_path / "*.bin")
    sequential = _epoch_orders(DistributedDataLoader(pattern, 1, 8), 3)
    assert sequential == [list(range(6))] * 3
    a = _epoch_orders(DistributedDataLoader(pattern, 1, 8, seed=1), 4)
    assert a == _epoch_orders(DistributedDataLoader(pattern, 1, 8, seed=1), 4)  # deterministic
    assert all(sorted(order) == list(range(6)) for order in a)  # each shard once per epoch
    assert len({tuple(order) for order in a}) > 1  # reshuffled every epoch
    b = _epoch_orders(DistributedDataLoader(pattern, 1, 8, seed=2), 4)
    assert a != b


@pytest.mark.parametrize("seed", [None, 7])
@pytest.mark.parametrize("steps", [3, 6, 10, 17, 40])  # mid-shard, at shard ends, across epochs
def test_state_dict_resumes_exactly(tmp_path, seed, steps):
    make_shards(tmp_path, [61, 61, 45])
    pattern = str(tmp_path / "*.bin")
    B, T, world = 1, 5, 2
    for rank in range(world):
        loader = DistributedDataLoader(pattern, B, T, rank=rank, world_size=world, seed=seed)
        for _ in range(steps):
            loader.next_batch()
        state = json.loads(json.dumps(loader.state_dict()))  # survives a checkpoint as JSON
        expected = [loader.next_batch() for _ in range(15)]
        resumed = DistributedDataLoader(pattern, B, T, rank=rank, world_size=world, seed=seed)
        resumed.load_state_dict(state)
        assert_batches_equal(resumed, expected)
        assert resumed.state_dict() == loader.state_dict()


def test_load_state_dict_rejects_another_configuration(tmp_path):
    make_shards(tmp_path, [100, 100])
    pattern = str(tmp_path / "*.bin")
    state = DistributedDataLoader(pattern, 2, 4).state_dict()
    with pytest.raises(ValueError, match="B: saved 2, now 3"):
        DistributedDataLoader(pattern, 3, 4).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        DistributedDataLoader(pattern, 2, 4, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="position"):
        DistributedDataLoader(pattern, 2, 4).load_state_dict({**state, "position": 95})


def test_too_small_shard(tmp_path):
    make_shards(tmp_path, [100, 20])
    with pytest.raises(ValueError, match=r"000001\.bin has 20 tokens.*2\*2\*8\+1 = 33.*smaller B or T"):
        DistributedDataLoader(str(tmp_path / "*.bin"), B=2, T=8, world_size=2)
    DistributedDataLoader(str(tmp_path / "*.bin"), B=1, T=8, world_size=2)  # 17 tokens fit


def test_missing_files(tmp_path):
    pattern = str(tmp_path / "fineweb_train_*.bin")
    with pytest.raises(FileNotFoundError, match="fineweb_train_"):
        DistributedDataLoader(pattern, 1, 4)
    with pytest.raises(FileNotFoundError, match="gone.bin"):
        DistributedDataLoader([tmp_path / "gone.bin"], 1, 4)


def test_bad_shard_is_found_at_construction(tmp_path):
    make_shards(tmp_path, [100, 100])
    _corrupt(tmp_path / "data_train_000001.bin", "truncated")
    with pytest.raises(ShardFormatError, match="000001.bin is truncated"):
        DistributedDataLoader(str(tmp_path / "*.bin"), 1, 4)


def write_manifest(folder: Path, names, prefix="data"):
    entries = [{"file": n, "tokens": read_shard_header(folder / n), "sha256": file_sha256(folder / n)} for n in names]
    (folder / f"{prefix}{MANIFEST_SUFFIX}").write_text(json.dumps({"shards": entries}))


def _flip_token_byte(path: Path, index: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[4 * HEADER_INTS + 2 * index] ^= 0x04  # a token changes; the header and the size stay valid
    path.write_bytes(bytes(raw))


def test_write_shard_returns_the_files_sha256(tmp_path):
    digest = write_shard(tmp_path / "s.bin", np.arange(300))
    assert digest == hashlib.sha256((tmp_path / "s.bin").read_bytes()).hexdigest() == file_sha256(tmp_path / "s.bin")


def test_damaged_shard_listed_in_a_manifest_is_refused(tmp_path):
    shards = make_shards(tmp_path, [100, 100])
    write_manifest(tmp_path, ["data_train_000000.bin", "data_train_000001.bin"])
    pattern = str(tmp_path / "data_train_*.bin")
    assert_batches_equal(DistributedDataLoader(pattern, 2, 8), expected_batches(shards, 2, 8, 0, 1, [[0, 1]]))

    # the first shard is checked when the loader opens it, before a batch is made
    _flip_token_byte(tmp_path / "data_train_000000.bin", 13)
    with pytest.raises(ShardFormatError, match=r"data_train_000000\.bin is damaged: its sha256 is") as info:
        DistributedDataLoader(pattern, 2, 8)
    assert f"{tmp_path / 'data_manifest.json'} records" in str(info.value) and "--verify_shards 0" in str(info.value)
    loader = DistributedDataLoader(pattern, 2, 8, verify=False)  # the check is off: the damage passes
    assert loader.next_batch()[0][1, 5].item() == shards[0][8 + 5] ^ 0x04

    # a later shard is checked when the walk reaches it, before any of its tokens are used
    make_shards(tmp_path, [100, 100])
    _flip_token_byte(tmp_path / "data_train_000001.bin", 3)
    loader = DistributedDataLoader(pattern, 2, 8)
    for _ in range(5):  # shard 0 holds 6 windows of 17 tokens; after the 6th the loader opens shard 1
        loader.next_batch()
    with pytest.raises(ShardFormatError, match=r"data_train_000001\.bin is damaged"):
        loader.next_batch()


def test_each_listed_shard_is_hashed_once_per_loader(tmp_path, monkeypatch):
    import pyllmc.data as data

    shards = make_shards(tmp_path, [40, 40, 40])
    write_manifest(tmp_path, ["data_train_000000.bin", "data_train_000002.bin"])  # shard 1 is not listed
    hashed = []
    real = data.file_sha256
    monkeypatch.setattr(data, "file_sha256", lambda path: hashed.append(Path(path).name) or real(path))
    loader = DistributedDataLoader(str(tmp_path / "data_train_*.bin"), 1, 8)
    assert_batches_equal(loader, expected_batches(shards, 1, 8, 0, 1, [[0, 1, 2]] * 3))  # three epochs
    loader.load_state_dict(loader.state_dict())
    assert hashed == ["data_train_000000.bin", "data_train_000002.bin"]


def test_shards_without_a_manifest_are_not_checked(tmp_path):
    shards = make_shards(tmp_path, [100])
    _flip_token_byte(tmp_path / "data_train_000000.bin", 0)  # nothing records what the shard should be
    (tmp_path / "other_manifest.json").write_text(json.dumps({"shards": [{"file": "x.bin", "sha256": "00"}]}))
    loader = DistributedDataLoader(str(tmp_path / "*.bin"), 2, 8)
    assert loader.checksums == {}
    assert loader.next_batch()[0][0, 0].item() == shards[0][0] ^ 0x04
    (tmp_path / "other_manifest.json").write_text("{not json")
    with pytest.raises(ShardFormatError, match="other_manifest.json is unreadable"):
        DistributedDataLoader(str(tmp_path / "*.bin"), 2, 8)


def write_manifest_with_max_ids(folder: Path, names, prefix="data", **overrides):
    """A manifest as the data scripts write it (pyllmc.data.write_shard_entry's fields); overrides:
    file_stem={field: value} for entries edited by hand."""
    entries = []
    for n in names:
        sha, top = file_sha256(folder / n), int(read_shard(folder / n).max())
        entries.append({"file": n, "tokens": read_shard_header(folder / n), "sha256": sha, "max_token_id": top,
                        **overrides.get(Path(n).stem, {})})
    (folder / f"{prefix}{MANIFEST_SUFFIX}").write_text(json.dumps({"shards": entries}))


@pytest.fixture
def shard_reads(monkeypatch):
    """{"scanned": [...], "hashed": [...], "searched": [...]}: the shards read whole, by name, through the
    loader's ways of reading a whole shard (the max-id scan; the sha256 check, alone or with the max id in
    the same pass; the search for an id past the vocabulary)."""
    import pyllmc.data as data

    reads = {"scanned": [], "hashed": [], "searched": []}

    def counted(kind, real):
        return lambda path, *a: reads[kind].append(Path(path).name) or real(path, *a)

    monkeypatch.setattr(data, "max_token_id", counted("scanned", data.max_token_id))
    monkeypatch.setattr(data, "file_sha256", counted("hashed", data.file_sha256))
    monkeypatch.setattr(data, "shard_digest", counted("hashed", data.shard_digest))
    monkeypatch.setattr(data, "check_token_ids", counted("searched", data.check_token_ids))
    return reads


def test_write_shard_entry_records_what_the_loader_trusts(tmp_path):
    entry = write_shard_entry(tmp_path / "x_train_000001.bin", [5, 70000, 3], dtype="uint32")
    assert entry == {"file": "x_train_000001.bin", "tokens": 3,
                     "sha256": file_sha256(tmp_path / "x_train_000001.bin"), "max_token_id": 70000}
    assert write_shard_entry(tmp_path / "empty.bin", [])["max_token_id"] == -1
    assert shard_digest(tmp_path / "x_train_000001.bin") == (entry["sha256"], 70000)
    assert shard_digest(tmp_path / "empty.bin") == (file_sha256(tmp_path / "empty.bin"), -1)


@pytest.mark.parametrize("chunk", [1024, 2048, 3072])  # the header alone, header + tokens, chunks of odd counts
def test_the_one_pass_digest_crosses_chunks(tmp_path, monkeypatch, chunk):
    import pyllmc.data as data

    monkeypatch.setattr(data, "_HASH_CHUNK", chunk)
    for dtype, top_at in (("uint16", 0), ("uint16", 1499), ("uint32", 700)):
        tokens = np.arange(1500) % 1000
        tokens[top_at] = 60000
        path = tmp_path / f"{dtype}_{top_at}.bin"
        write_shard(path, tokens, dtype=dtype)
        assert shard_digest(path) == (hashlib.sha256(path.read_bytes()).hexdigest(), 60000)


def test_start_up_reads_each_listed_shard_once(tmp_path, shard_reads):
    """The trainer's start-up (train_gpt2.py's check_vocabulary: loader.max_token_id(), then
    check_token_ids only when an id is too large) takes the max ids of listed shards from the
    manifest: the first shard is read once (its sha256 check, which recomputes its max id in the same
    pass), the other listed shards not at all until the walk opens them; an unlisted one is scanned."""
    shards = make_shards(tmp_path, [40, 40, 40])  # largest ids 39, 79, 119
    write_manifest_with_max_ids(tmp_path, ["data_train_000000.bin", "data_train_000002.bin"])  # 1 is not listed
    loader = DistributedDataLoader(str(tmp_path / "data_train_*.bin"), 1, 8)
    assert loader.max_token_id() == (119, str(tmp_path / "data_train_000002.bin"))
    loader.check_token_ids(120)
    assert shard_reads == {"scanned": ["data_train_000001.bin"], "hashed": ["data_train_000000.bin"], "searched": []}
    assert loader.max_token_id() == (119, str(tmp_path / "data_train_000002.bin"))  # remembered: no second scan
    assert shard_reads["scanned"] == ["data_train_000001.bin"]
    # a vocabulary too small: only the shards whose max id does not fit are searched for the offending id
    with pytest.raises(ShardFormatError, match=r"000002\.bin holds token id 100 at position 20 "):
        loader.check_token_ids(100)
    assert shard_reads["searched"] == ["data_train_000002.bin"]
    # the walk checks the other listed shard when it gets there, once
    assert_batches_equal(loader, expected_batches(shards, 1, 8, 0, 1, [[0, 1, 2]] * 2))
    assert shard_reads["hashed"] == ["data_train_000000.bin", "data_train_000002.bin"]

    # with the check off, the recorded max ids are used all the same: nothing listed is read at start-up
    shard_reads["scanned"].clear(), shard_reads["hashed"].clear()
    unverified = DistributedDataLoader(str(tmp_path / "data_train_*.bin"), 1, 8, verify=False)
    assert unverified.max_token_id() == (119, str(tmp_path / "data_train_000002.bin"))
    assert shard_reads["scanned"] == ["data_train_000001.bin"] and shard_reads["hashed"] == []


def test_a_manifest_without_max_ids_still_works(tmp_path, shard_reads):
    """Manifests from before max_token_id (sha256 only): their shards are checked as before and scanned
    for their max id, like shards no manifest lists."""
    make_shards(tmp_path, [40, 40])
    write_manifest(tmp_path, ["data_train_000000.bin", "data_train_000001.bin"])
    loader = DistributedDataLoader(str(tmp_path / "data_train_*.bin"), 1, 8)
    assert loader.max_token_id() == (79, str(tmp_path / "data_train_000001.bin"))
    assert shard_reads["scanned"] == ["data_train_000000.bin", "data_train_000001.bin"]
    assert shard_reads["hashed"] == ["data_train_000000.bin"]
    # a manifest that records the field for one shard only: that one is spared the scan
    write_manifest_with_max_ids(tmp_path, ["data_train_000000.bin", "data_train_000001.bin"])
    manifest = json.loads((tmp_path / "data_manifest.json").read_text())
    del manifest["shards"][0]["max_token_id"]
    (tmp_path / "data_manifest.json").write_text(json.dumps(manifest))
    shard_reads["scanned"].clear()
    assert DistributedDataLoader(str(tmp_path / "data_train_*.bin"), 1, 8).max_token_id()[0] == 79
    assert shard_reads["scanned"] == ["data_train_000000.bin"]


def test_a_recorded_max_id_that_disagrees_with_the_shard_is_refused_when_opened(tmp_path):
    shards = make_shards(tmp_path, [40, 40])
    names = ["data_train_000000.bin", "data_train_000001.bin"]
    pattern = str(tmp_path / "data_train_*.bin")

    # the shard changed (an id past the recorded max): its sha256 no longer matches
    raw = bytearray((tmp_path / names[1]).read_bytes())
    write_manifest_with_max_ids(tmp_path, names)
    raw[4 * HEADER_INTS + 2 * 7: 4 * HEADER_INTS + 2 * 8] = (50000).to_bytes(2, "little")
    (tmp_path / names[1]).write_bytes(bytes(raw))
    loader = DistributedDataLoader(pattern, 1, 8)
    assert loader.max_token_id() == (79, str(tmp_path / names[1]))  # the manifest's word, until the shard opens
    for _ in range(3):  # shard 0 holds 4 windows of 9 tokens; taking the 4th moves the loader to shard 1
        loader.next_batch()
    with pytest.raises(ShardFormatError, match=r"data_train_000001\.bin is damaged: its sha256 is"):
        loader.next_batch()

    # the manifest edited (a max id too small), the shard intact: the same pass that checks the sha256 tells
    make_shards(tmp_path, [40, 40])
    write_manifest_with_max_ids(tmp_path, names, data_train_000001={"max_token_id": 50})
    loader = DistributedDataLoader(pattern, 1, 8)
    assert loader.max_token_id() == (50, str(tmp_path / names[1]))
    for _ in range(3):
        loader.next_batch()
    with pytest.raises(ShardFormatError, match=r"data_train_000001\.bin matches the sha256 that .*data_manifest"
                                               r"\.json records, but its largest token id is 79, not the "
                                               r"max_token_id 50"):
        loader.next_batch()
    write_manifest_with_max_ids(tmp_path, names, data_train_000000={"max_token_id": 38})
    with pytest.raises(ShardFormatError, match=r"000000\.bin .* largest token id is 39, not the max_token_id 38"):
        DistributedDataLoader(pattern, 1, 8)  # the first shard: refused before the loader is made
    # with the check off the recorded value stands, as the shard itself does
    unverified = DistributedDataLoader(pattern, 1, 8, verify=False)
    assert unverified.max_token_id() == (79, str(tmp_path / names[1]))
    assert_batches_equal(unverified, expected_batches(shards, 1, 8, 0, 1, [[0, 1]]))


@pytest.mark.parametrize("value, message", [
    ("79", r"records max_token_id '79' for data_train_000001\.bin: expected an integer in \[-1, 2\*\*32\)"),
    (True, r"records max_token_id True for"),
    (-2, r"records max_token_id -2 for"),
    (2**32, r"records max_token_id 4294967296 for"),
    (70000, r"records max_token_id 70000 for .*data_train_000001\.bin, which holds uint16 ids"),
])
def test_a_malformed_max_id_is_refused(tmp_path, value, message):
    make_shards(tmp_path, [40, 40])
    write_manifest_with_max_ids(tmp_path, ["data_train_000000.bin", "data_train_000001.bin"],
                                data_train_000001={"max_token_id": value})
    with pytest.raises(ShardFormatError, match=message):
        DistributedDataLoader(str(tmp_path / "data_train_*.bin"), 1, 8, verify=False)


def test_two_manifests_must_agree_on_a_max_id(tmp_path):
    make_shards(tmp_path, [40])
    write_manifest_with_max_ids(tmp_path, ["data_train_000000.bin"], prefix="a")
    write_manifest_with_max_ids(tmp_path, ["data_train_000000.bin"], prefix="b")
    assert DistributedDataLoader(str(tmp_path / "*.bin"), 1, 8).max_token_id()[0] == 39
    write_manifest(tmp_path, ["data_train_000000.bin"], prefix="c")  # one without the field does not disagree
    assert recorded_shards([str(tmp_path / "data_train_000000.bin")])[str(tmp_path / "data_train_000000.bin")] \
        .max_token_id == 39
    write_manifest_with_max_ids(tmp_path, ["data_train_000000.bin"], prefix="b",
                                data_train_000000={"max_token_id": 40})
    with pytest.raises(ShardFormatError, match=r"a_manifest\.json and .*b_manifest\.json record different "
                                               r"max_token_id for data_train_000000\.bin"):
        DistributedDataLoader(str(tmp_path / "*.bin"), 1, 8)


def test_bad_arguments(tmp_path):
    make_shards(tmp_path, [100])
    with pytest.raises(ValueError, match="rank"):
        DistributedDataLoader(str(tmp_path / "*.bin"), 1, 4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="positive"):
        DistributedDataLoader(str(tmp_path / "*.bin"), 0, 4)


# ---------------------------------------------------------------------------------------
# data preparation scripts


# The scripts are thin command lines over the package (pyllmc.fineweb, pyllmc.corpus, pyllmc.audio): a
# test runs each once as a user does, in a subprocess; the rest call the package in this process.
def run_script(name, *args, **kwargs):
    result = subprocess.run([sys.executable, str(REPO / "dev" / "data" / name), *map(str, args)],
                            capture_output=True, text=True, timeout=300, **kwargs)
    return result


def test_tinyshakespeare_script(tmp_path):
    source = data_file("tinyshakespeare.txt")
    result = run_script("tinyshakespeare.py", "--input", source, "--output_dir", tmp_path)
    assert result.returncode == 0, result.stderr
    val = read_shard(tmp_path / "tiny_shakespeare_val.bin")
    train = read_shard(tmp_path / "tiny_shakespeare_train.bin")
    assert (len(val), len(train)) == (32768, 305260)  # the counts llm.c's script reports
    tokens = np.concatenate([val, train]).astype(np.int64)
    text = source.read_text(encoding="utf-8")
    sections = text.split("\n\n")
    starts = np.flatnonzero(tokens == EOT_TOKEN)
    assert len(starts) == len(sections) and starts[0] == 0
    # each section is EOT + its tokens; all but the last keep their "\n\n"
    for i in (0, 1, len(sections) // 2, len(sections) - 1):
        end = starts[i + 1] if i + 1 < len(sections) else len(tokens)
        body = sections[i] + ("\n\n" if i < len(sections) - 1 else "")
        assert tokens[starts[i] + 1 : end].tolist() == encode(body)
    assert decode(tokens[tokens != EOT_TOKEN]) == text
    manifest = json.loads((tmp_path / "tiny_shakespeare_manifest.json").read_text())
    assert [(s["file"], s["tokens"]) for s in manifest["shards"]] == [("tiny_shakespeare_val.bin", 32768),
                                                                     ("tiny_shakespeare_train.bin", 305260)]
    assert all(s["sha256"] == file_sha256(tmp_path / s["file"]) for s in manifest["shards"])
    assert [s["max_token_id"] for s in manifest["shards"]] == [int(val.max()), int(train.max())]
    loader = DistributedDataLoader(str(tmp_path / "tiny_shakespeare_*.bin"), 4, 64)
    assert sorted(Path(f).name for f in loader.checksums) == ["tiny_shakespeare_train.bin", "tiny_shakespeare_val.bin"]


FINEWEB_SHARD = 20000


def fineweb_documents():
    csv.field_size_limit(2**31 - 1)
    with open(data_file("fineweb_edu_sample150_annotated.csv"), encoding="utf-8", newline="") as f:
        return [row["text"] for row in csv.DictReader(f)]


def shard_files(folder):
    return sorted(p for p in folder.iterdir() if p.suffix == ".bin")


def snapshot(folder):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in shard_files(folder)}


def test_fineweb_script_end_to_end(tmp_path, capsys):
    source = data_file("fineweb_edu_sample150_annotated.csv")
    out = tmp_path / "out"
    args = ["--input", source, "--output_dir", out, "--shard_size", FINEWEB_SHARD, "--num_workers", 2, "--chunksize", 4]
    result = run_script("fineweb.py", *args)
    assert result.returncode == 0, result.stderr

    documents = fineweb_documents()
    assert len(documents) == 150
    expected = np.concatenate([encode_document(d) for d in documents])
    files = shard_files(out)
    names = [p.name for p in files]
    assert names[-1] == "fineweb_val_000000.bin"  # sorts last; shard 0 is the validation split
    assert names[:-1] == [f"fineweb_train_{i:06d}.bin" for i in range(1, len(files))]
    shards = [read_shard(out / f"fineweb_{'val' if i == 0 else 'train'}_{i:06d}.bin") for i in range(len(files))]
    assert all(len(s) == FINEWEB_SHARD for s in shards[:-1]) and 0 < len(shards[-1]) <= FINEWEB_SHARD
    assert sum(len(s) for s in shards) == len(expected) == sum(len(encode_document(d)) for d in documents)
    np.testing.assert_array_equal(np.concatenate(shards), expected)
    assert len(files) == 5
    recorded = json.loads((out / "fineweb_manifest.json").read_text())["shards"]
    assert {e["file"]: e["sha256"] for e in recorded} == {p.name: file_sha256(p) for p in files}
    assert {e["file"]: e["max_token_id"] for e in recorded} == {p.name: int(read_shard(p).max()) for p in files}

    # the reruns run in this process (a fresh interpreter per run costs seconds of imports)
    args = [str(a) for a in args[:-4]] + ["--num_workers", "0"]
    # a second run finds everything done and touches nothing
    before = snapshot(out)
    fineweb.main(args)
    assert "writing from" not in capsys.readouterr().out
    assert snapshot(out) == before

    # a deleted shard is recreated identically, the others are left alone
    (out / "fineweb_train_000002.bin").unlink()
    fineweb.main(args)
    assert "writing from shard 2 on" in capsys.readouterr().out
    after = snapshot(out)
    assert after["fineweb_train_000002.bin"][0] == before["fineweb_train_000002.bin"][0]
    assert {k: v for k, v in after.items() if k != "fineweb_train_000002.bin"} == \
           {k: v for k, v in before.items() if k != "fineweb_train_000002.bin"}


def test_fineweb_local_input_runs_end_to_end_with_its_defaults(tmp_path):
    """python dev/data/fineweb.py --input my_docs.csv (the README's line) with no other flag: shards of about a
    tenth of the input (a val shard and several train shards), written to the user cache (never the source
    tree), and the train_gpt2.py flags it prints read exactly the shards it wrote."""
    import glob
    import shlex

    source = data_file("fineweb_edu_sample150_annotated.csv")
    def source_tree():
        return sorted(p.relative_to(REPO) for p in (REPO / "dev" / "data").rglob("*") if "__pycache__" not in p.parts)

    before = source_tree()
    env = {**os.environ, "PYLLMC_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, str(REPO / "dev" / "data" / "fineweb.py"), "--input", str(source),
                             "--num_workers", "0"], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    (out,) = (tmp_path / "cache" / "data").iterdir()
    assert out.name.startswith("fineweb-fineweb_edu_sample150_annotated-")
    names = sorted(p.name for p in shard_files(out))
    assert names[-1] == "fineweb_val_000000.bin" and len(names) >= 5, names
    assert names[:-1] == [f"fineweb_train_{i:06d}.bin" for i in range(1, len(names))]
    shards = [read_shard(out / name) for name in [names[-1], *names[:-1]]]
    size = json.loads((out / "fineweb_manifest.json").read_text())["config"]["shard_size"]
    assert all(len(s) == size for s in shards[:-1]) and 1000 <= size < 20000
    expected = np.concatenate([encode_document(d) for d in fineweb_documents()])
    np.testing.assert_array_equal(np.concatenate(shards), expected)
    assert source_tree() == before  # nothing written into the source tree

    # the last line: the training flags, reading exactly the shards written
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith("train on them: python train_gpt2.py --input_bin "), result.stdout
    flags = shlex.split(line.split("train_gpt2.py", 1)[1])
    assert flags[0] == "--input_bin" and flags[2] == "--input_val_bin"
    assert sorted(Path(p).name for p in glob.glob(flags[1])) == names[:-1]
    assert [Path(p).name for p in glob.glob(flags[3])] == ["fineweb_val_000000.bin"]
    loader = DistributedDataLoader(flags[1], 4, 64)
    assert len(loader.files) == len(names) - 1 and loader.next_batch()[0].shape == (4, 64)


def test_fineweb_input_too_small_for_a_val_and_a_train_shard_is_refused(tmp_path):
    small = tmp_path / "small.csv"
    with open(small, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([["text"], ["A short document."], ["Another one."]])
    with pytest.raises(SystemExit, match=r"holds 29 characters, about 7 tokens: too little .* --shard_size"):
        fineweb.main(["--input", str(small), "--output_dir", str(tmp_path / "a"), "--num_workers", "0"])
    assert not (tmp_path / "a").exists()
    # a --shard_size that leaves no training shard: said after tokenising, with the size that would do
    with pytest.raises(SystemExit, match=r"made 9 tokens, one shard of --shard_size 100: training needs a validation "
                                         r"shard \(shard 0\) and at least one training shard; pass --shard_size 4"):
        fineweb.main(["--input", str(small), "--output_dir", str(tmp_path / "b"), "--shard_size", "100",
                      "--num_workers", "0"])


def test_fineweb_resumes_interrupted_and_damaged_runs(tmp_path):
    source = data_file("fineweb_edu_sample150_annotated.csv")
    out = tmp_path / "out"
    args = ["--input", str(source), "--output_dir", str(out), "--shard_size", str(FINEWEB_SHARD), "--num_workers", "0"]
    fineweb.main(args)
    reference = {name: data for name, (data, _) in snapshot(out).items()}

    # an interrupted run: the manifest records shards 0-1 only, the later files never appeared
    manifest_path = out / "fineweb_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["shards"], manifest["complete"] = manifest["shards"][:2], False
    manifest_path.write_text(json.dumps(manifest))
    for name in reference:
        if int(name[-10:-4]) >= 2:
            (out / name).unlink()
    # and a damaged shard
    (out / "fineweb_train_000001.bin").write_bytes(reference["fineweb_train_000001.bin"][:-10])
    fineweb.main(args)
    assert {name: data for name, (data, _) in snapshot(out).items()} == reference
    assert json.loads(manifest_path.read_text())["complete"] is True

    # a flipped bit inside a shard (valid header, right size): its sha256 tells, and it is made again
    _flip_token_byte(out / "fineweb_train_000003.bin", 1234)
    with pytest.raises(ShardFormatError, match="fineweb_train_000003.bin is damaged"):
        DistributedDataLoader(str(out / "fineweb_train_*.bin"), 4, 64, seed=None).load_state_dict(
            {"epoch": 0, "shard_index": 2, "position": 0})
    fineweb.main(args)
    assert {name: data for name, (data, _) in snapshot(out).items()} == reference

    # a manifest from before sha256 and max_token_id were recorded gets them on the next run, shards untouched
    full = json.loads(manifest_path.read_text())
    assert all(e["max_token_id"] == int(read_shard(out / e["file"]).max()) for e in full["shards"])
    manifest_path.write_text(json.dumps({**full, "shards": [{k: v for k, v in e.items()
                                                             if k not in ("sha256", "max_token_id")}
                                                            for e in full["shards"]]}))
    before = snapshot(out)
    fineweb.main(args)
    assert json.loads(manifest_path.read_text()) == full and snapshot(out) == before

    # other settings in the same folder are refused unless asked to overwrite
    with pytest.raises(SystemExit, match="--overwrite"):
        fineweb.main(args[:-4] + ["--shard_size", "30000", "--num_workers", "0"])
    fineweb.main(args[:-4] + ["--shard_size", "30000", "--num_workers", "0", "--overwrite"])
    assert read_shard_header(out / "fineweb_val_000000.bin") == 30000


def test_fineweb_local_formats(tmp_path):
    docs = ["First document.\nWith two lines.", "Second, \"quoted\", document", "Third ünïcode 🦙", "4th"]
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    with open(folder / "a.jsonl", "w", encoding="utf-8") as f:
        for d in docs[:2]:
            f.write(json.dumps({"text": d, "id": 1}) + "\n")
    with open(folder / "b.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "text"])
        writer.writerow([3, docs[2]])
    (folder / "sub" / "c.txt").write_text(docs[3], encoding="utf-8")
    (folder / "ignored.md").write_text("not an input")
    out = tmp_path / "out"
    fineweb.main(["--input", str(folder), "--output_dir", str(out), "--shard_size", "10", "--num_workers", "0"])
    tokens = np.concatenate([read_shard(p) for p in sorted(shard_files(out), key=lambda p: p.name[-10:])])
    np.testing.assert_array_equal(tokens, np.concatenate([encode_document(d) for d in docs]))
    with pytest.raises(SystemExit, match="no column 'body'"):
        fineweb.main(["--input", str(folder / "b.csv"), "--output_dir", str(tmp_path / "o2"),
                      "--text_column", "body", "--num_workers", "0"])


class _FakeHFDataset:
    """Just the part of datasets.Dataset that fineweb.py uses."""

    def __init__(self, rows, calls):
        self.rows, self.calls = rows, calls

    def __len__(self):
        return len(self.rows)

    def select_columns(self, columns):
        self.calls.append(("select_columns", tuple(columns)))
        return _FakeHFDataset([{c: r[c] for c in columns} for r in self.rows], self.calls)

    def select(self, indices):
        self.calls.append(("select", indices.start))
        return _FakeHFDataset([self.rows[i] for i in indices], self.calls)

    def iter(self, batch_size):
        for i in range(0, len(self.rows), batch_size):
            chunk = self.rows[i : i + batch_size]
            yield {key: [r[key] for r in chunk] for key in chunk[0]}


def test_fineweb_download_path_with_a_stand_in_datasets_module(tmp_path, monkeypatch):
    import types

    docs = [f"Document number {i}. " * (i % 7 + 1) for i in range(60)]
    calls = []

    def load_dataset(path, name, split):
        calls.append(("load_dataset", path, name, split))
        return _FakeHFDataset([{"text": d, "id": i, "score": 3.0} for i, d in enumerate(docs)], calls)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    out = tmp_path / "out"
    args = ["--version", "100B", "--output_dir", str(out), "--shard_size", "100", "--num_workers", "0"]
    fineweb.main(args)
    assert calls[0] == ("load_dataset", "HuggingFaceFW/fineweb-edu", "sample-100BT", "train")
    shards = [read_shard(p) for p in sorted(shard_files(out), key=lambda p: p.name[-10:])]
    np.testing.assert_array_equal(np.concatenate(shards), np.concatenate([encode_document(d) for d in docs]))
    assert len(shards) > 3

    # resuming in the middle starts the dataset at the recorded document
    manifest = json.loads((out / "fineweb_manifest.json").read_text())
    third = manifest["shards"][3]
    reference = (out / third["file"]).read_bytes()
    (out / third["file"]).unlink()
    calls.clear()
    fineweb.main(args)
    assert ("select", third["start"][0]) in calls
    assert (out / third["file"]).read_bytes() == reference


def test_fineweb_parquet_input(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="reading parquet needs pyarrow")
    import pyarrow.parquet as pq

    docs = [f"parquet row {i}" for i in range(30)]
    pq.write_table(pa.table({"id": list(range(30)), "text": docs}), tmp_path / "part.parquet", row_group_size=7)
    out = tmp_path / "out"
    fineweb.main(["--input", str(tmp_path / "part.parquet"), "--output_dir", str(out), "--shard_size", "50",
                  "--num_workers", "0"])
    tokens = np.concatenate([read_shard(p) for p in sorted(shard_files(out), key=lambda p: p.name[-10:])])
    np.testing.assert_array_equal(tokens, np.concatenate([encode_document(d) for d in docs]))


def test_hellaswag_script_writes_into_the_user_cache_and_keeps_what_is_there(tmp_path):
    """python dev/data/hellaswag.py without --output writes pyllmc.corpus.hellaswag_path() (the user cache,
    not the source tree); run again without --input, it keeps that file instead of downloading."""
    from pyllmc import corpus

    source = tmp_path / "official.jsonl"  # the official file's fields
    rows = [{"ind": i, "activity_label": "Baking", "ctx": f"Context {i}.", "label": i % 4,
             "endings": ["a.", "b.", "c.", "d."], "split": "val"} for i in range(3)]
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    env = {**os.environ, "PYLLMC_CACHE_DIR": str(tmp_path / "cache")}
    result = run_script("hellaswag.py", "--input", source, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    target = tmp_path / "cache" / "data" / "hellaswag" / "hellaswag_val.jsonl"
    assert f"wrote 3 examples to {target}" in result.stdout
    with pytest.MonkeyPatch.context() as m:
        m.setenv("PYLLMC_CACHE_DIR", str(tmp_path / "cache"))
        assert corpus.hellaswag_path() == target
    written = target.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "official.jsonl"]
    # no --input: the file is there, so nothing is downloaded (this machine may be offline)
    result = run_script("hellaswag.py", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert f"{target} already holds 3 examples" in result.stdout and target.read_bytes() == written
