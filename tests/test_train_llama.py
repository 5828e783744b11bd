"""train_gpt2.py training the Llama family end to end on the CPU: the llama-tiny preset on TinyStories-style
shards of a 512-id sentencepiece vocabulary made here (tiny Shakespeare's text through pyllmc.tinystories,
llama2.c's recipe), with the GPT-2 trainer's guarantees: the loss falls, samples decode with the shards'
tokenizer, checkpoints resume bitwise, Hugging Face export, the kernel backends train like torch."""

import json
import math
import shutil
from pathlib import Path

import pytest

from pyllmc import checkpoint
from test_train import SHARED_DATA, read_log, run_train, train_losses

COMMON = ["--model", "llama-tiny", "--batch_size", "2", "--sequence_length", "32", "--val_max_steps", "1",
          "--sample_every", "-1", "--backend", "torch", "--device", "cpu", "--learning_rate", "3e-3",
          "--seed", "7"]
RESUME_ARGS = ["--num_iterations", "6", "--warmup_iters", "2", "--learning_rate_decay_frac", "0.1",
               "--total_batch_size", "128", "--checkpoint_every", "3", "--sample_every", "3", "--sample_length", "8"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """20 KB of tiny Shakespeare as stories (blank-line separated), a 512-id vocabulary, shards + manifest."""
    from pyllmc import tinystories

    source = SHARED_DATA / "tinyshakespeare.txt"
    if not source.exists():
        pytest.skip(f"shared data file {source} not found")
    d = tmp_path_factory.mktemp("llama_shards")
    text = d / "stories.txt"
    text.write_text(source.read_text()[:60000])
    tinystories.main(["--input", str(text), "--vocab_size", "512", "--output_dir", str(d / "out"),
                      "--shard_size", "8000", "--num_threads", "1"])
    return d / "out"


def _data_args(shards):
    return ["--input_bin", str(shards / "tinystories_train_*.bin"),
            "--input_val_bin", str(shards / "tinystories_val_*.bin")]


@pytest.fixture(scope="module")
def baseline(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("llama_baseline")
    result = run_train([*COMMON, *_data_args(shards), *RESUME_ARGS, "--output_dir", str(out),
                        "--keep_checkpoints", "5", "--write_hf", "1"])
    return out, result, read_log(out)


def test_llama_run_lowers_the_loss_and_samples_decode(baseline):
    out, result, records = baseline
    assert "Llama, " in result.stdout and "4 heads (2 key/value)" in result.stdout
    losses = train_losses(records)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert losses[1] == pytest.approx(math.log(512), abs=0.6)  # a fresh model: about uniform over 512 ids
    assert losses[6] < losses[1] - 0.5, losses
    config = records[0]
    assert config["tokenizer"]["name"] == "sentencepiece" and config["tokenizer"]["vocab_size"] == 512
    samples = [r for r in records if r["type"] == "sample"]
    assert [r["step"] for r in samples] == [3, 6] and all(isinstance(r["text"], str) and r["text"] for r in samples)
    state = checkpoint.load_checkpoint(checkpoint.list_checkpoints(out)[-1][1])
    assert state["model_family"] == "llama" and state["model_config"]["n_kv_head"] == 2


def test_llama_resume_is_bitwise(baseline, shards, tmp_path):
    """Stopped after its step-3 checkpoint and resumed: the same losses as the uninterrupted run, bit for bit."""
    out, _, records = baseline
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(out / "ckpt_00000003.pt", resumed)
    run_train([*COMMON, *_data_args(shards), *RESUME_ARGS, "--output_dir", str(resumed), "--resume", "1"])
    want, got = train_losses(records), train_losses(read_log(resumed))
    assert {s: got[s] for s in (4, 5, 6)} == {s: want[s] for s in (4, 5, 6)}


def test_llama_hf_export_loads_in_transformers(baseline):
    """--write_hf 1: a LlamaForCausalLM directory that transformers loads, with our logits."""
    import torch
    transformers = pytest.importorskip("transformers")
    from pyllmc.llama import Llama

    out, _, _ = baseline
    hf_dir = out / "hf_00000006"
    assert json.loads((hf_dir / "config.json").read_text())["model_type"] == "llama"
    ours = Llama.from_pretrained(str(hf_dir))
    theirs = transformers.LlamaForCausalLM.from_pretrained(str(hf_dir)).eval()
    idx = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], theirs(idx).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernels", ["triton", "cuda"])
def test_llama_kernel_backend_trains_like_torch(shards, tmp_path, kernels):
    """RMSNorm, RoPE, GQA attention, SwiGLU and the fused classifier on the Triton (interpreter) and CUDA
    (simulator) kernels: the first loss as torch's, the second close."""
    from conftest import kernel_device

    device = kernel_device(kernels).type
    losses = {}
    for backend in (kernels, "torch"):
        args = [a if a not in ("torch", "cpu") else {"torch": backend, "cpu": device}[a] for a in COMMON]
        run_train([*args, *_data_args(shards), "--num_iterations", "2", "--total_batch_size", "64",
                   "--val_max_steps", "0", "--output_dir", str(tmp_path / backend), "--checkpoint_every", "-1"])
        losses[backend] = train_losses(read_log(tmp_path / backend))
    assert losses[kernels][1] == pytest.approx(losses["torch"][1], abs=1e-3)
    assert losses[kernels][2] == pytest.approx(losses["torch"][2], abs=2e-2)


def test_llama_refuses_llmc_files(shards, tmp_path):
    result = run_train([*COMMON, *_data_args(shards), "--num_iterations", "1", "--output_dir", str(tmp_path),
                        "--write_llmc", "1"], expect_ok=False)
    assert result.returncode != 0 and "--write_llmc writes llm.c's GPT-2 files" in result.stdout + result.stderr


def test_llama_diagnostics_read_the_rotated_attention_and_change_nothing(shards, tmp_path):
    """--diagnostics_every on a Llama: activations, gradients, updates and the attention of every layer (from q
    and k after RoPE, over 2 key/value heads), no GELU figures (SwiGLU), and losses bitwise as without."""
    common = [*COMMON, *_data_args(shards), "--num_iterations", "2", "--total_batch_size", "64",
              "--val_max_steps", "0", "--checkpoint_every", "-1"]
    run_train([*common, "--output_dir", str(tmp_path / "plain")])
    run_train([*common, "--output_dir", str(tmp_path / "diag"), "--diagnostics_every", "1"])
    plain, diag = read_log(tmp_path / "plain"), read_log(tmp_path / "diag")
    assert train_losses(diag) == train_losses(plain)
    records = [r for r in diag if r["type"] == "diagnostics"]
    assert [r["step"] for r in records] == [1, 2]
    record = records[-1]
    assert len(record["attention"]) == 4 and all(len(a["entropy"]) == 4 for a in record["attention"])
    # mean entropy per head: between 0 and that of uniform attention over the visible keys (T = 32)
    uniform = sum(math.log(t + 1) for t in range(1, 32)) / 31
    assert all(0 <= e <= uniform + 1e-6 for a in record["attention"] for e in a["entropy"])
    assert all(s is None for s in record["activations"]["gelu_input"])
    assert all(s is not None and math.isfinite(s["std"]) for s in record["activations"]["residual"])


def test_llama_two_processes_with_zero1_match_one(shards, tmp_path):
    """DDP (gloo) with ZeRO-1 on a Llama: 2 processes of 1 micro step each train as 1 process of 2."""
    args = [*COMMON, *_data_args(shards), "--num_iterations", "2", "--total_batch_size", "128",
            "--val_max_steps", "0", "--checkpoint_every", "-1"]
    run_train([*args, "--output_dir", str(tmp_path / "one")])
    result = run_train([*args, "--output_dir", str(tmp_path / "two"), "--zero_stage", "1"], nproc=2)
    assert "x 2 rank(s)" in result.stdout and "ZeRO-1" in result.stdout
    one, two = train_losses(read_log(tmp_path / "one")), train_losses(read_log(tmp_path / "two"))
    assert sorted(two) == [1, 2]
    for step in one:  # float32 reduction order differs, nothing else
        assert two[step] == pytest.approx(one[step], rel=1e-5, abs=1e-5), (step, one, two)
