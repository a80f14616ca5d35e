"""The zeroth-order step, as pure functions (MeZO-style two-point SPSA):

    z        = noise(seed, step, k, name, shape)         regenerated, never stored
    L+, L-   = loss(theta + eps z), loss(theta - eps z)
    g        = (L+ - L-) / (2 eps)                       the projected gradient (a scalar)
    theta   <- theta - lr * g * z                        z regenerated from the same key

The noise comes from a counter-based generator (Philox) keyed by (seed, a hash of the tensor's
name) with the counter (step, perturbation index): the same z on every machine, at any thread
count, after a resume, and whichever other tensors are trained beside it.

`hadamard` draws orthogonal directions instead of independent ones. Number the D trained values
in the order of their tensors' sorted names, and let m be the power of two >= D. Perturbation k of
a step is row r_k of the m x m Sylvester-Hadamard matrix, H[r, j] = (-1)^popcount(r & j), cut to
D columns and multiplied coordinate by coordinate by the step's random signs s_j:

    z_k[j] = s_j * H[r_k, j]       r_k = (a * k + b) mod m,  a odd: k -> r_k is one-to-one

so the rows of a step are distinct for k < m. Since H^T H = m I, the m rows of a step satisfy
sum_k z_k z_k^T = m I exactly, and the mean of g_k z_k over m perturbations is the central-
difference gradient itself (for an iid draw it only converges at the rate 1/n). Each entry is
still +-1. With fewer than m perturbations a step samples rows without replacement. The row and
the signs hang on the value's global index, so this noise does depend on which tensors are
trained together (the other two do not).
"""
from __future__ import annotations

import zlib

import numpy as np

from ..errors import NonFiniteError

DISTRIBUTIONS = ("rademacher", "gaussian", "hadamard")


def layout(theta: dict) -> dict[str, tuple[int, int]]:
    """name -> (offset, D): each tensor's first global index (sorted names) and the total D."""
    out, off = {}, 0
    for name in sorted(theta):
        out[name] = off
        off += int(np.prod(theta[name].shape, dtype=np.int64))
    return {name: (o, off) for name, o in out.items()}


def _keyed(seed: int, name: str, step: int, k: int) -> np.random.Generator:
    key = np.array([seed & (2**64 - 1), zlib.crc32(name.encode("utf-8"))], np.uint64)
    return np.random.Generator(np.random.Philox(key=key, counter=np.array([step, k, 0, 0], np.uint64)))


def _parity(x: np.ndarray) -> np.ndarray:
    """popcount(x) & 1 of uint64 values, by folding (np.bitwise_count needs NumPy 2)."""
    for shift in (32, 16, 8, 4, 2, 1):
        x = x ^ (x >> np.uint64(shift))
    return x & np.uint64(1)


def hadamard_row(seed: int, step: int, k: int, total: int) -> int:
    """r_k of the step: an affine bijection of range(m) keyed by (seed, step)."""
    m = 1 << max(0, (int(total) - 1).bit_length())
    a, b = (int(v) for v in _keyed(seed, "\0hadamard", step, 2**63).integers(0, m, size=2, dtype=np.uint64))
    return ((a | 1) * int(k) + b) % m


def noise(seed: int, step: int, k: int, name: str, shape, dist: str = "rademacher",
          where: tuple[int, int] | None = None) -> np.ndarray:
    """z (shape) float32 for perturbation k of `step` of the tensor `name`: +-1 (Rademacher),
    standard normal, or +-1 from a row of a Hadamard matrix (`where`: the tensor's offset and the
    total number of trained values, from layout())."""
    if dist == "rademacher":
        return (_keyed(seed, name, step, k).integers(0, 2, size=shape, dtype=np.int8) * np.int8(2)
                - np.int8(1)).astype(np.float32)
    if dist == "gaussian":
        return _keyed(seed, name, step, k).standard_normal(size=shape, dtype=np.float32)
    if dist == "hadamard":
        if where is None:
            raise ValueError("hadamard noise needs the tensor's place among the trained values (zo.layout)")
        offset, total = where
        n = int(np.prod(shape, dtype=np.int64))
        j = np.arange(offset, offset + n, dtype=np.uint64)
        odd = _parity(j & np.uint64(hadamard_row(seed, step, k, total)))
        signs = _keyed(seed, name, step, 2**63).integers(0, 2, size=n, dtype=np.int8)   # the step's s, for every k
        return (1.0 - 2.0 * (odd ^ signs.astype(np.uint64))).astype(np.float32).reshape(shape)
    raise ValueError(f"noise distribution must be one of {DISTRIBUTIONS}, got {dist!r}")


def perturb(theta: dict, seed: int, step: int, k: int, scale: float, dist: str = "rademacher"):
    """theta[name] += scale * z(name), in place, for every tensor."""
    where = layout(theta)
    for name, a in theta.items():
        a += np.float32(scale) * noise(seed, step, k, name, a.shape, dist, where[name])


def projected_gradient(loss_plus: float, loss_minus: float, eps: float, clip: float | None = None) -> float:
    """(L+ - L-) / (2 eps), clipped to [-clip, clip] (quantized-scale ZO diverges without it)."""
    g = (float(loss_plus) - float(loss_minus)) / (2.0 * eps)
    if not np.isfinite(g):
        raise NonFiniteError(f"the loss is not finite (L+ {loss_plus}, L- {loss_minus})")
    return g if clip is None else float(np.clip(g, -clip, clip))


def gradient(name: str, shape, seed: int, step: int, grads: list[float], dist: str = "rademacher",
             where: tuple[int, int] | None = None) -> np.ndarray:
    """The step's gradient estimate for one tensor: mean over perturbations k of g_k z_k
    (`where`: from layout(), for hadamard noise)."""
    est = np.zeros(shape, np.float32)
    for k, g in enumerate(grads):
        est += np.float32(g / len(grads)) * noise(seed, step, k, name, shape, dist, where)
    return est
