"""Binarization recipes: float weights -> k sign planes and their scales (edgepanel.bits layout).

Data-free fitting (issue 3): greedy residual planes, then alternating least squares.
  greedy:  R = W; for i in 1..k: B_i = sign(R), alpha_i = mean |R| per (row, group), R -= alpha_i B_i
  ALS:     repeat: (a) scales by least squares per (row, group), signs fixed: (B B^T) alpha = B w
                   (b) signs by the nearest of the 2^k levels sum_i +-alpha_i, scales fixed
Both steps never increase the squared error.  Ternary weights {-a, 0, +a} (BitNet) are exactly two
planes with scales a/2 and take no fitting at all.
Sums (mean |R|, B w) are taken in float64 and the levels compared in float64, then scales rounded
to float32: a sum of float32 values in float64 is exact, or nearly, whatever its order, so csrc/fit.c
(GPTQ's column loop in C, issue 24) reproduces these fits bit for bit.
"""
from __future__ import annotations

import contextlib
import itertools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

from . import bits
from .kernels import native, usable_cpus


def _grouped(x: np.ndarray, group: int) -> np.ndarray:
    """(out, in) -> (out, ng, gs), zero-padded; gs = group (or in for one group per row)."""
    n_out, n_in = x.shape
    gs = n_in if bits.n_groups(n_in, group) == 1 else group
    ng = -(-n_in // gs)
    pad = ng * gs - n_in
    if pad:
        x = np.concatenate([x, np.zeros((n_out, pad), x.dtype)], axis=1)
    return x.reshape(n_out, ng, gs)


def _valid_mask(n_in: int, group: int) -> np.ndarray:
    ones = np.ones((1, n_in), np.float32)
    return _grouped(ones, group)[0] > 0          # (ng, gs)


def greedy_planes(w: np.ndarray, k: int, group: int, block: int = 4096):
    """Greedy residual fit: (signs (k, out, in) int8, alpha (k, out, ng) float32), `block` rows at
    a time (rows are fitted independently: the same bits whatever the block; a 49152-row table's
    float32 temporaries took ten times its size at once)."""
    w = np.asarray(w, np.float32)
    n_out, n_in = w.shape
    valid = _valid_mask(n_in, group)
    counts = valid.sum(axis=1).astype(np.float32)           # (ng,)
    signs = np.empty((k, n_out, n_in), np.int8)
    alpha = np.empty((k, n_out, valid.shape[0]), np.float32)
    for r0 in range(0, n_out, block):
        r = _grouped(w[r0:r0 + block], group).copy()
        rows = slice(r0, r0 + r.shape[0])
        for i in range(k):
            b = np.where(r < 0, np.float32(-1), np.float32(1))
            a = ((np.abs(r) * valid).sum(axis=2, dtype=np.float64) / counts).astype(np.float32)  # (rows, ng)
            r -= a[:, :, None] * b * valid
            signs[i, rows] = b.reshape(len(b), -1)[:, :n_in]
            alpha[i, rows] = a
    return signs, alpha


def expand_scales(alpha: np.ndarray, group: int, n_in: int) -> np.ndarray:
    """alpha (..., out, n_groups) -> (..., out, n_in): each group's scale on its inputs."""
    ng = alpha.shape[-1]
    idx = np.minimum(np.arange(n_in) // (n_in if ng == 1 else group), ng - 1)
    return alpha[..., idx]


def _levels(alpha: np.ndarray):
    """alpha (k, ...) -> (combos (2^k, k) of +-1, levels (2^k, ...) float64: exact sums of float32 scales)."""
    k = alpha.shape[0]
    combos = np.array(list(itertools.product((-1.0, 1.0), repeat=k)), np.float64)  # (2^k, k)
    return combos, np.tensordot(combos, alpha.astype(np.float64), axes=(1, 0))


def _nearest_index(x: np.ndarray, lev: np.ndarray) -> np.ndarray:
    """x (o, ...) and levels lev (L, o, ...) broadcastable to it -> index of the first nearest level
    (argmin's tie rule), one level at a time over slices of rows that stay in cache: no (L, ...)
    temporary."""
    shape = np.broadcast_shapes(x.shape, lev.shape[1:])
    best = np.zeros(shape, np.uint8 if lev.shape[0] <= 256 else np.intp)
    step = max(1, (1 << 15) // max(1, int(np.prod(shape[1:]))))   # rows per slice: ~32k elements
    for r0 in range(0, shape[0], step):
        xs, ls, bs = x[r0:r0 + step], lev[:, r0:r0 + step], best[r0:r0 + step]
        dist = np.abs(xs - ls[0])
        d, closer = np.empty_like(dist), np.empty(dist.shape, bool)
        for c in range(1, lev.shape[0]):
            np.abs(np.subtract(xs, ls[c], out=d), out=d)
            np.less(d, dist, out=closer)
            np.copyto(bs, c, where=closer)
            np.copyto(dist, d, where=closer)
    return best


def als_refine(w: np.ndarray, signs: np.ndarray, alpha: np.ndarray, group: int, iters: int = 4,
               rows_per_chunk: int = 4096):
    """Alternating least squares on (signs, alpha); returns refined copies."""
    w = np.asarray(w, np.float32)
    k, n_out, n_in = signs.shape
    valid = _valid_mask(n_in, group).astype(np.float32)     # (ng, gs)
    signs = signs.copy()
    alpha = alpha.astype(np.float32).copy()
    for r0 in range(0, n_out, rows_per_chunk):
        r1 = min(r0 + rows_per_chunk, n_out)
        wg = _grouped(w[r0:r1], group)                      # (o, ng, gs)
        for _ in range(iters):
            b = np.stack([_grouped(signs[i, r0:r1].astype(np.float32), group) for i in range(k)], 2)
            b *= valid[None, :, None, :]                     # (o, ng, k, gs)
            gram = np.einsum("onks,onhs->onkh", b, b).astype(np.float64)
            gram += 1e-6 * gram.shape[-1] * np.eye(k) * np.maximum(valid.sum(axis=1), 1)[None, :, None, None]
            rhs = np.einsum("onks,ons->onk", b, wg, dtype=np.float64)
            a = np.linalg.solve(gram, rhs[..., None])[..., 0]  # ridge keeps equal planes solvable
            alpha[:, r0:r1] = np.moveaxis(a, 2, 0).astype(np.float32)
            combos, lev = _levels(alpha[:, r0:r1])            # lev (2^k, o, ng)
            best = _nearest_index(wg, lev[..., None])         # (o, ng, gs)
            chosen = combos.astype(np.int8)[best]             # (o, ng, gs, k)
            for i in range(k):
                signs[i, r0:r1] = chosen[..., i].reshape(r1 - r0, -1)[:, :n_in]
    return signs, alpha


def fit_planes(w: np.ndarray, k: int, group: int, als_iters: int = 4) -> bits.PlaneMatrix:
    """The data-free recipe: greedy residual planes refined by `als_iters` ALS rounds."""
    bits.check_group(w.shape[1], group)
    if not 1 <= k <= bits.MAX_PLANES:
        raise ValueError(f"planes must be in 1..{bits.MAX_PLANES}, got {k}")
    signs, alpha = greedy_planes(w, k, group)
    if als_iters:
        signs, alpha = als_refine(w, signs, alpha, group, als_iters)
    return bits.PlaneMatrix.from_signs(signs, alpha, group)


def ternary_scale(w: np.ndarray) -> float | None:
    """If w holds only {-a, 0, +a} for one a > 0, return a; else None."""
    w = np.asarray(w, np.float32)
    nz = np.abs(w[w != 0])
    if nz.size == 0:
        return None
    a = float(nz.max())
    return a if np.all(nz == np.float32(a)) else None


def absmean_ternary(w: np.ndarray) -> tuple[np.ndarray, float]:
    """BitNet b1.58's weight quantization: t = round(clip(w / mean|w|, -1, 1)), scale mean|w|."""
    w = np.asarray(w, np.float32)
    gamma = max(float(np.abs(w).mean()), 1e-5)
    t = np.clip(np.round(w / gamma), -1, 1)
    return (t * gamma).astype(np.float32), gamma


def ternary_planes(w: np.ndarray) -> bits.PlaneMatrix:
    """Exactly two planes for a ternary matrix (one group per row)."""
    a = ternary_scale(w)
    if a is None:
        raise ValueError("matrix is not ternary {-a, 0, +a}")
    n_out, n_in = w.shape
    signs, alpha = bits.ternary_to_planes(w, np.full(n_out, a, np.float32))
    return bits.PlaneMatrix.from_signs(signs, alpha[:, :, None], n_in)


def reconstruction_error(w: np.ndarray, pm: bits.PlaneMatrix) -> float:
    """Relative Frobenius error ||W - W_hat|| / ||W||."""
    w = np.asarray(w, np.float32)
    return float(np.linalg.norm(w - pm.dequantize()) / max(np.linalg.norm(w), 1e-30))


def int8_rows(w: np.ndarray):
    """Per-row absmax int8: (q int8 (rows, cols), scale float32 (rows,)), w ~ q * scale."""
    w = np.asarray(w, np.float32)
    amax = np.abs(w).max(axis=1)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


# ---------------------------------------------------------------------------------------------
# calibration-aware fitting (issue 4): the error measured on real inputs, H = X^T X


def weighted_error(w: np.ndarray, pm: bits.PlaneMatrix, h: np.ndarray, block: int = 4096,
                   w_hat: np.ndarray | None = None) -> float:
    """Output error on the calibration inputs, relative: tr(E H E^T) / tr(W H W^T), E = W - W_hat;
    `block` rows at a time (a 49152-row head's products took 1 GB at once).  w_hat: pm
    dequantized (pm.dequantize_rows(0, out)), when the caller has it already.  A report: the
    products in float32 (E and W as stored, H rounded once), the sums in float64, within 1e-5
    relative of a float64 computation (tested) in half its time."""
    num = den = 0.0
    h32 = np.asarray(h, np.float32)
    for r0 in range(0, w.shape[0], block):
        r1 = min(r0 + block, w.shape[0])
        wb = np.asarray(w[r0:r1], np.float32)
        e = wb - np.asarray(pm.dequantize_rows(r0, r1) if w_hat is None else w_hat[r0:r1], np.float32)
        num += float(np.sum((e @ h32) * e, dtype=np.float64))   # matrix products: a three-operand einsum
        den += float(np.sum((wb @ h32) * wb, dtype=np.float64))  # would not use BLAS
    return float(num / max(den, 1e-30))


def _nearest_level(col: np.ndarray, alpha: np.ndarray, combos: np.ndarray):
    """col (out,), alpha (k, out) -> (value (out,), chosen combo rows (out, k))."""
    lev = combos @ alpha                               # (2^k, out)
    best = np.abs(col[None, :] - lev).argmin(axis=0)   # (out,)
    return lev[best, np.arange(col.size)], combos[best]


def native_chosen() -> bool:
    """Conversion's C kernels (GPTQ's column loop, calibration's rotation) run when they are built
    and EDGEPANEL_BACKEND does not name another backend (EDGEPANEL_BACKEND=numpy: the NumPy
    references)."""
    return native.lib is not None and os.environ.get("EDGEPANEL_BACKEND", "") in ("", "c")


class GptqPrep(NamedTuple):
    """What GPTQ needs of H, computed once for every matrix that reads the same inputs."""
    h: np.ndarray            # (in, in) damped H, float64, original column order
    hinv: np.ndarray         # upper Cholesky factor of the inverse of H in processing order
    dead: np.ndarray         # (in,) bool: inputs that are always zero
    order: np.ndarray        # (in,) processing order of the columns (act-order or 0..in-1)


def gptq_prepare(h: np.ndarray, damp: float = 0.01, act_order: bool = False) -> GptqPrep:
    """Damp H, choose the column order (act-order: by decreasing diag(H), the inputs with the most
    energy rounded first, while the most columns are left to absorb their error) and factor the
    inverse in that order.

    The factor U (upper, U^T U = H^-1) comes without inverting H: with J the reversal, J H J = L L^T
    (Cholesky) gives H = V V^T, V = J L J upper, so U = V^-1, a triangular inverse (a third of the
    work of inv + cholesky)."""
    h = np.array(h, np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    h += damp * np.mean(np.diag(h)) * np.eye(h.shape[0])
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(h.shape[0])
    hp = h[np.ix_(order, order)] if act_order else h
    v = np.ascontiguousarray(np.linalg.cholesky(np.ascontiguousarray(hp[::-1, ::-1]))[::-1, ::-1])
    return GptqPrep(h, _inv_upper(v), dead, order)


def _inv_upper(v: np.ndarray, leaf: int = 64) -> np.ndarray:
    """Inverse of an upper triangular matrix, by halves: [[A, B], [0, D]]^-1 =
    [[A^-1, -A^-1 B D^-1], [0, D^-1]], the products in BLAS."""
    n = v.shape[0]
    if n <= leaf:
        return np.triu(np.linalg.inv(v))
    m = n // 2
    a, d = _inv_upper(v[:m, :m], leaf), _inv_upper(v[m:, m:], leaf)
    out = np.zeros_like(v)
    out[:m, :m], out[m:, m:] = a, d
    out[:m, m:] = -(a @ v[:m, m:]) @ d
    return out


def gptq_planes(w: np.ndarray, h: np.ndarray, k: int, group: int, damp: float = 0.01, block: int = 128,
                als_iters: int = 2, refit: bool = True, prepared: GptqPrep | None = None,
                act_order: bool = False, row_block: int = 8192) -> bits.PlaneMatrix:
    """GPTQ-style fitting of k sign planes: columns one by one (left to right, or by decreasing
    diag(H) with act_order), each rounded to the nearest of its row's 2^k levels, the rounding
    error fed forward through H^-1 to the columns not yet rounded.  Groups stay the contiguous
    runs of `group` inputs the kernels read; each group's codebook (its k scales per row) is
    fitted, greedy + ALS, on the error-updated weights when its first column comes up.
    Optionally the scales are then refit jointly per row on the original weights (signs fixed,
    see refit_scales).  Left to right, the column loop runs in C (csrc/fit.c) when the kernels are
    built, with the same results; this NumPy loop is its reference and serves act-order.
    Rows are fitted independently (H is shared), `row_block` at a time: a 49152-row head's
    float64 copy and error feedback no longer exist whole (0.8 GB)."""
    w = np.asarray(w, np.float32)
    n_out, n_in = w.shape
    bits.check_group(n_in, group)
    prep = prepared if prepared is not None else gptq_prepare(h, damp, act_order)
    ng = bits.n_groups(n_in, group)
    signs = np.zeros((k, n_out, n_in), np.int8)
    alpha = np.zeros((k, n_out, ng), np.float32)
    for r0 in range(0, n_out, row_block):
        r1 = min(r0 + row_block, n_out)
        whole = r1 - r0 == n_out   # else the block's own (contiguous) arrays, copied in after
        s_b = signs if whole else np.zeros((k, r1 - r0, n_in), np.int8)
        a_b = alpha if whole else np.zeros((k, r1 - r0, ng), np.float32)
        _gptq_rows(w[r0:r1], prep, k, group, block, als_iters, s_b, a_b)
        if refit:
            a_b[...] = refit_alpha(w[r0:r1], s_b, group, prep.h)
        if not whole:
            signs[:, r0:r1], alpha[:, r0:r1] = s_b, a_b
    return bits.PlaneMatrix.from_signs(signs, alpha, group)


def _gptq_rows(w: np.ndarray, prep: GptqPrep, k: int, group: int, block: int, als_iters: int,
               signs: np.ndarray, alpha: np.ndarray) -> None:
    """gptq_planes on the rows w (float32): fills signs (k, rows, in) and alpha (k, rows, ng)."""
    n_in = w.shape[1]
    one_group = bits.n_groups(n_in, group) == 1
    g = n_in if one_group else group
    W = w.astype(np.float64)
    W[:, prep.dead] = 0.0
    B = n_in if one_group else max(block, g) // g * g   # columns per block: whole groups
    if native_chosen() and np.array_equal(prep.order, np.arange(n_in)):
        hinv = np.ascontiguousarray(prep.hinv, np.float64)
        for i1 in range(0, n_in, B):
            i2 = min(i1 + B, n_in)
            E1 = native.gptq_block(W, hinv, i1, i2, g, als_iters, signs, alpha)   # (out, i2 - i1)
            W[:, i2:] -= E1 @ hinv[i1:i2, i2:]
    else:
        _gptq_columns(W, prep, k, g, B, als_iters, signs, alpha)


def _gptq_columns(W: np.ndarray, prep: GptqPrep, k: int, g: int, B: int, als_iters: int,
                  signs: np.ndarray, alpha: np.ndarray) -> None:
    """gptq_planes' column loop in NumPy, in prep.order, on W (out, in) float64 (dead inputs
    zeroed): fills signs (k, out, in) and alpha (k, out, n_groups).  csrc/fit.c's reference."""
    n_in = W.shape[1]
    hinv, order = prep.hinv, prep.order
    pos_of = np.empty(n_in, np.int64)
    pos_of[order] = np.arange(n_in)
    W = W[:, order]                                  # columns in processing order
    combos = np.array(list(itertools.product((-1.0, 1.0), repeat=k)), np.float64)  # (2^k, k)
    books: list[np.ndarray | None] = [None] * alpha.shape[2]  # (k, out) float64 per group, once fitted
    for i1 in range(0, n_in, B):
        i2 = min(i1 + B, n_in)
        W1 = W[:, i1:i2].copy()
        E1 = np.zeros_like(W1)
        H1 = hinv[i1:i2, i1:i2]
        for j in range(i2 - i1):
            col = int(order[i1 + j])
            gi = col // g
            if books[gi] is None:  # the group's columns as error feedback has left them (none rounded yet)
                ps = pos_of[gi * g:min(gi * g + g, n_in)]
                part = np.where(ps[None, :] < i2, W1[:, np.clip(ps - i1, 0, i2 - i1 - 1)], W[:, ps])
                part = part.astype(np.float32)
                s0, a0 = greedy_planes(part, k, part.shape[1])
                if als_iters:
                    s0, a0 = als_refine(part, s0, a0, part.shape[1], als_iters)
                books[gi] = a0[:, :, 0].astype(np.float64)
                alpha[:, :, gi] = books[gi]
            q, chosen = _nearest_level(W1[:, j], books[gi], combos)
            signs[:, :, col] = chosen.T.astype(np.int8)
            err = (W1[:, j] - q) / H1[j, j]
            W1[:, j:] -= np.outer(err, H1[j, j:])
            E1[:, j] = err
        W[:, i2:] -= E1 @ hinv[i1:i2, i2:]


def refit_scales(w: np.ndarray, pm: bits.PlaneMatrix, h: np.ndarray, rows_per_chunk: int = 32) -> bits.PlaneMatrix:
    """Every scale of a row at once, signs fixed: minimise (w - B a)^T H (w - B a) per row, with
    B the row's planes split by groups (n_groups * k unknowns, one small solve per row)."""
    S = pm.signs()                                         # (k, out, in) int8
    alpha = refit_alpha(w, S, pm.group, h, rows_per_chunk)
    return bits.PlaneMatrix.from_signs(S, alpha.astype(np.float32), pm.group)


def refit_alpha(w: np.ndarray, S: np.ndarray, group: int, h: np.ndarray, rows_per_chunk: int = 32,
                threads: int | None = None) -> np.ndarray:
    """refit_scales' scales, (k, out, n_groups) float64, for signs S (k, out, in).

    Per row the normal equations are A a = b, A[(g,i), (g',i')] = s_gi^T H[g, g'] s_g'i' and
    b[(g,i)] = s_gi^T (H w)[g], s_gi the row's signs of plane i on group g.  Built from matrix
    products (H symmetric): P_g = S[:, rows, g] @ H[g, g:] for every group (half of H: A is
    symmetric), then the block row of group g against all groups g' <= g as one stacked product
    of each row's (k, |g|) signs with its P columns of g.

    The products run in float32 (the signs exact, H and w rounded once), the solve in float64:
    1.4x faster on SmolLM2's layers, whose errors the scales leave are the float64 refit's to
    3e-8 relative (1e-6 on ill-conditioned inputs, tests/test_fit.py), since an optimum is
    stationary: A's and b's rounding moves the scales by about 1e-5 relative and the error by
    its square.

    The chunks of rows are independent: `threads` workers (default: the usable CPUs, at most
    four: each holds a buffer of up to 32 MiB) take them in turn, each with BLAS held to one
    thread (threadpoolctl).  BLAS's own threads split these products (K = one group's width)
    badly: on two cores they spun waiting on each other, and the refit took 1.4x the time.  Every
    chunk is computed the same way whatever the number of workers, so the scales' bits do not
    depend on it."""
    w = np.asarray(w, np.float32)
    h = np.asarray(h, np.float32)
    n_out, n_in = w.shape
    k = S.shape[0]
    bounds = bits.group_bounds(n_in, group)
    ng = len(bounds)
    starts = [c0 for c0, _ in bounds]
    m = ng * k
    rows = max(1, min(rows_per_chunk, n_out, (32 << 20) // (4 * m * n_in)))  # P: <= 32 MiB
    chunks = list(range(0, n_out, rows))
    new_alpha = np.empty((k, n_out, ng))
    hw = w @ h                                             # (out, in): one large product, BLAS's threads
    with _blas_one_thread() as held:
        def run(r0: int, P_buf: np.ndarray):
            r1 = min(r0 + rows, n_out)
            R = r1 - r0
            s = S[:, r0:r1].astype(np.float32)             # (k, R, in)
            # P[(g, i), r, u] = S_i[r, g] @ H[g, u], for u in group g and after it
            P = P_buf[:m * R * n_in].reshape(m, R, n_in)
            for gi, (c0, c1) in enumerate(bounds):
                np.matmul(s[:, :, c0:c1].reshape(k * R, c1 - c0), h[c0:c1, c0:],
                          out=P[gi * k:(gi + 1) * k, :, c0:].reshape(k * R, n_in - c0))
            A = np.empty((R, m, m))
            for gi, (c0, c1) in enumerate(bounds):
                mg = (gi + 1) * k
                sg = s[:, :, c0:c1].transpose(1, 0, 2)                       # (R, k, |g|)
                blk = np.matmul(sg, P[:mg, :, c0:c1].transpose(1, 2, 0))     # (R, k, mg): (g, i) x (g' <= g, i')
                A[:, :mg, gi * k:mg] = blk.transpose(0, 2, 1)                # the mirror first: the diagonal
                A[:, gi * k:mg, :mg] = blk                                   # block keeps blk's own entries
            b = np.add.reduceat(s * hw[r0:r1], starts, axis=2, dtype=np.float64)   # (k, R, ng)
            b = b.transpose(1, 2, 0).reshape(R, m)                           # (R, (g, i))
            tr = np.trace(A, axis1=1, axis2=2) / m
            A.reshape(R, m * m)[:, ::m + 1] += (1e-7 * tr + 1e-12)[:, None]   # the ridge, on the diagonals
            a = np.linalg.solve(A, b[..., None])[..., 0]      # (R, m)
            new_alpha[:, r0:r1, :] = a.reshape(R, ng, k).transpose(2, 0, 1)

        def worker(first: int, step: int):
            P_buf = np.empty(m * rows * n_in, np.float32)   # once a worker: fresh pages for every chunk cost more
            for r0 in chunks[first::step]:
                run(r0, P_buf)

        workers = min(len(chunks), threads or min(usable_cpus(), 4)) if held else 1
        if workers <= 1:
            worker(0, 1)
        else:
            with ThreadPoolExecutor(workers) as pool:
                for f in [pool.submit(worker, i, workers) for i in range(workers)]:
                    f.result()
    return new_alpha


@contextlib.contextmanager
def _blas_one_thread():
    """BLAS held to one thread inside the block (yields True), when threadpoolctl can do it; else
    nothing changes (yields False)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield False
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield True
