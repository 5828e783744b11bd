"""train_gpt2.py end to end on the CPU: the tiny model on tiny tiny-Shakespeare shards, run as a
subprocess exactly as people run it (torchrun for two processes), plus pyllmc.checkpoint's
crash safety in-process.

What is checked: the loss goes down; the triton backend (interpreter) trains like the torch
one; 2 gloo processes with half the accumulation each follow the 1-process loss curve (with and
without ZeRO-1, whose optimizer shards also survive a resume); an interrupted run resumed from
its checkpoint continues the loss curve bit for bit, also when the newest checkpoint is damaged
(truncated, or one flipped bit in a tensor that only its checksum reveals); a damaged token shard
is reported before training; non-finite updates are skipped; the llm.c / Hugging Face exports
equal the checkpoint and can start a run; bad settings fail before training, saying what to
change. The first run's data: the corpus is prepared in the user cache (PYLLMC_CACHE_DIR, here in
tmp_path; never the source tree), offline (a proxy on a closed port) from the standard library; the
CPU demo's defaults and trimmed vocabulary; uint32 shards, --vocab_size (padded to a multiple of 128),
token ids past the vocabulary refused before training; the tokenizer recorded in log and checkpoint,
and a resume or continuation on another refused. About 8 minutes on 2 busy cores.
"""

import io
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pyllmc import checkpoint
from pyllmc.data import write_shard

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "train_gpt2.py"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TIMEOUT = 600

# the tiny preset, 2 sequences of 32 tokens per micro step, 1 validation batch, no samples
COMMON = ["--model", "tiny", "--batch_size", "2", "--sequence_length", "32", "--val_max_steps", "1",
          "--sample_every", "-1", "--backend", "torch", "--device", "cpu", "--learning_rate", "3e-3",
          "--seed", "7"]
STEP_LINE = re.compile(r"^step +\d+/\d+ \| loss \d+\.\d{4} \| lr \d\.\d\de[-+]\d\d \| norm [\d.]+ \| "
                       r"dt [\d.]+ms \| tok/s [\d,]+ \| MFU (n/a|[\d.]+%) \| ETA \S+$", re.M)


def _raw_tokens(name):
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"shared data file {path} not found")
    return np.fromfile(path, dtype=np.uint16)  # raw uint16 GPT-2 tokens, no header


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    train, val = _raw_tokens("tinyshakespeare_gpt2_train.bin"), _raw_tokens("tinyshakespeare_gpt2_val.bin")
    write_shard(d / "train.bin", train[:20000])
    write_shard(d / "val.bin", val[:2000])
    write_shard(d / "tiny.bin", val[:50])  # smaller than one global batch of 2 x 32 (+1)
    return d


def _data_args(shards):
    return ["--input_bin", str(shards / "train.bin"), "--input_val_bin", str(shards / "val.bin")]


def _env():
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_train(args, *, nproc=1, expect_ok=True):
    if nproc == 1:
        command = [sys.executable, str(TRAIN), *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
                   "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(TRAIN), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO, env=_env())
    if expect_ok:
        assert result.returncode == 0, f"{' '.join(command)}\nSTDOUT:\n{result.stdout}\nSTDERR:\n{result.stderr}"
    return result


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_log(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "main.jsonl").read_text().splitlines() if line.strip()]


def train_losses(records):
    return {r["step"]: r["loss"] for r in records if r["type"] == "train"}


# 6 steps of 2 micro steps, cosine schedule with warmup, checkpoints and samples every 3 steps (sampling
# must not disturb the training RNG, or the resumed run would differ)
RESUME_ARGS = ["--num_iterations", "6", "--warmup_iters", "2", "--learning_rate_decay_frac", "0.1",
               "--total_batch_size", "128", "--checkpoint_every", "3", "--sample_every", "3", "--sample_length", "4"]


@pytest.fixture(scope="module")
def baseline(shards, tmp_path_factory):
    """An uninterrupted 6-step run (cosine schedule with warmup) with checkpoints every 3 steps."""
    out = tmp_path_factory.mktemp("baseline")
    result = run_train([*COMMON, *_data_args(shards), *RESUME_ARGS, "--output_dir", str(out), "--keep_checkpoints", "5",
                        "--write_llmc", "1", "--write_hf", "1"])
    return out, result, read_log(out)


def test_tiny_run_lowers_the_loss(baseline):
    out, result, records = baseline
    losses = train_losses(records)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    print("tiny-run losses:", [round(losses[s], 4) for s in sorted(losses)])
    assert losses[6] < losses[1] - 0.5, losses
    assert len(STEP_LINE.findall(result.stdout)) == 6, result.stdout
    val = [r for r in records if r["type"] == "val"]
    assert val and val[-1]["step"] == 6 and np.isfinite(val[-1]["val_loss"])
    summary = [r for r in records if r["type"] == "summary"][-1]
    assert summary["tokens_seen"] == 6 * 128 and summary["final_val_loss"] == val[-1]["val_loss"]
    assert "tokens seen" in result.stdout and "final val loss" in result.stdout
    assert [s for s, _ in checkpoint.list_checkpoints(out)] == [3, 6]
    samples = [r for r in records if r["type"] == "sample"]
    assert [r["step"] for r in samples] == [3, 6] and all(isinstance(r["text"], str) for r in samples)
    assert result.stdout.count("---- sample at step") == 2
    lrs = {r["step"]: r["lr"] for r in records if r["type"] == "train"}
    assert lrs[1] == pytest.approx(1.5e-3) and lrs[2] == pytest.approx(3e-3)  # warmup
    assert lrs[3] == pytest.approx(3e-3) and lrs[6] < lrs[5] < lrs[4] < lrs[3]  # cosine decay


@pytest.mark.parametrize("kernels", ["triton", "cuda"])
def test_kernel_backend_trains_like_torch(shards, tmp_path, kernels):
    """The Triton kernels (the interpreter, on a CPU) and the CUDA kernels (the simulator, on a
    CPU) train the tiny model like the torch backend."""
    from conftest import kernel_device

    device = kernel_device(kernels).type
    losses = {}
    for backend in (kernels, "torch"):
        args = [a if a not in ("torch", "cpu") else {"torch": backend, "cpu": device}[a] for a in COMMON]
        out = tmp_path / backend
        run_train([*args, *_data_args(shards), "--num_iterations", "2", "--total_batch_size", "64",
                   "--val_max_steps", "0", "--output_dir", str(out), "--checkpoint_every", "-1"])
        assert read_log(out)[0]["backend"] == backend
        losses[backend] = train_losses(read_log(out))
    # same init and data: the first loss matches, the second (after one update) is close
    assert losses[kernels][1] == pytest.approx(losses["torch"][1], abs=1e-3)
    assert losses[kernels][2] == pytest.approx(losses["torch"][2], abs=2e-2)
    assert losses[kernels][2] < losses[kernels][1]


def test_compiled_run_trains_like_eager(shards, single_process, tmp_path):
    """--compile 1 (torch.compile, fullgraph, Inductor) follows the eager loss curve."""
    result = run_train([*COMMON, *_data_args(shards), "--num_iterations", "3", "--total_batch_size", "256",
                        "--output_dir", str(tmp_path), "--checkpoint_every", "-1", "--compile", "1"])
    assert "compiled (torch.compile, fullgraph)" in result.stdout
    eager, compiled = train_losses(single_process), train_losses(read_log(tmp_path))
    assert sorted(compiled) == [1, 2, 3]
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], rel=1e-4, abs=1e-4), (step, eager, compiled)


@pytest.fixture(scope="module")
def single_process(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    run_train([*COMMON, *_data_args(shards), "--num_iterations", "3", "--total_batch_size", "256",
               "--output_dir", str(out), "--checkpoint_every", "-1"])
    return read_log(out)


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_two_processes_match_one(shards, single_process, tmp_path, zero_stage):
    # 1 process: 4 micro steps of 2 x 32; 2 processes: 2 micro steps each, the same 256 tokens per step
    args = [*COMMON, *_data_args(shards), "--num_iterations", "3", "--total_batch_size", "256",
            "--output_dir", str(tmp_path), "--zero_stage", str(zero_stage)]
    if zero_stage == 0:
        result = run_train([*args, "--checkpoint_every", "-1"], nproc=2)
    else:  # interrupted after step 2 and resumed: each rank's optimizer shard comes back from the checkpoint
        run_train([*args, "--stop_at_step", "2"], nproc=2)
        result = run_train([*args, "--resume", "1"], nproc=2)
        assert "resumed from" in result.stdout and "ZeRO-1" in result.stdout
    assert "x 2 rank(s) x 2 micro steps" in result.stdout
    one, two = train_losses(single_process), train_losses(read_log(tmp_path))
    assert sorted(two) == [1, 2, 3]
    for step in one:  # float32 reduction order differs, nothing else
        assert two[step] == pytest.approx(one[step], rel=1e-5, abs=1e-5), (step, one, two)


def _copy_checkpoint(src_dir, step, dst_dir):
    dst_dir.mkdir(parents=True, exist_ok=True)
    (dst_dir / f"ckpt_{step:08d}.pt").write_bytes((src_dir / f"ckpt_{step:08d}.pt").read_bytes())



def test_interrupted_run_resumes_bitwise(shards, baseline, tmp_path):
    _, _, records = baseline
    out = tmp_path / "run"
    first = run_train([*COMMON, *_data_args(shards), *RESUME_ARGS, "--output_dir", str(out), "--stop_at_step", "3"])
    assert "stopped early" in first.stdout
    assert [s for s, _ in checkpoint.list_checkpoints(out)] == [3]
    second = run_train([*COMMON, *_data_args(shards), *RESUME_ARGS, "--output_dir", str(out), "--resume", "1"])
    assert "resumed from" in second.stdout
    resumed, uninterrupted = train_losses(read_log(out)), train_losses(records)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]  # the log continues the interrupted one
    assert resumed == uninterrupted  # bit for bit
    final = lambda recs: [r["val_loss"] for r in recs if r["type"] == "val" and r["step"] == 6]  # noqa: E731
    assert final(read_log(out)) == final(records)


def test_resume_continues_the_run_with_its_recorded_settings(shards, baseline, tmp_path):
    """--resume 1 --output_dir OUT alone continues the run OUT holds with the settings it recorded (schedule,
    batch, data, model, seed...), bit for bit; a flag that shapes training given with another value is refused
    before training, naming both values and the override; --resume_override changes one on purpose."""
    _, _, records = baseline
    out = tmp_path / "run"
    first = run_train([*COMMON, *_data_args(shards), *RESUME_ARGS, "--output_dir", str(out), "--stop_at_step", "3"])
    # a preset on a CPU is not the demo: one line says which demo settings it does not get (those not given)
    assert re.search(r"^note: --model tiny is not the CPU demo \(--model auto\), so these keep their plain defaults: "
                     r"weight_decay 0\.0 \(the demo's 0\.1\); pass them to change them$", first.stdout, re.M), \
        first.stdout

    conflict = run_train(["--resume", "1", "--output_dir", str(out), "--learning_rate", "0.01", "--batch_size", "4"],
                         expect_ok=False)
    assert conflict.returncode == 2, conflict.stdout + conflict.stderr
    assert re.search(r"--resume 1 continues the run of \S*ckpt_00000003\.pt with the settings it recorded, and this "
                     r"command line gives others:\n  --batch_size 4 \(this command line\) vs 2 \(the run\)\n"
                     r"  --learning_rate 0\.01 \(this command line\) vs 0\.003 \(the run\)\n"
                     r".*--resume_override learning_rate\b",
                     conflict.stderr), conflict.stderr
    assert "--batch_size cannot change in a resumed run" in conflict.stderr
    assert "step 4/" not in conflict.stdout

    second = run_train(["--resume", "1", "--output_dir", str(out)])  # nothing else: the run's own settings
    assert "resumed from" in second.stdout and "step 6/6" in second.stdout and "note:" not in second.stdout
    assert train_losses(read_log(out)) == train_losses(records)  # bit for bit, as if never interrupted
    assert [r["step"] for r in read_log(out) if r["type"] == "sample"] == [3, 6]  # its --sample_every too

    third = run_train(["--resume", "1", "--output_dir", str(out), "--num_iterations", "8",
                       "--resume_override", "num_iterations"])
    assert "--resume_override: --num_iterations 8 (the run had 6)" in third.stdout and "step 8/8" in third.stdout
    assert sorted(train_losses(read_log(out))) == [1, 2, 3, 4, 5, 6, 7, 8]
    bad = run_train(["--resume", "1", "--output_dir", str(out), "--resume_override", "learning_rate,batch_size,nope"],
                    expect_ok=False)
    assert bad.returncode == 2 and "--resume_override names nope: not a flag of this trainer" in bad.stderr, bad.stderr


def _flip_inside_largest_tensor(path):
    """Flip one bit in the middle of the checkpoint's largest tensor: torch.load alone would not notice."""
    import zipfile

    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    h = info.header_offset
    start = h + 30 + int.from_bytes(data[h + 26:h + 28], "little") + int.from_bytes(data[h + 28:h + 30], "little")
    data[start + info.file_size // 2] ^= 0x20
    path.write_bytes(bytes(data))


def test_damaged_newest_checkpoint_is_skipped(shards, baseline, tmp_path):
    import torch

    base_dir, _, records = baseline
    out = tmp_path / "run"
    _copy_checkpoint(base_dir, 3, out)
    _copy_checkpoint(base_dir, 6, out)
    _flip_inside_largest_tensor(out / "ckpt_00000006.pt")  # the newest: corrupted in its payload
    unverified = checkpoint.load_checkpoint(out / "ckpt_00000006.pt", verify=False)  # loads without a word ...
    reference = checkpoint.load_checkpoint(base_dir / "ckpt_00000006.pt")
    assert not all(torch.equal(unverified["model"][k], t) for k, t in reference["model"].items())  # ... wrongly
    good = (out / "ckpt_00000003.pt").read_bytes()
    (out / "ckpt_00000005.pt").write_bytes(good[: len(good) // 2])  # a partial write under a final name
    (out / ".tmp-ckpt_00000006.pt.12345").write_bytes(b"garbage")  # a writer killed mid-write
    result = run_train([*COMMON, *_data_args(shards), *RESUME_ARGS, "--output_dir", str(out), "--resume", "1"])
    assert re.search(r"skipping checkpoint of step 6: .*ckpt_00000006\.pt: checksum mismatch", result.stderr)
    assert "skipping checkpoint of step 5" in result.stderr
    assert "step 3)" in result.stdout  # resumed from the good one
    assert train_losses(read_log(out)) == {s: l for s, l in train_losses(records).items() if s > 3}
    assert not list(out.glob(".tmp-*"))
    # the run ends where the uninterrupted one did, bit for bit: model, optimizer moments, loader
    final = checkpoint.load_checkpoint(out / "ckpt_00000006.pt")
    for name, tensor in reference["model"].items():
        assert torch.equal(final["model"][name], tensor), name
    for pid, moments in reference["optimizer"]["state"].items():
        for key, tensor in moments.items():
            assert torch.equal(final["optimizer"]["state"][pid][key], tensor), (pid, key)
    assert final["ranks"][0]["train_loader"] == reference["ranks"][0]["train_loader"]


def test_a_checkpoint_that_would_run_code_is_refused_by_the_trainer(shards, baseline, tmp_path):
    """A shared checkpoint with a valid checksum and one entry that runs a shell command when unpickled:
    --model refuses it before anything runs; --resume 1 skips it for the older good checkpoint."""
    from test_checkpoint import write_malicious_checkpoint

    base_dir, _, records = baseline
    marker = tmp_path / "the_command_ran"
    good = checkpoint.load_checkpoint(base_dir / "ckpt_00000006.pt")
    state = {k: v for k, v in good.items() if k not in ("format", "version", "step")}
    out = tmp_path / "run"
    _copy_checkpoint(base_dir, 3, out)
    evil = write_malicious_checkpoint(out, 6, state, marker)

    result = run_train([*COMMON, *_data_args(shards), "--model", str(evil), "--num_iterations", "1"],
                       expect_ok=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert re.search(r"--model \S+ckpt_00000006\.pt: \S+: refused: .*could run code", result.stderr), result.stderr
    assert "step 1/" not in result.stdout

    result = run_train([*COMMON, *_data_args(shards), *RESUME_ARGS, "--output_dir", str(out), "--resume", "1"])
    assert re.search(r"skipping checkpoint of step 6: .*ckpt_00000006\.pt: refused", result.stderr), result.stderr
    assert "step 3)" in result.stdout  # resumed from the good one, and on from there bit for bit
    assert train_losses(read_log(out)) == {s: l for s, l in train_losses(records).items() if s > 3}
    assert not marker.exists(), "loading the checkpoint ran its shell command"


def test_damaged_shard_is_reported_before_training(shards, tmp_path):
    from pyllmc.data import file_sha256

    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.bin", "val.bin"):
        (data / name).write_bytes((shards / name).read_bytes())
    manifest = {"shards": [{"file": n, "sha256": file_sha256(data / n)} for n in ("train.bin", "val.bin")]}
    (data / "data_manifest.json").write_text(json.dumps(manifest))
    raw = bytearray((data / "train.bin").read_bytes())
    raw[1024 + 2 * 500] ^= 0x01  # one token of the training shard
    (data / "train.bin").write_bytes(bytes(raw))
    args = [*COMMON, "--input_bin", str(data / "train.bin"), "--input_val_bin", str(data / "val.bin"),
            "--num_iterations", "1", "--output_dir", str(tmp_path / "out"), "--checkpoint_every", "-1"]
    result = run_train(args, expect_ok=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert re.search(r"--input_bin: token shard \S*train\.bin is damaged: its sha256 is", result.stderr), result.stderr
    assert "step 1/" not in result.stdout
    result = run_train([*args, "--verify_shards", "0"])  # asked not to check: it trains (as on shards without
    assert "step 1/1" in result.stdout                    # a manifest, which every other test here uses)


def test_checkpoint_write_killed_midway_keeps_the_previous(tmp_path, monkeypatch):
    checkpoint.save_checkpoint(tmp_path, 1, {"weights": [0, 1, 2, 3]})

    def killed(src, dst):
        raise OSError("killed during rename")

    with monkeypatch.context() as m:
        m.setattr(os, "replace", killed)
        with pytest.raises(OSError, match="killed"):
            checkpoint.save_checkpoint(tmp_path, 2, {"weights": [0, 1, 2, 3, 4]})
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path)] == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_00000001.pt"]  # no temporary left behind
    state, path = checkpoint.load_latest(tmp_path)
    assert state["step"] == 1 and list(state["weights"]) == [0, 1, 2, 3]


def test_checkpoints_keep_the_last_k_and_skip_foreign_files(tmp_path):
    for step in (1, 2, 3, 4):
        checkpoint.save_checkpoint(tmp_path, step, {"x": step}, keep_last=2)
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path)] == [3, 4]
    import torch

    torch.save({"not": "a checkpoint"}, tmp_path / "ckpt_00000009.pt")  # loads, but has no header
    (tmp_path / "ckpt_00000010.pt").write_bytes(b"\x00" * 100)
    with pytest.warns(UserWarning) as warned:
        state, _ = checkpoint.load_latest(tmp_path)
    messages = [str(w.message) for w in warned]
    assert any("skipping checkpoint of step 10" in m and "not a readable checkpoint" in m for m in messages)
    assert any("skipping checkpoint of step 9" in m and "no header" in m for m in messages)
    assert state["step"] == 4 and state["x"] == 4
    assert checkpoint.load_latest(tmp_path / "missing") is None


def test_rng_state_round_trip():
    import random

    import torch

    saved = checkpoint.rng_state()
    a = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3))
    # through a file, read back as a checkpoint is (plain data only)
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    checkpoint.set_rng_state(torch.load(buffer, weights_only=True))
    b = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3))
    assert a[:3] == b[:3] and torch.equal(a[3], b[3])


@pytest.mark.parametrize("case", ["batch_not_divisible", "sequence_too_long", "shard_too_small", "missing_file"])
def test_bad_configs_fail_before_training(shards, tmp_path, case):
    args = {
        "batch_not_divisible": [*_data_args(shards), "--total_batch_size", "100"],
        "sequence_too_long": [*_data_args(shards), "--sequence_length", "512"],
        "shard_too_small": ["--input_bin", str(shards / "tiny.bin"), "--input_val_bin", str(shards / "val.bin")],
        "missing_file": ["--input_bin", str(tmp_path / "nope_*.bin")],
    }[case]
    expected = {
        "batch_not_divisible": r"--total_batch_size 100 is not a multiple of .* = 64: use e\.g\. --total_batch_size 128",
        "sequence_too_long": r"--sequence_length 512 is longer than the model's block_size 256: use --sequence_length 256",
        "shard_too_small": r"has 50 tokens, fewer than one global batch .*use a smaller B or T",
        "missing_file": r"no file matches --input_bin .*nope_\*\.bin",
    }[case]
    result = run_train([*COMMON, *args, "--num_iterations", "2"], expect_ok=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert re.search(expected, result.stderr), result.stderr
    assert "step 1/" not in result.stdout


def source_tree_files():
    """Every file under the repository but git's, the virtualenv's and Python's byte-code caches."""
    skip = {".git", ".venv", "__pycache__", ".pytest_cache"}
    return {p for p in REPO.rglob("*") if p.is_file() and not skip & set(p.relative_to(REPO).parts)}


def corpus_env(tmp_path, **extra):
    """The environment of a run on the built-in corpus: its cache in tmp_path, no PYLLMC_DATA_DIR
    unless given, and no network (a proxy on a closed port: the download fails at once)."""
    env = {k: v for k, v in _env().items() if k not in ("PYLLMC_DATA_DIR", "no_proxy", "NO_PROXY")}
    env.update(PYLLMC_CACHE_DIR=str(tmp_path / "cache"), https_proxy="http://127.0.0.1:9",
               http_proxy="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9")
    env.update(extra)
    return env


@pytest.mark.slow  # three runs: ~20 s on 2 cores
def test_tinyshakespeare_is_prepared_on_first_use_in_the_cache(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    text = SHARED_DATA / "tinyshakespeare.txt"
    if not text.exists():
        pytest.skip(f"{text} not found")
    (data / "tinyshakespeare.txt").write_text(text.read_text()[:160_000])
    env_args = ["--model", "tiny", "--device", "cpu", "--num_iterations", "1", "--val_max_steps", "1",
                "--sample_every", "-1", "--batch_size", "1", "--sequence_length", "16"]
    command = [sys.executable, str(TRAIN), *env_args]
    before = source_tree_files()
    env = corpus_env(tmp_path, PYLLMC_DATA_DIR=str(data))
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"corpus: tiny Shakespeare, from {data / 'tinyshakespeare.txt'} ($PYLLMC_DATA_DIR) | shards made now in " \
           f"{tmp_path / 'cache' / 'data'}" in result.stdout
    assert "offline" not in result.stdout  # a local copy: nothing to download
    assert sorted(p.name for p in data.iterdir()) == ["tinyshakespeare.txt"]  # the folder is only read
    shards = sorted(p.name for p in (tmp_path / "cache" / "data").rglob("*.bin"))
    assert shards == ["tiny_shakespeare_train.bin", "tiny_shakespeare_val.bin"]
    assert "step 1/1" in result.stdout
    assert source_tree_files() == before  # nothing written into the source tree
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO, env=env)
    assert result.returncode == 0 and "| shards cached in" in result.stdout, result.stdout + result.stderr

    broken = tmp_path / "broken"  # preparation that fails: a text too short for the val split
    broken.mkdir()
    (broken / "tinyshakespeare.txt").write_text("To be.")
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO,
                            env=corpus_env(tmp_path, PYLLMC_DATA_DIR=str(broken)))
    assert result.returncode == 2
    assert re.search(r"could not prepare tiny Shakespeare from \S*broken/tinyshakespeare\.txt \(\$PYLLMC_DATA_DIR\): "
                     r"the text \S+ has only 4 tokens", result.stderr), result.stderr


def test_the_cpu_demo_takes_its_defaults_and_a_trimmed_vocabulary(tmp_path):
    """python train_gpt2.py on a CPU (--model auto): DEMO_CPU's settings for every flag not given, the
    corpus in GPT-2's BPE trimmed to its 8,192 commonest tokens, recorded in the log and checkpoint."""
    text = SHARED_DATA / "tinyshakespeare.txt"
    if not text.exists():
        pytest.skip(f"{text} not found")
    from pyllmc import settings

    out = tmp_path / "out"
    before = source_tree_files()
    hellaswag = SHARED_DATA / "hellaswag_val_preprocessed.jsonl"  # scored through the trimmed tokenizer
    extra = ["--hellaswag", str(hellaswag), "--hellaswag_max_examples", "4"] if hellaswag.exists() else []
    command = [sys.executable, str(TRAIN), "--corpus", str(text), "--num_iterations", "2", "--sample_every", "1",
               "--sample_length", "12", "--val_max_steps", "1", "--output_dir", str(out), *extra]
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO, env=corpus_env(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    demo = settings.DEMO_CPU
    records = read_log(out)
    config = records[0]
    for key in ("batch_size", "sequence_length", "learning_rate", "warmup_iters", "sample_length"):
        expected = {"sample_length": 12}.get(key, demo[key])  # a flag given wins over the demo's value
        assert config["args"][key] == expected, key
    assert config["args"]["num_iterations"] == 2 and config["model_config"]["n_layer"] == 2
    trim = settings.DEMO_TRIM_VOCAB
    assert config["model_config"]["vocab_size"] == trim and config["tokenizer"]["name"] == "gpt2-trimmed"
    assert config["tokenizer_label"].startswith(f"gpt2-trimmed-{trim}-") and config["data"].startswith("tiny Shakespeare")
    assert f"tokenizer gpt2-trimmed-{trim}-" in result.stdout
    samples = [r for r in records if r["type"] == "sample"]
    assert [r["step"] for r in samples] == [1, 2] and all(isinstance(r["text"], str) for r in samples)
    state, ckpt = checkpoint.load_latest(out)
    assert state["tokenizer"] == config["tokenizer"]
    if extra:
        scores = [r for r in records if r["type"] == "hellaswag"]
        assert len(scores) == 1 and scores[0]["n"] == 4 and 0 <= scores[0]["acc_norm"] <= 1

    # continuing the demo's checkpoint on its corpus: the tokenizer comes from the checkpoint, no flag names it
    command = [sys.executable, str(TRAIN), "--model", str(ckpt), "--corpus", str(text), "--num_iterations", "1",
               "--val_max_steps", "1", "--sample_every", "-1", "--output_dir", str(tmp_path / "more")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO, env=corpus_env(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "weights from checkpoint" in result.stdout and "step 1/1" in result.stdout
    assert read_log(tmp_path / "more")[0]["tokenizer"] == state["tokenizer"]
    assert source_tree_files() == before


@pytest.mark.slow  # builds the stdlib corpus from this Python's standard library (~10-20 s on 2 cores)
def test_offline_with_no_arguments_it_trains_on_the_standard_library(tmp_path):
    before = source_tree_files()
    command = [sys.executable, str(TRAIN), "--num_iterations", "2", "--sample_every", "-1", "--val_max_steps", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO, env=corpus_env(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    notices = [line for line in result.stdout.splitlines() if line.startswith("offline:")]
    assert len(notices) == 1 and "could not download tiny Shakespeare" in notices[0]
    assert notices[0].endswith("standard library instead")
    assert "corpus: the docstrings and comments of the" in result.stdout and "step 2/2" in result.stdout
    assert list((tmp_path / "cache" / "data").glob("stdlib-*/gpt2-trimmed-*/stdlib_train.bin"))
    assert source_tree_files() == before


def _uint32_shards(folder, vocab=300, bad_at=None):
    """Token shards of llm.c's uint32 kind with ids below `vocab` (one id `vocab` at position bad_at)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    train = (np.arange(4000) * 7 + rng.integers(0, 3, 4000)) % vocab
    if bad_at is not None:
        train[bad_at] = vocab
    write_shard(folder / "ids_train_000001.bin", train, dtype="uint32")
    write_shard(folder / "ids_val_000000.bin", np.arange(1000) * 7 % vocab, dtype="uint32")
    return ["--input_bin", str(folder / "ids_train_*.bin"), "--input_val_bin", str(folder / "ids_val_*.bin")]


def test_vocab_size_for_a_model_trained_from_scratch(tmp_path):
    """uint32 shards, --vocab_size 300: the embedding padded to 384 (a multiple of 128, as llm.c does);
    undeclared uint32 tokens are shown as ids."""
    out = tmp_path / "out"
    result = run_train([*COMMON, *_uint32_shards(tmp_path / "d"), "--vocab_size", "300", "--num_iterations", "2",
                        "--sample_every", "2", "--sample_length", "5", "--output_dir", str(out)])
    assert "block 256, vocab 300 (padded 384)" in result.stdout
    assert "tokenizer ids (any id) (no manifest declares one: samples are shown as token ids)" in result.stdout
    config = read_log(out)[0]
    assert (config["model_config"]["vocab_size"], config["model_config"]["padded_vocab_size"]) == (300, 384)
    sample = [r for r in read_log(out) if r["type"] == "sample"][0]["text"]
    assert len(sample.split()) == 5 and all(0 <= int(i) < 300 for i in sample.split())
    state, _ = checkpoint.load_latest(out)
    assert state["model"]["transformer.wte.weight"].shape[0] == 384 and state["tokenizer"] == {"name": "ids"}


@pytest.mark.parametrize("case", ["vocab_size_too_small", "no_vocab_size"])
def test_a_token_id_past_the_vocabulary_fails_before_training(tmp_path, case):
    if case == "vocab_size_too_small":  # one id 300 at position 1234 of the train shard, --vocab_size 300
        args, expected = [*_uint32_shards(tmp_path / "d", bad_at=1234), "--vocab_size", "300"], (
            r"--input_bin: token shard \S*ids_train_000001\.bin holds token id 300 at position 1234 \(of 4000\), but the "
            r"vocabulary has 300 ids \(0\.\.299\); the shard's largest id is 300: train with --vocab_size 301")
    else:  # ids past GPT-2's 50,257 and no --vocab_size: the model gets GPT-2's size, and the error says what to pass
        folder = tmp_path / "d"
        folder.mkdir()
        write_shard(folder / "t.bin", 60000 + np.arange(3000), dtype="uint32")
        args, expected = ["--input_bin", str(folder / "t.bin")], (
            r"holds token id 60000 at position 0 .* largest id is 62999: train with --vocab_size 63000")
    result = run_train([*COMMON, *args, "--num_iterations", "2"], expect_ok=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert re.search(expected, result.stderr), result.stderr
    assert "step 1/" not in result.stdout


@pytest.mark.slow  # five runs: ~20 s on 2 cores
def test_the_tokenizer_is_recorded_and_another_is_refused(shards, tmp_path):
    """Shards that declare the mu-law tokenizer: the run records it in its log and checkpoints; a
    resume or a --model continuation on shards of another tokenizer (GPT-2's) is refused."""
    from pyllmc.audio import MuLawTokenizer
    from pyllmc.corpus import write_split

    mulaw = tmp_path / "mulaw"
    codes = (128 + 100 * np.sin(np.arange(6000) * 2 * np.pi / 32)).astype(np.int64)
    write_split(mulaw, "audio", codes[:1000], codes[1000:], MuLawTokenizer(8000), {"source": "a sine"})
    out = tmp_path / "out"
    args = [*COMMON, "--input_bin", str(mulaw / "audio_train.bin"), "--input_val_bin", str(mulaw / "audio_val.bin"),
            "--vocab_size", "256", "--output_dir", str(out)]
    result = run_train([*args, "--num_iterations", "2"])
    assert "tokenizer mulaw-8000hz" in result.stdout and "(declared in" in result.stdout
    config = read_log(out)[0]
    assert config["tokenizer"] == {"name": "mulaw", "sample_rate": 8000} and config["tokenizer_label"] == "mulaw-8000hz"
    state, ckpt = checkpoint.load_latest(out)
    assert state["tokenizer"] == {"name": "mulaw", "sample_rate": 8000}

    gpt2 = ["--input_bin", str(shards / "train.bin"), "--input_val_bin", str(shards / "val.bin")]
    result = run_train([*COMMON, *gpt2, "--output_dir", str(out), "--resume", "1", "--num_iterations", "4"],
                       expect_ok=False)  # other shards than the run's: refused as a change of its settings ...
    assert result.returncode == 2 and re.search(r"--input_bin \S*train\.bin \(this command line\) vs "
                                                r"\S*audio_train\.bin \(the run\)", result.stderr), result.stderr
    override = ["--resume_override", "input_bin,input_val_bin,num_iterations,vocab_size"]
    result = run_train([*COMMON, *gpt2, "--output_dir", str(out), "--resume", "1", "--num_iterations", "4", *override],
                       expect_ok=False)  # the vocabulary is fixed for a resumed run
    assert result.returncode == 2 and "--vocab_size is not on this command line" not in result.stderr
    assert "--resume_override: --vocab_size cannot change in a resumed run" in result.stderr, result.stderr
    for how in (["--output_dir", str(out), "--resume", "1", "--num_iterations", "4", *override[:1],
                 "input_bin,input_val_bin,num_iterations"],  # ... and with the override, by the tokenizer check
                ["--model", str(ckpt), "--num_iterations", "1"]):
        result = run_train([*COMMON, *gpt2, *how], expect_ok=False)  # the last --model wins
        assert result.returncode == 2, result.stdout + result.stderr
        assert re.search(r"the model \((resumed from|weights from checkpoint) \S*ckpt_00000002\.pt.*\) was made with "
                         r"tokenizer mulaw-8000hz \(256 8-bit mu-law codes of 8,000 Hz mono audio\), not gpt2 "
                         r"\(50,257 ids\)", result.stderr), result.stderr
        assert "step 3/" not in result.stdout and "step 1/" not in result.stdout
    # HellaSwag is text: a run whose tokenizer does not encode text refuses it before training
    hellaswag = SHARED_DATA / "hellaswag_val_preprocessed.jsonl"
    if hellaswag.exists():
        result = run_train([*args, "--hellaswag", str(hellaswag), "--num_iterations", "1",
                            "--output_dir", str(tmp_path / "o3")], expect_ok=False)
        assert result.returncode == 2 and re.search(r"--hellaswag \S+: HellaSwag is English text, and this run's "
                                                    r"tokenizer mulaw-8000hz .* does not encode text", result.stderr)
        assert "step 1/" not in result.stdout
    # --tokenizer against what the manifest declares
    result = run_train([*args, "--tokenizer", "gpt2", "--num_iterations", "1", "--output_dir", str(tmp_path / "o2")],
                       expect_ok=False)
    assert result.returncode == 2 and "the shards were made with mulaw-8000hz" in result.stderr, result.stderr


def test_help_explains_every_flag():
    result = subprocess.run([sys.executable, str(TRAIN), "--help"], capture_output=True, text=True, timeout=TIMEOUT,
                            cwd=REPO)
    assert result.returncode == 0
    for flag in ("--input_bin", "--input_val_bin", "--output_dir", "--model", "--batch_size", "--sequence_length",
                 "--total_batch_size", "--num_iterations", "--learning_rate", "--warmup_iters",
                 "--learning_rate_decay_frac", "--weight_decay", "--grad_clip", "--val_loss_every", "--val_max_steps",
                 "--sample_every", "--hellaswag", "--hellaswag_path", "--dtype", "--device", "--compile", "--seed",
                 "--backend", "--checkpoint_every", "--resume", "--keep_checkpoints", "--zero_stage", "--write_llmc",
                 "--write_hf", "--verify_shards", "--corpus", "--tokenizer", "--vocab_size"):
        assert re.search(rf"^\s+{flag}\b", result.stdout, re.M), flag


def test_auto_dtype_is_float32_where_bfloat16_is_not_native(monkeypatch):
    import torch

    from pyllmc.precision import training_dtype

    capability = {}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability["now"])
    capability["now"] = (9, 0)  # H100
    assert training_dtype("auto", "cuda") == ("bfloat16", None)
    capability["now"] = (8, 0)  # A100
    assert training_dtype("auto", "cuda:0") == ("bfloat16", None)
    for old in [(7, 5), (7, 0)]:  # T4, V100
        capability["now"] = old
        name, note = training_dtype("auto", "cuda")
        assert name == "float32" and note.startswith(f"--dtype auto: float32, because this GPU (compute capability "
                                                     f"{old[0]}.{old[1]}) has no native bfloat16")
        name, note = training_dtype("bfloat16", "cuda")  # asked for: kept, with a note
        assert name == "bfloat16" and "--dtype float32 avoids it" in note
        assert training_dtype("float32", "cuda") == ("float32", None)
    assert training_dtype("auto", "cpu") == ("float32", None)
    assert training_dtype("bfloat16", "cpu") == ("bfloat16", None)
    with pytest.raises(ValueError, match="dtype 'fp8'"):
        training_dtype("fp8", "cpu")


def test_learning_rate_schedule(trainer):
    from pyllmc.reporting import OutlierDetector

    args, _ = trainer.settings.parse_command_line(trainer.build_parser(), ["--learning_rate", "1.0", "--warmup_iters", "10", "--num_iterations", "110",
                                  "--learning_rate_decay_frac", "0.1"])
    lr = [trainer.learning_rate_at(it, args) for it in range(110)]
    assert lr[0] == pytest.approx(0.1) and lr[9] == pytest.approx(1.0)  # linear warmup
    assert lr[10] == pytest.approx(1.0) and lr[60] == pytest.approx(0.55)  # cosine half way
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))
    assert trainer.learning_rate_at(110, args) == pytest.approx(0.1)  # the floor
    detector = OutlierDetector(window=16)
    for i in range(16):
        assert not detector.update(1.0 + 0.01 * (i % 2)) > 5
    assert detector.update(3.0) > 5


def test_pruned_exports_take_their_checksums_along(tmp_path):
    for step in (3, 6, 9):
        (tmp_path / f"model_{step:08d}.bin").write_bytes(b"m")
        (tmp_path / f"model_{step:08d}.bin.sha256").write_text("x")
        (tmp_path / f"hf_{step:08d}").mkdir()
    checkpoint.prune_exports(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "hf_00000006", "hf_00000009", "model_00000006.bin", "model_00000006.bin.sha256",
        "model_00000009.bin", "model_00000009.bin.sha256"]


def test_plot_reads_the_log(baseline, tmp_path):
    out, _, records = baseline
    import plot  # dev/plot.py (pyproject.toml puts dev/ on the tests' path)

    series = plot.read_log(out / "main.jsonl")
    assert [s for s, _ in series["train"]] == [1, 2, 3, 4, 5, 6]
    assert dict(series["train"]) == train_losses(records)
    assert [s for s, _ in series["val"]] == [6] and series["hellaswag"] == []
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit, match="pip install matplotlib"):
            plot.main([str(out / "main.jsonl"), "-o", str(tmp_path / "c.png")])
    else:
        plot.main([str(out / "main.jsonl"), "--ref", str(out / "main.jsonl"), "-o", str(tmp_path / "c.png")])
        assert (tmp_path / "c.png").stat().st_size > 1000


def test_non_finite_steps_are_skipped(shards, tmp_path):
    # an absurd learning rate blows the model up after one update: the NaN updates must not be applied
    run_train([*COMMON, "--input_bin", str(shards / "train.bin"), "--num_iterations", "3", "--learning_rate", "1e12",
               "--grad_clip", "0", "--val_max_steps", "0", "--output_dir", str(tmp_path)])
    records = [r for r in read_log(tmp_path) if r["type"] == "train"]
    assert [r.get("skipped", False) for r in records] == [False, True, True]
    state, _ = checkpoint.load_latest(tmp_path)
    import torch

    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_exported_models_match_the_checkpoint_and_restart_training(shards, baseline, tmp_path):
    import torch

    from pyllmc.llmc import read_model
    from pyllmc.model import GPT

    out, _, _ = baseline
    assert sorted(p.name for p in out.glob("model_*.bin")) == ["model_00000003.bin", "model_00000006.bin"]
    for name in ("model_00000003.bin", "model_00000006.bin"):  # each with its sha256, in sha256sum's format
        check = subprocess.run(["sha256sum", "-c", f"{name}.sha256"], cwd=out, capture_output=True, text=True)
        assert check.returncode == 0 and check.stdout.strip() == f"{name}: OK", check.stdout + check.stderr
    damaged = bytearray((out / "model_00000003.bin").read_bytes())  # --model with a damaged export is refused
    damaged[len(damaged) // 2] ^= 0x08
    (tmp_path / "model_00000003.bin").write_bytes(bytes(damaged))
    (tmp_path / "model_00000003.bin.sha256").write_bytes((out / "model_00000003.bin.sha256").read_bytes())
    from pyllmc import inputs
    from pyllmc.settings import ConfigError

    with pytest.raises(ConfigError, match=r"--model .*model_00000003\.bin: .*sha256 mismatch"):
        inputs.build_model(str(tmp_path / "model_00000003.bin"), seed=0)
    state, _ = checkpoint.load_latest(out)
    from_llmc, from_hf = read_model(str(out / "model_00000006.bin")), GPT.from_pretrained(str(out / "hf_00000006"))
    for name, tensor in state["model"].items():
        assert torch.equal(from_llmc.state_dict()[name], tensor), name
        assert torch.equal(from_hf.state_dict()[name], tensor), name

    # start a new run from the llm.c file, with a short HellaSwag evaluation at its end
    hellaswag = SHARED_DATA / "hellaswag_val_preprocessed.jsonl"
    extra = ["--hellaswag", str(hellaswag), "--hellaswag_max_examples", "4"] if hellaswag.exists() else []
    result = run_train([*COMMON, "--input_bin", str(shards / "train.bin"), "--model", str(out / "model_00000006.bin"),
                        "--num_iterations", "1", "--total_batch_size", "64", "--val_max_steps", "0",
                        "--output_dir", str(tmp_path), "--checkpoint_every", "-1", *extra])
    assert "weights from llm.c file" in result.stdout
    x = torch.from_numpy(np.fromfile(shards / "train.bin", dtype=np.uint16, offset=1024)[:65].astype(np.int64))
    with torch.no_grad():
        _, expected = from_llmc(x[:-1].view(2, 32), x[1:].view(2, 32))
    records = read_log(tmp_path)
    assert train_losses(records)[1] == pytest.approx(expected.item(), abs=1e-5)
    if extra:
        scores = [r for r in records if r["type"] == "hellaswag"]
        assert len(scores) == 1 and scores[0]["n"] == 4 and 0 <= scores[0]["acc_norm"] <= 1


def test_resume_of_a_run_from_before_loss_head_keeps_the_fused_classifier(baseline, tmp_path):
    """A checkpoint whose recorded settings have no --loss_head trained with llm.c's fused classifier (the only
    loss head then): --resume 1 continues on it, not on today's default, so the run goes on as it was."""
    out, _, _ = baseline
    state = checkpoint.load_checkpoint(out / "ckpt_00000003.pt")
    assert state["settings"]["loss_head"] == "chunked"
    del state["settings"]["loss_head"]
    old = tmp_path / "old"
    checkpoint.save_checkpoint(old, 3, state)
    run_train(["--resume", "1", "--output_dir", str(old), "--stop_at_step", "4"])
    config = [r for r in read_log(old) if r["type"] == "config"][-1]
    assert config["args"]["loss_head"] == "fused"
