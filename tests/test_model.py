"""pyllmc.model.GPT: shapes, GPT-2 init, vocabulary padding, weight tying, parity with
Hugging Face's GPT2LMHeadModel, backend parity, KV-cache generation, optimizer groups, MFU."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import pyllmc
from pyllmc.model import GPT, GPTConfig, PEAK_BF16_FLOPS, PRESETS, peak_bf16_flops
from conftest import interpreted, kernel_device

V = 50257


def tiny_config(**overrides) -> GPTConfig:
    fields = dict(block_size=16, n_layer=2, n_head=2, n_embd=64)
    fields.update(overrides)
    return GPTConfig(**fields)


def random_batch(B=2, T=16, vocab=V):
    x = torch.randint(0, vocab, (B, T))
    y = torch.randint(0, vocab, (B, T))
    return x, y


def perturb_(model: torch.nn.Module, scale=0.05):
    """Random values everywhere (biases and LayerNorm parameters too), so a mix-up shows."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))


# ---- config ----------------------------------------------------------------------------------

def test_presets():
    assert PRESETS["gpt2"] == GPTConfig()  # 124M is the default
    expected = {"gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280), "gpt2-xl": (48, 25, 1600),
                "d6": (6, 6, 384), "d12": (12, 12, 768), "d24": (24, 16, 1024), "d36": (36, 20, 1280),
                "d48": (48, 25, 1600), "tiny": (2, 2, 128), "tiny-4": (4, 4, 256)}
    for name, (L, H, C) in expected.items():
        c = GPTConfig.from_preset(name)
        assert (c.n_layer, c.n_head, c.n_embd) == (L, H, C), name
        assert (c.vocab_size, c.padded_vocab_size) == (50257, 50304), name
        assert c.padded_vocab_size % 128 == 0
    assert GPTConfig.from_preset("tiny").block_size == 256
    assert GPTConfig.from_preset("gpt2", block_size=64).block_size == 64
    with pytest.raises(ValueError, match="unknown GPT preset"):
        GPTConfig.from_preset("gpt5")
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=100, n_head=3)
    with pytest.raises(ValueError, match="padded_vocab_size"):
        GPTConfig(padded_vocab_size=50000)


# ---- forward -------------------------------------------------------------------------------------

def test_forward_shapes_and_loss():
    model = GPT(tiny_config(), seed=0)
    x, y = random_batch(B=3, T=11)
    y[0, :4] = -1  # ignored positions
    logits, loss = model(x, y)
    assert logits.shape == (3, 11, V)
    assert logits.stride(1) == 50304, "logits must be the view of the padded logits, not a copy"
    assert loss.dim() == 0 and loss.dtype == torch.float32
    expected = F.cross_entropy(logits.reshape(-1, V).double(), y.reshape(-1), ignore_index=-1)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    # a freshly initialised model predicts roughly uniformly
    assert abs(loss.item() - math.log(V)) < 0.5

    no_logits, loss2 = model(x, y, return_logits=False)
    assert no_logits is None and loss2.item() == pytest.approx(loss.item(), rel=1e-6)
    logits_only, no_loss = model(x)
    assert no_loss is None
    torch.testing.assert_close(logits_only, logits, rtol=0, atol=0)


def test_forward_bad_input():
    model = GPT(tiny_config(), seed=0)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="int64"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="inplace_backward"):
        model(torch.zeros(1, 4, dtype=torch.long), inplace_backward=True)


def test_forward_matches_plain_pytorch_gpt2():
    """The same weights through a from-scratch PyTorch GPT-2 (no pyllmc ops) give the same logits."""
    model = GPT(tiny_config(), seed=1)
    perturb_(model)
    x, _ = random_batch(B=2, T=9)
    logits, _ = model(x)

    c = model.config
    sd = dict(model.named_parameters())
    h = sd["transformer.wte.weight"][x] + sd["transformer.wpe.weight"][: x.size(1)]
    B, T, C = h.shape
    for i in range(c.n_layer):
        p = lambda n: sd[f"transformer.h.{i}.{n}"]  # noqa: E731
        a = F.layer_norm(h, (C,), p("ln_1.weight"), p("ln_1.bias"), 1e-5)
        q, k, v = F.linear(a, p("attn.c_attn.weight"), p("attn.c_attn.bias")).split(C, dim=-1)
        q, k, v = (t.view(B, T, c.n_head, C // c.n_head).transpose(1, 2) for t in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        h = h + F.linear(att, p("attn.c_proj.weight"), p("attn.c_proj.bias"))
        m = F.layer_norm(h, (C,), p("ln_2.weight"), p("ln_2.bias"), 1e-5)
        m = F.gelu(F.linear(m, p("mlp.c_fc.weight"), p("mlp.c_fc.bias")), approximate="tanh")
        h = h + F.linear(m, p("mlp.c_proj.weight"), p("mlp.c_proj.bias"))
    h = F.layer_norm(h, (C,), sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"], 1e-5)
    expected = F.linear(h, sd["transformer.wte.weight"])[..., :V]
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


# ---- init, tying, padding ----------------------------------------------------------------------

def test_gpt2_init_statistics():
    config = tiny_config(n_layer=4, n_embd=128, n_head=4, block_size=64)
    model = GPT(config, seed=0)
    params = dict(model.named_parameters())
    residual_std = 0.02 / math.sqrt(2 * config.n_layer)
    for name, p in params.items():
        if name.endswith(".bias"):
            assert torch.all(p == 0), name
        elif ".ln_" in name:
            assert torch.all(p == 1), name
        else:
            values = p[:V] if name == "transformer.wte.weight" else p
            expected = residual_std if name.endswith("c_proj.weight") else 0.02
            assert values.std().item() == pytest.approx(expected, rel=0.1), name
            assert abs(values.mean().item()) < 0.1 * expected, name
    assert torch.all(params["transformer.wte.weight"][V:] == 0), "padded vocab rows start at zero"
    assert torch.all(model.transformer.ln_f.weight == 1) and torch.all(model.transformer.ln_f.bias == 0)


def test_seeded_init_is_reproducible():
    a, b, c = GPT(tiny_config(), seed=7), GPT(tiny_config(), seed=7), GPT(tiny_config(), seed=8)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if pa.dim() >= 2:
            assert not torch.equal(pa, pc), name


def test_weight_tying():
    model = GPT(tiny_config(), seed=0)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.shape == (50304, 64)
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names and "transformer.wte.weight" in names
    # both uses contribute to the one gradient: the embedding rows of the batch's tokens and
    # the output layer's rows of all real tokens
    x, y = random_batch(B=1, T=5)
    model(x, y)[1].backward()
    g = model.transformer.wte.weight.grad
    assert g is not None and torch.all(g[:V].abs().sum(dim=1) > 0)


def test_padded_vocab_never_reaches_loss():
    model = GPT(tiny_config(), seed=0)
    x, y = random_batch()
    logits, loss = model(x, y)
    loss.backward()
    assert torch.all(model.transformer.wte.weight.grad[V:] == 0), "padded rows get no gradient"
    with torch.no_grad():
        model.transformer.wte.weight[V:] = 100 * torch.randn(50304 - V, 64)
    logits2, loss2 = model(x, y)
    assert loss2.item() == loss.item()
    assert torch.equal(logits2, logits)


# ---- Hugging Face -----------------------------------------------------------------------------------

def _hf_model(n_layer=2, n_head=2, n_embd=64, n_positions=32):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions,
                                     vocab_size=V, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config).eval()
    perturb_(model)
    return transformers, model


def _hf_logits_and_loss(hf, x, y):
    with torch.no_grad():
        out = hf(input_ids=x, labels=None)
    logits = out.logits
    loss = F.cross_entropy(logits.reshape(-1, V), y.reshape(-1))
    return logits, loss


def test_from_pretrained_matches_transformers(tmp_path):
    transformers, hf = _hf_model()
    hf.save_pretrained(tmp_path / "hf")
    model = GPT.from_pretrained(str(tmp_path / "hf"))
    assert (model.config.n_layer, model.config.n_head, model.config.n_embd, model.config.block_size) == (2, 2, 64, 32)
    x, y = random_batch(B=2, T=20)
    hf_logits, hf_loss = _hf_logits_and_loss(hf, x, y)
    with torch.no_grad():
        logits, loss = model(x, y)
    torch.testing.assert_close(logits, hf_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, hf_loss, rtol=1e-5, atol=1e-5)


def test_save_pretrained_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = GPT(tiny_config(block_size=32), seed=3)
    perturb_(model)
    with torch.no_grad():
        model.transformer.wte.weight[V:] = 0  # padded rows are not exported
    model.save_pretrained(str(tmp_path / "ours"))
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["model_type"] == "gpt2" and saved["activation_function"] == "gelu_new"
    assert saved["vocab_size"] == V and saved["n_positions"] == saved["n_ctx"] == 32
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "ours")).eval()
    x, y = random_batch(B=2, T=32)
    hf_logits, hf_loss = _hf_logits_and_loss(hf, x, y)
    with torch.no_grad():
        logits, loss = model(x, y)
    torch.testing.assert_close(hf_logits, logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hf_loss, loss, rtol=1e-5, atol=1e-5)
    # and back: ours -> HF dir -> ours is exact
    again = GPT.from_pretrained(str(tmp_path / "ours"))
    for (name, a), b in zip(model.named_parameters(), again.parameters()):
        assert torch.equal(a, b), name


def test_from_pretrained_pytorch_bin_and_errors(tmp_path):
    transformers, hf = _hf_model(n_layer=1)
    d = tmp_path / "bin"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(hf.config.to_dict()))
    torch.save(hf.state_dict(), d / "pytorch_model.bin")
    model = GPT.from_pretrained(str(d))
    x, _ = random_batch(B=1, T=8)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], hf(input_ids=x).logits, rtol=1e-5, atol=1e-5)

    # a pickle that names more than tensors is refused (weights_only), and so is an index pointing elsewhere
    from test_checkpoint import RunsAShellCommand

    marker = tmp_path / "the_command_ran"
    torch.save({"x": torch.zeros(1), "evil": RunsAShellCommand(f"touch {marker}")}, d / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model.bin: refused: .*\((posix|os)\.system\); loading it could run"):
        GPT.from_pretrained(str(d))
    assert not marker.exists()
    os.remove(d / "pytorch_model.bin")
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"h.0.attn": "../outside.bin"}}))
    with pytest.raises(ValueError, match=r"weight_map names \['../outside.bin'\], not files of"):
        GPT.from_pretrained(str(d))
    os.remove(d / "pytorch_model.bin.index.json")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        GPT.from_pretrained(str(d))
    cfg = hf.config.to_dict()
    cfg["activation_function"] = "relu"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="activation_function"):
        GPT.from_pretrained(str(d))


def test_from_pretrained_hub_name_offline_is_a_clear_error(tmp_path):
    pytest.importorskip("huggingface_hub")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    code = ("from pyllmc.model import GPT\n"
            "try:\n    GPT.from_pretrained('gpt2')\n"
            "except OSError as e:\n    print('OSERROR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "OSERROR" in out.stdout, out.stdout + out.stderr
    assert "openai-community/gpt2" in out.stdout and "local directory" in out.stdout


# ---- backends --------------------------------------------------------------------------------------

def test_backend_parity(kernel_backend):
    """The kernel backend's logits, loss and every gradient match the torch backend's."""
    name, device = kernel_backend
    config = tiny_config(n_layer=1, block_size=8)
    model = GPT(config, seed=0).to(device)
    perturb_(model, 0.02)
    x, y = (t.to(device) for t in random_batch(B=2, T=8))

    results = {}
    for backend in ("torch", name):
        model.zero_grad(set_to_none=True)
        with pyllmc.backend(backend):
            logits, loss = model(x, y)
            loss.backward()
        results[backend] = (logits.detach().clone(), loss.detach().clone(),
                            {n: p.grad.clone() for n, p in model.named_parameters()})
    ref, got = results["torch"], results[name]
    torch.testing.assert_close(got[0], ref[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-5)
    for n in ref[2]:
        torch.testing.assert_close(got[2][n], ref[2][n], rtol=1e-3, atol=1e-5, msg=lambda m: f"{n}: {m}")


def test_backend_parity_bfloat16(kernel_backend):
    """A bf16 model on the kernel backend against the float32 torch-backend model: the bf16
    error of the kernels is within 2x (+ eps) of the torch backend's own bf16 error."""
    name, device = kernel_backend
    if interpreted(name, device):
        pytest.skip("bf16 dot products are wrong under the Triton interpreter: run on a GPU")
    config = tiny_config(n_layer=2, n_head=2, n_embd=128, block_size=64)  # head dim 64
    model = GPT(config, seed=0).to(device)
    x, y = (t.to(device) for t in random_batch(B=4, T=64))
    with pyllmc.backend("torch"):
        ref_logits, ref_loss = model(x, y)
    model_bf16 = GPT(config, seed=0).to(device=device, dtype=torch.bfloat16)
    errors = {}
    for backend in ("torch", name):
        with pyllmc.backend(backend):
            logits, loss = model_bf16(x, y)
        errors[backend] = ((logits.float() - ref_logits).abs().max().item(), abs(loss.item() - ref_loss.item()))
    assert errors[name][0] <= 2 * errors["torch"][0] + 1e-2, errors
    assert errors[name][1] <= 2 * errors["torch"][1] + 1e-2, errors


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_inplace_backward_path_gives_the_same_gradients(backend):
    """The fused-classifier path (loss gradient written over the logits) == the plain path."""
    device = torch.device("cpu") if backend == "torch" else kernel_device(backend)
    model = GPT(tiny_config(n_layer=1), seed=0).to(device)
    x, y = (t.to(device) for t in random_batch(B=2, T=8))
    y[1, 3] = -1
    with pyllmc.backend(backend):
        logits, loss = model(x, y)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        no_logits, loss2 = model(x, y, inplace_backward=True)
        assert no_logits is None
        assert loss2.item() == pytest.approx(loss.item(), rel=1e-6)
        loss2.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-5, atol=1e-7, msg=lambda m: f"{n}: {m}")


def test_bfloat16_model_runs():
    model = GPT(tiny_config(n_layer=1), seed=0).to(torch.bfloat16)
    x, y = random_batch(B=1, T=8)
    logits, loss = model(x, y)
    loss.backward()
    assert logits.dtype == torch.bfloat16 and torch.isfinite(loss)
    assert model.transformer.wte.weight.grad.dtype == torch.bfloat16


# ---- generation ---------------------------------------------------------------------------------------

def naive_greedy(model, idx, max_new_tokens):
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits, _ = model(idx[:, -model.config.block_size:])
        idx = torch.cat([idx, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    return idx


@pytest.mark.parametrize("prompt_len,new_tokens", [(1, 6), (5, 20)])  # the second outgrows block_size 16
def test_generate_with_kv_cache_equals_naive(prompt_len, new_tokens):
    model = GPT(tiny_config(), seed=0)
    perturb_(model, 0.2)  # sharper, better separated logits than the init's near-uniform ones
    idx = torch.randint(0, V, (2, prompt_len))
    model.train()
    out = model.generate(idx, new_tokens, top_k=1)
    assert model.training, "generate restores the training mode"
    assert out.shape == (2, prompt_len + new_tokens)
    assert torch.equal(out[:, :prompt_len], idx)
    assert torch.equal(out, naive_greedy(model, idx, new_tokens))
    assert torch.equal(model.generate(idx, new_tokens, temperature=0.0), out)


def test_kv_cache_logits_match_full_forward():
    model = GPT(tiny_config(), seed=0)
    perturb_(model)
    idx = torch.randint(0, V, (2, 12))
    with torch.no_grad():
        full, _ = model(idx)
        caches, logits = model._prefill(idx[:, :5])
        torch.testing.assert_close(logits, full[:, 4], rtol=1e-5, atol=1e-5)
        # a chunk of 3 new queries against the cache (the masked path) ...
        logits = model._decode_step(idx[:, 5:8], caches)
        torch.testing.assert_close(logits, full[:, 7], rtol=1e-5, atol=1e-5)
        # ... then one token at a time
        for t in range(8, 12):
            logits = model._decode_step(idx[:, t:t + 1], caches)
            torch.testing.assert_close(logits, full[:, t], rtol=1e-5, atol=1e-5)
        assert caches[0].length == 12


def test_generate_sampling():
    model = GPT(tiny_config(), seed=0)
    perturb_(model, 0.2)
    idx = torch.randint(0, V, (3, 4))
    a = model.generate(idx, 8, temperature=0.8, top_k=50, generator=torch.Generator().manual_seed(1))
    b = model.generate(idx, 8, temperature=0.8, top_k=50, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert a.min() >= 0 and a.max() < V
    # top_k=3: every sampled token is among the 3 most likely at its step
    out = model.generate(idx, 1, top_k=3, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        top3 = model(idx)[0][:, -1].topk(3).indices
    assert all(out[i, -1] in top3[i] for i in range(3))
    with pytest.raises(ValueError, match="temperature"):
        model.generate(idx, 1, temperature=-1.0)


# ---- optimizer, counts, MFU -----------------------------------------------------------------------------

def test_configure_optimizers_groups():
    pytest.importorskip("pyllmc.optim")
    model = GPT(tiny_config(), seed=0)
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=6e-4, betas=(0.9, 0.95), eps=1e-8)
    assert isinstance(opt, torch.optim.Optimizer)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decay["lr"] == 6e-4 and decay["betas"] == (0.9, 0.95)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert len(decay["params"]) == 2 + 4 * model.config.n_layer  # wte, wpe, 4 matrices per block


def test_num_parameters_and_flops():
    with torch.device("meta"):  # no memory, no init: just the shapes
        gpt2 = GPT(GPTConfig.from_preset("gpt2"))
    assert gpt2.num_parameters() == 124_439_808  # OpenAI's GPT-2 small
    assert gpt2.num_parameters(non_embedding=True) == 124_439_808 - 1024 * 768
    N = gpt2.num_parameters(non_embedding=True)
    assert gpt2.estimate_flops_per_token() == 6 * N + 12 * 12 * 768 * 1024
    assert gpt2.estimate_flops_per_token(seq_len=256) == 6 * N + 12 * 12 * 768 * 256


def test_estimate_mfu():
    with torch.device("meta"):
        model = GPT(GPTConfig.from_preset("gpt2"))
    assert model.estimate_mfu(1e5, "Some Unknown Accelerator") is None
    assert model.estimate_mfu(1e5, "") is None
    mfu = model.estimate_mfu(1e5, "NVIDIA H100 80GB HBM3")
    assert mfu == pytest.approx(model.estimate_flops_per_token() * 1e5 / 989e12)
    assert 0 < mfu < 1
    assert peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_bf16_flops("NVIDIA H200") == 989e12
    assert peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_bf16_flops("NVIDIA A10G") == PEAK_BF16_FLOPS["A10G"]
    assert peak_bf16_flops("NVIDIA GeForce RTX 4090") == PEAK_BF16_FLOPS["RTX 4090"]
    assert all(v > 0 for v in PEAK_BF16_FLOPS.values())
