"""The bit layout (edgepanel.bits): packing, order, padding, round trips, the ternary identity."""
import numpy as np
import pytest

from edgepanel import bits
from edgepanel.bits import PlaneMatrix


@pytest.mark.parametrize("n_out,n_in", [(1, 1), (3, 7), (17, 63), (16, 64), (5, 65), (40, 127), (33, 4097)])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_pack_unpack_round_trip(rng, k, n_out, n_in):
    signs = rng.choice(np.array([-1, 1], np.int8), size=(k, n_out, n_in))
    planes = bits.pack_planes(signs)
    assert planes.shape == (k, bits.padded_out(n_out) // 16, bits.padded_in(n_in) // 8, 16)
    assert planes.dtype == np.uint8
    np.testing.assert_array_equal(bits.unpack_planes(planes, n_out, n_in), signs)


def test_one_hot_bit_order():
    """-1 at (plane 1, row 18, input 77) lands in byte [1, 18 // 16, 77 // 8, 18 % 16], bit 77 % 8."""
    signs = np.ones((2, 20, 100), np.int8)
    signs[1, 18, 77] = -1
    planes = bits.pack_planes(signs)
    expect = np.zeros_like(planes)
    expect[1, 1, 9, 2] = 1 << 5
    np.testing.assert_array_equal(planes, expect)
    # the same row's 64-bit word 1 (inputs 64..127) is little-endian over byte columns 8..15
    word = np.ascontiguousarray(planes[1, 1, 8:16, 2]).view("<u8")[0]
    assert word == 1 << (77 - 64)


def test_padding_is_zero_and_scales_tile(rng):
    signs = -np.ones((1, 17, 65), np.int8)  # every real bit is 1
    planes = bits.pack_planes(signs)
    rows = planes.transpose(0, 1, 3, 2).reshape(1, 32, 16)
    assert (rows[0, 17:] == 0).all(), "padding rows hold 0"
    assert (rows[0, :17, 8] == 1).all() and (rows[0, :17, 9:] == 0).all(), "padding bits hold 0"
    alpha = rng.standard_normal((3, 17, 5)).astype(np.float32)
    tiled = bits.tile_scales(alpha)
    assert tiled.shape == (3, 2, 5, 16)
    assert tiled[2, 1, 4, 0] == alpha[2, 16, 4]
    assert (tiled[:, 1, :, 1:] == 0).all()
    np.testing.assert_array_equal(bits.untile_scales(tiled, 17), alpha)


def test_act_bits_round_trip(rng):
    x = rng.standard_normal((5, 130)).astype(np.float32)
    b = bits.pack_act_bits(x)
    assert b.shape == (5, 24)
    np.testing.assert_array_equal(bits._unpack_bits_rows(b, 130), x < 0)


def test_plane_matrix_dequantize(rng):
    signs = rng.choice(np.array([-1, 1], np.int8), size=(2, 9, 100))
    alpha = rng.standard_normal((2, 9, 4)).astype(np.float32)
    w = PlaneMatrix.from_signs(signs, alpha, 32)
    dense = np.zeros((9, 100), np.float32)
    for j in range(4):
        sl = slice(32 * j, min(32 * (j + 1), 100))
        dense[:, sl] = alpha[0, :, j, None] * signs[0, :, sl] + alpha[1, :, j, None] * signs[1, :, sl]
    np.testing.assert_allclose(w.dequantize(), dense, rtol=1e-6)
    for u in (w, w.with_u8_scales()):   # by blocks of rows, any rows: the same bits
        whole = u.dequantize()
        np.testing.assert_array_equal(u.dequantize(block=4), whole)
        np.testing.assert_array_equal(u.dequantize_rows(3, 8), whole[3:8])
    with pytest.raises(ValueError, match="not within"):
        w.dequantize_rows(5, 10)


def test_ternary_is_exactly_two_planes(rng):
    a = rng.uniform(0.1, 2.0, 12).astype(np.float32)
    t = rng.integers(-1, 2, (12, 70)).astype(np.float32) * a[:, None]
    signs, alpha = bits.ternary_to_planes(t, a)
    w = PlaneMatrix.from_signs(signs, alpha[:, :, None], 70)
    np.testing.assert_array_equal(w.dequantize(), t)
    q = rng.integers(-127, 128, (3, 70)).astype(np.int8)
    y = bits.gemm_planes_i8(q, np.ones(3, np.float32), w)
    np.testing.assert_allclose(y, q.astype(np.float64) @ t.T.astype(np.float64), rtol=1e-6)


def test_reference_quantize_rules():
    x = np.array([[0.0, 0.0], [1.0, -0.5], [np.nan, 2.0], [127.5, -127.0 * 1.5]], np.float32)
    q, s = bits.quantize_i8(x)
    np.testing.assert_array_equal(q[0], [0, 0]) and s[0] == 0
    np.testing.assert_array_equal(q[1], [127, -64])  # -63.5 rounds half to even
    np.testing.assert_array_equal(q[2], [0, 127])    # NaN -> 0, absmax ignores it
    assert s[1] == np.float32(1.0) / np.float32(127)
    assert np.abs(q).max() <= 127


def test_reference_abs_mean_order():
    x = np.arange(1, 20, dtype=np.float32)[None]
    lanes = [sum(float(v) for v in x[0, l::8]) for l in range(8)]
    expect = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]))
    assert bits.abs_mean(x)[0] == np.float32(np.float32(expect) / np.float32(19))


@pytest.mark.parametrize("bad", [48, 0, 100, 512])
def test_bad_group(bad):
    with pytest.raises(ValueError, match="group"):
        bits.check_group(300, bad)
    assert bits.check_group(300, 300) == 300


@pytest.mark.parametrize("n_out,n_in,group", [(1, 1, 1), (17, 63, 32), (40, 127, 64), (33, 576, 256), (5, 100, 100)])
@pytest.mark.parametrize("k", [1, 3, 4])
def test_rows_lookup_is_the_dequantized_row_summed_in_order(rng, k, n_out, n_in, group):
    """PlaneMatrix.rows (an embedding lookup) gives W_hat's rows, summed plane by plane in float32
    (the order every engine follows): exactly that order's float32 sums."""
    signs = rng.choice(np.array([-1, 1], np.int8), size=(k, n_out, n_in))
    alpha = rng.random((k, n_out, bits.n_groups(n_in, group)), dtype=np.float32) * np.float32(3.7)
    pm = PlaneMatrix.from_signs(signs, alpha, group)
    ids = np.array([n_out - 1, 0, n_out // 2, n_out - 1])
    got = pm.rows(ids)
    assert got.shape == (len(ids), n_in) and got.dtype == np.float32
    gidx = np.minimum(np.arange(n_in) // group, alpha.shape[2] - 1)
    want = np.zeros((len(ids), n_in), np.float32)
    for i in range(k):
        want = (want + (signs[i, ids] * alpha[i][ids][:, gidx]).astype(np.float32)).astype(np.float32)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got, pm.dequantize()[ids], rtol=1e-6, atol=1e-6)


def test_u8_scales_round_to_nearest_and_flip_negative_scales_exactly(rng):
    k, n_out, n_in, group = 3, 37, 200, 64
    signs = rng.choice(np.array([-1, 1], np.int8), size=(k, n_out, n_in))
    alpha = rng.standard_normal((k, n_out, bits.n_groups(n_in, group))).astype(np.float32)
    alpha[:, 5] = 0                                     # an all-zero row stays zero
    pm = PlaneMatrix.from_signs(signs, alpha, group)
    p8 = pm.with_u8_scales()
    assert p8.scales.dtype == np.uint8 and p8.scale_rows.shape == (3, 16)
    assert (p8.scale_rows[2, 5:] == 0).all(), "padding rows"       # rows 37..47
    a8 = p8.alpha()
    assert (a8 >= 0).all()
    step = np.abs(alpha).max(axis=(0, 2)) / 255          # per row
    # the same matrix up to rounding each |scale| to its row's code step
    assert (np.abs(np.abs(alpha) - a8) <= step[None, :, None] / 2 + 1e-7).all()
    err = np.abs(p8.dequantize() - pm.dequantize())
    assert (err <= k * step[:, None] / 2 + 1e-6).all()
    assert (p8.dequantize()[5] == 0).all()
    with pytest.raises(ValueError, match="scale_rows"):
        PlaneMatrix(p8.planes, p8.scales, n_out, n_in, group)
