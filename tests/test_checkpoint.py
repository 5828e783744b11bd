"""pyllmc.checkpoint's checksums: no damaged byte of a checkpoint loads silently.

The sweep flips single bits across every region of a small but complete training checkpoint
(each model tensor, the optimizer's moments and step, the data-loader state, every RNG state,
the pickle that holds the non-tensor state, every zip header and record, the checksum record
itself) and asserts that each flipped file is refused with a ValueError naming it. A control
run of the same flips with verification off shows that they do load silently, with different
values, in every payload region: the sweep would fail if the checksum were not checked.
"""

import copy
import pickle
import random
import warnings
import zipfile

import numpy as np
import pytest
import torch

import pyllmc
from pyllmc import checkpoint
from pyllmc.data import DistributedDataLoader, write_shard
from pyllmc.model import GPT, GPTConfig


def small_training_state(tmp_path):
    """What train_gpt2.py saves, for a 1-layer model: model, AdamW state after a step, loader, RNGs."""
    config = GPTConfig(block_size=8, vocab_size=60, padded_vocab_size=64, n_layer=1, n_head=2, n_embd=8)
    model = GPT(config, seed=0)
    optimizer = pyllmc.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, backend="torch")
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    write_shard(tmp_path / "data_train_000001.bin", np.arange(200) % 60)
    loader = DistributedDataLoader(str(tmp_path / "data_train_*.bin"), 2, 4)
    loader.next_batch()
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    return {
        "model_config": {"n_layer": 1, "n_embd": 8},
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "ranks": [{"train_loader": loader.state_dict(), "rng": checkpoint.rng_state()}],
        "outliers": {"loss": {"values": [3.25, 3.5]}},
        "tokens_seen": 128,
    }


def walk(obj, path=""):
    """(path, leaf) for every leaf of a nested state."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from walk(v, f"{path}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from walk(v, f"{path}/{i}")
    else:
        yield path, obj


def same_state(a, b) -> bool:
    la, lb = list(walk(a)), list(walk(b))
    if [p for p, _ in la] != [p for p, _ in lb]:
        return False
    for (_, x), (_, y) in zip(la, lb):
        if type(x) is not type(y):
            return False
        if isinstance(x, torch.Tensor):
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x.view(-1).view(torch.uint8),
                                                                           y.view(-1).view(torch.uint8)):
                return False
        elif isinstance(x, np.ndarray):
            if x.dtype != y.dtype or x.tobytes() != y.tobytes():
                return False
        elif isinstance(x, float):
            if np.float64(x).tobytes() != np.float64(y).tobytes():
                return False
        elif x != y:
            return False
    return True


def category(state_path: str) -> str:
    if state_path.startswith("/model/"):
        return "model tensor"
    if state_path.startswith("/optimizer/"):
        return "optimizer state"
    if "/rng/" in state_path:
        return "rng state"
    raise AssertionError(state_path)


def regions(path, state):
    """[(label, category, start, end)] covering the file byte for byte, from its zip structure."""
    data = path.read_bytes()
    # torch.save names storages data/0, data/1, ... in the order the pickler meets them, which is
    # walk()'s order; a storage met again (lm_head.weight is wte.weight) keeps its first name
    storages = {}
    for state_path, leaf in walk(state):
        if isinstance(leaf, torch.Tensor):
            storage = leaf.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if key not in storages:
                storages[key] = (f"data/{len(storages)}", state_path, bytes(storage))
    members = {name: (state_path, raw) for name, state_path, raw in storages.values()}
    out = []
    with zipfile.ZipFile(path) as archive:
        infos = sorted(archive.infolist(), key=lambda i: i.header_offset)
        for info in infos:
            h = info.header_offset
            start = h + 30 + _u16(data, h + 26) + _u16(data, h + 28)  # local header: name and extra lengths
            end = start + info.compress_size
            name = info.filename.split("/", 1)[1]
            out.append((f"local header of {name}", "zip metadata", h, start))
            if name == "data.pkl":
                out.extend(pickle_regions(data, start, end, state))
            elif name.startswith("data/"):
                state_path, raw = members[name]
                assert data[start:end] == raw, (name, state_path)
                out.append((f"{name} = {state_path}", category(state_path), start, end))
            else:  # version, byteorder, .format_version, .storage_alignment, .data/serialization_id
                out.append((f"record {name}", "zip metadata", start, end))
            if info is not infos[-1]:  # padding up to the next local header, if any
                nxt = infos[infos.index(info) + 1].header_offset
                if nxt > end:
                    out.append((f"gap after {name}", "zip metadata", end, nxt))
        directory_start = end
    eocd = data.rindex(b"PK\x05\x06")
    out.append(("central directory and zip64 end records", "zip metadata", directory_start, eocd))
    out.append(("end of central directory record", "zip metadata", eocd, eocd + 22))
    out.append(("checksum record (zip comment)", "checksum record", eocd + 22, len(data)))
    covered = sorted((s, e) for _, _, s, e in out)
    assert covered[0][0] == 0 and covered[-1][1] == len(data)
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:])), "regions must tile the file"
    return out


def _u16(data, at):
    return int.from_bytes(data[at:at + 2], "little")


def pickle_regions(data, start, end, state):
    """The pickle split into the spans that hold the loader state and the numpy/python RNG states."""
    pkl = data[start:end]
    rank = state["ranks"][0]
    spans = []

    def find(needle, label, cat):
        at = pkl.find(needle)
        assert at >= 0, label
        spans.append((label, cat, start + at, start + at + len(needle)))

    find(rank["train_loader"]["file"].encode(), "pickle: loader state (current shard)", "loader state")
    # (numpy's RNG key is a tensor: its own zip member, found by regions())
    # python's Mersenne Twister state: 625 ints, each one pickle opcode with its argument
    find(b"".join(pickle.dumps(i, 2)[2:-1] for i in rank["rng"]["python"][1]), "pickle: python RNG state",
         "rng state")
    spans.sort(key=lambda s: s[2])
    out, pos = [], start
    for label, cat, s, e in spans:
        out.append(("pickle: structure and other non-tensor values", "pickled state", pos, s))
        out.append((label, cat, s, e))
        pos = e
    out.append(("pickle: structure and other non-tensor values", "pickled state", pos, end))
    return [r for r in out if r[3] > r[2]]


def flip_positions(start, end):
    n = end - start
    if n <= 48:
        return list(range(start, end))
    return sorted({start, end - 1, *(start + (n - 1) * i // 23 for i in range(24))})


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    state = small_training_state(d)
    path = checkpoint.save_checkpoint(d / "run", 7, copy.deepcopy(state))
    return path, path.read_bytes(), checkpoint.load_checkpoint(path)


def test_every_single_bit_flip_is_refused(clean, tmp_path):
    path, data, loaded = clean
    table = regions(path, loaded)
    assert checkpoint.read_checksum_record(path)[0] == checkpoint.default_algorithm()
    categories = {c for _, c, _, _ in table}
    assert categories == {"model tensor", "optimizer state", "loader state", "rng state", "pickled state",
                          "zip metadata", "checksum record"}
    tensor_paths = {p for p, leaf in walk(loaded) if isinstance(leaf, torch.Tensor)}
    assert {label.split(" = ")[1] for label, *_ in table if " = " in label} == tensor_paths - {"/model/lm_head.weight"}

    flipped = tmp_path / "ckpt_00000007.pt"
    outcomes, silent = {}, []
    for label, cat, start, end in table:
        for k, pos in enumerate(flip_positions(start, end)):
            bad = bytearray(data)
            bad[pos] ^= 1 << ((pos + k) % 8)
            flipped.write_bytes(bad)
            try:
                checkpoint.load_checkpoint(flipped)
            except ValueError as err:
                assert str(flipped) in str(err), err
                kind = ("checksum" if isinstance(err, checkpoint.ChecksumError) else "unreadable")
                outcomes[kind] = outcomes.get(kind, 0) + 1
            else:
                silent.append((label, pos))
    print(f"{sum(outcomes.values())} flips over {len(table)} regions: {outcomes}")
    assert not silent, f"flips that loaded without an error: {silent[:10]}"
    assert outcomes.get("checksum", 0) > 0.9 * sum(outcomes.values())


def test_the_flips_would_load_silently_without_the_checksum(clean, tmp_path):
    """The control: with verification off, flips in every payload region load, with other values."""
    path, data, loaded = clean
    flipped = tmp_path / "ckpt_00000007.pt"
    silently_different = set()
    for label, cat, start, end in regions(path, loaded):
        if cat in ("zip metadata", "checksum record", "pickled state"):
            continue
        for pos in (start, (start + end) // 2, end - 1):
            bad = bytearray(data)
            bad[pos] ^= 0x10
            flipped.write_bytes(bad)
            try:
                state = checkpoint.load_checkpoint(flipped, verify=False)
            except ValueError:
                continue
            if not same_state(state, loaded):
                silently_different.add(cat)
    assert silently_different == {"model tensor", "optimizer state", "loader state", "rng state"}


def test_checksum_error_names_the_damaged_part(clean, tmp_path):
    path, data, loaded = clean
    table = regions(path, loaded)
    label, _, start, end = next(r for r in table if r[0].endswith("/model/transformer.wpe.weight"))
    bad = bytearray(data)
    bad[(start + end) // 2] ^= 0x40
    flipped = tmp_path / "ckpt_00000007.pt"
    flipped.write_bytes(bad)
    with pytest.raises(checkpoint.ChecksumError, match="checksum mismatch") as info:
        checkpoint.load_checkpoint(flipped)
    assert str(flipped) in str(info.value) and f"tensor bytes {label.split(' = ')[0]}" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_load_latest_skips_a_payload_corrupted_checkpoint(clean, tmp_path):
    path, data, loaded = clean
    (tmp_path / "ckpt_00000007.pt").write_bytes(data)
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 0x01  # inside a tensor's bytes: torch.load alone would not notice
    (tmp_path / "ckpt_00000008.pt").write_bytes(bad)
    with pytest.warns(UserWarning, match="skipping checkpoint of step 8: .*checksum mismatch"):
        state, found = checkpoint.load_latest(tmp_path)
    assert found.name == "ckpt_00000007.pt" and same_state(state, loaded)


def test_checkpoints_without_a_checksum(clean, tmp_path):
    path, data, loaded = clean
    # a version-3 checkpoint whose checksum record was cut off: refused
    algorithm, _, length = checkpoint.read_checksum_record(path)
    stripped = tmp_path / "ckpt_00000004.pt"
    stripped.write_bytes(data[:length - 2] + b"\0\0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(checkpoint.ChecksumError, match="without its checksum record"):
            checkpoint.load_checkpoint(stripped)
    assert same_state(checkpoint.load_checkpoint(stripped, verify=False), loaded)


def test_sha256_where_xxhash_is_missing(clean, tmp_path, monkeypatch):
    path, data, loaded = clean
    monkeypatch.setattr(checkpoint, "_xxhash", lambda: None)
    written = checkpoint.save_checkpoint(tmp_path, 7, {k: v for k, v in loaded.items()
                                                       if k not in ("format", "version", "step")})
    assert checkpoint.read_checksum_record(written)[0] == "sha256"
    assert same_state(checkpoint.load_checkpoint(written), loaded)
    bad = bytearray(written.read_bytes())
    bad[len(bad) // 2] ^= 0x02
    written.write_bytes(bad)
    with pytest.raises(checkpoint.ChecksumError, match="sha256 of its first"):
        checkpoint.load_checkpoint(written)
    if checkpoint.read_checksum_record(path)[0] == "xxh3_128":  # an XXH3 file here cannot be verified: say so
        with pytest.raises(RuntimeError, match="pip install xxhash"):
            checkpoint.load_checkpoint(path)


def test_checksum_writer_streams_and_matches_a_second_read(tmp_path):
    import io

    buffer = io.BytesIO()
    writer = checkpoint.ChecksumWriter(buffer, "sha256")
    torch.save({"a": torch.randn(1000), "b": list(range(50))}, writer)
    digest = writer.finish()
    data = buffer.getvalue()
    algorithm, recorded, length = checkpoint.read_checksum_record(_write(tmp_path / "c.pt", data))
    assert (algorithm, recorded) == ("sha256", digest)
    import hashlib

    assert hashlib.sha256(data[:length]).hexdigest() == digest
    assert zipfile.ZipFile(io.BytesIO(data)).comment.startswith(b"pyllmc-checksum sha256 ")


def _write(path, data):
    path.write_bytes(data)
    return path


# ---- the tokenizer a checkpoint's run used ----

def test_the_recorded_tokenizer_comes_back_and_another_is_refused(tmp_path):
    from pyllmc.audio import MuLawTokenizer
    from pyllmc.tokenizer import GPT2Tokenizer, TokenizerMismatchError

    path = checkpoint.save_checkpoint(tmp_path, 1, {"model_config": {"vocab_size": 256},
                                                    "tokenizer": MuLawTokenizer(8000).spec()})
    state = checkpoint.load_checkpoint(path)
    assert checkpoint.recorded_tokenizer(state) == {"name": "mulaw", "sample_rate": 8000}
    checkpoint.check_tokenizer(state, MuLawTokenizer(8000), path)  # the same: nothing
    with pytest.raises(TokenizerMismatchError, match=r"checkpoint .*ckpt_00000001\.pt was made with tokenizer "
                                                     r"mulaw-8000hz .*not mulaw-16000hz"):
        checkpoint.check_tokenizer(state, MuLawTokenizer(16000), path)
    with pytest.raises(ValueError, match="not gpt2"):
        checkpoint.check_tokenizer(state, GPT2Tokenizer(), path)
    # written before tokenizers were recorded: GPT-2's when the model has GPT-2's vocabulary, else unknown
    assert checkpoint.recorded_tokenizer({"model_config": {"vocab_size": 50257}}) == {"name": "gpt2"}
    assert checkpoint.recorded_tokenizer({"model_config": {"vocab_size": 256}}) is None
    checkpoint.check_tokenizer({"model_config": {"vocab_size": 256}}, MuLawTokenizer())  # unknown: not refused


# ---- a checkpoint is data, not code ---------------------------------------------------------------

class RunsAShellCommand:
    """What a malicious checkpoint carries: unpickling it calls os.system(command)."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        import os

        return os.system, (self.command,)


def write_malicious_checkpoint(directory, step, state, marker):
    """pyllmc's own writer (a valid checksum and header) with one extra entry that runs a shell command
    when unpickled, as anyone can make; the check of plain data is what a forger would skip."""
    payload = {"format": checkpoint.FORMAT, "version": checkpoint.VERSION, "step": step, **state,
               "extra": RunsAShellCommand(f"touch {marker}")}
    return checkpoint.atomic_torch_save(payload, checkpoint.checkpoint_path(directory, step))


def test_a_checkpoint_that_would_run_code_is_refused(clean, tmp_path):
    path, data, loaded = clean
    marker = tmp_path / "the_command_ran"
    state = {k: v for k, v in loaded.items() if k not in ("format", "version", "step")}
    good = checkpoint.save_checkpoint(tmp_path / "run", 3, state)
    evil = write_malicious_checkpoint(tmp_path / "run", 6, state, marker)
    checkpoint.verify_checksum(evil)  # its checksum is valid: a checksum is no signature
    with pytest.raises(checkpoint.UnsafeCheckpointError, match=r"refused: .*only plain data.*(posix|os)\.system") as info:
        checkpoint.load_checkpoint(evil)
    assert isinstance(info.value, ValueError) and str(evil) in str(info.value)
    assert "convert" not in str(info.value)  # not mistaken for an old checkpoint of ours
    # the newest is refused, the older good one is taken, as for a damaged file
    with pytest.warns(UserWarning, match="skipping checkpoint of step 6: .*could run code"):
        state_back, found = checkpoint.load_latest(tmp_path / "run")
    assert found == good and same_state(state_back, loaded | {"step": 3})
    assert not marker.exists(), "loading the checkpoint ran its shell command"


def test_saving_anything_but_plain_data_is_refused(tmp_path):
    with pytest.raises(TypeError, match=r"state\['ranks'\]\[0\]\['rng'\] is a numpy.ndarray"):
        checkpoint.save_checkpoint(tmp_path, 1, {"ranks": [{"rng": np.zeros(3)}]})
    with pytest.raises(TypeError, match=r"state\['extra'\] is a .*RunsAShellCommand"):
        checkpoint.save_checkpoint(tmp_path, 1, {"extra": RunsAShellCommand("true")})
    assert checkpoint.list_checkpoints(tmp_path) == []


def earlier_format_checkpoint(directory, loaded, version):
    """A checkpoint as pyllmc wrote it before version 3: numpy's RNG state pickled as numpy's tuple (an
    ndarray inside), with the checksum record (version 2) or without (version 1)."""
    state = copy.deepcopy({k: v for k, v in loaded.items() if k not in ("format", "version", "step")})
    np.random.seed(11)
    for rank in state["ranks"]:
        rank["rng"]["numpy"] = np.random.get_state()
    payload = {"format": checkpoint.FORMAT, "version": version, "step": 5, **state}
    return checkpoint.atomic_torch_save(payload, checkpoint.checkpoint_path(directory, 5), checksum=version >= 2)


@pytest.mark.parametrize("version", [1, 2])
def test_an_earlier_format_checkpoint_is_refused_with_the_conversion_command(clean, tmp_path, capsys, version):
    _, _, loaded = clean
    old = earlier_format_checkpoint(tmp_path, loaded, version)
    with pytest.raises(checkpoint.UnsafeCheckpointError,
                       match=r"earlier format.*numpy.*convert --trust-this-file") as info:
        checkpoint.load_checkpoint(old)
    assert f"python -m pyllmc.checkpoint convert --trust-this-file {old} NEW.pt" in str(info.value)
    converted = tmp_path / "converted.pt"
    # the converter runs the unrestricted unpickler: only when told that the file is trusted
    with pytest.raises(SystemExit) as exit_info:
        checkpoint.main(["convert", str(old), str(converted)])
    assert exit_info.value.code == 2 and "--trust-this-file" in capsys.readouterr().err
    assert not converted.exists()
    assert checkpoint.main(["convert", "--trust-this-file", str(old), str(converted)]) == 0
    assert "checkpoint version 3" in capsys.readouterr().out
    state = checkpoint.load_checkpoint(converted)
    assert state["version"] == checkpoint.VERSION and state["step"] == 5
    assert same_state(state["model"], loaded["model"]) and same_state(state["optimizer"], loaded["optimizer"])
    # numpy's RNG continues where the old file's state left it
    np.random.seed(11)
    expected = np.random.rand(4)
    np.random.seed(99)
    checkpoint.set_rng_state(state["ranks"][0]["rng"])
    assert np.array_equal(np.random.rand(4), expected)
    # refused: converting onto itself, or a file that is no checkpoint
    assert checkpoint.main(["convert", "--trust-this-file", str(old), str(old)]) == 1
    (tmp_path / "other.pt").write_bytes(b"\0" * 64)
    assert checkpoint.main(["convert", "--trust-this-file", str(tmp_path / "other.pt"), str(tmp_path / "o.pt")]) == 1
    assert "error:" in capsys.readouterr().err
