"""Plane matrices as ONNX integer codes (pure NumPy; the graph is built in onnx.py).

A ±1 plane is a 2-bit code: INT2 holds -1 and +1 as they are (two's complement 0b11, 0b01), with
the plane's scale per (row, group) as a blocked DequantizeLinear scale, so W_i = code * alpha_i
exactly; before opset 25 (no INT2) a plane is an INT4 code, twice the bytes.  k planes fold into
one code when that is exact: every (row, group) has the same scale on every plane (what BitNet's
ternary weights become), so sum_i alpha B_i = (alpha * f) * c with c = sum_i B_i / f, f = 2 for
even k, an integer in -k/f..k/f (k=2: -1..1, INT2; k=3, 4: INT4).  Folding by other ratios (powers
of two) is exact too, but no recipe produces them, so it is not attempted.

For ONNX Runtime's MatMulNBits (`--format ort`) the same codes are stored unsigned with its
default zero point 2^(bits-1), packed per (row, block) as its kernels read them."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import bits


@dataclass
class Scales:
    """The plane scales of one matrix (k, out, n_groups) as the model file stores them: float
    (float16 or float32 values), or 8-bit codes with one float32 multiplier per row."""
    values: np.ndarray | None = None     # float16 / float32 (k, out, ng)
    codes: np.ndarray | None = None      # uint8 (k, out, ng)
    rows: np.ndarray | None = None       # float32 (out,): alpha = float32(code) * rows

    @classmethod
    def of(cls, pm: bits.PlaneMatrix) -> "Scales":
        s = bits.untile_scales(pm.scales, pm.out_features)
        if pm.scale_rows is None:
            return cls(values=np.ascontiguousarray(s))
        return cls(codes=np.ascontiguousarray(s), rows=np.ascontiguousarray(pm.scale_rows.reshape(-1)[:pm.out_features]))

    def alpha(self) -> np.ndarray:
        """float32 (k, out, ng): the scales, one float32 product per u8 code."""
        if self.codes is None:
            return self.values.astype(np.float32)
        return (self.codes.astype(np.float32) * self.rows[None, :, None]).astype(np.float32)


@dataclass
class PlaneCodes:
    """How one plane matrix (out, in) is stored: `terms` codes (out, in), each times its scale;
    one per plane, or one when folded (then `fold` is the factor f, the term's scale is f times
    plane 0's, and `folded` holds its values)."""
    pm: bits.PlaneMatrix
    bits: int                          # 2 or 4: the signed type holding every code
    fold: int | None = None            # None: one term per plane
    folded: np.ndarray | None = None   # int8 (out, in)

    @property
    def terms(self) -> int:
        return 1 if self.fold else self.pm.k

    def values(self, t: int) -> np.ndarray:
        """Term t's codes, int8 (out, in)."""
        return self.folded if self.fold else self.pm.signs()[t]

    def packed(self, t: int, zero_point: int = 0) -> np.ndarray:
        """Term t's codes plus `zero_point`, packed `bits` bits each (pack_low_bits' order), as
        uint8 (out, ceil(in * bits / 8)) when rows end on a byte, else flat (out * in * bits / 8)."""
        n_out, n_in = self.pm.shape
        if self.fold or (n_in * self.bits) % 8:
            return np.frombuffer(pack_low_bits(self.values(t).astype(np.int16) + zero_point, self.bits), np.uint8)
        # straight from the plane bytes: each byte (8 inputs, bit 1 = -1) becomes `bits` bytes
        rows = self.pm.planes[t].transpose(0, 2, 1).reshape(-1, self.pm.planes.shape[2])[:n_out]  # (out, in_pad/8)
        lut = _byte_codes(self.bits, zero_point)
        return lut[rows].reshape(n_out, -1)[:, :n_in * self.bits // 8]


def _byte_codes(nbits: int, zero_point: int) -> np.ndarray:
    """(256, nbits) uint8: a plane byte's 8 signs as codes (+-1 + zero_point), packed."""
    signs = np.where(np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little"), -1, 1)
    return np.frombuffer(pack_low_bits(signs + zero_point, nbits), np.uint8).reshape(256, nbits)


def pack_low_bits(values: np.ndarray, nbits: int) -> bytes:
    """Signed or unsigned integers (any shape, each fitting `nbits` bits in two's complement)
    packed as ONNX stores INT2/UINT2/INT4/UINT4 tensors: row-major elements, 8/nbits to a byte,
    the first in the least significant bits; the last byte padded with zeros."""
    per = 8 // nbits
    v = np.ascontiguousarray(values).reshape(-1)
    v = (v.view(np.uint8) if v.dtype == np.int8 else v.astype(np.int64).astype(np.uint8)) & np.uint8((1 << nbits) - 1)
    if len(v) % per:
        v = np.concatenate([v, np.zeros(-len(v) % per, np.uint8)])
    v = v.reshape(-1, per)
    out = v[:, 0].copy()
    for j in range(1, per):
        out |= v[:, j] << np.uint8(nbits * j)
    return out.tobytes()


def plane_codes(pm: bits.PlaneMatrix, alpha: np.ndarray, int2: bool) -> PlaneCodes:
    """The codes of `pm` (alpha: its float32 scales (k, out, ng)); `int2`: INT2 is available."""
    k = pm.k
    if k > 1 and np.array_equal(alpha, np.broadcast_to(alpha[:1], alpha.shape)):
        f = 2 if k % 2 == 0 else 1
        c = (pm.signs().sum(axis=0, dtype=np.int8) // f).astype(np.int8)   # exact: the sum has k's parity
        fits2 = int(c.min()) >= -2 and int(c.max()) <= 1
        return PlaneCodes(pm, 2 if fits2 and int2 else 4, f, c)
    return PlaneCodes(pm, 2 if int2 else 4)


def nbits_block(n_in: int, group: int) -> int:
    """MatMulNBits' block: the group, or for one group per row a power of two (its kernels take
    16..256) repeating the row's scale."""
    return group if group < n_in else 32


def nbits_weights(pc: PlaneCodes, alpha: np.ndarray, group: int):
    """MatMulNBits inputs for the terms of `pc` stacked as output rows (term t, row r -> t*out+r):
    B uint8 (terms*out, n_blocks, block*bits/8) and scales float32 (terms*out, n_blocks), with the
    default zero point 2^(bits-1); the padding of the last block holds the zero point (weight 0).
    Returns (B, scales, block)."""
    n_out, n_in = pc.pm.shape
    block = nbits_block(n_in, group)
    nb = -(-n_in // block)
    zp = 1 << (pc.bits - 1)
    blob = block * pc.bits // 8
    B = np.full((pc.terms, n_out, nb * blob), np.uint8(sum(zp << (pc.bits * j) for j in range(8 // pc.bits))))
    for t in range(pc.terms):
        p = pc.packed(t, zp)
        if p.ndim == 2:
            B[t, :, :p.shape[1]] = p
        else:   # rows that do not end on a byte: pack row by row
            v = pc.values(t).astype(np.int16) + zp
            for r in range(n_out):
                row = np.frombuffer(pack_low_bits(v[r], pc.bits), np.uint8)
                B[t, r, :len(row)] = row
    a = alpha[:1] * np.float32(pc.fold) if pc.fold else alpha               # (terms, out, ng)
    col_group = np.minimum(np.arange(nb) * block // group, a.shape[2] - 1)   # each block within one group
    scales = np.ascontiguousarray(a[:, :, col_group].reshape(pc.terms * n_out, nb), np.float32)
    return B.reshape(pc.terms * n_out, nb, blob), scales, block
