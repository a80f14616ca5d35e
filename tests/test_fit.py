"""Calibration-aware fitting, fast paths (issue 24): GPTQ's column loop in C (csrc/fit.c) against
the NumPy loop it replaces, the scale refit from matrix products against the former per-row
einsums, the triangular-inverse preparation against inv + Cholesky; bad input to the C binding
gets a clear error."""
import numpy as np
import pytest

from edgepanel import bits, quantize
from edgepanel.kernels import native


def spd(rng, n, dead=()):
    """H = X^T X / m with uneven input scales, a few outlier inputs and `dead` inputs never active."""
    x = rng.standard_normal((2 * n + 8, n)) * (0.5 + rng.random(n))
    x[:, :3] *= 6
    x[:, list(dead)] = 0.0
    return x.T @ x / len(x)


def both_paths(monkeypatch, w, h, k, group, **kw):
    """(NumPy result, C result) of gptq_planes, checking that the C path really ran."""
    assert native.lib is not None, "the C kernels are not built (pip install -e . builds them)"
    monkeypatch.setenv("EDGEPANEL_BACKEND", "numpy")
    ref = quantize.gptq_planes(w, h, k, group, **kw)
    calls = []
    real = native.gptq_block

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(native, "gptq_block", counted)
    monkeypatch.setenv("EDGEPANEL_BACKEND", "c")
    fast = quantize.gptq_planes(w, h, k, group, **kw)
    assert calls, "gptq_planes did not take the C path"
    return ref, fast


# The C loop repeats NumPy's arithmetic operation for operation where the order is fixed, and both
# take their sums (mean |r|, B w) in float64, where a sum of float32 values is exact, or off by a
# rounding the float32 scales do not see, whatever its order: the results are the same bits, so
# they are compared exactly (docs/fitting.md).
@pytest.mark.parametrize("n_out, n_in, k, group, dead", [
    (64, 256, 4, 64, ()),        # SmolLM2's recipe, whole groups
    (96, 200, 3, 32, (5, 77)),   # a short last group; dead inputs
    (50, 100, 2, 100, ()),       # one group per row (group = in)
    (40, 96, 4, 128, ()),        # one group per row (group > in)
    (33, 130, 1, 32, (0,)),      # one plane; rows not a multiple of anything
])
def test_c_gptq_matches_numpy_bit_for_bit(monkeypatch, n_out, n_in, k, group, dead):
    rng = np.random.default_rng(n_out * 1000 + n_in)
    w = (rng.standard_normal((n_out, n_in)) * 0.05).astype(np.float32)
    h = spd(rng, n_in, dead)
    ref, fast = both_paths(monkeypatch, w, h, k, group, refit=False)
    np.testing.assert_array_equal(fast.signs(), ref.signs())
    np.testing.assert_array_equal(fast.alpha(), ref.alpha())
    assert quantize.weighted_error(w, fast, h) == quantize.weighted_error(w, ref, h)


@pytest.mark.parametrize("als_iters, block", [(0, 128), (1, 64), (3, 256)])
def test_c_gptq_matches_numpy_for_other_settings(monkeypatch, als_iters, block):
    rng = np.random.default_rng(als_iters)
    w = (rng.standard_normal((48, 320)) * 0.05).astype(np.float32)
    h = spd(rng, 320)
    ref, fast = both_paths(monkeypatch, w, h, 4, 64, als_iters=als_iters, block=block, refit=True)
    np.testing.assert_array_equal(fast.signs(), ref.signs())
    np.testing.assert_array_equal(fast.alpha(), ref.alpha())


def test_c_gptq_ties_follow_argmin(monkeypatch):
    """Weights on a coarse grid with H = I (no error feedback: values stay on the grid) put many
    of them exactly halfway between two levels and make levels coincide: the C loop must still
    pick argmin's first minimum in itertools.product order, in ALS and in rounding."""
    rng = np.random.default_rng(7)
    w = (rng.integers(-4, 5, (40, 128)) / 4).astype(np.float32)
    w[:5] = 0.0          # all-zero rows: every scale 0, all 2^k levels equal
    w[5:8, :64] = 0.25   # constant groups: equal planes, the ridge keeps them solvable
    h = np.eye(128)
    for k in (1, 2, 3, 4):
        ref, fast = both_paths(monkeypatch, w, h, k, 64, refit=False)
        np.testing.assert_array_equal(fast.signs(), ref.signs())
        np.testing.assert_array_equal(fast.alpha(), ref.alpha())


def test_c_gptq_act_order_keeps_the_numpy_loop(monkeypatch):
    """Act-order permutes the columns: only the NumPy loop handles it (the C one is not called)."""
    monkeypatch.delenv("EDGEPANEL_BACKEND", raising=False)
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((16, 128)) * 0.05).astype(np.float32)
    h = spd(rng, 128)

    def fail(*a, **kw):
        raise AssertionError("the C loop ran for act-order")

    monkeypatch.setattr(native, "gptq_block", fail)
    pm = quantize.gptq_planes(w, h, 2, 64, act_order=True, refit=False)
    assert pm.shape == w.shape


def test_c_gptq_results_do_not_depend_on_threads():
    rng = np.random.default_rng(11)
    n_out, n_in, k, g = 37, 192, 4, 64
    h = spd(rng, n_in)
    hinv = np.ascontiguousarray(quantize.gptq_prepare(h).hinv)
    w = rng.standard_normal((n_out, n_in)) * 0.05
    outs = []
    for threads in (1, 2, 3):
        W = w.copy()
        signs = np.zeros((k, n_out, n_in), np.int8)
        alpha = np.zeros((k, n_out, n_in // g), np.float32)
        e = native.gptq_block(W, hinv, 0, 128, g, 2, signs, alpha, threads=threads)
        outs.append((W, signs, alpha, e))
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            np.testing.assert_array_equal(a, b)
    assert np.all(np.abs(outs[0][1][:, :, :128]) == 1) and np.all(outs[0][1][:, :, 128:] == 0)


@pytest.mark.parametrize("backend", ["numpy", "c"])
def test_gptq_by_row_blocks_is_the_whole_fit(monkeypatch, backend):
    """Rows are fitted independently (H is shared): a block of rows at a time (how a 49152-row
    head is fitted in bounded memory) gives the whole fit's planes and scales, bit for bit, and
    the weighted error summed by row blocks is the whole error's."""
    monkeypatch.setenv("EDGEPANEL_BACKEND", backend)
    rng = np.random.default_rng(12)
    n_out, n_in = 203, 96
    h = spd(rng, n_in, dead=(5,))
    w = (rng.standard_normal((n_out, n_in)) * 0.05).astype(np.float32)
    whole = quantize.gptq_planes(w, h, 3, 32)
    for row_block in (7, 64):
        part = quantize.gptq_planes(w, h, 3, 32, row_block=row_block)
        np.testing.assert_array_equal(part.planes, whole.planes)
        np.testing.assert_array_equal(part.scales, whole.scales)
    e = w.astype(np.float64) - whole.dequantize().astype(np.float64)
    want = np.trace(e @ h @ e.T) / np.trace(w.astype(np.float64) @ h @ w.T.astype(np.float64))
    for block in (7, 4096):   # float32 products, float64 sums
        assert quantize.weighted_error(w, whole, h, block=block) == pytest.approx(want, rel=1e-5)


# ---- scale refit ---------------------------------------------------------------------------

def refit_alpha_before(w, signs, group, h, rows_per_chunk=64):
    """The refit as it was before issue 24 (per-row einsums over (m, in, R)), up to its float32
    cast: the reference for quantize.refit_alpha."""
    w = np.asarray(w, np.float64)
    n_out, n_in = w.shape
    k = signs.shape[0]
    bounds = bits.group_bounds(n_in, group)
    ng = len(bounds)
    S = signs.astype(np.float64)
    hw = w @ h
    m = ng * k
    new_alpha = np.empty((k, n_out, ng))
    for r0 in range(0, n_out, rows_per_chunk):
        r1 = min(r0 + rows_per_chunk, n_out)
        R = r1 - r0
        hp = np.empty((m, n_in, R))
        for gi, (c0, c1) in enumerate(bounds):
            for i in range(k):
                hp[gi * k + i] = h[:, c0:c1] @ S[i, r0:r1, c0:c1].T
        A = np.empty((R, m, m))
        b = np.empty((R, m))
        for gi, (c0, c1) in enumerate(bounds):
            for i in range(k):
                s = S[i, r0:r1, c0:c1]
                A[:, gi * k + i, :] = np.einsum("ru,mur->rm", s, hp[:, c0:c1, :])
                b[:, gi * k + i] = np.einsum("ru,ru->r", s, hw[r0:r1, c0:c1])
        tr = np.trace(A, axis1=1, axis2=2) / m
        A += (1e-7 * tr + 1e-12)[:, None, None] * np.eye(m)
        a = np.linalg.solve(A, b[..., None])[..., 0]
        new_alpha[:, r0:r1, :] = a.reshape(R, ng, k).transpose(2, 0, 1)
    return new_alpha


def row_errors(w, signs, alpha, group, h):
    """(w - w_hat) H (w - w_hat)^T per row, in float64, w_hat from signs (k, out, in) and alpha
    (k, out, n_groups)."""
    reps = np.diff([c0 for c0, _ in bits.group_bounds(w.shape[1], group)] + [w.shape[1]])
    w_hat = np.einsum("kri,kri->ri", signs.astype(np.float64), np.repeat(alpha, reps, axis=2))
    e = w.astype(np.float64) - w_hat
    return np.einsum("ri,ij,rj->r", e, h, e)


@pytest.mark.parametrize("n_out, n_in, k, group, rows_per_chunk", [
    (70, 256, 4, 64, 64),    # two chunks, the second short
    (50, 200, 3, 32, 16),    # a short last group
    (30, 100, 2, 100, 64),   # one group per row
    (20, 130, 1, 64, 7),
])
def test_refit_matches_the_per_row_einsums(n_out, n_in, k, group, rows_per_chunk):
    rng = np.random.default_rng(n_in)
    w = (rng.standard_normal((n_out, n_in)) * 0.05).astype(np.float32)
    h = quantize.gptq_prepare(spd(rng, n_in)).h
    signs = quantize.fit_planes(w, k, group).signs()
    new = quantize.refit_alpha(w, signs, group, h, rows_per_chunk)
    old = refit_alpha_before(w, signs, group, h)
    # products in float32, the solve in float64: the scales move by float32's rounding, the
    # error they leave (the objective, stationary at the optimum) by its square
    np.testing.assert_allclose(new, old, rtol=2e-4, atol=1e-5 * np.abs(old).max())
    err = lambda a: float(np.sum(row_errors(w, signs, a, group, h)))
    assert err(new) == pytest.approx(err(old), rel=1e-7, abs=0)
    assert err(new) < err(np.ones_like(old)) and err(new) < err(old * 1.001)
    pm = quantize.refit_scales(w, bits.PlaneMatrix.from_signs(signs, np.ones_like(new, np.float32), group), h)
    np.testing.assert_array_equal(pm.signs(), signs)
    np.testing.assert_array_equal(pm.alpha(), quantize.refit_alpha(w, signs, group, h).astype(np.float32))


def test_refit_workers_give_the_same_bits():
    """The refit's chunks of rows on 1, 2 or 3 workers (BLAS held to one thread each): the same
    scales, bit for bit, as the reference's within float32's rounding."""
    from edgepanel import quantize as q
    with q._blas_one_thread() as held:
        assert held, "threadpoolctl is a dependency: the refit's workers need it"
    rng = np.random.default_rng(11)
    n_out, n_in = 101, 192
    w = (rng.standard_normal((n_out, n_in)) * 0.05).astype(np.float32)
    h = quantize.gptq_prepare(spd(rng, n_in)).h
    signs = quantize.fit_planes(w, 3, 64).signs()
    runs = [quantize.refit_alpha(w, signs, 64, h, rows_per_chunk=8, threads=t) for t in (1, 2, 3)]
    for r in runs[1:]:
        np.testing.assert_array_equal(r, runs[0])
    old = refit_alpha_before(w, signs, 64, h)
    np.testing.assert_allclose(runs[0], old, rtol=2e-4, atol=1e-5 * np.abs(old).max())


def test_refit_in_float32_products_on_ill_conditioned_inputs():
    """Inputs as real activations are: a few channels 100x the rest, and most nearly copies of
    another (condition number ~1e9 before damping).  The float32 products still leave the float64
    refit's error, to 1e-6."""
    rng = np.random.default_rng(5)
    n_in, n_out = 256, 48
    base = rng.standard_normal((600, 64))
    x = np.repeat(base, 4, axis=1) + 1e-4 * rng.standard_normal((600, n_in))
    x[:, [3, 70, 200]] *= 100
    h = quantize.gptq_prepare(x.T @ x / len(x)).h
    w = (rng.standard_normal((n_out, n_in)) * 0.05).astype(np.float32)
    signs = quantize.gptq_planes(w, h, 4, 64, refit=False).signs()
    new = quantize.refit_alpha(w, signs, 64, h)
    old = refit_alpha_before(w, signs, 64, h)
    e_new, e_old = (row_errors(w, signs, a, 64, h) for a in (new, old))
    np.testing.assert_allclose(e_new, e_old, rtol=1e-6, atol=0)


# ---- preparation ----------------------------------------------------------------------------

@pytest.mark.parametrize("n, act_order", [(200, False), (333, True), (64, False)])
def test_prepare_factors_the_inverse(n, act_order):
    """U upper with U^T U = H^-1 (in processing order), as cholesky(inv(H)).T computed it."""
    rng = np.random.default_rng(n)
    h = spd(rng, n, dead=(1,))
    prep = quantize.gptq_prepare(h, 0.01, act_order)
    hp = prep.h[np.ix_(prep.order, prep.order)]
    before = np.linalg.cholesky(np.linalg.inv(hp)).T
    assert np.array_equal(prep.hinv, np.triu(prep.hinv)) and prep.hinv.flags.c_contiguous
    np.testing.assert_allclose(prep.hinv, before, rtol=0, atol=1e-10 * np.abs(before).max())
    np.testing.assert_allclose(prep.hinv.T @ prep.hinv @ hp, np.eye(n), atol=1e-9)


def test_nearest_index_is_argmins_first_minimum():
    """The reference ALS picks levels one at a time (no (2^k, ...) temporary): same as argmin."""
    rng = np.random.default_rng(2)
    lev = np.sort(rng.integers(-3, 4, (8, 5, 1)) / 2, axis=0)    # repeated levels: ties
    x = rng.integers(-8, 9, (5, 40)) / 4                           # many exactly halfway
    np.testing.assert_array_equal(quantize._nearest_index(x, lev), np.abs(x[None] - lev).argmin(axis=0))


# ---- bad input to the C binding --------------------------------------------------------------

def block_args(n_out=8, n_in=128, k=2, g=64):
    h = spd(np.random.default_rng(0), n_in)
    return dict(w=np.zeros((n_out, n_in)), hinv=np.ascontiguousarray(quantize.gptq_prepare(h).hinv),
                i1=0, i2=n_in, group=g, als_iters=2, signs=np.zeros((k, n_out, n_in), np.int8),
                alpha=np.zeros((k, n_out, n_in // g), np.float32))


@pytest.mark.parametrize("change, error, message", [
    (dict(w=np.zeros((8, 128), np.float32)), TypeError, "w must have dtype float64"),
    (dict(signs=np.zeros((2, 8, 128), np.float32)), TypeError, "signs must have dtype int8"),
    (dict(hinv=np.eye(64)), ValueError, r"hinv must have shape \(128, 128\)"),
    (dict(w=np.zeros((8, 256))[:, ::2]), ValueError, "w must be C-contiguous"),
    (dict(signs=np.zeros((5, 8, 128), np.int8)), ValueError, "signs must have shape"),
    (dict(alpha=np.zeros((2, 8, 3), np.float32)), ValueError, "alpha must have shape"),
    (dict(i1=32), ValueError, "whole groups"),
    (dict(i2=100), ValueError, "whole groups"),
    (dict(i1=64, i2=64), ValueError, "whole groups"),
    (dict(group=0), ValueError, "group must be positive"),
    (dict(als_iters=-1), ValueError, "als_iters"),
    (dict(i1=1.5), TypeError, "i1 must be an int"),
    (dict(w=np.full((8, 128), np.nan)), ValueError, "w holds a NaN"),
    (dict(hinv=np.full((128, 128), np.inf)), ValueError, "hinv holds a NaN or an infinity"),
])
def test_bad_input_to_the_c_loop_is_a_clear_error(change, error, message):
    args = block_args()
    args.update(change)
    with pytest.raises(error, match=message):
        native.gptq_block(**args)


def test_c_checks_its_own_arguments():
    """Past the binding, the C entry point refuses bad sizes and NULL pointers with EP_EINVAL."""
    lib, ffi = native.lib, native.ffi
    assert lib is not None, "the C kernels are not built"
    a = block_args()
    p = {name: ffi.cast(ctype, a[name].ctypes.data) for name, ctype in
         (("w", "double *"), ("hinv", "double *"), ("signs", "int8_t *"), ("alpha", "float *"))}
    err = np.zeros((8, 128))
    e = ffi.cast("double *", err.ctypes.data)
    good = [p["w"], 8, 128, 128, p["hinv"], 128, 2, 64, 2, e, p["signs"], 128, p["alpha"], 2, 1]
    assert lib.ep_gptq_block(*good) == lib.EP_OK
    for pos, bad in ((0, ffi.NULL), (1, 0), (2, -1), (3, 64), (6, 5), (7, 0), (8, -1), (13, 1), (9, ffi.NULL)):
        args = list(good)
        args[pos] = bad
        assert lib.ep_gptq_block(*args) == lib.EP_EINVAL, pos
