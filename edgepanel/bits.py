"""The bit layout of binary planes and activations: the one place it is defined, with the NumPy
reference arithmetic every kernel is tested against.  Imports nothing of edgepanel's.

Weights
-------
A weight matrix W (out x in) is stored as k binary planes: W ~ sum_i alpha_i * B_i, B_i in {-1,+1}.

* Bit value: **1 means -1**, 0 means +1 (the sign bit, as in IEEE floats).
* Packing axis: the input axis, 8 inputs per byte, least significant bit first: bit b of byte
  column c holds input 8c+b.  The eight bytes c = 8w..8w+7 of a row are that row's 64-bit word w
  (little-endian), so a row is a whole number of 64-bit words.
* Tiles: rows are grouped 16 to a tile, and the 16 bytes of one (tile, byte column) are adjacent:
  byte r is row 16*tile + r.  One 16-byte vector then holds the same 8 inputs of 16 rows, the shape
  a table lookup (x86 vpshufb, ARM tbl) or a byte popcount wants.
  Array: ``planes[k, out_pad // 16, in_pad // 8, 16]``, uint8.
* Padding: ``in_pad`` is ``in`` rounded up to 64 and ``out_pad`` is ``out`` rounded up to 16.
  Padding bits and padding rows hold 0 when packed here, and every kernel ignores them whatever
  they hold.  The layout is defined on bytes, so it is the same on every machine.
* Scales: ``scales[k, out_pad // 16, n_groups, 16]``, float16 or float32: alpha of plane i,
  row 16t+r, group j is ``scales[i, t, j, r]``; padding rows hold 0.  Or 8-bit: ``scales`` uint8
  codes and ``scale_rows[out_pad // 16, 16]`` float32, one multiplier per row, with
  ``alpha = code * scale_rows[t, r]``; the C kernels add each group's planes as exact integers
  (sum of code * D) before one float32 multiply-add by the row's multiplier (csrc/ref.c).
  8-bit scales are non-negative: a negative scale is stored as its magnitude with that plane's
  signs flipped over the group (exact).  Group j covers inputs
  ``[j*g, min((j+1)*g, in))`` for g in GROUP_SIZES, or g = in (one group per row).

Activations (per token)
-----------------------
* int8 (for k planes x int8): ``scale = absmax / 127``, ``q = clip(rint(x * (127 / absmax)), -127, 127)``
  in float32 arithmetic, half to even, NaN to 0; an all-zero row gets scale 0 and q = 0.
* binary (for XNOR): bits ``(x < 0)`` packed like a plane row, ``(n, in_pad // 8)`` uint8, and
  ``scale = mean |x|`` summed in a fixed order (eight float32 lanes, lane l holding x[l], x[l+8],
  ... in turn, then ((l0+l1)+(l2+l3)) + ((l4+l5)+(l6+l7))).

Products
--------
``y[t, r] = s[t] * sum_j sum_i alpha[i, r, j] * D[t, i, r, j]`` where D is the exact integer dot
product over group j of plane i's signs with the int8 activations (or, for XNOR, with the +-1
activations: D = valid inputs - 2 * popcount(a XOR w)).  The C kernels accumulate in float32 with
one fused multiply-add per (group, plane), groups outer, planes inner; the reference below sums in
float64.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The layout's constants, defined here for the pure-Python kernels (NumPy, Numba: they run without
# the C extension); the C ABI defines them once more in csrc/include/edgepanel.h (EP_TILE,
# EP_IN_ALIGN, EP_MAX_PLANES, EP_SCALES_*) and tests/test_c_binding.py checks each pair agrees.
TILE = 16
IN_ALIGN = 64
SCALES_F32, SCALES_F16, SCALES_U8 = 0, 1, 2    # how scales are stored
GROUP_SIZES = (32, 64, 128, 256)
MAX_PLANES = 4                                 # planes per matrix: the counts kernel_check tests


def padded_in(n_in: int) -> int:
    return -(-n_in // IN_ALIGN) * IN_ALIGN


def padded_out(n_out: int) -> int:
    return -(-n_out // TILE) * TILE


def n_groups(n_in: int, group: int) -> int:
    return 1 if group >= n_in else -(-n_in // group)


def check_group(n_in: int, group: int) -> int:
    """Return `group` if it is valid for rows of `n_in` inputs, else raise ValueError."""
    if not isinstance(group, (int, np.integer)) or isinstance(group, bool):
        raise TypeError(f"group must be an int, got {type(group).__name__}")
    if int(group) not in GROUP_SIZES and int(group) != n_in:
        raise ValueError(f"group must be one of {GROUP_SIZES} or the row length {n_in}, got {group}")
    return int(group)


def group_bounds(n_in: int, group: int) -> list[tuple[int, int]]:
    """[start, end) of each group's real inputs."""
    ng = n_groups(n_in, group)
    if ng == 1:
        return [(0, n_in)]
    return [(j * group, min((j + 1) * group, n_in)) for j in range(ng)]


# ---------------------------------------------------------------------------------------------
# packing


def _pack_bits_rows(neg: np.ndarray) -> np.ndarray:
    """neg (..., in) bool -> (..., in_pad // 8) uint8, LSB first, padding bits 0."""
    n_in = neg.shape[-1]
    pad = padded_in(n_in) - n_in
    if pad:
        neg = np.concatenate([neg, np.zeros(neg.shape[:-1] + (pad,), dtype=bool)], axis=-1)
    return np.packbits(neg, axis=-1, bitorder="little")


def _unpack_bits_rows(bits: np.ndarray, n_in: int) -> np.ndarray:
    """(..., in_pad // 8) uint8 -> (..., n_in) bool (True where the bit is 1)."""
    return np.unpackbits(bits, axis=-1, bitorder="little", count=n_in).astype(bool)


def pack_planes(signs: np.ndarray) -> np.ndarray:
    """Pack the signs of `signs` (k, out, in) into planes (k, out_pad/16, in_pad/8, 16) uint8.

    An entry < 0 becomes bit 1 (-1); anything else (0, +x, NaN) becomes bit 0 (+1)."""
    signs = np.asarray(signs)
    if signs.ndim != 3:
        raise ValueError(f"signs must have shape (k, out, in), got {signs.shape}")
    k, n_out, n_in = signs.shape
    rows = _pack_bits_rows(signs < 0)                              # (k, out, in_pad/8)
    rows = np.concatenate([rows, np.zeros((k, padded_out(n_out) - n_out, rows.shape[2]), np.uint8)], 1)
    tiles = rows.reshape(k, -1, TILE, rows.shape[2])              # (k, tiles, 16, ncol)
    return np.ascontiguousarray(tiles.transpose(0, 1, 3, 2))       # (k, tiles, ncol, 16)


def unpack_planes(planes: np.ndarray, n_out: int, n_in: int) -> np.ndarray:
    """Planes (k, tiles, ncol, 16) -> signs (k, n_out, n_in) int8 in {-1, +1}; padding ignored."""
    k, tiles, ncol, _ = planes.shape
    rows = planes.transpose(0, 1, 3, 2).reshape(k, tiles * TILE, ncol)[:, :n_out]
    neg = _unpack_bits_rows(rows, n_in)
    return np.where(neg, np.int8(-1), np.int8(1))


def tile_scales(alpha: np.ndarray) -> np.ndarray:
    """alpha (k, out, n_groups) -> (k, out_pad/16, n_groups, 16) float32, padding rows 0."""
    alpha = np.asarray(alpha, dtype=np.float32)
    k, n_out, ng = alpha.shape
    full = np.zeros((k, padded_out(n_out), ng), np.float32)
    full[:, :n_out] = alpha
    return np.ascontiguousarray(full.reshape(k, -1, TILE, ng).transpose(0, 1, 3, 2))


def tile_rows(v: np.ndarray) -> np.ndarray:
    """Per-row values (out,) -> (out_pad/16, 16), padding rows 0."""
    v = np.asarray(v)
    full = np.zeros(padded_out(v.shape[0]), v.dtype)
    full[:v.shape[0]] = v
    return full.reshape(-1, TILE)


def untile_scales(scales: np.ndarray, n_out: int) -> np.ndarray:
    """(k, tiles, n_groups, 16) -> alpha (k, n_out, n_groups)."""
    k, tiles, ng, _ = scales.shape
    return scales.transpose(0, 1, 3, 2).reshape(k, tiles * TILE, ng)[:, :n_out]


def level_signs(k: int) -> np.ndarray:
    """(2^k, k) float32: row c holds the signs of level code c, plane 0 in the code's highest bit."""
    c = np.arange(2 ** k)[:, None]
    return np.where((c >> (k - 1 - np.arange(k))[None, :]) & 1, 1.0, -1.0).astype(np.float32)


def level_codes(pm: "PlaneMatrix") -> np.ndarray:
    """(out, n_groups, group) uint8: each weight's level code (bit k-1-i set where plane i is +1),
    the inputs padded to whole groups with code 0; weight (o, c) is then
    sum_i level_signs(k)[code, i] * alpha[i, o, group of c] (the scale tuners build W this way)."""
    k, out, n_in, ng = pm.k, pm.out_features, pm.in_features, pm.n_groups
    gs = n_in if ng == 1 else pm.group
    codes = np.zeros((out, ng * gs), np.uint8)
    tiles, ncol = pm.planes.shape[1:3]
    for i in range(k):   # read from the packed bits (1: -1), one plane at a time
        rows = pm.planes[i].transpose(0, 2, 1).reshape(tiles * TILE, ncol)[:out]
        neg = np.unpackbits(rows, axis=-1, bitorder="little", count=n_in)   # (out, in) 0/1
        codes[:, :n_in] |= (neg ^ 1) << np.uint8(k - 1 - i)
    return codes.reshape(out, ng, gs)


def pack_act_bits(x: np.ndarray) -> np.ndarray:
    """Signs of activations x (n, in) -> (n, in_pad/8) uint8, bit 1 where x < 0."""
    return _pack_bits_rows(np.asarray(x) < 0)


def ternary_to_planes(t: np.ndarray, scale: np.ndarray):
    """A ternary matrix t (out, in) with entries in {-a, 0, +a}, a = scale per row (out,), is
    exactly two planes with equal scales a/2: +a -> (+1, +1), -a -> (-1, -1), 0 -> (+1, -1).

    Returns (signs (2, out, in) int8, alpha (2, out) float32)."""
    t = np.asarray(t)
    pos, neg = t > 0, t < 0
    b1 = np.where(neg, -1, 1).astype(np.int8)
    b2 = np.where(pos, 1, -1).astype(np.int8)
    half = (np.asarray(scale, np.float32) / 2).astype(np.float32)
    return np.stack([b1, b2]), np.stack([half, half])


# ---------------------------------------------------------------------------------------------
# a packed matrix


@dataclass(frozen=True)
class PlaneMatrix:
    """k bit planes and their scales for a weight matrix of shape (out_features, in_features)."""

    planes: np.ndarray          # (k, out_pad/16, in_pad/8, 16) uint8
    scales: np.ndarray          # (k, out_pad/16, n_groups, 16) float32, float16 or uint8 codes
    out_features: int
    in_features: int
    group: int
    scale_rows: np.ndarray | None = None   # (out_pad/16, 16) float32: the multipliers of uint8 codes

    def __post_init__(self):
        for name in ("out_features", "in_features"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        check_group(self.in_features, self.group)
        p, s = self.planes, self.scales
        if not isinstance(p, np.ndarray) or p.dtype != np.uint8:
            raise TypeError(f"planes must be a uint8 ndarray, got {getattr(p, 'dtype', type(p))}")
        if not isinstance(s, np.ndarray) or s.dtype not in (np.float32, np.float16, np.uint8):
            raise TypeError(f"scales must be a float32, float16 or uint8 ndarray, got {getattr(s, 'dtype', type(s))}")
        m = self.scale_rows
        if (s.dtype == np.uint8) != (m is not None):
            raise ValueError("uint8 scales need scale_rows (and only they take them)")
        if m is not None:
            if not isinstance(m, np.ndarray) or m.dtype != np.float32:
                raise TypeError(f"scale_rows must be a float32 ndarray, got {getattr(m, 'dtype', type(m))}")
            if m.shape != (s.shape[1], TILE) or not m.flags.c_contiguous:
                raise ValueError(f"scale_rows must be C-contiguous of shape {(s.shape[1], TILE)}, got {m.shape}")
        tiles, ncol = padded_out(self.out_features) // TILE, padded_in(self.in_features) // 8
        if p.ndim != 4 or p.shape[1:] != (tiles, ncol, TILE) or not 1 <= p.shape[0] <= MAX_PLANES:
            raise ValueError(
                f"planes must have shape (k in 1..{MAX_PLANES}, {tiles}, {ncol}, {TILE}) for a "
                f"{self.out_features}x{self.in_features} matrix, got {p.shape}")
        ng = n_groups(self.in_features, self.group)
        if s.shape != (p.shape[0], tiles, ng, TILE):
            raise ValueError(f"scales must have shape {(p.shape[0], tiles, ng, TILE)}, got {s.shape}")
        for name, a in (("planes", p), ("scales", s)):
            if not a.flags.c_contiguous:
                raise ValueError(f"{name} must be C-contiguous")
            if not a.flags.aligned:
                raise ValueError(f"{name} is not aligned to {a.dtype.itemsize} bytes")

    @property
    def k(self) -> int:
        return self.planes.shape[0]

    @property
    def scales_kind(self) -> int:
        """How the scales are stored, as the C kernels number it (SCALES_F32/F16/U8)."""
        return {np.dtype(np.float32): SCALES_F32, np.dtype(np.float16): SCALES_F16}.get(self.scales.dtype, SCALES_U8)

    def float_scales(self, tiles: slice = slice(None)) -> np.ndarray:
        """The scales as float32 (k, out_pad/16, n_groups, 16), or those of `tiles` only: widened,
        or codes times rows."""
        if self.scale_rows is None:
            return self.scales[:, tiles].astype(np.float32)
        return (self.scales[:, tiles].astype(np.float32) * self.scale_rows[None, tiles, None, :]).astype(np.float32)

    def with_u8_scales(self) -> "PlaneMatrix":
        """The same planes with 8-bit scales: each row's largest scale is code 255; codes round
        to nearest.  Negative scales first become positive with that plane's signs flipped over
        their group, which changes nothing."""
        alpha = self.alpha()
        signs = self.signs()
        if (alpha < 0).any():
            gidx = np.minimum(np.arange(self.in_features) // self.group, self.n_groups - 1)
            flip = alpha < 0                                              # (k, out, ng)
            signs = np.where(flip[:, :, gidx], -signs, signs).astype(np.int8)
            alpha = np.abs(alpha)
        top = alpha.max(axis=(0, 2))                                      # (out,)
        mult = (top / np.float32(255)).astype(np.float32)
        safe = np.where(mult > 0, mult, np.float32(1))
        codes = np.clip(np.rint(alpha / safe[None, :, None]), 0, 255).astype(np.uint8)
        tiled = tile_scales(codes.astype(np.float32)).astype(np.uint8)
        return PlaneMatrix(pack_planes(signs), tiled, self.out_features, self.in_features, self.group,
                           tile_rows(mult))

    def stored(self, scales: str) -> "PlaneMatrix":
        """The matrix with its scales as a model file stores them: "u8" (with_u8_scales) or "f16"
        (rounded to float16; a scale that does not fit is a ValueError).  The converter and
        Model.save both write through this."""
        if scales == "u8":
            return self if self.scale_rows is not None else self.with_u8_scales()
        if scales != "f16":
            raise ValueError(f"scales must be stored as f16 or u8, got {scales!r}")
        f = self.float_scales()
        if not np.all(np.isfinite(f)):
            raise ValueError("a plane scale is not finite")
        h = f.astype(np.float16)
        if not np.all(np.isfinite(h)):
            raise ValueError("a plane scale does not fit in float16")
        return PlaneMatrix(self.planes, h, self.out_features, self.in_features, self.group)

    @property
    def n_groups(self) -> int:
        return self.scales.shape[2]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @classmethod
    def from_signs(cls, signs: np.ndarray, alpha: np.ndarray, group: int) -> "PlaneMatrix":
        """signs (k, out, in) (< 0 means -1) and alpha (k, out, n_groups)."""
        signs = np.asarray(signs)
        if signs.ndim != 3:
            raise ValueError(f"signs must have shape (k, out, in), got {signs.shape}")
        k, n_out, n_in = signs.shape
        check_group(n_in, group)
        alpha = np.asarray(alpha, np.float32)
        if alpha.shape != (k, n_out, n_groups(n_in, group)):
            raise ValueError(f"alpha must have shape {(k, n_out, n_groups(n_in, group))}, got {alpha.shape}")
        return cls(pack_planes(signs), tile_scales(alpha), n_out, n_in, group)

    def signs(self) -> np.ndarray:
        """(k, out, in) int8 in {-1, +1}."""
        return unpack_planes(self.planes, self.out_features, self.in_features)

    def alpha(self) -> np.ndarray:
        """(k, out, n_groups) float32."""
        return untile_scales(self.float_scales(), self.out_features).astype(np.float32)

    def rows(self, ids) -> np.ndarray:
        """Rows `ids` of W_hat as float32 (len(ids), in), the way an embedding lookup reads them:
        x = alpha_0 B_0, then x += alpha_i B_i for i = 1..k-1, in float32 (every engine sums in
        this order, so a looked-up row is the same bits everywhere)."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        tiles, lanes = ids // TILE, ids % TILE
        sub = self.planes[:, tiles, :, lanes]                        # (n, k, ncol)
        neg = _unpack_bits_rows(sub, self.in_features)               # (n, k, in)
        gidx = np.minimum(np.arange(self.in_features) // self.group, self.n_groups - 1)
        a = self.scales[:, tiles, :, lanes].astype(np.float32)               # (n, k, ng)
        if self.scale_rows is not None:
            a = (a * self.scale_rows[tiles, lanes][:, None, None]).astype(np.float32)
        a = a[:, :, gidx]                                                    # (n, k, in)
        term = np.where(neg, -a, a)
        x = term[:, 0].copy()
        for i in range(1, self.k):
            x += term[:, i]
        return x

    def dequantize(self, block: int = 4096) -> np.ndarray:
        """W_hat = sum_i alpha_i * B_i as float32 (out, in), `block` rows at a time (the same
        bits: each entry is its own sum over the planes), so that the signs are never widened
        to float32 whole (16 bytes a weight at k = 4)."""
        w = np.empty(self.shape, np.float32)
        for r0 in range(0, self.out_features, block):
            w[r0:r0 + block] = self.dequantize_rows(r0, min(r0 + block, self.out_features))
        return w

    def dequantize_rows(self, r0: int, r1: int) -> np.ndarray:
        """Rows [r0, r1) of dequantize()."""
        if not 0 <= r0 <= r1 <= self.out_features:
            raise ValueError(f"rows [{r0}, {r1}) are not within the matrix's {self.out_features}")
        t0, t1 = r0 // TILE, -(-r1 // TILE)
        rows = slice(r0 - t0 * TILE, r1 - t0 * TILE)   # within the tiles' rows
        b = unpack_planes(self.planes[:, t0:t1], (t1 - t0) * TILE, self.in_features)[:, rows].astype(np.float32)
        a = untile_scales(self.float_scales(slice(t0, t1)), (t1 - t0) * TILE)[:, rows]
        w = np.zeros((r1 - r0, self.in_features), np.float32)
        for j, (s, e) in enumerate(group_bounds(self.in_features, self.group)):
            w[:, s:e] = np.einsum("ko,koi->oi", a[:, :, j], b[:, :, s:e])
        return w


# ---------------------------------------------------------------------------------------------
# reference arithmetic


def quantize_i8(x: np.ndarray):
    """Per-token int8 quantization of x (n, in) float32 -> (q int8 (n, in), scale float32 (n,))."""
    x = np.asarray(x, np.float32)
    ax = np.abs(x)
    amax = np.max(np.where(np.isnan(ax), np.float32(0), ax), axis=-1, initial=np.float32(0))
    safe = np.where(amax == 0, np.float32(1), amax).astype(np.float32)
    inv = (np.float32(127) / safe).astype(np.float32)
    v = np.rint(x * inv[..., None])
    v = np.clip(np.nan_to_num(v, nan=0.0), -127, 127)
    q = np.where(amax[..., None] == 0, 0, v).astype(np.int8)
    scale = np.where(amax == 0, np.float32(0), (amax / np.float32(127)).astype(np.float32))
    return q, scale.astype(np.float32)


def abs_mean(x: np.ndarray) -> np.ndarray:
    """mean |x| over the last axis in the canonical order of the module docstring."""
    x = np.asarray(x, np.float32)
    n_in = x.shape[-1]
    ax = np.abs(x)
    pad = -n_in % 8
    if pad:
        ax = np.concatenate([ax, np.zeros(ax.shape[:-1] + (pad,), np.float32)], axis=-1)
    lanes = ax.reshape(ax.shape[:-1] + (-1, 8))
    lane = np.cumsum(lanes, axis=-2, dtype=np.float32)[..., -1, :]  # sequential per lane
    s = ((lane[..., 0] + lane[..., 1]) + (lane[..., 2] + lane[..., 3])) + (
        (lane[..., 4] + lane[..., 5]) + (lane[..., 6] + lane[..., 7]))
    return (s / np.float32(n_in)).astype(np.float32)


def binarize(x: np.ndarray):
    """Per-token sign binarization of x (n, in) -> (bits uint8 (n, in_pad/8), scale float32 (n,))."""
    x = np.asarray(x, np.float32)
    return pack_act_bits(x), abs_mean(x)


def gemm_planes_i8(q: np.ndarray, qscale: np.ndarray, w: PlaneMatrix) -> np.ndarray:
    """Reference y (n, out) = dequantized activations times W_hat^T, exact integers per group,
    scales applied in float64."""
    qf = np.asarray(q, np.float64)
    b = w.signs().astype(np.float64)
    a = w.alpha().astype(np.float64)
    y = np.zeros((qf.shape[0], w.out_features))
    for j, (s, e) in enumerate(group_bounds(w.in_features, w.group)):
        d = qf[:, s:e] @ b[:, :, s:e].transpose(0, 2, 1)   # (k, n, out), exact: integers < 2**53
        y += np.einsum("knr,kr->nr", d, a[:, :, j])
    return (y * np.asarray(qscale, np.float64)[:, None]).astype(np.float32)


def gemm_xnor(bits: np.ndarray, ascale: np.ndarray, w: PlaneMatrix) -> np.ndarray:
    """Reference XNOR product: +-1 activations from `bits` (padding ignored) times W_hat^T."""
    act = np.where(_unpack_bits_rows(np.asarray(bits), w.in_features), -1.0, 1.0)
    return gemm_planes_i8(act, ascale, w)
