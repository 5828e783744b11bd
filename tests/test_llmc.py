"""llm.c's model file and debug state file, and `python -m pyllmc.llmc check`."""

import hashlib
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import pyllmc
from pyllmc import llmc
from pyllmc.llmc import LlmcFormatError, read_model, read_state, write_model, write_state
from pyllmc.model import GPT, GPTConfig

V = 50257


def tiny_model(seed=0, **overrides) -> GPT:
    fields = dict(block_size=16, n_layer=2, n_head=2, n_embd=64)
    fields.update(overrides)
    model = GPT(GPTConfig(**fields), seed=seed)
    with torch.no_grad():  # random biases and LayerNorm parameters too, so any mix-up shows
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def assert_same_parameters(a: GPT, b: GPT, exact=True):
    assert a.config == b.config
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        if exact:
            assert torch.equal(pa, pb), name
        else:
            torch.testing.assert_close(pa, pb, msg=lambda m: f"{name}: {m}")


# ---- model file ----------------------------------------------------------------------------------------

def test_model_round_trip_float32_is_bit_identical(tmp_path):
    model = tiny_model()
    path = tmp_path / "model.bin"
    write_model(str(path), model)
    header = np.fromfile(path, dtype="<i4", count=256)
    assert list(header[:8]) == [20240326, 3, 16, V, 2, 2, 64, 50304]
    assert not header[8:].any()
    n_values = 50304 * 64 + 16 * 64 + 2 * (12 * 64 * 64 + 13 * 64) + 2 * 64
    assert os.path.getsize(path) == 1024 + 4 * n_values

    loaded = read_model(str(path))
    assert_same_parameters(model, loaded)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    write_model(str(tmp_path / "again.bin"), loaded)
    assert path.read_bytes() == (tmp_path / "again.bin").read_bytes()


def test_model_round_trip_bfloat16_is_bit_identical(tmp_path):
    model = tiny_model()
    path = tmp_path / "model_bf16.bin"
    write_model(str(path), model, dtype="bfloat16")
    assert list(np.fromfile(path, dtype="<i4", count=2)) == [20240326, 5]
    loaded = read_model(str(path))
    rounded = {n: p.detach().to(torch.bfloat16).float() for n, p in model.named_parameters()}
    for name, p in loaded.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, rounded[name]), name
    write_model(str(tmp_path / "again.bin"), loaded, dtype="bfloat16")
    assert path.read_bytes() == (tmp_path / "again.bin").read_bytes()
    as_bf16 = read_model(str(path), dtype=torch.bfloat16)
    assert as_bf16.transformer.wte.weight.dtype == torch.bfloat16


def test_model_file_layout_is_llmc_order(tmp_path):
    """Read the file with plain numpy at llm.c's offsets, independently of read_model."""
    model = tiny_model(n_layer=3)
    path = tmp_path / "model.bin"
    write_model(str(path), model)
    values = np.fromfile(path, dtype="<f4", offset=1024)
    L, C, Vp, maxT = 3, 64, 50304, 16
    sizes = [("wte", Vp * C), ("wpe", maxT * C), ("ln1w", L * C), ("ln1b", L * C), ("qkvw", L * 3 * C * C),
             ("qkvb", L * 3 * C), ("attprojw", L * C * C), ("attprojb", L * C), ("ln2w", L * C), ("ln2b", L * C),
             ("fcw", L * 4 * C * C), ("fcb", L * 4 * C), ("fcprojw", L * 4 * C * C), ("fcprojb", L * C),
             ("lnfw", C), ("lnfb", C)]
    offsets, offset = {}, 0
    for name, n in sizes:
        offsets[name] = offset
        offset += n
    assert offset == values.size

    def chunk(name, shape):
        n = int(np.prod(shape))
        return torch.from_numpy(values[offsets[name]: offsets[name] + n].copy()).view(shape)

    h = model.transformer.h
    assert torch.equal(chunk("wte", (Vp, C)), model.transformer.wte.weight.detach())
    assert torch.equal(chunk("wpe", (maxT, C)), model.transformer.wpe.weight.detach())
    assert torch.equal(chunk("qkvw", (L, 3 * C, C))[1], h[1].attn.c_attn.weight.detach())
    assert torch.equal(chunk("attprojb", (L, C))[2], h[2].attn.c_proj.bias.detach())
    assert torch.equal(chunk("ln2w", (L, C))[0], h[0].ln_2.weight.detach())
    assert torch.equal(chunk("fcprojw", (L, C, 4 * C))[2], h[2].mlp.c_proj.weight.detach())
    assert torch.equal(chunk("lnfb", (C,)), model.transformer.ln_f.bias.detach())


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "model.bin"
    write_model(str(path), tiny_model(n_layer=1))
    return path


def _patched(path, data: bytes, name: str):
    bad = path.parent / name
    bad.write_bytes(data)
    return str(bad)


def test_model_format_errors(model_file):
    data = model_file.read_bytes()
    header = np.frombuffer(data[:1024], dtype="<i4").copy()

    def with_header(**changes):
        h = header.copy()
        for index, value in changes.items():
            h[int(index[1:])] = value
        return h.tobytes() + data[1024:]

    cases = [
        ("bad_magic.bin", with_header(i0=20240520), "bad magic number 20240520"),
        ("version.bin", with_header(i1=4), "unsupported model file version 4"),
        ("short_header.bin", data[:100], "truncated"),
        ("truncated.bin", data[:-4], "truncated"),
        ("extra.bin", data + b"\0" * 8, "8 bytes too many"),
        ("layers.bin", with_header(i4=2), "truncated"),  # header says more layers than stored
        ("heads.bin", with_header(i5=3), "divisible"),
        ("padded.bin", with_header(i7=50000), "padded_vocab_size"),
    ]
    for name, content, message in cases:
        bad = _patched(model_file, content, name)
        with pytest.raises(LlmcFormatError, match=message) as info:
            read_model(bad)
        assert bad in str(info.value), "the error names the file"
        assert isinstance(info.value, ValueError)
    with pytest.raises(ValueError, match="dtype"):
        write_model(str(model_file), tiny_model(), dtype="float16")


def _sha256sum_check(folder, sidecar_name):
    if shutil.which("sha256sum") is None:
        pytest.skip("sha256sum (coreutils) not found")
    return subprocess.run(["sha256sum", "-c", sidecar_name], cwd=folder, capture_output=True, text=True, timeout=60)


def test_model_file_has_a_sha256_sidecar(tmp_path):
    model = tiny_model(n_layer=1)
    path = tmp_path / "model.bin"
    write_model(str(path), model)
    data = path.read_bytes()
    sidecar = tmp_path / "model.bin.sha256"
    assert sidecar.read_text() == f"{hashlib.sha256(data).hexdigest()}  model.bin\n"  # sha256sum's own format
    result = _sha256sum_check(tmp_path, "model.bin.sha256")
    assert result.returncode == 0 and result.stdout.strip() == "model.bin: OK", result.stdout + result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin", "model.bin.sha256"]  # no temporaries left
    assert_same_parameters(model, read_model(str(path)))

    # a flipped bit anywhere in the parameters is caught through the sidecar (llm.c's format has no checksum)
    for pos in np.linspace(1024, len(data) - 1, 17).astype(int):
        bad = bytearray(data)
        bad[pos] ^= 1 << (pos % 8)
        path.write_bytes(bad)
        with pytest.raises(LlmcFormatError, match="sha256 mismatch") as info:
            read_model(str(path))
        assert str(path) in str(info.value) and "model.bin.sha256" in str(info.value)
    assert _sha256sum_check(tmp_path, "model.bin.sha256").returncode != 0

    # without a sidecar (llm.c's own files) the file loads as before; a damaged sidecar is an error
    sidecar.unlink()
    assert read_model(str(path)).config == model.config
    sidecar.write_text("not a checksum\n")
    with pytest.raises(LlmcFormatError, match="not a sha256sum line"):
        read_model(str(path))
    write_model(str(path), model, dtype="bfloat16")  # a rewrite replaces both
    assert _sha256sum_check(tmp_path, "model.bin.sha256").returncode == 0
    assert read_model(str(path)).config == model.config


# ---- debug state file and the check command -------------------------------------------------------------

@pytest.fixture
def state_files(tmp_path):
    model = tiny_model(n_layer=1)
    x = torch.randint(0, V, (2, 8))
    y = torch.randint(0, V, (2, 8))
    write_model(str(tmp_path / "model.bin"), model)
    loss = write_state(str(tmp_path / "state.bin"), model, x, y)
    return model, x, y, loss, tmp_path / "model.bin", tmp_path / "state.bin"


def test_state_round_trip(state_files):
    model, x, y, loss, _, state_path = state_files
    state = read_state(str(state_path), model.config)
    assert (state["B"], state["T"]) == (2, 8)
    assert torch.equal(state["x"], x) and torch.equal(state["y"], y)
    logits, expected_loss = model(x, y)
    assert state["logits"].shape == (2, 8, V)
    torch.testing.assert_close(state["logits"], logits.detach(), rtol=0, atol=0)
    assert state["loss"].item() == pytest.approx(loss) == pytest.approx(expected_loss.item())
    assert list(state["grads"]) == list(llmc.TENSOR_NAMES)
    assert state["grads"]["wte"].shape == (50304, 64)
    assert torch.all(state["grads"]["wte"][V:] == 0)
    assert torch.equal(state["grads"]["qkvw"][0], model.transformer.h[0].attn.c_attn.weight.grad)
    assert torch.equal(state["grads"]["lnfw"], model.transformer.ln_f.weight.grad)
    header = np.fromfile(state_path, dtype="<i4", count=4)
    assert list(header) == [20240327, 2, 2, 8]


def test_state_format_errors(state_files):
    model, *_, state_path = state_files
    data = state_path.read_bytes()
    bad_version = np.frombuffer(data[:1024], dtype="<i4").copy()
    bad_version[1] = 1
    for name, content, message in [("magic.bin", data[1024:], "bad magic"),
                                   ("version.bin", bad_version.tobytes() + data[1024:], "unsupported debug state"),
                                   ("short.bin", data[:-1], "truncated"),
                                   ("long.bin", data + b"\0\0\0\0", "bytes too many")]:
        bad = _patched(state_path, content, name)
        with pytest.raises(LlmcFormatError, match=message) as info:
            read_state(bad, model.config)
        assert bad in str(info.value)
    with pytest.raises(LlmcFormatError, match="truncated"):  # wrong model for this state
        read_state(str(state_path), GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=64))


def run_check(*args):
    return subprocess.run([sys.executable, "-m", "pyllmc.llmc", "check", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_check_command_passes_and_catches_a_bad_gradient(state_files):
    _, _, _, _, model_path, state_path = state_files
    out = run_check(model_path, state_path, "--backend", "torch", "--device", "cpu", "--atol", "1e-5")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "grad qkvw" in out.stdout and "max abs err" in out.stdout and "all OK" in out.stdout
    assert "FAIL" not in out.stdout

    # corrupt one value of the fcw gradient: the check must notice and fail
    config = read_model(str(model_path)).config
    offset = 1024 + 4 * (2 * 2 * 8 + 2 * 8 * V + 1)
    for name, shape in llmc.tensor_shapes(config).items():
        if name == "fcw":
            break
        offset += 4 * int(np.prod(shape))
    data = bytearray(state_path.read_bytes())
    value = np.frombuffer(bytes(data[offset + 40: offset + 44]), dtype="<f4")[0]
    data[offset + 40: offset + 44] = np.float32(value + 0.5).tobytes()
    bad = state_path.parent / "bad_state.bin"
    bad.write_bytes(bytes(data))
    out = run_check(model_path, bad, "--device", "cpu")
    assert out.returncode == 1, out.stdout + out.stderr
    fcw_line = next(line for line in out.stdout.splitlines() if line.startswith("grad fcw "))
    assert "FAIL" in fcw_line and "5.000e-01" in fcw_line
    assert "FAILED" in out.stdout



def test_check_command_reports_unreadable_files(state_files, capsys):
    _, _, _, _, model_path, state_path = state_files
    assert llmc.main(["check", str(model_path), str(state_path.parent / "missing.bin"), "--device", "cpu"]) == 2
    assert "missing.bin" in capsys.readouterr().err
    assert llmc.main(["check", str(state_path), str(state_path), "--device", "cpu"]) == 2  # swapped
    assert "bad magic" in capsys.readouterr().err
    if not pyllmc.available_backends()["cuda"].available:
        assert llmc.main(["check", str(model_path), str(state_path), "--backend", "cuda"]) == 2
        assert "cannot run here" in capsys.readouterr().err


def test_check_function_on_kernel_backend(state_files, kernel_backend):
    """The same check in-process on a kernel backend (where the op kernels exist)."""
    name, device = kernel_backend
    _, _, _, _, model_path, state_path = state_files
    import io

    buffer = io.StringIO()
    ok = llmc.check(str(model_path), str(state_path), backend=name, device=str(device), atol=1e-4, out=buffer)
    assert ok, buffer.getvalue()


def test_reexports_of_the_other_llmc_formats(tmp_path):
    from pyllmc.llmc import read_shard, write_shard

    write_shard(str(tmp_path / "shard.bin"), [1, 2, 50256])
    assert list(read_shard(str(tmp_path / "shard.bin"))) == [1, 2, 50256]
    assert callable(llmc.write_llmc_tokenizer)
    with pytest.raises(AttributeError):
        llmc.no_such_name
