"""Kernel throughput beside NumPy float32 on the same shapes, in one run (pytest-benchmark).

    python -m pytest benchmarks/test_kernels_bench.py --benchmark-json=bench.json
    python tools/bench_report.py bench.json        # the README's table

Each kernel is timed from float32 activations to float32 outputs (quantize or binarize, then the
product) through direct cffi calls with buffers prepared beforehand, one thread, float16 scales
(as model files hold them); NumPy computes x @ W.T.  extra_info records the work so the report can give G binary-MAC/s and GB/s of weights.
"""
import time
from pathlib import Path

import numpy as np
import pytest

from edgepanel import bits
from edgepanel.kernels import native

pytestmark = pytest.mark.skipif(native.lib is None, reason="C kernels not built")

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576), (4096, 4096)]
TOKENS = [1, 64]
PLANES = [1, 2, 4]
GROUP = 64


def sid(s):
    return f"{s[0]}x{s[1]}"


class Prepared:
    """Everything a GEMM needs, allocated once: the timed call is two cffi calls."""

    def __init__(self, n_out, n_in, k, n_tokens, group=GROUP, seed=0, threads=1, isa=None):
        ffi, lib = native.ffi, native.lib
        rng = np.random.default_rng(seed)
        tiles, ncol = bits.padded_out(n_out) // 16, bits.padded_in(n_in) // 8
        self.planes = rng.integers(0, 256, (k, tiles, ncol, 16), dtype=np.uint8)
        # float16 scales, as a model file holds them and the engine reads them
        self.scales = rng.random((k, tiles, bits.n_groups(n_in, group), 16), dtype=np.float32).astype(np.float16)
        self.x = rng.standard_normal((n_tokens, n_in), dtype=np.float32)
        self.q = np.empty((n_tokens, n_in), np.int8)
        self.bits = np.empty((n_tokens, ncol), np.uint8)
        self.s = np.empty(n_tokens, np.float32)
        self.y = np.empty((n_tokens, n_out), np.float32)
        nbytes = lib.ep_workspace_bytes(n_tokens, n_out, n_in, group)
        self.work = np.empty(nbytes + 64, np.uint8)
        wp = self.work.ctypes.data + (-self.work.ctypes.data % 64)
        p = lambda t, a: ffi.cast(t, a.ctypes.data)  # noqa: E731
        kt = lib.ep_kernels_get(isa.encode() if isa else ffi.NULL)
        assert kt != ffi.NULL, f"ISA variant {isa} does not run here"
        args = (p("uint8_t *", self.planes), p("void *", self.scales), lib.EP_SCALES_F16, ffi.NULL, k, n_out, n_in, group,
                p("float *", self.y), ffi.cast("void *", wp), nbytes, threads)
        xp, qp, bp, sp = p("float *", self.x), p("int8_t *", self.q), p("uint8_t *", self.bits), p("float *", self.s)

        def i8():
            lib.ep_quantize_i8(kt, xp, n_tokens, n_in, qp, sp)
            lib.ep_gemm_planes_i8(kt, qp, sp, n_tokens, *args)

        def xnor():
            lib.ep_binarize(kt, xp, n_tokens, n_in, bp, sp)
            lib.ep_gemm_xnor(kt, bp, sp, n_tokens, *args)

        self.i8, self.xnor = i8, xnor
        self.weight_bytes = self.planes.nbytes + self.scales.nbytes
        self.isa = native.ffi.string(lib.ep_kernels_name(kt)).decode()


def info(benchmark, kind, n_out, n_in, n_tokens, k=None, weight_bytes=None, isa=None):
    benchmark.extra_info.update(kind=kind, out=n_out, inp=n_in, tokens=n_tokens, planes=k,
                                macs=n_out * n_in * n_tokens * (k or 1), weight_bytes=weight_bytes, isa=isa)


@pytest.mark.parametrize("n_tokens", TOKENS)
@pytest.mark.parametrize("shape", SHAPES, ids=sid)
def test_numpy_f32(benchmark, shape, n_tokens):
    n_out, n_in = shape
    rng = np.random.default_rng(0)
    w = rng.standard_normal((n_out, n_in), dtype=np.float32)
    x = rng.standard_normal((n_tokens, n_in), dtype=np.float32)
    benchmark.group = f"{sid(shape)} n={n_tokens}"
    info(benchmark, "numpy", n_out, n_in, n_tokens, weight_bytes=w.nbytes)
    benchmark(lambda: x @ w.T)


@pytest.mark.parametrize("k", PLANES)
@pytest.mark.parametrize("n_tokens", TOKENS)
@pytest.mark.parametrize("shape", SHAPES, ids=sid)
def test_planes_i8(benchmark, shape, n_tokens, k):
    prep = Prepared(*shape, k, n_tokens)
    benchmark.group = f"{sid(shape)} n={n_tokens}"
    info(benchmark, "planes_i8", *shape, n_tokens, k, prep.weight_bytes, prep.isa)
    benchmark(prep.i8)


@pytest.mark.parametrize("n_tokens", TOKENS)
@pytest.mark.parametrize("shape", SHAPES, ids=sid)
def test_xnor(benchmark, shape, n_tokens):
    prep = Prepared(*shape, 1, n_tokens)
    benchmark.group = f"{sid(shape)} n={n_tokens}"
    info(benchmark, "xnor", *shape, n_tokens, 1, prep.weight_bytes, prep.isa)
    benchmark(prep.xnor)


# --- from DRAM: weights twice the last-level cache (at least 64 MiB of bits) ----------------
def last_level_cache_bytes() -> int:
    """The largest data/unified cache the OS reports for CPU 0 (0 when it reports none).  In a
    virtual machine this is the host's shared cache, so the estimate errs on the large side."""
    size = 0
    for d in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if (d / "type").read_text().strip() == "Instruction":
                continue
            txt = (d / "size").read_text().strip().upper()
        except OSError:
            continue
        mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(txt[-1:], 1)
        size = max(size, int(txt.rstrip("KMG")) * mult)
    return size


DRAM_BYTES = min(4 * 2**30, max(64 * 2**20, 2 * last_level_cache_bytes()))   # of bits, one plane
# wide rows (16384 inputs: the int8 tables, 128 KB, live in L2) and narrow ones (2048: in L1)
DRAM_SHAPES = [(-(-DRAM_BYTES * 8 // n_in) // 16 * 16, n_in) for n_in in (16384, 2048)]


@pytest.fixture(scope="module")
def sum_array():
    return np.ones(max(512 * 2**20, DRAM_BYTES) // 8)


def test_dram_numpy_sum(benchmark, sum_array):
    benchmark.group = "DRAM"
    info(benchmark, "numpy_sum", 0, 0, 0, weight_bytes=sum_array.nbytes)
    benchmark.pedantic(sum_array.sum, rounds=5, iterations=1, warmup_rounds=1)


PAIRED_ROUNDS = 30


def paired_ratio(fn, nbytes, sum_array, rounds=PAIRED_ROUNDS):
    """GB/s of fn over GB/s of a.sum(), the two timed alternately (a.sum(), then fn three times,
    per round): the host's memory bandwidth drifts between tests on a shared machine, so the
    ratio is taken within each round; returns (median ratio, median a.sum() GB/s)."""
    ratios, sums = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        sum_array.sum()
        bw = sum_array.nbytes / (time.perf_counter() - t)
        ts = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        ratios.append(nbytes / float(np.median(ts)) / bw)
        sums.append(bw / 1e9)
    return float(np.median(ratios)), float(np.median(sums))


@pytest.mark.parametrize("kind", ["planes_i8", "xnor"])
@pytest.mark.parametrize("shape", DRAM_SHAPES, ids=sid)
def test_dram_gemv_one_plane(benchmark, shape, kind, sum_array):
    prep = Prepared(*shape, 1, 1, group=128)
    benchmark.group = "DRAM"
    info(benchmark, kind + "_dram", *shape, 1, 1, prep.weight_bytes, prep.isa)
    fn = getattr(prep, "i8" if kind == "planes_i8" else "xnor")
    benchmark.pedantic(fn, rounds=10, iterations=1, warmup_rounds=1)
    if not benchmark.disabled:
        ratio, bw = paired_ratio(fn, prep.weight_bytes, sum_array)
        benchmark.extra_info.update(paired_ratio=ratio, paired_sum_gbps=bw, paired_rounds=PAIRED_ROUNDS)
