"""Calibration-aware binarization: fit every linear layer against the inputs it really sees.

The model is held in float32 (source precision); then, optionally,
  1. rotation (RMS-norm models): norm weights fused into the next linear layers, the residual
     stream rotated by an orthogonal T (embeddings, every input and output of the blocks, head;
     exact offline; the tied head becomes its own matrix), each value head rotated (v_proj rows,
     o_proj columns; exact offline), and the MLP's inner activations rotated before down_proj
     (weights offline, activations at run time);
  2. one pass over the calibration tokens, layer by layer, through the already binarized layers:
     each layer's inputs X give H = X^T X, each linear layer is fitted by GPTQ-style error
     feedback with per-group codebooks, then its scales are refit jointly on H;
  3. the head, when binarized, the same way on the final hidden states.
Memory: the float model plus one layer's activations for the calibration tokens.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

from .. import bits, quantize
from ..errors import FormatError
from ..model import names as N
from ..model import reference as ref
from ..model.config import ModelConfig
from ..model.weights import Linear, Norm
from ..rotation import Rotation
from .base import Emitted

DEFAULT_CALIB = Path(__file__).resolve().parents[1] / "data" / "calib.txt"


def default_calib_edition() -> int:
    """The shipped calibration text's edition, from the recipe line tools/make_calib.py wrote."""
    import json
    try:
        head = DEFAULT_CALIB.open(encoding="utf-8").readline()
        return int(json.loads(head.split("recipe:", 1)[1]).get("edition", 1))
    except (OSError, IndexError, ValueError):
        return 0


class FloatModel:
    """Every tensor of the source, in edgepanel's names, float32."""

    def __init__(self, cfg: ModelConfig, emitted):
        self.cfg = cfg
        self.t: dict[str, Emitted] = {e.name: e for e in emitted}
        self.rotation: Rotation | None = None

    def w(self, name):
        return self.t[name].weight

    def set(self, name, weight=None, bias=None):
        e = self.t[name]
        if weight is not None:
            e.weight = np.ascontiguousarray(weight, np.float32)
        if bias is not None:
            e.bias = np.ascontiguousarray(bias, np.float32)


def can_rotate(cfg: ModelConfig) -> bool:
    return cfg.norm == "rms" and not cfg.sub_norms and cfg.pos == "rope"


def rotate(fm: FloatModel, seed: int = 0):
    """Fuse the norm weights and rotate (see the module docstring); outputs are unchanged."""
    cfg, t = fm.cfg, fm.t
    if not can_rotate(cfg):
        raise FormatError(f"rotation needs an RMS-norm rope model without sub-norms ({cfg.arch} is not)")
    res = Rotation.random(cfg.dim, seed)
    if cfg.tie_embeddings:  # the head gets its own matrix: it absorbs the final norm
        t["head"] = Emitted("head", "head", t["embed"].weight.copy())
        fm.cfg = cfg = dataclasses.replace(cfg, tie_embeddings=False)
    t["head"].weight = t["head"].weight * t["final_norm"].weight[None, :]
    t["final_norm"].weight = np.ones(cfg.dim, np.float32)
    fm.set("embed", res.apply(t["embed"].weight))
    fm.set("head", res.apply(t["head"].weight))
    G = cfg.n_heads // cfg.n_kv_heads
    for i in range(cfg.n_layers):
        L = lambda p: N.layer(i, p)  # noqa: E731
        for norm, lins in (("attn_norm", ("wq", "wk", "wv")), ("mlp_norm", ("w_gate", "w_up"))):
            gamma = t[L(norm)].weight
            for lin in lins:
                if L(lin) in t:
                    fm.set(L(lin), res.apply(t[L(lin)].weight * gamma[None, :]))
            t[L(norm)].weight = np.ones(cfg.dim, np.float32)
        for lin in ("wo", "w_down"):
            e = t[L(lin)]
            fm.set(L(lin), res.apply_columns(e.weight), None if e.bias is None else res.apply(e.bias))
        # value heads: rows of v_proj (and its bias), the matching columns of o_proj
        wv, wo, hd = t[L("wv")].weight.copy(), t[L("wo")].weight.copy(), cfg.head_dim
        bv = None if t[L("wv")].bias is None else t[L("wv")].bias.copy()
        for kh in range(cfg.n_kv_heads):
            rot = Rotation.random(hd, seed + 1000 + i * cfg.n_kv_heads + kh)
            sl = slice(kh * hd, (kh + 1) * hd)
            wv[sl] = rot.apply_columns(wv[sl])
            if bv is not None:
                bv[sl] = rot.apply(bv[sl])
            for h in range(kh * G, (kh + 1) * G):
                hs = slice(h * hd, (h + 1) * hd)
                wo[:, hs] = rot.apply(wo[:, hs])
        fm.set(L("wv"), wv, bv)
        fm.set(L("wo"), wo)
    mlp = Rotation.random(cfg.hidden_dim, seed + 1)
    for i in range(cfg.n_layers):
        fm.set(N.layer(i, "w_down"), mlp.apply(t[N.layer(i, "w_down")].weight))
    fm.rotation = mlp
    fm.cfg = dataclasses.replace(fm.cfg, mlp_rotation=True)


def calibration_tokens(tokenizer_json: str | None, text: str, n_tokens: int, seq_len: int, where: str) -> np.ndarray:
    """(S, seq_len) token ids: S = n_tokens // seq_len windows spread evenly over `text` (all of
    it is sampled however long it is), or as many as it holds."""
    if not tokenizer_json:
        raise FormatError(f"{where}: calibration needs the model's tokenizer; this source has none "
                          "(convert with --no-calib)")
    from tokenizers import Tokenizer
    tok = Tokenizer.from_str(tokenizer_json)
    ids = tok.encode(text).ids
    S = min(n_tokens // seq_len, len(ids) // seq_len)
    if S < 1:
        raise FormatError(f"calibration text has {len(ids)} tokens; at least {seq_len} are needed")
    starts = np.linspace(0, len(ids) - seq_len, S).astype(np.int64)
    ids = np.asarray(ids, np.int32)
    return np.stack([ids[s0:s0 + seq_len] for s0 in starts])


class _Run:
    """The calibration pass: activations flow through the layers as they get binarized."""

    def __init__(self, fm: FloatModel, recipe, log):
        self.fm, self.r, self.log = fm, recipe, log
        from .. import kernels
        self.kern = kernels.get()
        self.results: dict[str, tuple] = {}     # name -> (PlaneMatrix or None, error)
        self.fit_seconds = 0.0
        self._cache_key, self._cache = None, None
        self.format_of: dict[str, tuple[int, int]] = {}   # (planes, group) per tensor from a bit budget

    def fit(self, name: str, x: np.ndarray, x_fp: np.ndarray | None = None, fmt: tuple[int, int] | None = None):
        """Binarize linear `name` on its inputs x (N, in) -- the inputs the binarized model
        produces -- so that its outputs match the float layer's on the float model's inputs
        x_fp: min ||x W_hat^T - x_fp W^T||, i.e. GPTQ on H = x^T x of the compensated weights
        W* = W (x_fp^T x) H^-1, which also absorb the error of the layers before.  Returns its
        Linear for the forward."""
        e = self.fm.t[name]
        out, inp = e.weight.shape
        if e.ternary or e.absmean:  # BitNet: exactly two planes, nothing to fit
            self.results[name] = (None, 0.0)
            w = e.weight if e.ternary else quantize.absmean_ternary(e.weight)[0]
            return Linear(name, out, inp, planes=quantize.ternary_planes(w), bias=e.bias)
        if self.r.keeps(name):
            self.results[name] = (None, 0.0)
            return Linear(name, out, inp, weight=e.weight, bias=e.bias)
        t0 = time.time()
        if not (self._cache_key and self._cache_key[0] is x and self._cache_key[1] is x_fp):
            # q/k/v (and gate/up) read the same inputs: H once (the key holds them, so no other
            # array can take their place)
            xf = x.astype(np.float32)
            n = max(len(xf), 1)
            h = (xf.T @ xf).astype(np.float64) / n
            prep = quantize.gptq_prepare(h, self.r.damp, self.r.act_order)
            c = None
            if x_fp is not None and self.r.compensate:
                c = (xf.T @ x_fp.astype(np.float32)).astype(np.float64) / n  # x^T x_fp
            self._cache_key, self._cache = (x, x_fp), (h, prep, c)
        h, prep, c = self._cache
        target = e.weight
        compensate = c is not None and (self.r.compensate is True or
                                        (self.r.compensate == "residual" and name.split(".")[-1] in ("wo", "w_down")))
        if compensate:
            # W* = W C^T H_damped^-1
            target = ((e.weight.astype(np.float64) @ c.T) @ np.linalg.inv(prep.h)).astype(np.float32)
        k, group = fmt or self.format_of.get(name) or (self.r.planes, self.r.group_for(inp))
        pm = quantize.gptq_planes(target, h, k, group, damp=self.r.damp, refit=self.r.refit, prepared=prep,
                                  rounds=self.r.rounds)
        self.results[name] = (pm, quantize.weighted_error(target, pm, h))
        self.fit_seconds += time.time() - t0
        return Linear(name, out, inp, planes=pm, bias=e.bias)

    def linear(self, lin: Linear, x: np.ndarray) -> np.ndarray:
        if lin.planes is None:
            return ref.linear(lin, x)
        q, s = self.kern.quantize_i8(np.ascontiguousarray(x, np.float32))
        y = self.kern.gemm_planes_i8(q, s, lin.planes)
        return y + lin.bias if lin.bias is not None else y

    def block(self, i: int, x: np.ndarray, x_fp: np.ndarray | None, S: int, Lq: int, inv_freq, fit: bool):
        """Layer i on x (S*Lq, dim).  fit=True: binarize its linear layers on the way (x_fp: the
        float model's inputs, for compensation); fit=False: the float layer."""
        cfg, t = self.fm.cfg, self.fm.t
        L = lambda p: N.layer(i, p)  # noqa: E731
        norm = lambda name: Norm(t[L(name)].weight, t[L(name)].bias)  # noqa: E731
        dense = lambda name: Linear(name, *t[name].weight.shape, weight=t[name].weight, bias=t[name].bias)  # noqa: E731
        pos = np.arange(Lq)
        acts = {}

        def lin(name, inp, inp_fp):
            if not fit:
                acts[name] = inp
                return dense(L(name))
            return self.fit(L(name), inp, None if inp_fp is None else inp_fp[name])

        h = ref.norm(cfg, norm("attn_norm"), x)
        qkv = [lin(n, h, x_fp) for n in ("wq", "wk", "wv")]
        q, k, v = (self.linear(m, h) for m in qkv)
        att = np.empty((S * Lq, cfg.q_dim), np.float32)
        for s in range(S):
            sl = slice(s * Lq, (s + 1) * Lq)
            qs = q[sl].reshape(Lq, cfg.n_heads, cfg.head_dim)
            ks = k[sl].reshape(Lq, cfg.n_kv_heads, cfg.head_dim)
            if inv_freq is not None:
                qs, ks = ref.rope(qs, pos, inv_freq), ref.rope(ks, pos, inv_freq)
            vs = v[sl].reshape(Lq, cfg.n_kv_heads, cfg.head_dim)
            att[sl] = ref.attention(cfg, qs, ks, vs, pos).reshape(Lq, cfg.q_dim)
        if cfg.sub_norms:
            att = ref.rms_sub_norm(cfg, norm("attn_sub_norm"), att)
        wo = lin("wo", att, x_fp)
        x = x + self.linear(wo, att)
        h = ref.norm(cfg, norm("mlp_norm"), x)
        if cfg.gated_mlp:
            gate, up = lin("w_gate", h, x_fp), lin("w_up", h, x_fp)
            u = ref.activation(cfg, self.linear(gate, h)) * self.linear(up, h)
        else:
            up = lin("w_up", h, x_fp)
            u = ref.activation(cfg, self.linear(up, h))
        if cfg.sub_norms:
            u = ref.rms_sub_norm(cfg, norm("mlp_sub_norm"), u)
        if self.fm.rotation is not None:
            u = self.fm.rotation.apply_blas(u)
        u = u.astype(np.float32)
        down = lin("w_down", u, x_fp)
        return x + self.linear(down, u), acts

    def run(self, tokens: np.ndarray):
        fm, cfg, t = self.fm, self.fm.cfg, self.fm.t
        S, Lq = tokens.shape
        x = t["embed"].weight[tokens.reshape(-1)].astype(np.float32)      # (S*L, dim)
        if cfg.pos == "learned":
            x += np.tile(t["pos_embed"].weight[:Lq], (S, 1))
        inv_freq = cfg.rope_inv_freq() if cfg.pos == "rope" else None
        x_fp = x.copy() if self.r.compensate else None
        t0 = time.time()
        for i in range(cfg.n_layers):
            acts = None
            if x_fp is not None:  # the float layer first: its inputs are the targets' inputs
                x_fp_next, acts = self.block(i, x_fp, None, S, Lq, inv_freq, fit=False)
            x, _ = self.block(i, x, acts, S, Lq, inv_freq, fit=True)
            if x_fp is not None:
                x_fp = x_fp_next
            self.log(f"calibrated layer {i + 1}/{cfg.n_layers} ({time.time() - t0:.0f} s, fitting {self.fit_seconds:.0f} s)")
        return ref.norm(cfg, Norm(t["final_norm"].weight, t["final_norm"].bias), x)


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


def plan_bits(run: "_Run", tokens: np.ndarray, budget: float, log, sens_seqs: int = 8):
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
    import heapq

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

    def greedy_errors(w, n):
        """{(k, g): E} for every planes option of n, from one greedy fit per group size."""
        errs = {}
        w = np.asarray(w, np.float32)
        for g in sorted({o[1] for o in options(n) if o != INT8_ROWS}):
            s, a = quantize.greedy_planes(w, max(r.bits_planes), g)
            approx = np.zeros_like(w)
            for k in range(1, max(r.bits_planes) + 1):
                approx += quantize.expand_scales(a[k - 1], g, w.shape[1]) * s[k - 1]
                if k in r.bits_planes:
                    errs[(k, g)] = w - approx
        return errs

    t0 = time.time()
    est: dict[str, dict] = {}
    if torch_ok:
        stats = recover.sensitivity(fm, tokens[:sens_seqs], log)
        for n in names + [x for x in auto_rows if x == "head"]:
            f, h = stats[n]
            d = _gptq_weights(h, r.damp)
            est[n] = {o: float(0.5 * (f @ (e.astype(np.float64) ** 2) @ d)) for o, e in greedy_errors(t[n].weight, n).items()}
        if "embed" in auto_rows:
            f, p = stats["embed"]
            tied = "head" not in t   # the table is the head too: its error counts there as well
            fh, dh = (stats["head"][0], _gptq_weights(stats["head"][1], r.damp)) if tied else (None, None)
            est["embed"] = {}
            for o, e in greedy_errors(t["embed"].weight, "embed").items():
                e2 = e.astype(np.float64) ** 2
                est["embed"][o] = float(0.5 * (p @ e2 @ f)) + (float(0.5 * (fh @ e2 @ dh)) if tied else 0.0)
        how = "output-gradient-weighted error"
    else:
        S, Lq = tokens.shape
        cfg = fm.cfg
        x = t["embed"].weight[tokens.reshape(-1)].astype(np.float32)
        if cfg.pos == "learned":
            x += np.tile(t["pos_embed"].weight[:Lq], (S, 1))
        inv_freq = cfg.rope_inv_freq() if cfg.pos == "rope" else None
        for i in range(cfg.n_layers):
            x, acts = run.block(i, x, None, S, Lq, inv_freq, fit=False)
            seen = {}
            for short, xin in acts.items():
                n = N.layer(i, short)
                if n not in sizes:
                    continue
                if id(xin) not in seen:
                    xf = xin.astype(np.float32)
                    h = (xf.T @ xf).astype(np.float64) / len(xf)
                    seen[id(xin)] = (h, _gptq_weights(h, r.damp))
                h, d = seen[id(xin)]
                w = t[n].weight.astype(np.float64)
                total = max(float(np.sum((w @ h) * w)), 1e-30)
                est[n] = {o: sizes[n] * float(((e.astype(np.float64) ** 2) @ d).sum()) / total
                          for o, e in greedy_errors(t[n].weight, n).items()}
        how = "relative output error x size (no torch)"
    for n in auto_rows:   # int8 rows: rounded each on its own (no error feedback)
        q, s_ = quantize.int8_rows(t[n].weight)
        e2 = (t[n].weight.astype(np.float64) - q.astype(np.float64) * s_[:, None]) ** 2
        fh, hh = stats["head"]
        head_term = float(0.5 * (fh @ e2 @ np.diag(hh)))
        if n == "head":
            est[n][INT8_ROWS] = head_term
        else:
            f, p = stats[n]
            est[n][INT8_ROWS] = float(0.5 * (p @ e2 @ f)) + (head_term if "head" not in t else 0.0)
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


def to_weights(fm: FloatModel):
    """The float model as engine Weights (every layer dense), e.g. for the reference forward."""
    from ..model.weights import Layer, Rows, Weights
    cfg, t = fm.cfg, fm.t

    def lin(name):
        if name not in t:
            return None
        e = t[name]
        return Linear(name, e.weight.shape[0], e.weight.shape[1], weight=e.weight, bias=e.bias)

    def norm(name):
        return Norm(t[name].weight, t[name].bias) if name in t else None

    layers = []
    for i in range(cfg.n_layers):
        L = lambda p: N.layer(i, p)  # noqa: E731
        layers.append(Layer(attn_norm=norm(L("attn_norm")), wq=lin(L("wq")), wk=lin(L("wk")), wv=lin(L("wv")),
                            wo=lin(L("wo")), mlp_norm=norm(L("mlp_norm")), w_up=lin(L("w_up")),
                            w_down=lin(L("w_down")), w_gate=lin(L("w_gate")),
                            attn_sub_norm=norm(L("attn_sub_norm")), mlp_sub_norm=norm(L("mlp_sub_norm"))))
    rows = lambda name: Rows(name, *t[name].weight.shape, weight=t[name].weight)  # noqa: E731
    return Weights(cfg=cfg, embed=rows("embed"), layers=layers, final_norm=norm("final_norm"),
                   head=None if cfg.tie_embeddings else rows("head"),
                   pos_embed=t["pos_embed"].weight if "pos_embed" in t else None,
                   inv_freq=cfg.rope_inv_freq() if cfg.pos == "rope" else None, mlp_rotation=fm.rotation)
