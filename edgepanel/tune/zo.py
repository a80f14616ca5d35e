"""The zeroth-order step, as pure functions (MeZO-style two-point SPSA):

    z        = noise(seed, step, k, name, shape)         regenerated, never stored
    L+, L-   = loss(theta + eps z), loss(theta - eps z)
    g        = (L+ - L-) / (2 eps)                       the projected gradient (a scalar)
    theta   <- theta - lr * g * z                        z regenerated from the same key

The noise comes from a counter-based generator (Philox) keyed by (seed, a hash of the tensor's
name) with the counter (step, perturbation index): the same z on every machine, at any thread
count, after a resume, and whichever other tensors are trained beside it.
"""
from __future__ import annotations

import zlib

import numpy as np

from ..errors import NonFiniteError

DISTRIBUTIONS = ("rademacher", "gaussian")


def noise(seed: int, step: int, k: int, name: str, shape, dist: str = "rademacher") -> np.ndarray:
    """z (shape) float32 for perturbation k of `step` of the tensor `name`: +-1 (Rademacher) or
    standard normal."""
    key = np.array([seed & (2**64 - 1), zlib.crc32(name.encode("utf-8"))], np.uint64)
    counter = np.array([step, k, 0, 0], np.uint64)
    rng = np.random.Generator(np.random.Philox(key=key, counter=counter))
    if dist == "rademacher":
        return (rng.integers(0, 2, size=shape, dtype=np.int8) * np.int8(2) - np.int8(1)).astype(np.float32)
    if dist == "gaussian":
        return rng.standard_normal(size=shape, dtype=np.float32)
    raise ValueError(f"noise distribution must be one of {DISTRIBUTIONS}, got {dist!r}")


def perturb(theta: dict, seed: int, step: int, k: int, scale: float, dist: str = "rademacher"):
    """theta[name] += scale * z(name), in place, for every tensor."""
    for name, a in theta.items():
        a += np.float32(scale) * noise(seed, step, k, name, a.shape, dist)


def projected_gradient(loss_plus: float, loss_minus: float, eps: float, clip: float | None = None) -> float:
    """(L+ - L-) / (2 eps), clipped to [-clip, clip] (quantized-scale ZO diverges without it)."""
    g = (float(loss_plus) - float(loss_minus)) / (2.0 * eps)
    if not np.isfinite(g):
        raise NonFiniteError(f"the loss is not finite (L+ {loss_plus}, L- {loss_minus})")
    return g if clip is None else float(np.clip(g, -clip, clip))


def gradient(name: str, shape, seed: int, step: int, grads: list[float], dist: str = "rademacher") -> np.ndarray:
    """The step's gradient estimate for one tensor: mean over perturbations k of g_k z_k."""
    est = np.zeros(shape, np.float32)
    for k, g in enumerate(grads):
        est += np.float32(g / len(grads)) * noise(seed, step, k, name, shape, dist)
    return est
