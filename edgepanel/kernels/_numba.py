"""Numba fallback kernels, for machines where the C extension could not be built.

The same layout and integer arithmetic as the C kernels, with per-token 16-entry nibble tables;
float sums in float64, so results agree with C to float32 rounding, not bit for bit."""
from __future__ import annotations

import numpy as np

from .. import bits
from ._backend import Backend

try:
    import numba
    from numba import njit, prange
except ImportError as exc:  # numba is a dependency, but keep `import edgepanel` alive without it
    numba = None
    IMPORT_ERROR = exc
else:
    IMPORT_ERROR = None

if numba is not None:

    @njit(cache=True)
    def _quantize_rows(x, q, scale):
        n, m = x.shape
        for t in range(n):
            amax = np.float32(0.0)
            for j in range(m):
                a = abs(x[t, j])
                if a > amax:  # NaN compares false
                    amax = a
            if amax == 0:
                q[t, :] = 0
                scale[t] = np.float32(0.0)
                continue
            inv = np.float32(127.0) / amax
            for j in range(m):
                v = np.rint(x[t, j] * inv)
                if v != v:
                    v = np.float32(0.0)
                v = min(max(v, np.float32(-127.0)), np.float32(127.0))
                q[t, j] = np.int8(v)
            scale[t] = amax / np.float32(127.0)

    @njit(cache=True)
    def _binarize_rows(x, out_bits, scale):
        n, m = x.shape
        for t in range(n):
            out_bits[t, :] = 0
            lane = np.zeros(8, np.float32)
            for j in range(m):
                v = x[t, j]
                if v < 0:
                    out_bits[t, j >> 3] |= np.uint8(1 << (j & 7))
                lane[j & 7] += abs(v)
            s = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]))
            scale[t] = s / np.float32(m)

    @njit(cache=True)
    def _pack(w, planes):
        k, n_out, n_in = w.shape
        planes[:] = 0
        for i in range(k):
            for r in range(n_out):
                t, rr = r // 16, r % 16
                for u in range(n_in):
                    if w[i, r, u] < 0:
                        planes[i, t, u >> 3, rr] |= np.uint8(1 << (u & 7))

    @njit(cache=True)
    def _group_cols(j, ng, group, ncol):
        c1 = ncol if j == ng - 1 else (j + 1) * group // 8
        return j * group // 8, c1

    @njit(parallel=True, cache=True)
    def _gemm_tables(tab, base, ascale, planes, scales, n_out, group, y):
        """y[t, r] = ascale[t] * sum_j sum_i alpha * (base[t, j] - 2 * M), M from nibble tables."""
        k, tiles, ncol, _ = planes.shape
        ng = scales.shape[2]
        n = tab.shape[0]
        for tile in prange(tiles):
            for rr in range(16):
                r = tile * 16 + rr
                if r >= n_out:
                    continue
                for t in range(n):
                    acc = 0.0
                    for j in range(ng):
                        c0, c1 = _group_cols(j, ng, group, ncol)
                        for i in range(k):
                            m = 0
                            for c in range(c0, c1):
                                b = planes[i, tile, c, rr]
                                m += tab[t, c, 0, b & 15] + tab[t, c, 1, b >> 4]
                            acc += np.float64(scales[i, tile, j, rr]) * (base[t, j] - 2 * m)
                    y[t, r] = np.float32(acc * np.float64(ascale[t]))

    @njit(cache=True)
    def _i8_tables(q, ncol, tab):
        """tab[t, c, h, nib] = sum of q over the set bits of nib, inputs 8c+4h .. 8c+4h+3."""
        n, n_in = q.shape
        for t in range(n):
            for c in range(ncol):
                for h in range(2):
                    for nib in range(16):
                        s = 0
                        for b in range(4):
                            u = 8 * c + 4 * h + b
                            if (nib >> b) & 1 and u < n_in:
                                s += q[t, u]
                        tab[t, c, h, nib] = s

    @njit(cache=True)
    def _xnor_tables(act, n_in, tab):
        """tab[t, c, h, nib] = popcount((nib ^ activation nibble) & valid inputs)."""
        n, ncol = act.shape
        for t in range(n):
            for c in range(ncol):
                for h in range(2):
                    a = (act[t, c] >> (4 * h)) & 15
                    for nib in range(16):
                        s = 0
                        for b in range(4):
                            u = 8 * c + 4 * h + b
                            if u < n_in and ((nib ^ a) >> b) & 1:
                                s += 1
                        tab[t, c, h, nib] = s


class NumbaBackend(Backend):
    name = "numba"

    def __init__(self):
        if numba is None:
            from ..errors import BackendUnavailable
            raise BackendUnavailable(f"numba is not installed ({IMPORT_ERROR})")

    def _quantize_i8(self, x):
        q = np.empty(x.shape, np.int8)
        s = np.empty(x.shape[0], np.float32)
        _quantize_rows(x, q, s)
        return q, s

    def _binarize(self, x):
        b = np.empty((x.shape[0], bits.padded_in(x.shape[1]) // 8), np.uint8)
        s = np.empty(x.shape[0], np.float32)
        _binarize_rows(x, b, s)
        return b, s

    def _pack_planes(self, w):
        k, o, i = w.shape
        p = np.empty((k, bits.padded_out(o) // 16, bits.padded_in(i) // 8, 16), np.uint8)
        _pack(w, p)
        return p

    def _run(self, tab, base, scale, w, threads):
        y = np.empty((tab.shape[0], w.out_features), np.float32)
        group = bits.padded_in(w.in_features) if w.n_groups == 1 else w.group
        before = numba.get_num_threads()
        if threads:
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        try:
            _gemm_tables(tab, base, scale, w.planes, w.float_scales(), w.out_features, group, y)
        finally:
            numba.set_num_threads(before)
        return y

    def _gemm_planes_i8(self, q, qscale, w, threads):
        ncol = bits.padded_in(w.in_features) // 8
        tab = np.empty((q.shape[0], ncol, 2, 16), np.int32)
        _i8_tables(q, ncol, tab)
        q64 = q.astype(np.int64)
        base = np.stack([q64[:, s:e].sum(axis=1) for s, e in bits.group_bounds(w.in_features, w.group)], 1)
        return self._run(tab, base, qscale, w, threads)

    def _gemm_xnor(self, act_bits, ascale, w, threads):
        tab = np.empty((act_bits.shape[0], act_bits.shape[1], 2, 16), np.int32)
        _xnor_tables(act_bits, w.in_features, tab)
        valid = np.array([e - s for s, e in bits.group_bounds(w.in_features, w.group)], np.int64)
        base = np.broadcast_to(valid, (act_bits.shape[0], valid.size)).copy()
        return self._run(tab, base, ascale, w, threads)
