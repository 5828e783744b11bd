"""The benchmarks measure on a GPU; here we check that every benchmark module imports and runs
its code path on CPU tensors at tiny sizes, that the step benchmark's PyTorch baseline is the
same model as pyllmc's GPT, and that the report is computed right from known rows."""

import pytest

from bench import common, step  # dev/bench/, the package bench: pytest puts dev/ on sys.path
from bench import run as bench_run
from bench.common import Row


def test_every_benchmark_module_imports():
    assert bench_run.MODULES, "no benchmark modules listed"
    for name in bench_run.MODULES:
        module = bench_run.benchmark_module(name)
        assert callable(getattr(module, "run", None)), f"dev/bench/{name}.py has no run()"


def test_report_numbers():
    rows = [
        Row("gelu_forward", "torch eager", ms=2.0, bytes=4 * 10**9),
        Row("gelu_forward", "cuda", ms=1.0, bytes=4 * 10**9),
        Row("attention_forward", "sdpa flash", ms=3.0, flops=3 * 10**12),
        Row("attention_forward", "triton", ms=2.0, flops=3 * 10**12),
    ]
    assert rows[1].gbps == pytest.approx(4000.0)
    assert rows[3].tflops == pytest.approx(1500.0)
    env = {"gpu": "Test GPU", "date": "today"}
    md = bench_run.markdown(env, {"copy_gbps": 8000.0, "matmul_tflops": 3000.0}, rows)
    lines = {line.split("|")[2].strip() + "/" + line.split("|")[1].strip(): line
             for line in md.splitlines() if line.startswith("| ") and "---" not in line and "impl" not in line}
    assert "| 4000 | 50.0 |" in lines["cuda/gelu_forward"]        # 4000 GB/s = 50% of the copy ceiling
    assert "x2.00 torch eager" in lines["cuda/gelu_forward"]       # twice as fast as eager
    assert "| 1500.0 | 50.0 |" in lines["triton/attention_forward"]
    assert "x1.50 sdpa flash" in lines["triton/attention_forward"]
    assert "x" not in lines["torch eager/gelu_forward"].split("|")[-2]  # baselines have no speedup column


def test_step_rows_report():
    shape = "GPT-2 124M, B=16, T=1024, bfloat16"
    rows = [Row("train_step", "cuda", ms=100.0, flops=10**14, shape=shape, tokens_per_s=163840.0, mfu=0.41,
                peak_memory_bytes=20 * 2**30),
            Row("train_step", "torch.compile (nanoGPT-style)", ms=150.0, flops=10**14, shape=shape,
                tokens_per_s=109226.7, mfu=0.27, peak_memory_bytes=30 * 2**30)]
    env = {"gpu": "Test GPU", "date": "2030-01-02 03:04 UTC"}
    md = bench_run.markdown(env, {"copy_gbps": 4000.0, "matmul_tflops": 2000.0}, rows)
    cuda = next(line for line in md.splitlines() if line.startswith("| cuda |"))
    assert "| 100.0 | 163,840 | 1000.0 | 50.0 | 41.0 | 20.0 | x1.50 torch.compile (nanoGPT-style) |" in cuda
    assert bench_run.results_stem(env) == "Test-GPU-2030-01-02"

    payload = {"environment": env, "ceilings": None, "failures": ["step: boom"], "complete": False,
               "running": "step", "finished": ["gelu"], "rows": [r.to_json() for r in rows]}
    text = bench_run.markdown_from_payload(payload)
    assert "| cuda |" in text and "Incomplete: the run stopped during module 'step'" in text and "- step: boom" in text


def test_step_baseline_is_the_same_model():
    """The nanoGPT-style baseline loads pyllmc's GPT weights and computes the same loss."""
    import torch

    from pyllmc.model import GPT, GPTConfig

    config = GPTConfig(block_size=16, vocab_size=100, padded_vocab_size=128, n_layer=2, n_head=2, n_embd=32)
    ours = GPT(config, seed=0)
    baseline = step.NanoGPT(config)
    baseline.load_state_dict(ours.state_dict())
    idx = torch.randint(0, config.vocab_size, (2, 17))
    with torch.no_grad():
        _, want = ours(idx[:, :-1], idx[:, 1:], return_logits=False)
        got = baseline(idx[:, :-1], idx[:, 1:])
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (got, want)


def test_every_kernel_benchmark_runs_on_cpu(monkeypatch):
    """Each op module's code path (its calls into pyllmc's raw kernel functions, whose signatures
    the GPU run depends on) at tiny sizes on CPU tensors, one call per timing. GPU-only
    baselines (SDPA's flash / cuDNN kernels) skip themselves, as they do on a GPU without them."""
    import pyllmc

    monkeypatch.setattr(common, "_quick", True)  # eager baselines: no torch.compile on the CPU
    sizes = {"gelu": {"ROWS": 7, "COLS": 37}, "swiglu": {"ROWS": 7, "COLS": 37},
             "rope": {"B": 2, "T": 5, "H": 3, "D": 8},
             "cross_entropy": {"ROWS": 3, "VOCAB": 37, "PADDED_VOCAB": 40},
             "linear_cross_entropy": {"ROWS": 9, "EMBD": 8, "VOCAB": 37, "PADDED_VOCAB": 40},
             "layernorm": {"ROWS": 5, "C": 37}, "rmsnorm": {"ROWS": 5, "C": 37, "HEADS": 3},
             "attention": {"B": 1, "T": 37, "C": 128}}
    kernels = [name for name in ("cuda", "triton") if pyllmc.available_backends()[name].available]
    for name in bench_run.MODULES:
        if name == "step":  # its own CPU path: the GPU check's dry run
            continue
        module = bench_run.benchmark_module(name)
        monkeypatch.setattr(module, "bench_ms", lambda fn, *args, **kwargs: (fn(), 1.0)[1])
        for attr, value in sizes.get(name, {}).items():
            monkeypatch.setattr(module, attr, value)
        if name == "adamw":
            monkeypatch.setattr(module, "gpt2_124m_shapes", lambda: [(37, 29), (29,), (1,)])
        rows = module.run(device="cpu", dtype=__import__("torch").bfloat16)
        impls = {r.impl.split(" ")[0] for r in rows}
        assert set(kernels) <= impls, f"dev/bench/{name}.py: rows for {sorted(impls)}, expected {kernels} too"
        assert any(r.impl.startswith("torch") for r in rows), f"dev/bench/{name}.py: no PyTorch baseline row"
