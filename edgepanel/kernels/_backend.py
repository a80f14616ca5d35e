"""What every kernel backend offers, and the argument checks they all share.

A backend implements the `_impl` methods on validated, contiguous arrays; the public methods check
dtypes, shapes, contiguity and alignment first and raise TypeError / ValueError naming the
argument, so no backend ever sees (or crashes on) a bad array.
"""
from __future__ import annotations

import numpy as np

from .. import bits
from ..bits import PlaneMatrix


def check_array(name: str, a, dtype, ndim: tuple[int, ...]) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(a).__name__}")
    if a.dtype != np.dtype(dtype):
        raise TypeError(f"{name} must have dtype {np.dtype(dtype).name}, got {a.dtype.name}")
    if a.ndim not in ndim:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndim))} dimensions, got shape {a.shape}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (use np.ascontiguousarray)")
    if not a.flags.aligned:
        raise ValueError(f"{name} is not aligned to {a.dtype.itemsize} bytes")
    return a


def check_threads(threads) -> int:
    """None or 0 -> 0 (all processors); otherwise a positive int."""
    if threads is None:
        return 0
    if not isinstance(threads, (int, np.integer)) or isinstance(threads, bool) or threads < 0:
        raise ValueError(f"threads must be None or a non-negative int, got {threads!r}")
    return int(threads)


class Backend:
    """A set of kernels.  `name` is the backend ("c", "numba", "numpy"), `isa` its variant."""

    name = "?"
    isa = None

    def __repr__(self) -> str:
        return f"<edgepanel kernels {self.label}>"

    @property
    def label(self) -> str:
        return f"{self.name}/{self.isa}" if self.isa else self.name

    # -- activations ------------------------------------------------------------------------
    def quantize_i8(self, x: np.ndarray):
        """x (n, in) or (in,) float32 -> (q int8 same shape, scale float32 (n,) or scalar)."""
        x = check_array("x", x, np.float32, (1, 2))
        if x.shape[-1] == 0:
            raise ValueError("x must have at least one input")
        x2 = x.reshape(-1, x.shape[-1])
        q, s = self._quantize_i8(x2)
        return (q, s) if x.ndim == 2 else (q[0], s[0])

    def binarize(self, x: np.ndarray):
        """x (n, in) or (in,) float32 -> (bits uint8 (n, in_pad/8), scale float32 (n,))."""
        x = check_array("x", x, np.float32, (1, 2))
        if x.shape[-1] == 0:
            raise ValueError("x must have at least one input")
        x2 = x.reshape(-1, x.shape[-1])
        b, s = self._binarize(x2)
        return (b, s) if x.ndim == 2 else (b[0], s[0])

    def pack_planes(self, w: np.ndarray) -> np.ndarray:
        """Signs of w (k, out, in) float32 -> planes (k, out_pad/16, in_pad/8, 16) uint8."""
        w = check_array("w", w, np.float32, (3,))
        if min(w.shape) == 0:
            raise ValueError(f"w must not be empty, got shape {w.shape}")
        if w.shape[0] > bits.MAX_PLANES:
            raise ValueError(f"w holds {w.shape[0]} planes; at most {bits.MAX_PLANES} are supported")
        return self._pack_planes(w)

    # -- products ---------------------------------------------------------------------------
    @staticmethod
    def _check_w(w) -> PlaneMatrix:
        if not isinstance(w, PlaneMatrix):
            raise TypeError(f"w must be an edgepanel.bits.PlaneMatrix, got {type(w).__name__}")
        return w

    def _check_gemm(self, act_name, act, act_dtype, scale_name, scale, w, act_width, threads):
        act = check_array(act_name, act, act_dtype, (1, 2))
        single = act.ndim == 1
        act2 = act.reshape(1, -1) if single else act
        if act2.shape[1] != act_width:
            raise ValueError(f"{act_name} has {act2.shape[1]} columns; this {w.out_features}x"
                             f"{w.in_features} matrix needs {act_width}")
        scale = np.asarray(scale, np.float32) if single and np.isscalar(scale) else scale
        if single and isinstance(scale, np.ndarray) and scale.ndim == 0:
            scale = scale.reshape(1)
        scale = check_array(scale_name, scale, np.float32, (1,))
        if scale.shape[0] != act2.shape[0]:
            raise ValueError(f"{scale_name} has {scale.shape[0]} entries for {act2.shape[0]} tokens")
        return act2, scale, single, check_threads(threads)

    def gemm_planes_i8(self, q, qscale, w: PlaneMatrix, threads=None) -> np.ndarray:
        """y (n, out) float32 from int8 activations q (n, in) with scales qscale (n,)."""
        w = self._check_w(w)
        q2, s, single, th = self._check_gemm("q", q, np.int8, "qscale", qscale, w, w.in_features, threads)
        y = self._gemm_planes_i8(q2, s, w, th)
        return y[0] if single else y

    def gemm_xnor(self, act_bits, ascale, w: PlaneMatrix, threads=None) -> np.ndarray:
        """y (n, out) float32 from packed sign activations (n, in_pad/8) with scales ascale (n,)."""
        w = self._check_w(w)
        a2, s, single, th = self._check_gemm("act_bits", act_bits, np.uint8, "ascale", ascale, w,
                                             bits.padded_in(w.in_features) // 8, threads)
        y = self._gemm_xnor(a2, s, w, th)
        return y[0] if single else y

    # -- to implement -----------------------------------------------------------------------
    def _quantize_i8(self, x):
        raise NotImplementedError

    def _binarize(self, x):
        raise NotImplementedError

    def _pack_planes(self, w):
        raise NotImplementedError

    def _gemm_planes_i8(self, q, qscale, w, threads):
        raise NotImplementedError

    def _gemm_xnor(self, act_bits, ascale, w, threads):
        raise NotImplementedError


class NumpyBackend(Backend):
    """The reference: edgepanel.bits' arithmetic, float64 inside."""

    name = "numpy"

    def _quantize_i8(self, x):
        return bits.quantize_i8(x)

    def _binarize(self, x):
        return bits.binarize(x)

    def _pack_planes(self, w):
        return bits.pack_planes(w)

    def _gemm_planes_i8(self, q, qscale, w, threads):
        return bits.gemm_planes_i8(q, qscale, w)

    def _gemm_xnor(self, act_bits, ascale, w, threads):
        return bits.gemm_xnor(act_bits, ascale, w)
