"""The bit budget (--bits): planes and group per tensor by estimated sensitivity, so that the
average bits per weight, scales included, stay within the budget."""
from __future__ import annotations

import heapq
import time
from typing import TYPE_CHECKING

import numpy as np

from .. import bits, quantize
from ..errors import FormatError
from ..model import reference as ref

if TYPE_CHECKING:
    from .calibrate import _Run


def nominal_bits(k: int, group: int, n_in: int | None = None, scales: str = "f16") -> float:
    """Bits per weight of k planes with one scale per plane and group, float16 or 8-bit (plus a
    float32 multiplier per row); with n_in: of rows of n_in inputs, where the last group may be
    short or the row one group."""
    per = 16.0 if scales == "f16" else 8.0
    if n_in is None:
        return k * (1.0 + per / group)
    return k * (1.0 + per * bits.n_groups(n_in, group) / n_in) + (32.0 / n_in if scales == "u8" else 0.0)


INT8_ROWS = "int8"


def format_bits(fmt, n_in: int, scales: str = "f16") -> float:
    """Bits per weight of a format: (planes, group), or int8 rows (a float32 scale per row)."""
    return 8.0 + 32.0 / n_in if fmt == INT8_ROWS else nominal_bits(fmt[0], fmt[1], n_in, scales)


def _gptq_weights(h: np.ndarray, damp: float) -> np.ndarray:
    """d_j = 1 / U_jj^2 (U the upper Cholesky factor of H^-1): rounding input j's weight by e
    under GPTQ's error feedback costs about e^2 d_j of output error (OBQ's loss of one column,
    the columns after it absorbing what they can), against e^2 H_jj without feedback."""
    u = quantize.gptq_prepare(h, damp).hinv
    return 1.0 / np.diag(u) ** 2


def greedy_losses(w: np.ndarray, planes, groups, weigh, block: int = 4096) -> dict:
    """{(k, g): estimated loss} for k in `planes`, g in `groups`: one greedy fit of max(planes)
    planes per group size, `block` rows at a time (the fit and every estimate are sums over
    rows), each row block's errors E = W - W_hat handed to weigh(rows, E^2 in float64) as soon
    as they exist and the results summed.  A 49152-row head or embedding table so never has its
    fits or errors whole (the nine (k, g) errors of SmolLM2's head took 1 GB, more in float64)."""
    losses: dict = {}
    w = np.asarray(w, np.float32)
    kmax = max(planes)
    for g in sorted(set(groups)):
        for r0 in range(0, w.shape[0], block):
            wb = w[r0:r0 + block]
            s, a = quantize.greedy_planes(wb, kmax, g)
            approx = np.zeros_like(wb)
            for k in range(1, kmax + 1):
                approx += quantize.expand_scales(a[k - 1], g, w.shape[1]) * s[k - 1]
                if k in planes:
                    e = (wb - approx).astype(np.float64)
                    losses[(k, g)] = losses.get((k, g), 0.0) + weigh(slice(r0, r0 + len(wb)), e * e)
    return losses


def int8_loss(w: np.ndarray, weigh, block: int = 4096) -> float:
    """The estimated loss of int8 rows (each row rounded on its own, no error feedback), `block`
    rows at a time as greedy_losses."""
    q, scale = quantize.int8_rows(w)
    total = 0.0
    for r0 in range(0, w.shape[0], block):
        rs = slice(r0, r0 + block)
        e = w[rs].astype(np.float64) - q[rs].astype(np.float64) * scale[rs, None]
        total += weigh(rs, e * e)
    return total


def plan_bits(run: _Run, tokens: np.ndarray, budget: float, log, sens_seqs: int = 8):
    """Formats per tensor under an average of `budget` bits per weight, scales included.

    Candidates: every binarized linear layer takes (planes, group) with planes in
    recipe.bits_planes and group in recipe.bits_groups; embeddings and head, when their format
    is "auto", take int8 rows or such planes, and the budget counts them too.  A format's cost
    is its estimated loss increase, from a data-free (greedy) fit W_hat with E = W - W_hat:
      linear layers and head: 1/2 sum_r f_r sum_j E_rj^2 d_j, f_r the mean squared loss
        gradient of output r, d_j GPTQ's per-column weight (see _gptq_weights) from H = E[x x^T]
        of the layer's inputs -- the fitting that follows feeds errors back through H;
      embeddings (rows looked up, not multiplied): 1/2 sum_d f_d E_tok[e_tok,d^2], f_d the mean
        squared loss gradient at the embedding output, E_tok over the calibration tokens' rows
        (add-one smoothed);
    f and H from the float model on `sens_seqs` calibration sequences (recover.sensitivity,
    needs torch).  Without torch: the relative output error times the layer's size, and
    embeddings and head stay int8 rows.  Allocation: per tensor, the lower convex hull of its
    (bits, estimated loss) points; then hull steps, steepest loss decrease per bit first,
    while they fit the budget.
    Returns ({linear or head: (planes, group)}, {"embed"/"head": format} for the "auto" ones)."""
    from . import recover

    r, fm = run.r, run.fm
    t = fm.t
    names = [n for n, e in t.items() if e.role == "linear" and not (e.ternary or e.absmean or r.keeps(n))]
    torch_ok = recover.available()
    auto_rows = [role for role in ("embed", "head") if role in t and getattr(r, role) == "auto"]
    if auto_rows and not torch_ok:
        log("torch is not installed: embeddings and head stay int8 rows outside the bit budget")
        auto_rows = []
    sizes = {n: t[n].weight.size for n in names + auto_rows}

    def options(n):
        n_in = t[n].weight.shape[1]
        gs = sorted({g if g < n_in else n_in for g in r.bits_groups})
        out = [(k, g) for k in r.bits_planes for g in gs]
        return out + ([INT8_ROWS] if n in auto_rows else [])

    def planes_losses(n, weigh):
        opts = [o for o in options(n) if o != INT8_ROWS]
        return greedy_losses(t[n].weight, r.bits_planes, [o[1] for o in opts], weigh)

    t0 = time.time()
    est: dict[str, dict] = {}
    if torch_ok:
        # each distinct H reduced at once to all that is used of it: GPTQ's column weights, and
        # its diagonal (int8 rows, rounded without error feedback)
        stats = recover.sensitivity(fm, tokens[:sens_seqs], log,
                                    reduce=lambda h: (_gptq_weights(h, r.damp), np.diag(h).copy()))
        def output_weighted(n):   # 1/2 sum_r f_r sum_j E_rj^2 d_j over the rows given
            f, (d, _) = stats[n]
            return lambda rs, e2: float(0.5 * (f[rs] @ e2 @ d))

        for n in names + [x for x in auto_rows if x == "head"]:
            est[n] = planes_losses(n, output_weighted(n))
        if "embed" in auto_rows:
            f, p = stats["embed"]
            tied = "head" not in t   # the table is the head too: its error counts there as well
            as_head = output_weighted("head") if tied else (lambda rs, e2: 0.0)
            est["embed"] = planes_losses("embed", lambda rs, e2: float(0.5 * (p[rs] @ e2 @ f)) + as_head(rs, e2))
        how = "output-gradient-weighted error"
    else:   # the float layers, each layer's inputs kept as it runs
        ops, positions, x = run.stream(tokens, fit=False)
        for i in range(fm.cfg.n_layers):
            ops.acts = {}
            x = ref.block(ops, fm.cfg, i, x, positions)
            seen = {}
            for n, xin in ops.acts.items():
                if n not in sizes:
                    continue
                if id(xin) not in seen:
                    xf = xin.astype(np.float32)
                    h = (xf.T @ xf).astype(np.float64) / len(xf)
                    seen[id(xin)] = (h, _gptq_weights(h, r.damp))
                h, d = seen[id(xin)]
                w = t[n].weight.astype(np.float64)
                total = max(float(np.sum((w @ h) * w)), 1e-30)
                est[n] = planes_losses(n, lambda rs, e2, d=d, n=n, total=total: sizes[n] * float((e2 @ d).sum()) / total)
        how = "relative output error x size (no torch)"
    for n in auto_rows:   # int8 rows: rounded each on its own (no error feedback)
        fh, (_, hdiag) = stats["head"]
        as_head = lambda rs, e2: float(0.5 * (fh[rs] @ e2 @ hdiag))  # noqa: E731
        if n == "head":
            est[n][INT8_ROWS] = int8_loss(t[n].weight, as_head)
        else:
            f, p = stats[n]
            tied = "head" not in t
            est[n][INT8_ROWS] = int8_loss(t[n].weight, lambda rs, e2: float(0.5 * (p[rs] @ e2 @ f))
                                          + (as_head(rs, e2) if tied else 0.0))
    log(f"estimated the loss of {sum(len(v) for v in est.values())} formats for {len(est)} tensors "
        f"({how}, {time.time() - t0:.0f} s)")

    # per tensor: the lower convex hull of (bits, estimated loss), cheapest first
    hulls = {}
    for n, opts in est.items():
        n_in = t[n].weight.shape[1]
        pts = sorted(((format_bits(o, n_in, r.scales), v, o) for o, v in opts.items()), key=lambda p: (p[0], p[1]))
        hull = []
        for p_ in pts:
            if hull and p_[1] >= hull[-1][1]:
                continue  # costs more bits for no less loss
            while len(hull) >= 2:
                (b1, v1, _), (b2, v2, _) = hull[-2], hull[-1]
                if (v2 - v1) * (p_[0] - b1) >= (p_[1] - v1) * (b2 - b1):  # hull[-1] lies above the chord
                    hull.pop()
                else:
                    break
            hull.append(p_)
        hulls[n] = hull
    total = sum(sizes.values())
    if not total:
        return {}, {}
    at = {n: 0 for n in hulls}
    used = sum(sizes[n] * hulls[n][0][0] for n in hulls)
    limit = budget * total
    if used > limit + 1e-6 * total:
        raise FormatError(f"--bits {budget}: even the smallest formats take {used / total:.2f} bits per weight")
    heap = []

    def push(n):
        i = at[n]
        if i + 1 < len(hulls[n]):
            (b0, v0, _), (b1, v1, _) = hulls[n][i], hulls[n][i + 1]
            cost = sizes[n] * (b1 - b0)
            heapq.heappush(heap, ((v1 - v0) / cost, n, cost))

    for n in hulls:
        push(n)
    while heap:
        _, n, cost = heapq.heappop(heap)
        if used + cost > limit:
            continue
        at[n] += 1
        used += cost
        push(n)
    chosen = {n: hulls[n][at[n]][2] for n in hulls}
    rows = {n: ("int8" if chosen[n] == INT8_ROWS else chosen[n]) for n in auto_rows}
    formats = {n: o for n, o in chosen.items() if o != INT8_ROWS}
    counts: dict = {}
    for n in names:
        counts[chosen[n]] = counts.get(chosen[n], 0) + 1
    log(f"formats for {budget} bits/weight: {used / total:.3f} used; linear layers by (planes, group): "
        + ", ".join(f"k{k}g{g}: {c}" for (k, g), c in sorted(counts.items()))
        + "".join(f"; {n}: {rows[n] if rows[n] == 'int8' else 'k%dg%d' % rows[n]}" for n in auto_rows))
    log("formats per layer: " + " ".join(f"{n.replace('layers.', '')}=k{o[0]}g{o[1]}" for n, o in formats.items()))
    return formats, rows
