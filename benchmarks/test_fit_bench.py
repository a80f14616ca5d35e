"""GPTQ-style fitting of one SmolLM2-135M layer (issue 24), in one run (pytest-benchmark): the
column loop in C beside the NumPy loop it replaced, the scale refit, the preparation of H.

    python -m pytest benchmarks/test_fit_bench.py --benchmark-json=fit.json

The seven matrices of a layer, (out, in): q, k, v, o, gate, up, down; random weights and
calibration-like H (X^T X of inputs with uneven scales); the default recipe's k=4 planes, group 64.
BLAS on one thread (benchmarks/conftest.py); the C loop on every core.  Under --benchmark-disable
(CI) each runs once: a check that the paths work.
"""
import numpy as np
import pytest

from edgepanel import quantize
from edgepanel.kernels import native

# the C loop is what this measures: without the kernels the benchmark fails rather than skips
assert native.lib is not None, "the C kernels are not built (pip install -e . builds them)"

LAYER = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
K, GROUP = 4, 64


@pytest.fixture(scope="module")
def layer():
    rng = np.random.default_rng(0)
    hs = {}
    for n in sorted({n_in for _, n_in in LAYER}):
        x = rng.standard_normal((4096, n)).astype(np.float32) * (1 + rng.random(n)).astype(np.float32)
        hs[n] = (x.T @ x).astype(np.float64) / len(x)
    preps = {n: quantize.gptq_prepare(h) for n, h in hs.items()}
    ws = [(rng.standard_normal(s) * 0.05).astype(np.float32) for s in LAYER]
    return ws, hs, preps


@pytest.mark.parametrize("path", ["c", "numpy"])
def test_gptq_layer(benchmark, layer, monkeypatch, path):
    ws, hs, preps = layer
    monkeypatch.setenv("EDGEPANEL_BACKEND", path)

    def run():
        return [quantize.gptq_planes(w, hs[w.shape[1]], K, GROUP, prepared=preps[w.shape[1]], refit=False)
                for w in ws]

    benchmark.group = "fit"
    benchmark.extra_info.update(matrices=LAYER, planes=K, group=GROUP, path=path)
    pms = benchmark.pedantic(run, rounds=3 if path == "c" else 1, iterations=1)
    assert [pm.shape for pm in pms] == LAYER


def test_refit_layer(benchmark, layer):
    ws, hs, preps = layer
    pms = [quantize.fit_planes(w, K, GROUP) for w in ws]

    def run():
        return [quantize.refit_scales(w, pm, preps[w.shape[1]].h) for w, pm in zip(ws, pms)]

    benchmark.group = "fit"
    benchmark.extra_info.update(matrices=LAYER, planes=K, group=GROUP)
    out = benchmark.pedantic(run, rounds=3, iterations=1)
    assert len(out) == len(LAYER)


def test_prepare_layer(benchmark, layer):
    """The four H of a layer: attention input, attention output, MLP input, MLP inner."""
    _, hs, _ = layer
    order = [hs[576], hs[576], hs[576], hs[1536]]
    benchmark.group = "fit"
    out = benchmark.pedantic(lambda: [quantize.gptq_prepare(h) for h in order], rounds=3, iterations=1)
    assert len(out) == 4
