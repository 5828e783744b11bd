"""The benchmarks run only on a GPU; here we check that every benchmark module imports,
has run(), and that the report is computed right from known rows."""

import importlib
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "dev" / "bench"


@pytest.fixture(scope="module")
def bench_run():
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("run")
    finally:
        sys.path.remove(str(BENCH))


def test_every_benchmark_module_imports(bench_run):
    assert bench_run.MODULES, "no benchmark modules listed"
    for name in bench_run.MODULES:
        module = importlib.import_module(name)
        assert callable(getattr(module, "run", None)), f"dev/bench/{name}.py has no run()"


def test_report_numbers(bench_run):
    from common import Row

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
