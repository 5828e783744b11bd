"""pyllmc.memory's accounting of a training step against what autograd really saves."""

import pytest
import torch

from pyllmc.memory import num_parameters, step_memory
from pyllmc.model import GPT, GPTConfig, PRESETS


def test_parameter_count_matches_the_model():
    config = GPTConfig(block_size=64, vocab_size=500, padded_vocab_size=512, n_layer=3, n_head=4, n_embd=64)
    assert num_parameters(config) == sum(p.numel() for p in GPT(config).parameters())
    # GPT-2 124M with the padded vocabulary (llm.c reports 124,475,904)
    assert num_parameters(PRESETS["gpt2"]) == 124_475_904


@pytest.mark.parametrize("backend_name", ["torch", "triton", "cuda"])
def test_saved_activations_match_the_accounting(backend_name):
    """The forward of the training path (fused classifier) saves, for the backward, the
    activations and the logits the accounting counts: measured with saved_tensors_hooks."""
    import pyllmc

    if backend_name != "torch":
        from conftest import kernel_device

        if kernel_device(backend_name).type != "cpu":
            pytest.skip("measured here on CPU tensors")
    config = GPTConfig(block_size=32, vocab_size=1000, padded_vocab_size=1024, n_layer=2, n_head=2, n_embd=64)
    model = GPT(config, seed=0)
    B, T = 3, 32
    x, y = torch.randint(0, 1000, (B, T)), torch.randint(0, 1000, (B, T))
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages and t.is_floating_point():
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with pyllmc.backend(backend_name), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(x, y, return_logits=False, inplace_backward=True)
    account = step_memory(config, B, T, dtype=torch.float32)
    measured = sum(saved.values())
    expected = account.activations + account.logits
    assert abs(measured - expected) <= 0.02 * expected, (measured, expected)
    loss.backward()  # the saved tensors are what the backward needs: it runs


def test_peak_adds_the_parts():
    account = step_memory(PRESETS["gpt2"], B=16, T=1024, dtype=torch.bfloat16)
    P = 124_475_904
    assert account.params == 2 * P and account.grads == 2 * P and account.optimizer == 12 * P
    assert account.logits == 16 * 1024 * 50304 * 2
    assert account.peak_bytes == account.params + account.grads + account.optimizer + account.activations + \
        account.logits
    assert "peak" in account.table()
