"""Every backend (c per ISA variant, numba, numpy) against the NumPy reference in edgepanel.bits."""
import numpy as np
import pytest

from edgepanel import bits, kernels
from edgepanel.bits import PlaneMatrix

INS = [1, 7, 63, 64, 65, 127, 576, 1536, 4097]
OUTS = [1, 3, 17, 576]
TOKENS = [1, 2, 9, 64]
GROUPS = [32, 64, 128, 256, None]  # None: one group per row (group = in)


def sweep():
    """Each in x each out, with tokens, group and k rotating so every value of each meets the
    others; plus every (group, k) on one awkward shape."""
    cases = []
    for a, n_in in enumerate(INS):
        for b, n_out in enumerate(OUTS):
            n = TOKENS[(a + 2 * b) % 4]
            if n * n_out * n_in > 3_000_000:
                n = 2
            g = GROUPS[(a + b) % 5]
            cases.append((n, (a + b) % 4 + 1, n_out, n_in, g or n_in))
    for g in GROUPS:
        for k in range(1, 5):
            cases.append((3, k, 40, 333, g or 333))
    return cases


CASES = sweep()


def random_matrix(rng, k, n_out, n_in, group, integer_scales=False):
    tiles, ncol = bits.padded_out(n_out) // 16, bits.padded_in(n_in) // 8
    planes = rng.integers(0, 256, (k, tiles, ncol, 16), dtype=np.uint8)  # padding bits set at random
    shape = (k, n_out, bits.n_groups(n_in, group))
    if integer_scales:
        alpha = rng.integers(-3, 4, shape).astype(np.float32)
    else:
        alpha = rng.standard_normal(shape).astype(np.float32)
    return PlaneMatrix(planes, bits.tile_scales(alpha), n_out, n_in, group)


def magnitude(q, qscale, w):
    """sum of |terms| of each output: the scale of float32 summation error"""
    aw = PlaneMatrix(np.zeros_like(w.planes), np.abs(w.scales), w.out_features, w.in_features, w.group)
    return bits.gemm_planes_i8(np.abs(q.astype(np.int16)).astype(np.float64), np.abs(qscale), aw)


def case_id(c):
    return "n{}-k{}-{}x{}-g{}".format(*c)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_gemm_planes_i8_exact_integers(backend, rng, case):
    """Integer scales and unit activation scales: every output is an exact integer sum."""
    n, k, n_out, n_in, group = case
    w = random_matrix(rng, k, n_out, n_in, group, integer_scales=True)
    q = rng.integers(-128, 128, (n, n_in)).astype(np.int8)
    ones = np.ones(n, np.float32)
    y = backend.gemm_planes_i8(q, ones, w)
    assert y.shape == (n, n_out) and y.dtype == np.float32
    np.testing.assert_array_equal(y, bits.gemm_planes_i8(q, ones, w))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_gemm_xnor_exact_integers(backend, rng, case):
    n, k, n_out, n_in, group = case
    w = random_matrix(rng, k, n_out, n_in, group, integer_scales=True)
    act = rng.integers(0, 256, (n, bits.padded_in(n_in) // 8), dtype=np.uint8)  # padding bits too
    ones = np.ones(n, np.float32)
    np.testing.assert_array_equal(backend.gemm_xnor(act, ones, w), bits.gemm_xnor(act, ones, w))


# float outputs agree with the float64 reference to float32 summation error:
# |y - ref| <= RTOL * (sum of |terms|)
RTOL = 2e-6


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_gemm_float(backend, rng, case):
    n, k, n_out, n_in, group = case
    w = random_matrix(rng, k, n_out, n_in, group)
    x = (rng.standard_normal((n, n_in)) * 3).astype(np.float32)
    q, qs = backend.quantize_i8(x)
    rq, rqs = bits.quantize_i8(x)
    np.testing.assert_array_equal(q, rq)
    np.testing.assert_array_equal(qs, rqs)
    tol = RTOL * (w.k * w.n_groups + 8) * magnitude(q, qs, w)
    assert np.all(np.abs(backend.gemm_planes_i8(q, qs, w) - bits.gemm_planes_i8(q, qs, w)) <= tol)
    b, bs = backend.binarize(x)
    rb, rbs = bits.binarize(x)
    np.testing.assert_array_equal(b, rb)
    np.testing.assert_array_equal(bs, rbs)
    ones8 = np.ones((n, n_in), np.int8)
    tolx = RTOL * (w.k * w.n_groups + 8) * magnitude(ones8, bs, w)
    assert np.all(np.abs(backend.gemm_xnor(b, bs, w) - bits.gemm_xnor(b, bs, w)) <= tolx)


def test_padding_bits_never_change_a_result(backend, rng):
    n_out, n_in, group = 17, 65, 32
    w = random_matrix(rng, 3, n_out, n_in, group)
    clean = PlaneMatrix.from_signs(w.signs(), w.alpha(), group)  # same real bits, padding zeroed
    assert not np.array_equal(clean.planes, w.planes)
    q = rng.integers(-127, 128, (4, n_in)).astype(np.int8)
    qs = rng.uniform(0.01, 1, 4).astype(np.float32)
    np.testing.assert_array_equal(backend.gemm_planes_i8(q, qs, w), backend.gemm_planes_i8(q, qs, clean))
    act = rng.integers(0, 256, (4, 16), dtype=np.uint8)
    act_clean = act.copy()
    act_clean[:, 8] &= 1
    act_clean[:, 9:] = 0
    np.testing.assert_array_equal(backend.gemm_xnor(act, qs, w), backend.gemm_xnor(act_clean, qs, clean))


def test_one_hot_bit_order_through_the_kernel(backend):
    """One -1 at (plane 1, row 18, input 77): only y[18] moves, by -2 * alpha * q[77]."""
    signs = np.ones((2, 20, 100), np.int8)
    base = PlaneMatrix.from_signs(signs, np.ones((2, 20, 1), np.float32), 100)
    signs[1, 18, 77] = -1
    hot = PlaneMatrix.from_signs(signs, np.ones((2, 20, 1), np.float32), 100)
    q = (np.arange(100) % 50 + 1).astype(np.int8)[None]
    diff = backend.gemm_planes_i8(q, np.ones(1, np.float32), hot) - backend.gemm_planes_i8(q, np.ones(1, np.float32), base)
    expect = np.zeros((1, 20), np.float32)
    expect[0, 18] = -2 * q[0, 77]
    np.testing.assert_array_equal(diff, expect)


@pytest.mark.parametrize("value", [127, -127, -128])
def test_accumulators_do_not_overflow(backend, value):
    """4097 inputs in one group, every weight bit the same, every activation at an extreme: the sum
    (about 520k per plane) overflows any 8- or 16-bit accumulator kept too long."""
    n_in = 4097
    for neg in (True, False):
        signs = np.full((4, 3, n_in), -1 if neg else 1, np.int8)
        w = PlaneMatrix.from_signs(signs, np.ones((4, 3, 1), np.float32), n_in)
        q = np.full((2, n_in), value, np.int8)
        y = backend.gemm_planes_i8(q, np.ones(2, np.float32), w)
        expect = 4 * n_in * value * (-1 if neg else 1)
        np.testing.assert_array_equal(y, np.full((2, 3), expect, np.float32))
    act = np.zeros((1, bits.padded_in(n_in) // 8), np.uint8)  # all +1
    w = PlaneMatrix.from_signs(np.full((4, 3, n_in), -1, np.int8), np.ones((4, 3, 1), np.float32), n_in)
    np.testing.assert_array_equal(backend.gemm_xnor(act, np.ones(1, np.float32), w), np.full((1, 3), -4 * n_in, np.float32))


@pytest.mark.parametrize("group", [32, 64, 128, 256])
def test_group_int16_run(backend, group):
    """Each group's int16 runs at the largest per-lane values: the longest (256 inputs, group 256)
    and those the AVX2 kernel doubles in 16 bits (groups up to 128, twice 4080 per block)."""
    n_in = 1536
    for pattern in (-1, 1):
        signs = np.full((2, 16, n_in), pattern, np.int8)
        w = PlaneMatrix.from_signs(signs, np.ones((2, 16, n_in // group), np.float32), group)
        for value in (127, -128):
            q = np.full((1, n_in), value, np.int8)
            y = backend.gemm_planes_i8(q, np.ones(1, np.float32), w)
            np.testing.assert_array_equal(y, np.full((1, 16), 2 * n_in * value * pattern, np.float32))


def test_pack_planes_matches_reference(backend, rng):
    for shape in [(1, 1, 1), (2, 17, 65), (4, 40, 127), (3, 5, 4097)]:
        w = rng.standard_normal(shape).astype(np.float32)
        w[w > 1.5] = 0.0  # zero packs as +1
        np.testing.assert_array_equal(backend.pack_planes(w), bits.pack_planes(w))


def test_results_do_not_depend_on_threads(backend, rng):
    w = random_matrix(rng, 2, 200, 576, 64)
    q = rng.integers(-127, 128, (9, 576)).astype(np.int8)
    qs = rng.uniform(0.01, 1, 9).astype(np.float32)
    ys = [backend.gemm_planes_i8(q, qs, w, threads=t) for t in (1, 2, 3, None)]
    for y in ys[1:]:
        np.testing.assert_array_equal(y, ys[0])
    act = rng.integers(0, 256, (9, 72), dtype=np.uint8)
    xs = [backend.gemm_xnor(act, qs, w, threads=t) for t in (1, 2, 3)]
    for y in xs[1:]:
        np.testing.assert_array_equal(y, xs[0])


@pytest.mark.parametrize("group", GROUPS, ids=str)
def test_one_token_one_plane_wide_rows(backend, rng, group):
    """The decode product with rows whose tables outgrow L1 (C: tiles walked side by side):
    exact integers, floats within the stated error, odd tile counts, any thread count."""
    n_in = 4097
    for n_out in (16, 32, 83):  # 1, 2 and 6 tiles (the last partly padding)
        w = random_matrix(rng, 1, n_out, n_in, group or n_in, integer_scales=True)
        q = rng.integers(-128, 128, (1, n_in)).astype(np.int8)
        ones = np.ones(1, np.float32)
        ref = bits.gemm_planes_i8(q, ones, w)
        for t in (1, 2, 3):
            np.testing.assert_array_equal(backend.gemm_planes_i8(q, ones, w, threads=t), ref)
        w = random_matrix(rng, 1, n_out, n_in, group or n_in)
        q, qs = backend.quantize_i8((rng.standard_normal((1, n_in)) * 3).astype(np.float32))
        ys = [backend.gemm_planes_i8(q, qs, w, threads=t) for t in (1, 2, 3)]
        tol = RTOL * (w.n_groups + 8) * magnitude(q, qs, w)
        assert np.all(np.abs(ys[0] - bits.gemm_planes_i8(q, qs, w)) <= tol)
        for y in ys[1:]:
            np.testing.assert_array_equal(y, ys[0])


def test_single_token_vectors(backend, rng):
    w = random_matrix(rng, 2, 30, 100, 32)
    x = rng.standard_normal(100).astype(np.float32)
    q, s = backend.quantize_i8(x)
    assert q.shape == (100,) and np.ndim(s) == 0
    y = backend.gemm_planes_i8(q, s, w)
    assert y.shape == (30,)
    np.testing.assert_array_equal(y, backend.gemm_planes_i8(q[None], np.array([s], np.float32), w)[0])


def test_c_variants_are_bit_identical(rng):
    """Every C ISA variant gives the same float32 bits as the scalar specification."""
    isas = [i for b, i in kernels.available() if b == "c"]
    if len(isas) < 2:
        pytest.skip("fewer than two C variants run on this machine")
    w = random_matrix(rng, 3, 100, 1000, 64)
    x = rng.standard_normal((5, 1000)).astype(np.float32)
    outs = []
    for isa in isas:
        be = kernels.get("c", isa)
        q, s = be.quantize_i8(x)
        b, bs = be.binarize(x)
        outs.append((q, s, b, bs, be.gemm_planes_i8(q, s, w), be.gemm_xnor(b, bs, w)))
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("n", [2, 3, 4, 5, 11, 130])
@pytest.mark.parametrize("shape", [(1, 576, 576, 64), (2, 1536, 576, 64), (2, 40, 1000, 64), (3, 17, 333, 64)])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_float_scales_bit_identical_in_every_c_variant_and_token_count(rng, n, shape, dtype):
    """With float scales (the k <= 2 recipes' float16 ones among them) every C variant gives the
    scalar specification's bits for any number of tokens: the prefill kernels that load a token's
    tables once for all planes (k <= 2, group 64) add each (group, plane) in the same order."""
    k, n_out, n_in, group = shape
    w = random_matrix(rng, k, n_out, n_in, group)
    w = PlaneMatrix(w.planes, w.scales.astype(dtype), n_out, n_in, group)
    every_c_variant_gives_scalar_bits(rng, n, w)


def every_c_variant_gives_scalar_bits(rng, n, w, last_alone=False):
    """Each C variant's product of n random tokens with w, at 1 and 2 threads (and the last
    token alone), bit for bit the scalar specification's."""
    x = (rng.standard_normal((n, w.in_features)) * 3).astype(np.float32)
    ref = kernels.get("c", "scalar")
    q, qs = ref.quantize_i8(x)
    want = ref.gemm_planes_i8(q, qs, w)
    for isa in [i for b, i in kernels.available() if b == "c"]:
        be = kernels.get("c", isa)
        np.testing.assert_array_equal(be.gemm_planes_i8(q, qs, w), want, err_msg=isa)
        if last_alone:
            np.testing.assert_array_equal(be.gemm_planes_i8(q[-1:], qs[-1:], w), want[-1:], err_msg=isa)
        np.testing.assert_array_equal(be.gemm_planes_i8(q, qs, w, threads=2), want, err_msg=isa)


def u8_matrix(rng, k, n_out, n_in, group):
    """A random matrix with 8-bit scales: codes and a float32 multiplier per row."""
    w = random_matrix(rng, k, n_out, n_in, group)
    codes = rng.integers(0, 256, w.scales.shape, dtype=np.uint8)
    rows = bits.tile_rows(rng.uniform(1e-3, 2e-2, n_out).astype(np.float32))
    return PlaneMatrix(w.planes, codes, n_out, n_in, group, rows)


def u8_exact(act: np.ndarray, ascale: np.ndarray, w: PlaneMatrix) -> np.ndarray:
    """float64: each group's exact integer sum of code * (signs . act) over the planes, times
    the row's multiplier, summed over groups, times the activation scale."""
    codes = bits.untile_scales(w.scales, w.out_features).astype(np.int64)   # (k, out, ng)
    signs = w.signs().astype(np.int64)
    a = np.asarray(act, np.int64)
    rows = w.scale_rows.reshape(-1)[:w.out_features].astype(np.float64)
    y = np.zeros((a.shape[0], w.out_features))
    for j, (s, e) in enumerate(bits.group_bounds(w.in_features, w.group)):
        d = np.einsum("nu,kru->knr", a[:, s:e], signs[:, :, s:e])
        y += (d * codes[:, None, :, j]).sum(axis=0) * rows
    return y * np.asarray(ascale, np.float64)[:, None]


@pytest.mark.parametrize("case", CASES[::3], ids=case_id)
def test_u8_scales_sum_each_group_exactly(backend, rng, case):
    """8-bit scales (codes times a float32 multiplier per row) sum each group's planes as exact
    integers before one float multiply-add per group: every backend within float32 rounding of
    that sum in float64, and of the float32 scales the codes stand for."""
    n, k, n_out, n_in, group = case
    w8 = u8_matrix(rng, k, n_out, n_in, group)
    wf = PlaneMatrix(w8.planes, w8.float_scales(), n_out, n_in, group)
    assert w8.scales_kind == bits.SCALES_U8 and wf.scales_kind == bits.SCALES_F32
    x = (rng.standard_normal((n, n_in)) * 3).astype(np.float32)
    q, qs = backend.quantize_i8(x)
    b, bs = backend.binarize(x)
    act = np.where(bits._unpack_bits_rows(b, n_in), -1, 1)
    for got, want, near in ((backend.gemm_planes_i8(q, qs, w8), u8_exact(q, qs, w8), backend.gemm_planes_i8(q, qs, wf)),
                            (backend.gemm_xnor(b, bs, w8), u8_exact(act, bs, w8), backend.gemm_xnor(b, bs, wf))):
        top = max(np.abs(want).max(), 1e-30)
        assert np.abs(got - want).max() <= 1e-6 * top * (1 + bits.n_groups(n_in, group) / 8)
        assert np.abs(got - near).max() <= 1e-5 * top


@pytest.mark.parametrize("n", [1, 7, 8, 9, 16, 64, 130])
@pytest.mark.parametrize("shape", [(4, 1536, 576, 64), (3, 40, 333, 32), (2, 17, 2100, 128), (4, 20, 1000, 1000)])
def test_u8_scales_bit_identical_in_every_c_variant_and_token_count(rng, n, shape):
    """With 8-bit scales every C variant gives the scalar specification's bits, and each token
    the bits it gets alone, whether the product takes the table lookups or (from
    i16_min_tokens tokens on) the weight codes widened to 16 bits."""
    k, n_out, n_in, group = shape
    every_c_variant_gives_scalar_bits(rng, n, u8_matrix(rng, k, n_out, n_in, group), last_alone=True)
