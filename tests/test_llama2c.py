"""pyllmc.llama2c: llama2.c's model files (legacy version 0, read by run.c, and export.py's version 1),
the RoPE layout change on export / import, and the command line."""

import math
import struct
from dataclasses import asdict

import numpy as np
import pytest
import torch

import pyllmc
from pyllmc import llama2c
from pyllmc.llama import Llama, LlamaConfig

V = 96


def tiny_config(**overrides) -> LlamaConfig:
    fields = dict(dim=64, n_layer=2, n_head=4, n_kv_head=2, vocab_size=V, block_size=16, multiple_of=16)
    fields.update(overrides)
    return LlamaConfig(**fields)


def random_model(seed=0, **overrides) -> Llama:
    model = Llama(tiny_config(**overrides), seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def logits_of(model, idx):
    with torch.no_grad(), pyllmc.backend("torch"):
        return model(idx)[0]


# ---- the RoPE layout ----------------------------------------------------------------------------------

def test_halves_to_pairs_turns_rotate_halves_into_adjacent_pairs():
    """Rotating q = W x by halves, then reordering its dims halves -> pairs, equals rotating
    q' = halves_to_pairs(W) x by adjacent pairs: the permuted weights carry the model over."""
    H, D, C, pos, theta = 3, 8, 5, 7, 10000.0
    w, x = torch.randn(H * D, C, dtype=torch.float64), torch.randn(C, dtype=torch.float64)
    angle = pos * theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)  # (D/2,)
    cos, sin = angle.cos(), angle.sin()
    q = (w @ x).view(H, D)
    q1, q2 = q[:, : D // 2], q[:, D // 2:]
    rotated_halves = torch.cat([q1 * cos - q2 * sin, q1 * sin + q2 * cos], dim=1)  # (H, D)
    p = (llama2c.halves_to_pairs(w, H) @ x).view(H, D // 2, 2)
    rotated_pairs = torch.stack([p[..., 0] * cos - p[..., 1] * sin, p[..., 0] * sin + p[..., 1] * cos], dim=-1)
    # dim i of a half-rotated head is dim 2i (i < D/2) or 2(i - D/2) + 1 of the pair-rotated one
    torch.testing.assert_close(rotated_halves, rotated_pairs.transpose(1, 2).reshape(H, D))
    assert torch.equal(llama2c.pairs_to_halves(llama2c.halves_to_pairs(w, H), H), w)
    rows = torch.arange(D, dtype=torch.float64)[:, None]  # one head: rows 0..7 -> 0 4 1 5 2 6 3 7
    assert llama2c.halves_to_pairs(rows, 1).flatten().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


# ---- run.c's math in numpy, reading the legacy file itself -----------------------------------------------

def run_c_logits(path, tokens):
    """llama2.c's run.c forward, written from its documented layout and math in numpy float64: the
    legacy file parsed here from its bytes, RoPE on ADJACENT pairs with run.c's frequencies, GQA by
    kv head h // (H / H_kv), one position at a time with a KV cache. Returns (T, V) logits."""
    raw = open(path, "rb").read()
    dim, hidden, L, H, Hkv, vocab, S = struct.unpack("<7i", raw[:28])
    shared, vocab = vocab > 0, abs(vocab)
    f = np.frombuffer(raw, dtype="<f4", offset=28).astype(np.float64)
    hs = dim // H
    kv_dim = Hkv * hs
    pos = 0

    def take(*shape):
        nonlocal pos
        n = int(np.prod(shape))
        out = f[pos:pos + n].reshape(shape)
        pos += n
        return out

    emb = take(vocab, dim)
    rms_att, wq = take(L, dim), take(L, H * hs, dim)
    wk, wv, wo = take(L, kv_dim, dim), take(L, kv_dim, dim), take(L, dim, H * hs)
    rms_ffn, w1, w2, w3 = take(L, dim), take(L, hidden, dim), take(L, dim, hidden), take(L, hidden, dim)
    rms_final = take(dim)
    take(S, hs // 2), take(S, hs // 2)  # freq_cis_real / imag: run.c skips them
    wcls = emb if shared else take(vocab, dim)
    assert pos == f.size, "the file holds exactly run.c's tensors"

    def rmsnorm(x, w):
        return x / np.sqrt(np.mean(x * x) + 1e-5) * w

    def rotate_pairs(vec, p):  # dims (i, i + 1), i even, by p * 10000^(-(i mod hs) / hs)
        i = np.arange(0, vec.size, 2)
        angle = p / 10000.0 ** ((i % hs) / hs)
        a, b = vec[i].copy(), vec[i + 1].copy()
        vec[i], vec[i + 1] = a * np.cos(angle) - b * np.sin(angle), a * np.sin(angle) + b * np.cos(angle)

    key_cache, value_cache = np.zeros((L, S, kv_dim)), np.zeros((L, S, kv_dim))
    out = []
    for p, token in enumerate(tokens):
        x = emb[token].copy()
        for l in range(L):
            xb = rmsnorm(x, rms_att[l])
            q, k, v = wq[l] @ xb, wk[l] @ xb, wv[l] @ xb
            rotate_pairs(q, p)
            rotate_pairs(k, p)
            key_cache[l, p], value_cache[l, p] = k, v
            att_out = np.zeros(H * hs)
            for h in range(H):
                g = h // (H // Hkv)
                keys, values = key_cache[l, : p + 1, g * hs:(g + 1) * hs], value_cache[l, : p + 1, g * hs:(g + 1) * hs]
                scores = keys @ q[h * hs:(h + 1) * hs] / math.sqrt(hs)
                weights = np.exp(scores - scores.max())
                att_out[h * hs:(h + 1) * hs] = (weights / weights.sum()) @ values
            x = x + wo[l] @ att_out
            xb = rmsnorm(x, rms_ffn[l])
            a, b = w1[l] @ xb, w3[l] @ xb
            x = x + w2[l] @ (a / (1.0 + np.exp(-a)) * b)
        out.append(wcls @ rmsnorm(x, rms_final))
    return np.stack(out)


@pytest.mark.parametrize("tie", [False, True])
def test_legacy_file_runs_as_run_c_computes_it(tmp_path, tie):
    """Our logits == run.c's math on the exported file (adjacent-pair RoPE): the export permutes wq / wk."""
    model = random_model(tie_embeddings=tie)
    path = tmp_path / "model.bin"
    llama2c.write_model(str(path), model, version=0)
    tokens = torch.randint(0, V, (10,))
    expected = run_c_logits(path, tokens.tolist())
    got = logits_of(model, tokens[None])[0].double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    # without the permutation the file is another model: the layout is really adjacent pairs
    with torch.no_grad():
        for b in model.transformer.h:
            qk = b.attn.c_attn.weight[: (4 + 2) * 16]
            qk.copy_(llama2c.pairs_to_halves(qk, 4 + 2))
    assert np.abs(logits_of(model, tokens[None])[0].double().numpy() - expected).max() > 1e-3


# ---- round trips and layout ------------------------------------------------------------------------

@pytest.mark.parametrize("version", [0, 1])
@pytest.mark.parametrize("n_kv_head,tie", [(2, False), (4, True)])
def test_export_import_round_trip(tmp_path, version, n_kv_head, tie):
    model = random_model(n_kv_head=n_kv_head, tie_embeddings=tie)
    path = tmp_path / "model.bin"
    llama2c.write_model(str(path), model, version=version)
    config, read_version = llama2c.read_header(str(path))
    assert read_version == version
    def fields(c):  # what the file records (it gives the hidden size outright, not multiple_of)
        return (c.dim, c.n_layer, c.n_head, c.n_kv_head, c.vocab_size, c.block_size, c.ffn_hidden_dim,
                c.tie_embeddings, c.rope_theta, c.norm_eps)

    assert fields(config) == fields(model.config) and config.hidden_dim == model.config.ffn_hidden_dim
    again = llama2c.read_model(str(path))
    assert (again.lm_head.weight is again.transformer.wte.weight) == tie
    for (name, p), q in zip(model.named_parameters(), again.parameters()):
        assert torch.equal(p, q), name
    idx = torch.randint(0, V, (2, 16))
    assert torch.equal(logits_of(model, idx), logits_of(again, idx))


def test_file_layouts(tmp_path):
    model = random_model(tie_embeddings=False)
    c = model.config
    C, L, hidden, D = c.dim, c.n_layer, c.ffn_hidden_dim, c.head_dim
    n_floats = (V * C + L * C + L * (4 * 16 * C) + 2 * L * (2 * 16 * C) + L * (C * 4 * 16) + L * C
                + 3 * L * hidden * C + C + V * C)  # emb, att norms, wq, wk + wv, wo, ffn norms, w1 w2 w3, final, wcls
    llama2c.write_model(str(tmp_path / "v0.bin"), model, version=0)
    raw = (tmp_path / "v0.bin").read_bytes()
    assert struct.unpack("<7i", raw[:28]) == (C, hidden, L, 4, 2, -V, 16)  # negative vocab: unshared classifier
    assert len(raw) == 28 + 4 * (n_floats + 2 * 16 * D // 2)
    tables = np.frombuffer(raw, dtype="<f4", offset=28 + 4 * (n_floats - V * C),  # just before wcls
                           count=2 * 16 * D // 2).reshape(2, 16, D // 2)
    angle = np.arange(16)[:, None] * 10000.0 ** (-np.arange(0, D, 2) / D)
    np.testing.assert_allclose(tables[0], np.cos(angle), atol=1e-6)  # freq_cis_real
    np.testing.assert_allclose(tables[1], np.sin(angle), atol=1e-6)  # freq_cis_imag

    llama2c.write_model(str(tmp_path / "v1.bin"), model, version=1)
    raw1 = (tmp_path / "v1.bin").read_bytes()
    assert raw1[:4] == b"24ka" and struct.unpack("<I", raw1[:4])[0] == 0x616B3432  # "ak42" as a little-endian uint32
    assert struct.unpack("<i7iB", raw1[4:37]) == (1, C, hidden, L, 4, 2, V, 16, 0)
    assert raw1[37:256] == bytes(219) and len(raw1) == 256 + 4 * n_floats
    first = np.frombuffer(raw1, dtype="<f4", offset=256, count=C)  # version 1 starts with the attention norms
    assert np.array_equal(first, model.transformer.h[0].ln_1.weight.detach().numpy())


def test_bad_files_and_models(tmp_path):
    model = random_model()
    path = tmp_path / "model.bin"
    llama2c.write_model(str(path), model, version=0)
    data = path.read_bytes()
    (tmp_path / "short.bin").write_bytes(data[:-8])
    with pytest.raises(ValueError, match="truncated"):
        llama2c.read_model(str(tmp_path / "short.bin"))
    (tmp_path / "tiny.bin").write_bytes(data[:10])
    with pytest.raises(ValueError, match="too short"):
        llama2c.read_model(str(tmp_path / "tiny.bin"))
    (tmp_path / "junk.bin").write_bytes(struct.pack("<7i", 64, 172, 0, 8, 4, 512, 512) + bytes(64))
    with pytest.raises(ValueError, match="not a llama2.c model file"):
        llama2c.read_model(str(tmp_path / "junk.bin"))
    (tmp_path / "v2.bin").write_bytes(struct.pack("<Ii", 0x616B3432, 2) + bytes(300))
    with pytest.raises(ValueError, match="version 2"):
        llama2c.read_model(str(tmp_path / "v2.bin"))
    with pytest.raises(ValueError, match="version must be"):
        llama2c.write_model(str(path), model, version=2)
    with pytest.raises(ValueError, match="rope_theta"):
        llama2c.write_model(str(path), Llama(tiny_config(rope_theta=500.0)), version=0)


# ---- command line ----------------------------------------------------------------------------------

def test_command_line(tmp_path, capsys):
    from pyllmc.checkpoint import save_checkpoint

    model = random_model(tie_embeddings=False)
    ckpt = save_checkpoint(tmp_path / "run", 10, {"model_config": asdict(model.config), "model": model.state_dict()})
    out = tmp_path / "model.bin"
    assert llama2c.main(["export", str(ckpt), str(out), "--version", "1"]) == 0
    assert llama2c.main(["info", str(out)]) == 0
    assert "llama2.c version 1" in capsys.readouterr().out
    assert llama2c.main(["import", str(out), str(tmp_path / "hf")]) == 0
    again = Llama.from_pretrained(str(tmp_path / "hf"))
    for (name, p), q in zip(model.named_parameters(), again.parameters()):
        assert torch.equal(p, q), name
    assert llama2c.main(["export", str(tmp_path / "hf"), str(tmp_path / "from_hf.bin")]) == 0  # an HF directory too
    assert llama2c.read_header(str(tmp_path / "from_hf.bin"))[1] == 0
    assert llama2c.main(["export", str(tmp_path / "missing.pt"), str(out)]) == 2
    assert "error:" in capsys.readouterr().err
