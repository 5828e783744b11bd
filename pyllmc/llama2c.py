"""llama2.c's model files: the legacy format its run.c reads (version 0) and export.py's version 1.

All little-endian; C = dim, L = n_layers, H = n_heads, H_kv = n_kv_heads, D = C / H (head size),
hidden = the MLP's hidden size, V = vocab_size, S = seq_len (max sequence length). Weight matrices
are nn.Linear's (out, in), each layer's tensors stacked along a leading L.

Version 0, "legacy" (run.c's read_checkpoint / memory_map_weights; export.py's legacy_export):
    header: 7 int32    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len
                       vocab_size < 0 flags an unshared classifier: |vocab_size| is V and wcls follows
    then float32, in this order:
        token_embedding_table (V, C)
        rms_att_weight (L, C)
        wq (L, H D, C)   wk (L, H_kv D, C)   wv (L, H_kv D, C)   wo (L, C, H D)
        rms_ffn_weight (L, C)
        w1 (L, hidden, C)   w2 (L, C, hidden)   w3 (L, hidden, C)
        rms_final_weight (C)
        freq_cis_real (S, D/2)   freq_cis_imag (S, D/2)   cos and sin of pos * 10000^(-2i/D); run.c skips
                                 them (it recomputes RoPE), they are written for the layout and ignored on read
        wcls (V, C)      only when vocab_size < 0

Version 1 (export.py's version1_export): a 256-byte header, then the same tensors in another order:
    header: uint32 magic 0x616b3432 ("ak42"; bytes 32 34 6b 61), int32 version = 1,
            7 int32 as above but vocab_size always positive, uint8 shared_classifier (1: wcls is
            token_embedding_table), zeros up to byte 256
    then float32: rms_att_weight (L, C), rms_ffn_weight (L, C), rms_final_weight (C),
        token_embedding_table (V, C), wq, wk, wv, wo, w1, w2, w3 (shapes as above), wcls (V, C) only
        when not shared. No RoPE tables.
(Version 2 is export.py's int8 Q8_0 quantisation, read by runq.c; not supported here.)

RoPE layout. Meta's Llama and llama2.c rotate ADJACENT pairs of a head's dims: (2i, 2i + 1) by the
angle pos * theta^(-2i/D) (run.c's loop over i in steps of 2; model.py's view_as_complex of
(..., D/2, 2)). pyllmc (like Hugging Face) rotates HALVES: (i, i + D/2) by the same angle. The two
are one model under a permutation of the rows of wq and wk within each head:

    export (halves -> pairs):  pairs row 2i = halves row i,   pairs row 2i + 1 = halves row i + D/2
    import (pairs -> halves):  the inverse

q and k are permuted alike, so q . k, the scores, and the model's output are unchanged; wv, wo and the
rest are untouched. run.c hardcodes RoPE's theta = 10000 and RMSNorm's eps = 1e-5; a model with other
values is refused on export (ValueError), and a read model gets those.

Command line:
    python -m pyllmc.llama2c export SOURCE OUT.bin [--version 0|1]   SOURCE: a pyllmc training checkpoint
                                                                    (.pt) of a Llama, or a Hugging Face
                                                                    Llama directory
    python -m pyllmc.llama2c import MODEL.bin OUT_DIR               to a Hugging Face Llama directory
    python -m pyllmc.llama2c info MODEL.bin                         the header and the config
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
from typing import Optional

import numpy as np
import torch

from pyllmc import ops
from pyllmc.llama import Llama, LlamaConfig

MAGIC = 0x616B3432  # "ak42"
HEADER_BYTES_V1 = 256
LEGACY_HEADER_BYTES = 7 * 4
RUN_C_ROPE_THETA = 10000.0  # run.c's RoPE and RMSNorm constants
RUN_C_NORM_EPS = 1e-5


# ---- RoPE layout: rotate halves (pyllmc, HF) <-> adjacent pairs (Meta, llama2.c) ---------------------------

def halves_to_pairs(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q or k projection (n_heads D, C), rotate-halves layout -> adjacent-pair layout."""
    rows, cols = w.shape
    D = rows // n_heads
    # per head: (2, D/2) -> (D/2, 2): row i of each half goes next to its partner
    return w.reshape(n_heads, 2, D // 2, cols).transpose(1, 2).reshape(rows, cols)


def pairs_to_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of halves_to_pairs: adjacent-pair rows (n_heads D, C) -> rotate-halves rows."""
    rows, cols = w.shape
    D = rows // n_heads
    return w.reshape(n_heads, D // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


# ---- model <-> llama2.c's named tensors ---------------------------------------------------------------

def _check_run_c_constants(config: LlamaConfig) -> None:
    if config.rope_theta != RUN_C_ROPE_THETA or config.norm_eps != RUN_C_NORM_EPS:
        raise ValueError(f"llama2.c's run.c uses rope_theta={RUN_C_ROPE_THETA:g} and norm_eps={RUN_C_NORM_EPS:g}; "
                         f"this model has rope_theta={config.rope_theta:g}, norm_eps={config.norm_eps:g}, which its "
                         f"files cannot record")


@torch.no_grad()
def llama2c_tensors(model: Llama) -> dict[str, torch.Tensor]:
    """The model's weights under run.c's names, float32 on the CPU, wq / wk in the adjacent-pair layout,
    each stacked over layers (L, ...). wcls only when the classifier is not tied to the embedding."""
    c = model.config
    H, Hkv, D, hidden = c.n_head, c.n_kv_head, c.head_dim, c.ffn_hidden_dim
    blocks = model.transformer.h

    def stack(get):
        return torch.stack([get(b).detach().float().cpu() for b in blocks])

    def qkv(b):  # c_attn (H D + 2 H_kv D, C) rows [wq | wk | wv]
        return b.attn.c_attn.weight.split([H * D, Hkv * D, Hkv * D], dim=0)

    t = {
        "token_embedding_table": model.transformer.wte.weight.detach().float().cpu(),
        "rms_att_weight": stack(lambda b: b.ln_1.weight),
        "wq": stack(lambda b: halves_to_pairs(qkv(b)[0], H)),
        "wk": stack(lambda b: halves_to_pairs(qkv(b)[1], Hkv)),
        "wv": stack(lambda b: qkv(b)[2]),
        "wo": stack(lambda b: b.attn.c_proj.weight),
        "rms_ffn_weight": stack(lambda b: b.ln_2.weight),
        "w1": stack(lambda b: b.mlp.c_fc.weight[:hidden]),
        "w2": stack(lambda b: b.mlp.c_proj.weight),
        "w3": stack(lambda b: b.mlp.c_fc.weight[hidden:]),
        "rms_final_weight": model.transformer.ln_f.weight.detach().float().cpu(),
    }
    if not c.tie_embeddings:
        t["wcls"] = model.lm_head.weight.detach().float().cpu()
    return t


def tensor_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """run.c's tensors and their shapes (the freq_cis tables and wcls included only where they exist)."""
    C, L, H, Hkv, D = config.dim, config.n_layer, config.n_head, config.n_kv_head, config.head_dim
    hidden, V = config.ffn_hidden_dim, config.vocab_size
    shapes = {"token_embedding_table": (V, C), "rms_att_weight": (L, C), "wq": (L, H * D, C),
              "wk": (L, Hkv * D, C), "wv": (L, Hkv * D, C), "wo": (L, C, H * D), "rms_ffn_weight": (L, C),
              "w1": (L, hidden, C), "w2": (L, C, hidden), "w3": (L, hidden, C), "rms_final_weight": (C,)}
    if not config.tie_embeddings:
        shapes["wcls"] = (V, C)
    return shapes


_LEGACY_ORDER = ("token_embedding_table", "rms_att_weight", "wq", "wk", "wv", "wo", "rms_ffn_weight", "w1", "w2",
                 "w3", "rms_final_weight", "freq_cis_real", "freq_cis_imag", "wcls")
_V1_ORDER = ("rms_att_weight", "rms_ffn_weight", "rms_final_weight", "token_embedding_table", "wq", "wk", "wv", "wo",
             "w1", "w2", "w3", "wcls")


@torch.no_grad()
def _load_tensors(model: Llama, t: dict[str, torch.Tensor]) -> None:
    """Copy run.c's tensors (adjacent-pair wq / wk) into `model`."""
    c = model.config
    hidden = c.ffn_hidden_dim
    for i, b in enumerate(model.transformer.h):
        b.ln_1.weight.copy_(t["rms_att_weight"][i])
        b.attn.c_attn.weight.copy_(torch.cat([pairs_to_halves(t["wq"][i], c.n_head),
                                              pairs_to_halves(t["wk"][i], c.n_kv_head), t["wv"][i]]))
        b.attn.c_proj.weight.copy_(t["wo"][i])
        b.ln_2.weight.copy_(t["rms_ffn_weight"][i])
        b.mlp.c_fc.weight[:hidden].copy_(t["w1"][i])
        b.mlp.c_fc.weight[hidden:].copy_(t["w3"][i])
        b.mlp.c_proj.weight.copy_(t["w2"][i])
    model.transformer.wte.weight.copy_(t["token_embedding_table"])
    model.transformer.ln_f.weight.copy_(t["rms_final_weight"])
    if not c.tie_embeddings:
        model.lm_head.weight.copy_(t["wcls"])


# ---- writing ------------------------------------------------------------------------------------

def write_model(path: str, model: Llama, version: int = 0) -> None:
    """Write `model` as a llama2.c model file: version 0 (legacy, what run.c reads) or 1 (export.py's
    version 1, 256-byte header). Written to a temporary file and renamed into place."""
    from pyllmc.checkpoint import atomic_write

    if version not in (0, 1):
        raise ValueError(f"version must be 0 (legacy, run.c) or 1 (export.py's version 1); got {version!r}")
    c = model.config
    _check_run_c_constants(c)
    t = llama2c_tensors(model)
    params = [c.dim, c.ffn_hidden_dim, c.n_layer, c.n_head, c.n_kv_head, c.vocab_size, c.block_size]
    if version == 0:
        if not c.tie_embeddings:
            params[5] = -params[5]  # the legacy format's flag for an unshared classifier
        header = struct.pack("<7i", *params)
        t["freq_cis_real"], t["freq_cis_imag"] = ops.rope_tables(c.block_size, c.head_dim, RUN_C_ROPE_THETA,
                                                                 device="cpu")
        order = _LEGACY_ORDER
    else:
        header = struct.pack("<Ii7iB", MAGIC, 1, *params, int(c.tie_embeddings))
        header += b"\0" * (HEADER_BYTES_V1 - len(header))
        order = _V1_ORDER

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(header)
            for name in order:
                if name in t:
                    f.write(t[name].contiguous().numpy().astype("<f4", copy=False).tobytes())

    atomic_write(os.fspath(path), write)


# ---- reading ------------------------------------------------------------------------------------

def read_header(path: str) -> tuple[LlamaConfig, int]:
    """(config, version) of a llama2.c model file: version 1 when it starts with the "ak42" magic,
    else 0 (legacy). The file's size must be exactly what the header implies."""
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES_V1)
    if len(head) < LEGACY_HEADER_BYTES:
        raise ValueError(f"{path}: {len(head)} bytes, too short for a llama2.c model file")
    if struct.unpack("<I", head[:4])[0] == MAGIC:
        if len(head) < HEADER_BYTES_V1:
            raise ValueError(f"{path}: truncated: shorter than the 256-byte header of a llama2.c version 1 file")
        version = struct.unpack("<i", head[4:8])[0]
        if version != 1:
            raise ValueError(f"{path}: llama2.c file version {version}; pyllmc reads versions 0 (legacy) and 1 "
                             f"(fp32){' (version 2 is int8-quantised)' if version == 2 else ''}")
        params = list(struct.unpack("<7i", head[8:36]))
        shared = head[36]
        if shared not in (0, 1) or params[5] <= 0:
            raise ValueError(f"{path}: bad llama2.c version 1 header (shared_classifier={shared}, "
                             f"vocab_size={params[5]})")
        offset = HEADER_BYTES_V1
    else:
        version, offset = 0, LEGACY_HEADER_BYTES
        params = list(struct.unpack("<7i", head[:LEGACY_HEADER_BYTES]))
        shared = int(params[5] > 0)
        params[5] = abs(params[5])
    dim, hidden, n_layer, n_head, n_kv_head, vocab, seq_len = params
    try:
        config = LlamaConfig(dim=dim, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head, vocab_size=vocab,
                             block_size=seq_len, hidden_dim=hidden, norm_eps=RUN_C_NORM_EPS,
                             rope_theta=RUN_C_ROPE_THETA, tie_embeddings=bool(shared))
    except ValueError as err:
        raise ValueError(f"{path}: not a llama2.c model file (header {params}: {err})") from None
    expected = offset + 4 * _num_floats(config, version)
    actual = os.path.getsize(path)
    if actual != expected:
        raise ValueError(f"{path}: {actual} bytes, but a llama2.c version {version} file with header {params} "
                         f"holds {expected}: {'truncated' if actual < expected else 'not such a file'}")
    return config, version


def _num_floats(config: LlamaConfig, version: int) -> int:
    n = sum(int(np.prod(s)) for s in tensor_shapes(config).values())
    if version == 0:
        n += 2 * config.block_size * (config.head_dim // 2)  # freq_cis_real, freq_cis_imag
    return n


def read_model(path: str, *, dtype: torch.dtype = torch.float32, device="cpu") -> Llama:
    """A Llama from a llama2.c model file (version 0 or 1; see the module's doc)."""
    config, version = read_header(path)
    offset = LEGACY_HEADER_BYTES if version == 0 else HEADER_BYTES_V1
    data = torch.from_numpy(np.fromfile(path, dtype="<f4", offset=offset).astype(np.float32, copy=False))
    shapes = tensor_shapes(config)
    if version == 0:
        table = (config.block_size, config.head_dim // 2)
        shapes.update(freq_cis_real=table, freq_cis_imag=table)
    t, pos = {}, 0
    for name in (_LEGACY_ORDER if version == 0 else _V1_ORDER):
        if name in shapes:
            n = int(np.prod(shapes[name]))
            t[name] = data[pos:pos + n].view(shapes[name])
            pos += n
    model = Llama.empty(config)
    _load_tensors(model, t)
    return model.to(device=device, dtype=dtype)


# ---- command line ----------------------------------------------------------------------------------

def load_source(source: str) -> Llama:
    """A Llama from a pyllmc training checkpoint (model_config + model) or a Hugging Face directory."""
    if os.path.isdir(source):
        return Llama.from_pretrained(source)
    from pyllmc.checkpoint import load_checkpoint

    state = load_checkpoint(source)
    if "model_config" not in state or "model" not in state:
        raise ValueError(f"{source}: not a pyllmc training checkpoint (no model_config / model)")
    try:
        config = LlamaConfig(**state["model_config"])
    except TypeError as err:
        raise ValueError(f"{source}: its model is not a Llama (model_config {state['model_config']}): {err}") from None
    model = Llama.empty(config)
    weights = {k.removeprefix("_orig_mod."): v for k, v in state["model"].items()}  # torch.compile's prefix
    model.load_state_dict(weights)
    return model


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pyllmc.llama2c", description="llama2.c model files")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export", help="write a llama2.c model file (version 0: run.c's legacy format)")
    p.add_argument("source", help="a pyllmc training checkpoint (.pt) of a Llama, or a Hugging Face Llama directory")
    p.add_argument("out", help="the .bin file to write")
    p.add_argument("--version", type=int, choices=[0, 1], default=0, help="0: legacy, read by run.c (default); "
                                                                         "1: export.py's version 1")
    p = sub.add_parser("import", help="convert a llama2.c model file to a Hugging Face Llama directory")
    p.add_argument("model", help="llama2.c model file (version 0 or 1), e.g. stories15M.bin")
    p.add_argument("out_dir", help="the directory to write (config.json, model.safetensors)")
    p = sub.add_parser("info", help="print a llama2.c model file's header")
    p.add_argument("model")
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            write_model(args.out, load_source(args.source), version=args.version)
            print(f"wrote {args.out} (llama2.c version {args.version})")
        elif args.command == "import":
            read_model(args.model).save_pretrained(args.out_dir)
            print(f"wrote {args.out_dir}")
        else:
            config, version = read_header(args.model)
            print(f"{args.model}: llama2.c version {version}: {config} (hidden {config.ffn_hidden_dim})")
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
