"""Structured orthogonal transforms (randomized Hadamard) for rotating weights and activations.

A transform T on vectors of length n = 2^a * m (m odd) is
    T(x) = mix_m( FWHT_{2^a}( d * x ) )
with d a vector of random signs, FWHT the orthonormal fast Walsh-Hadamard transform applied to
each of the m consecutive blocks of 2^a entries, and mix_m a random orthogonal m x m matrix O
combining the blocks: y[i*2^a + j] = sum_i' O[i, i'] z[i'*2^a + j].  T is orthogonal, so it keeps
dot products: T(x) . T(w) = x . w.  Rotating the rows of a weight matrix offline and its input at
run time (or both offline, when the previous layer's output can absorb it) leaves the layer's
output unchanged while spreading outliers over many inputs, which quantization tolerates better.
Cost O(n log n + n m).  The C engine applies the same T with the same butterflies (csrc/forward.c,
ep_rotate_rows; calibration calls it on many rows)."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np


def split_pow2(n: int) -> tuple[int, int]:
    """n = p * m with p the largest power of two dividing n."""
    p = n & -n
    return p, n // p


@functools.lru_cache(maxsize=8)
def _hadamard(p: int) -> np.ndarray:
    """The orthonormal p x p Walsh-Hadamard matrix (Sylvester order, symmetric), float32; built
    once per size (a calibration pass rotates every layer's inputs with it), read-only."""
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < p:
        h = np.block([[h, h], [h, -h]])
    h = (h / np.float32(np.sqrt(p))).astype(np.float32)
    h.flags.writeable = False
    return h


@dataclass
class Rotation:
    signs: np.ndarray   # (n,) float32 in {-1, +1}
    mix: np.ndarray     # (m, m) float32 orthogonal

    @property
    def n(self) -> int:
        return self.signs.size

    @classmethod
    def random(cls, n: int, seed: int) -> "Rotation":
        rng = np.random.default_rng(seed)
        p, m = split_pow2(n)
        signs = rng.choice(np.array([-1.0, 1.0], np.float32), n)
        q, r = np.linalg.qr(rng.standard_normal((m, m)))
        q = q * np.sign(np.diag(r))  # a Haar-random orthogonal matrix
        return cls(signs.astype(np.float32), q.astype(np.float32))

    def apply(self, x: np.ndarray) -> np.ndarray:
        """T applied to the last axis of x (any leading shape)."""
        x = np.asarray(x, np.float32)
        n = self.n
        p, m = split_pow2(n)
        shape = x.shape
        y = (x * self.signs).reshape(-1, m, p).astype(np.float32)
        h = 1
        while h < p:  # in-place butterflies, blocks of 2h
            y = y.reshape(-1, m, p // (2 * h), 2, h)
            a, b = y[..., 0, :].copy(), y[..., 1, :].copy()
            y[..., 0, :], y[..., 1, :] = a + b, a - b
            y = y.reshape(-1, m, p)
            h *= 2
        y *= np.float32(1.0 / np.sqrt(p))
        y = np.einsum("ij,bjp->bip", self.mix, y).astype(np.float32)
        return y.reshape(shape)

    def apply_blas(self, x: np.ndarray) -> np.ndarray:
        """T(x) as apply() computes it, up to float32 rounding, with the Hadamard blocks as one
        matrix product (for the many rows of a calibration pass; blocks up to 2048 wide)."""
        x = np.asarray(x, np.float32)
        p, m = split_pow2(self.n)
        if p > 2048:
            return self.apply(x)
        y = ((x * self.signs).reshape(-1, p) @ _hadamard(p)).reshape(-1, m, p)
        out = np.empty_like(y)
        for i in range(m):   # mix the m blocks: out[b, i] = sum_j mix[i, j] y[b, j]
            out[:, i] = y[:, 0] * self.mix[i, 0]
            for j in range(1, m):
                out[:, i] += y[:, j] * self.mix[i, j]
        return out.reshape(x.shape)

    def apply_rows(self, x: np.ndarray, transpose: bool = False) -> np.ndarray:
        """T (or its transpose, S H M^T: H is symmetric) on the last axis of x, in x's dtype, the
        Hadamard blocks as one matrix product: the scale tuner's forward and backward passes
        (float64 where tests check gradients against differences)."""
        p, m = split_pow2(self.n)
        had = _hadamard(p).astype(x.dtype)
        if not transpose:
            y = ((x * self.signs).reshape(-1, p) @ had).reshape(-1, m, p)
            return np.einsum("ij,bjp->bip", self.mix, y).reshape(x.shape)
        y = np.einsum("ji,bjp->bip", self.mix, x.reshape(-1, m, p)).reshape(-1, p) @ had
        return y.reshape(x.shape) * self.signs

    def matrix(self) -> np.ndarray:
        """T as an n x n matrix A with T(x) = A x."""
        return self.apply(np.eye(self.n, dtype=np.float32)).T

    def apply_columns(self, w: np.ndarray) -> np.ndarray:
        """Rotate the outputs of a linear layer: W (out=n, in) -> A W, so T(W x) = (A W) x."""
        return np.ascontiguousarray(self.apply(np.asarray(w, np.float32).T).T)
