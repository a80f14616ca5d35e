"""The sampler per token: C (csrc/sample.c) beside NumPy (`Sampler(params, native=False)`), each
setting one benchmark group so the two are compared in one run, over 49152 logits shaped like a
model's (a wide normal body and a few leaders) with a 300-token history.

    python -m pytest benchmarks/test_sample_bench.py --benchmark-json=sample.json

Measured on the default model's own logits (300 positions): docs/bench.md, "The sampler in C"."""
import numpy as np
import pytest

from edgepanel.sample import Sampler, Sampling, native_available

pytestmark = pytest.mark.skipif(not native_available(), reason="C kernels not built")

SETTINGS = {"defaults": {}, "greedy": {"temperature": 0.0},
            "nucleus only": {"min_p": 0.0, "top_p": 0.9}, "top-k 40": {"top_k": 40}}


@pytest.fixture(scope="module")
def logits_and_history():
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(16):
        x = rng.standard_normal(49152) * 2.5
        x[rng.integers(0, 49152, 8)] += rng.uniform(4, 14, 8)
        rows.append(x.astype(np.float32))
    return rows, list(rng.integers(0, 49152, 300))


@pytest.mark.parametrize("path", ["c", "numpy"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_sampler(benchmark, logits_and_history, setting, path):
    rows, hist = logits_and_history
    s = Sampler(Sampling(seed=1, **SETTINGS[setting]), native=path == "c")
    it = iter(range(10**9))
    benchmark.group = f"sampler, 49152 logits, {setting}"
    benchmark.extra_info.update(path=path, setting=setting)
    tok = benchmark(lambda: s(rows[next(it) % len(rows)], hist))
    assert 0 <= tok < 49152
