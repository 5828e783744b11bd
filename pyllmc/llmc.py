"""llm.c's binary files: the model checkpoint, the debug state file, and a Python test_gpt2.

Model file (llm.c's gpt2_124M.bin, gpt2_124M_bf16.bin):
    header: 256 int32
        [0] 20240326 (magic)  [1] version: 3 = float32 parameters, 5 = bfloat16
        [2] max_seq_len  [3] vocab_size  [4] num_layers  [5] num_heads  [6] channels
        [7] padded_vocab_size
    then the parameters, little-endian, in this order, each layer's tensors stacked:
        wte (Vp, C)  wpe (maxT, C)  ln1w (L, C)  ln1b (L, C)  qkvw (L, 3C, C)  qkvb (L, 3C)
        attprojw (L, C, C)  attprojb (L, C)  ln2w (L, C)  ln2b (L, C)  fcw (L, 4C, C)  fcb (L, 4C)
        fcprojw (L, C, 4C)  fcprojb (L, C)  lnfw (C)  lnfb (C)
    Weights are (out, in), nn.Linear's layout, so they map onto pyllmc's GPT without transposes.

Debug state file (llm.c's gpt2_124M_debug_state.bin, written by its train_gpt2.py):
    header: 256 int32: [0] 20240327 (magic)  [1] 2 (version)  [2] B  [3] T
    then x (B, T) int32, y (B, T) int32, logits (B, T, V) float32 (V = vocab_size, unpadded),
    loss (1 float32), and the gradients of every parameter in the model file's order and
    shapes (wte's with the padded rows, zero), float32.

`python -m pyllmc.llmc check MODEL.bin STATE.bin` runs the model's forward and backward on the
state's batch and compares logits, loss and every gradient with the file (llm.c's test_gpt2).

Checksum sidecar: write_model also writes `<file>.sha256` beside the model file, one line in
sha256sum's format (`<64 hex digits>  <file name>`, so `sha256sum -c model.bin.sha256` checks it
from the file's folder), hashed from the bytes as they are written; the model file itself stays
byte for byte llm.c's. read_model verifies the file against its sidecar when there is one (llm.c's
own files have none and load as before).

The token shard and tokenizer files have their own modules; read_shard, write_shard and
write_llmc_tokenizer are re-exported here so that all of llm.c's formats are in one place.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from pyllmc.model import GPT, GPTConfig

MODEL_MAGIC = 20240326
MODEL_VERSION_FP32 = 3
MODEL_VERSION_BF16 = 5
STATE_MAGIC = 20240327
STATE_VERSION = 2
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4

_VERSION_OF_DTYPE = {"float32": MODEL_VERSION_FP32, "bfloat16": MODEL_VERSION_BF16}
_DTYPE_OF_VERSION = {MODEL_VERSION_FP32: torch.float32, MODEL_VERSION_BF16: torch.bfloat16}

# the parameter tensors of the model file, in order
TENSOR_NAMES = ("wte", "wpe", "ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb",
                "ln2w", "ln2b", "fcw", "fcb", "fcprojw", "fcprojb", "lnfw", "lnfb")

# per-layer tensors: llm.c name -> the parameter's path inside a Block
_LAYER_PARAMS = {
    "ln1w": "ln_1.weight", "ln1b": "ln_1.bias",
    "qkvw": "attn.c_attn.weight", "qkvb": "attn.c_attn.bias",
    "attprojw": "attn.c_proj.weight", "attprojb": "attn.c_proj.bias",
    "ln2w": "ln_2.weight", "ln2b": "ln_2.bias",
    "fcw": "mlp.c_fc.weight", "fcb": "mlp.c_fc.bias",
    "fcprojw": "mlp.c_proj.weight", "fcprojb": "mlp.c_proj.bias",
}


class LlmcFormatError(ValueError):
    """A file that is not a valid llm.c model / state file (message names the file)."""


# ---- re-exports of the other llm.c formats (imported on first use) ----------------------------

_REEXPORTS = {"read_shard": "pyllmc.data", "write_shard": "pyllmc.data", "ShardFormatError": "pyllmc.data",
              "write_llmc_tokenizer": "pyllmc.tokenizer"}


def __getattr__(name):
    if name in _REEXPORTS:
        import importlib

        return getattr(importlib.import_module(_REEXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---- tensors in llm.c's order ------------------------------------------------------------------

def tensor_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """llm.c name -> shape, in file order."""
    L, C, Vp, maxT = config.n_layer, config.n_embd, config.padded_vocab_size, config.block_size
    return {
        "wte": (Vp, C), "wpe": (maxT, C),
        "ln1w": (L, C), "ln1b": (L, C),
        "qkvw": (L, 3 * C, C), "qkvb": (L, 3 * C),
        "attprojw": (L, C, C), "attprojb": (L, C),
        "ln2w": (L, C), "ln2b": (L, C),
        "fcw": (L, 4 * C, C), "fcb": (L, 4 * C),
        "fcprojw": (L, C, 4 * C), "fcprojb": (L, C),
        "lnfw": (C,), "lnfb": (C,),
    }


def _num_values(config: GPTConfig) -> int:
    return sum(int(np.prod(shape)) for shape in tensor_shapes(config).values())


def _param_tensors(model: GPT, grads: bool = False) -> dict[str, torch.Tensor]:
    """The model's parameters (or their gradients, zeros where None) stacked in llm.c's order."""
    def get(param):
        if not grads:
            return param.detach()
        return param.grad.detach() if param.grad is not None else torch.zeros_like(param)

    blocks = model.transformer.h
    out = {"wte": get(model.transformer.wte.weight), "wpe": get(model.transformer.wpe.weight)}
    for llmc_name, path in _LAYER_PARAMS.items():
        out[llmc_name] = torch.stack([get(blocks[i].get_parameter(path)) for i in range(len(blocks))])
    out["lnfw"] = get(model.transformer.ln_f.weight)
    out["lnfb"] = get(model.transformer.ln_f.bias)
    return {name: out[name] for name in TENSOR_NAMES}


def _tensor_bytes(t: torch.Tensor, dtype: torch.dtype) -> bytes:
    t = t.detach().to(device="cpu", dtype=dtype).contiguous()
    if dtype == torch.bfloat16:  # numpy has no bfloat16: write its bits
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def _header(values: dict[int, int]) -> bytes:
    header = np.zeros(HEADER_INTS, dtype="<i4")
    for index, value in values.items():
        header[index] = value
    return header.tobytes()


def _atomic_write(path: str, chunks) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        for chunk in chunks:
            f.write(chunk)
    os.replace(tmp, path)


# ---- sha256 sidecar ------------------------------------------------------------------------------

SIDECAR_SUFFIX = ".sha256"
_SIDECAR_LINE = re.compile(r"([0-9a-fA-F]{64}) [ *](.+)")


def sidecar_path(path) -> str:
    return os.fspath(path) + SIDECAR_SUFFIX


def _write_with_sidecar(path: str, chunks) -> None:
    """Write `chunks` to `path` and its sha256 to `path`.sha256, each atomically and durably (temp file,
    fsync, rename). The old sidecar goes first, so a crash never leaves a stale checksum beside new bytes."""
    from pyllmc.checkpoint import atomic_write

    sidecar = sidecar_path(path)
    if os.path.exists(sidecar):
        os.unlink(sidecar)
    digest = hashlib.sha256()

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                digest.update(chunk)
                f.write(chunk)

    atomic_write(path, write)
    line = f"{digest.hexdigest()}  {os.path.basename(path)}\n"
    atomic_write(sidecar, lambda tmp: Path(tmp).write_text(line))


def read_sidecar(path) -> str | None:
    """The sha256 that `path`.sha256 records for `path` (lower-case hex); None when there is no sidecar."""
    sidecar = sidecar_path(path)
    try:
        with open(sidecar, encoding="utf-8", errors="replace") as f:
            first = f.readline().rstrip("\r\n")
    except FileNotFoundError:
        return None
    match = _SIDECAR_LINE.fullmatch(first)
    if not match:
        raise LlmcFormatError(f"{sidecar}: not a sha256sum line ({first[:100]!r}): the checksum of {path} "
                              f"is damaged")
    return match.group(1).lower()


def _verify_sidecar(path: str, data) -> None:
    expected = read_sidecar(path)
    if expected is None:
        return
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise LlmcFormatError(f"{path}: sha256 mismatch, the file changed after it was written (its sha256 is "
                              f"{actual}, {sidecar_path(path)} records {expected})")


# ---- model file ----------------------------------------------------------------------------------

def write_model(path: str, model: GPT, dtype: str = "float32") -> None:
    """Write `model` as llm.c's model file, parameters in float32 (version 3) or bfloat16 (5), and its
    sha256 as `path`.sha256 (atomic and durable: temp files, fsync, rename)."""
    if dtype not in _VERSION_OF_DTYPE:
        raise ValueError(f"dtype must be one of {sorted(_VERSION_OF_DTYPE)}; got {dtype!r}")
    c = model.config
    version = _VERSION_OF_DTYPE[dtype]
    header = _header({0: MODEL_MAGIC, 1: version, 2: c.block_size, 3: c.vocab_size, 4: c.n_layer,
                      5: c.n_head, 6: c.n_embd, 7: c.padded_vocab_size})
    torch_dtype = _DTYPE_OF_VERSION[version]
    tensors = _param_tensors(model)
    _write_with_sidecar(os.fspath(path), [header] + [_tensor_bytes(t, torch_dtype) for t in tensors.values()])


def _read_header(path: str, f, magic: int, what: str) -> np.ndarray:
    raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES:
        raise LlmcFormatError(f"{path}: truncated: {len(raw)} bytes, shorter than the {HEADER_BYTES}-byte "
                              f"header of an llm.c {what}")
    header = np.frombuffer(raw, dtype="<i4")
    if header[0] != magic:
        raise LlmcFormatError(f"{path}: bad magic number {int(header[0])} (an llm.c {what} starts with {magic})")
    return header


def _check_size(path: str, expected: int, what: str) -> None:
    actual = os.path.getsize(path)
    if actual < expected:
        raise LlmcFormatError(f"{path}: truncated: the header describes a {what} of {expected} bytes, "
                              f"the file has {actual}")
    if actual > expected:
        raise LlmcFormatError(f"{path}: size disagrees with the header: {what} of {expected} bytes expected, "
                              f"the file has {actual} ({actual - expected} bytes too many)")


def read_model_header(path: str) -> tuple[GPTConfig, torch.dtype]:
    """(config, parameter dtype) from an llm.c model file's header, size checked."""
    with open(path, "rb") as f:
        header = _read_header(path, f, MODEL_MAGIC, "model file")
    version = int(header[1])
    if version not in _DTYPE_OF_VERSION:
        raise LlmcFormatError(f"{path}: unsupported model file version {version} "
                              f"(expected {MODEL_VERSION_FP32} = float32 or {MODEL_VERSION_BF16} = bfloat16)")
    try:
        config = GPTConfig(block_size=int(header[2]), vocab_size=int(header[3]), n_layer=int(header[4]),
                           n_head=int(header[5]), n_embd=int(header[6]), padded_vocab_size=int(header[7]))
    except ValueError as err:
        raise LlmcFormatError(f"{path}: invalid model header: {err}") from err
    dtype = _DTYPE_OF_VERSION[version]
    _check_size(path, HEADER_BYTES + _num_values(config) * dtype.itemsize, "model file")
    return config, dtype


def _read_values(path: str, offset: int, count: int, dtype: torch.dtype) -> torch.Tensor:
    """`count` values of `dtype` at byte `offset` of the file, as a 1-D CPU tensor."""
    np_dtype = {torch.float32: "<f4", torch.bfloat16: "<i2", torch.int32: "<i4"}[dtype]
    array = np.fromfile(path, dtype=np_dtype, count=count, offset=offset)
    if array.size != count:
        raise LlmcFormatError(f"{path}: truncated: expected {count} values at byte {offset}, read {array.size}")
    tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if dtype == torch.bfloat16 else tensor


def read_model(path: str, *, dtype: torch.dtype = torch.float32, device="cpu") -> GPT:
    """Load llm.c's model file into a pyllmc GPT with parameters in `dtype` (float32 by default:
    a bf16 file is upcast exactly, so writing it back as bf16 gives the same bytes). The file is checked
    against its sha256 sidecar when it has one (LlmcFormatError on a mismatch)."""
    config, file_dtype = read_model_header(path)
    count = _num_values(config)
    with open(path, "rb") as f:  # one read: the same bytes are hashed and parsed
        data = bytearray(HEADER_BYTES + count * file_dtype.itemsize)
        if f.readinto(data) != len(data):
            raise LlmcFormatError(f"{path}: truncated while reading")
    _verify_sidecar(path, data)
    np_dtype = {torch.float32: "<f4", torch.bfloat16: "<i2"}[file_dtype]
    values = torch.from_numpy(np.frombuffer(data, dtype=np_dtype, count=count, offset=HEADER_BYTES))
    if file_dtype == torch.bfloat16:
        values = values.view(torch.bfloat16)
    model = GPT.empty(config, device=device)
    model.to(dtype)
    tensors, offset = {}, 0
    for name, shape in tensor_shapes(config).items():
        n = int(np.prod(shape))
        tensors[name] = values[offset: offset + n].view(shape)
        offset += n
    _load_param_tensors(model, tensors)
    return model


@torch.no_grad()
def _load_param_tensors(model: GPT, tensors: dict[str, torch.Tensor]) -> None:
    blocks = model.transformer.h
    model.transformer.wte.weight.copy_(tensors["wte"])
    model.transformer.wpe.weight.copy_(tensors["wpe"])
    for llmc_name, param_path in _LAYER_PARAMS.items():
        for i, block in enumerate(blocks):
            block.get_parameter(param_path).copy_(tensors[llmc_name][i])
    model.transformer.ln_f.weight.copy_(tensors["lnfw"])
    model.transformer.ln_f.bias.copy_(tensors["lnfb"])


# ---- debug state file ----------------------------------------------------------------------------

def write_state(path: str, model: GPT, x: torch.Tensor, y: torch.Tensor) -> float:
    """Run forward + backward of `model` on (x, y) (B, T) and write llm.c's debug state file:
    the batch, the logits, the loss and every parameter's gradient. Returns the loss.

    The model's existing gradients are discarded."""
    model.zero_grad(set_to_none=True)
    logits, loss = model(x, y)
    loss.backward()
    B, T = x.shape
    header = _header({0: STATE_MAGIC, 1: STATE_VERSION, 2: B, 3: T})
    grads = _param_tensors(model, grads=True)
    chunks = [header, _tensor_bytes(x, torch.int32), _tensor_bytes(y, torch.int32),
              _tensor_bytes(logits, torch.float32), _tensor_bytes(loss.reshape(1), torch.float32)]
    chunks += [_tensor_bytes(g, torch.float32) for g in grads.values()]
    _atomic_write(path, chunks)
    return loss.item()


def read_state(path: str, config: GPTConfig) -> dict:
    """llm.c's debug state file -> {"x", "y": (B, T) int64, "logits": (B, T, V) float32,
    "loss": float32 scalar, "grads": {llm.c name: float32 tensor}}. The file does not store the
    model's sizes: `config` (e.g. from the model file) gives V and the gradient shapes."""
    with open(path, "rb") as f:
        header = _read_header(path, f, STATE_MAGIC, "debug state file")
    version = int(header[1])
    if version != STATE_VERSION:
        raise LlmcFormatError(f"{path}: unsupported debug state version {version} (expected {STATE_VERSION})")
    B, T = int(header[2]), int(header[3])
    if B <= 0 or T <= 0:
        raise LlmcFormatError(f"{path}: invalid batch size B={B}, T={T} in the header")
    V = config.vocab_size
    counts = {"x": B * T, "y": B * T, "logits": B * T * V, "loss": 1}
    total = sum(counts.values()) + _num_values(config)
    _check_size(path, HEADER_BYTES + 4 * total, f"debug state (B={B}, T={T}, V={V}, {config.n_layer} layers, "
                                                f"C={config.n_embd})")
    state, offset = {"B": B, "T": T}, HEADER_BYTES
    for name, n in counts.items():
        dtype = torch.int32 if name in ("x", "y") else torch.float32
        state[name] = _read_values(path, offset, n, dtype)
        offset += 4 * n
    state["x"] = state["x"].view(B, T).long()
    state["y"] = state["y"].view(B, T).long()
    state["logits"] = state["logits"].view(B, T, V)
    state["loss"] = state["loss"][0]
    grads = {}
    for name, shape in tensor_shapes(config).items():
        n = int(np.prod(shape))
        grads[name] = _read_values(path, offset, n, torch.float32).view(shape)
        offset += 4 * n
    state["grads"] = grads
    return state


# ---- python -m pyllmc.llmc check -------------------------------------------------------------------

def max_abs_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest |actual - expected| (inf when anything is NaN / inf, so it always fails)."""
    diff = (actual.detach().double().cpu() - expected.detach().double().cpu()).abs()
    if diff.numel() == 0:
        return 0.0
    if not torch.isfinite(diff).all():
        return float("inf")
    return diff.max().item()


def check(model_path: str, state_path: str, *, backend: Optional[str] = None, device: Optional[str] = None,
          atol: float = 1e-2, out=sys.stdout) -> bool:
    """Forward + backward of the model file on the state file's batch, compared with the state's
    logits, loss and gradients; prints one line per tensor and returns whether all are within atol."""
    import pyllmc

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = read_model(model_path, device=device)
    state = read_state(state_path, model.config)
    x, y = state["x"].to(device), state["y"].to(device)
    model.zero_grad(set_to_none=True)
    with pyllmc.backend(backend or "auto"):
        logits, loss = model(x, y)
        loss.backward()
    grads = _param_tensors(model, grads=True)

    rows = [("logits", tuple(state["logits"].shape), max_abs_error(logits, state["logits"])),
            ("loss", (), max_abs_error(loss, state["loss"]))]
    rows += [(f"grad {name}", tuple(expected.shape), max_abs_error(grads[name], expected))
             for name, expected in state["grads"].items()]
    print(f"model {model_path}: {model.config}", file=out)
    print(f"state {state_path}: B={state['B']} T={state['T']}, loss {state['loss'].item():.6f}, "
          f"ours {loss.item():.6f} (backend {backend or 'auto'}, device {device})", file=out)
    ok = True
    for name, shape, err in rows:
        good = err <= atol
        ok &= good
        print(f"{name:<16} {str(shape):<20} max abs err {err:.3e}  {'OK' if good else 'FAIL'}", file=out)
    print(f"{'all OK' if ok else 'FAILED'} (atol {atol:g})", file=out)
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pyllmc.llmc", description="llm.c file tools")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="compare the model's forward/backward with an llm.c debug state file "
                                     "(llm.c's test_gpt2)")
    p.add_argument("model", help="llm.c model file, e.g. gpt2_124M.bin")
    p.add_argument("state", help="llm.c debug state file, e.g. gpt2_124M_debug_state.bin")
    p.add_argument("--backend", choices=["cuda", "triton", "torch", "auto"], default=None)
    p.add_argument("--device", default=None, help="cuda if available, else cpu")
    p.add_argument("--atol", type=float, default=1e-2,
                   help="max abs error allowed on logits, loss and every gradient (default 1e-2, as test_gpt2)")
    args = parser.parse_args(argv)
    from pyllmc.backends import BackendUnavailableError

    try:
        ok = check(args.model, args.state, backend=args.backend, device=args.device, atol=args.atol)
    except (ValueError, OSError, BackendUnavailableError) as err:  # bad files, a backend that can't run here
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
