"""Calibration-aware binarization: fit every linear layer against the inputs it really sees.

The model is held in float32 (source precision); then, optionally,
  1. rotation (RMS-norm models): norm weights fused into the next linear layers, the residual
     stream rotated by an orthogonal T (embeddings, every input and output of the blocks, head;
     exact offline; the tied head becomes its own matrix), each value head rotated (v_proj rows,
     o_proj columns; exact offline), and the MLP's inner activations rotated before down_proj
     (weights offline, activations at run time);
  2. one pass over the calibration tokens, layer by layer (model.reference.block, on _CalibOps),
     through the already binarized layers: each layer's inputs X give H = X^T X, each linear
     layer is fitted by GPTQ-style error feedback with per-group codebooks, then its scales are
     refit jointly on H;
  3. the head, when binarized, the same way on the final hidden states.
Memory: the float model plus one layer's activations for the calibration tokens.  The formats
under a bit budget are chosen before (budget.py).
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import numpy as np

from .. import quantize
from ..errors import FormatError
from ..kernels import native
from ..model import names as N
from ..model import reference as ref
from ..model.config import ModelConfig
from ..model.weights import Linear, Norm
from ..rotation import Rotation
from . import memory
from .base import Emitted

DEFAULT_CALIB = Path(__file__).resolve().parents[1] / "assets" / "calib.txt"


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


def rotate_rows(rot: Rotation, x: np.ndarray, in_place: bool = False) -> np.ndarray:
    """rot applied to the last axis of x (any leading shape), for many rows at once: in C, in
    parallel over rows, else Rotation.apply_blas; the transform of Rotation.apply to float32
    rounding.  in_place: x (float32, C-contiguous, writeable) receives the result and is returned."""
    if in_place and not (x.dtype == np.float32 and x.flags.c_contiguous and x.flags.writeable):
        raise ValueError("in_place needs a writeable C-contiguous float32 array")
    if not quantize.native_chosen():   # C: csrc/forward.c's butterflies, the engine's
        y = rot.apply_blas(x)
        if in_place:
            x[...] = y
            return x
        return y
    y = x if in_place else np.array(x, np.float32, order="C")            # a copy, never x itself
    native.rotate_rows(np.ascontiguousarray(rot.signs, np.float32), np.ascontiguousarray(rot.mix, np.float32),
                       y.reshape(-1, rot.n))
    return y


def rotate_columns(rot: Rotation, w: np.ndarray) -> np.ndarray:
    """Rotation.apply_columns (W (out=n, in) -> A W) by rotate_rows on the columns."""
    wt = np.array(np.asarray(w, np.float32).T, order="C")                # (in, n)
    return np.ascontiguousarray(rotate_rows(rot, wt, in_place=True).T)


def rotate(fm: FloatModel, seed: int = 0):
    """Fuse the norm weights and rotate (see the module docstring); outputs are unchanged."""
    cfg, t = fm.cfg, fm.t
    if not can_rotate(cfg):
        raise FormatError(f"rotation needs an RMS-norm rope model without sub-norms ({cfg.arch} is not)")
    res = Rotation.random(cfg.dim, seed)
    if cfg.tie_embeddings:  # the head gets its own matrix (the product below): it absorbs the final norm
        t["head"] = Emitted("head", "head", t["embed"].weight)
        fm.cfg = cfg = dataclasses.replace(cfg, tie_embeddings=False)
    head = (t["head"].weight * t["final_norm"].weight[None, :]).astype(np.float32, copy=False)
    t["final_norm"].weight = np.ones(cfg.dim, np.float32)
    fm.set("embed", rotate_rows(res, t["embed"].weight))
    fm.set("head", rotate_rows(res, head, in_place=True))
    G = cfg.n_heads // cfg.n_kv_heads
    for i in range(cfg.n_layers):
        L = lambda p: N.layer(i, p)  # noqa: E731
        for norm, lins in (("attn_norm", ("wq", "wk", "wv")), ("mlp_norm", ("w_gate", "w_up"))):
            gamma = t[L(norm)].weight
            for lin in lins:
                if L(lin) in t:
                    fm.set(L(lin), rotate_rows(res, (t[L(lin)].weight * gamma[None, :]).astype(np.float32, copy=False),
                                               in_place=True))
            t[L(norm)].weight = np.ones(cfg.dim, np.float32)
        for lin in ("wo", "w_down"):
            e = t[L(lin)]
            fm.set(L(lin), rotate_columns(res, e.weight), None if e.bias is None else rotate_rows(res, e.bias))
        # value heads: rows of v_proj (and its bias), the matching columns of o_proj
        wv, wo, hd = t[L("wv")].weight.copy(), t[L("wo")].weight.copy(), cfg.head_dim
        bv = None if t[L("wv")].bias is None else t[L("wv")].bias.copy()
        for kh in range(cfg.n_kv_heads):
            rot = Rotation.random(hd, seed + 1000 + i * cfg.n_kv_heads + kh)
            sl = slice(kh * hd, (kh + 1) * hd)
            wv[sl] = rotate_columns(rot, wv[sl])
            if bv is not None:
                bv[sl] = rotate_rows(rot, bv[sl])
            for h in range(kh * G, (kh + 1) * G):
                hs = slice(h * hd, (h + 1) * hd)
                wo[:, hs] = rotate_rows(rot, wo[:, hs])
        fm.set(L("wv"), wv, bv)
        fm.set(L("wo"), wo)
    mlp = Rotation.random(cfg.hidden_dim, seed + 1)
    for i in range(cfg.n_layers):
        fm.set(N.layer(i, "w_down"), rotate_rows(mlp, t[N.layer(i, "w_down")].weight))
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
        self._h_of, self._h = None, None        # the inputs H was computed on; (H, its GPTQ prep)
        self.format_of: dict[str, tuple[int, int]] = {}   # (planes, group) per tensor from a bit budget
        self.torch = None
        if recipe.calib_matmul_dtype() == "bfloat16":
            try:
                import torch
            except ImportError:
                raise FormatError("calibration in bfloat16 (--calib-dtype bfloat16) needs torch: pip install "
                                  "'edgepanel[tune]' (or --calib-dtype float32)") from None
            self.torch = torch
        self._dense: tuple[str, np.ndarray] | None = None   # the last fitted layer's weights, dequantized

    def fit(self, name: str, x: np.ndarray, fmt: tuple[int, int] | None = None):
        """Binarize linear `name` on its inputs x (N, in) -- the inputs the binarized model
        produces --: GPTQ on H = x^T x / N, then the joint scale refit.  Returns its Linear for
        the forward."""
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
        if self._h_of is not x:
            # q/k/v (and gate/up) read the same inputs: H once (holding x, no other array can
            # take its place)
            # x^T x with x itself on both sides (no copy of x): NumPy's product then computes one
            # triangle (BLAS syrk) and mirrors it, as scipy's ssyrk would, in the same time (measured)
            xf = np.ascontiguousarray(x, np.float32)
            h = (xf.T @ xf).astype(np.float64) / max(len(xf), 1)
            self._h_of, self._h = x, (h, quantize.gptq_prepare(h, self.r.damp, self.r.act_order))
        h, prep = self._h
        k, group = fmt or self.format_of.get(name) or (self.r.planes, self.r.group_for(inp))
        pm = quantize.gptq_planes(e.weight, h, k, group, damp=self.r.damp, refit=self.r.refit, prepared=prep)
        w_hat = None
        if self.torch is not None and e.role == "linear":   # read twice: by the error and by the forward
            w_hat = pm.dequantize_rows(0, out)
            self._dense = (name, w_hat)
        self.results[name] = (pm, quantize.weighted_error(e.weight, pm, h, w_hat=w_hat))
        self.fit_seconds += time.time() - t0
        return Linear(name, out, inp, planes=pm, bias=e.bias)

    def linear(self, lin: Linear, x: np.ndarray) -> np.ndarray:
        if lin.planes is None:
            return ref.linear(lin, x)
        q, s = self.kern.quantize_i8(np.ascontiguousarray(x, np.float32))
        if self.torch is not None:
            y = self._gemm_bf16(q, s, lin)
        else:
            y = self.kern.gemm_planes_i8(q, s, lin.planes)
        return y + lin.bias if lin.bias is not None else y

    def _gemm_bf16(self, q: np.ndarray, s: np.ndarray, lin: Linear) -> np.ndarray:
        """gemm_planes_i8's product (calib_dtype bfloat16): the same int8 activations q (exact in
        bfloat16) against the fitted weights dequantized and rounded to bfloat16, summed in
        float32 by torch (AMX or AVX512-BF16), the product rounded to bfloat16, then times each
        row's scale s into float32.  One dense product instead of one per plane: 2.5x the
        engine kernel's speed on a Xeon with AMX, outputs within 0.3% (relative norm) of its."""
        from ..kernels import usable_cpus
        torch = self.torch
        if self._dense is not None and self._dense[0] == lin.name:
            w, self._dense = self._dense[1], None
        else:
            w = lin.planes.dequantize_rows(0, lin.out_features)
        y = np.empty((len(q), lin.out_features), np.float32)   # NumPy's pages (huge pages where it can)
        threads = torch.get_num_threads()
        torch.set_num_threads(usable_cpus())
        try:
            with torch.no_grad():
                p = torch.nn.functional.linear(torch.from_numpy(q).to(torch.bfloat16),
                                               torch.from_numpy(w).to(torch.bfloat16))
                torch.mul(p, torch.from_numpy(s)[:, None], out=torch.from_numpy(y))
        finally:
            torch.set_num_threads(threads)
        return y

    def stream(self, tokens: np.ndarray, fit: bool = True):
        """For tokens (S, Lq): the arithmetic (_CalibOps), every token's position and the embedded
        residual stream (S*Lq, dim) the layers start from."""
        S, Lq = tokens.shape
        ops = _CalibOps(self, Lq, fit)
        positions = np.tile(np.arange(Lq), S)                           # (S*Lq,): each sequence from 0
        return ops, positions, ref.embed(ops, self.fm.cfg, tokens.reshape(-1), positions)

    def run(self, tokens: np.ndarray, start: int = 0, x: np.ndarray | None = None, after_layer=None,
            progress: bool = False) -> np.ndarray:
        """Binarize every layer on tokens (S, Lq); returns the final hidden states (S*Lq, dim).
        To resume: `start` layers are done (in self.results) and `x` is the stream after them.
        after_layer(i, x): called once layer i is fitted (a checkpoint)."""
        cfg = self.fm.cfg
        ops, positions, x0 = self.stream(tokens)
        x = x0 if x is None else x
        del x0
        t0 = time.time()
        from ..progress import bar
        layers = bar(range(start, cfg.n_layers), total=cfg.n_layers, initial=start, desc="calibrating",
                     unit="layer", disable=not progress)
        for i in layers:
            x = ref.block(ops, cfg, i, x, positions)
            if self.torch is not None:   # torch's temporaries leave the heaps fragmented: 0.5-3 GiB by the end
                memory.give_back()
            done, spent = i + 1 - start, time.time() - t0
            left = spent / done * (cfg.n_layers - i - 1)
            self.log(f"calibrated layer {i + 1}/{cfg.n_layers} ({spent:.0f} s, fitting {self.fit_seconds:.0f} s; "
                     f"about {left:.0f} s left)")
            if after_layer is not None:
                after_layer(i, x)
        return ops.norm("final_norm", x)


def _row_blocks(x: np.ndarray, elements: int = 1 << 18) -> list[slice]:
    """Slices of x's rows (axis 0) of about `elements` values each (1 MiB of float32: a block and
    its temporary stay in cache)."""
    step = max(1, elements // max(1, int(np.prod(x.shape[1:]))))
    return [slice(r0, min(r0 + step, len(x))) for r0 in range(0, max(len(x), 1), step)]


class _CalibOps:
    """ref.block's arithmetic for calibration: NumPy on the float model over S sequences of Lq
    tokens at once (rows (S*Lq, ...)), RoPE and attention within each sequence.  fit: each
    linear layer is binarized on its inputs when the block reaches it, then runs binarized;
    else the float layer runs and its inputs are kept in `acts` (name -> x)."""

    def __init__(self, run: _Run, Lq: int, fit: bool = True):
        self.run, self.cfg, self.t, self.Lq, self.fit = run, run.fm.cfg, run.fm.t, Lq, fit
        self.inv_freq = self.cfg.rope_inv_freq() if self.cfg.pos == "rope" else None
        self.acts: dict[str, np.ndarray] = {}

    def _seqs(self, n: int):
        return [slice(s0, s0 + self.Lq) for s0 in range(0, n, self.Lq)]

    def norm(self, name, x, rms=False):
        n = Norm(self.t[name].weight, self.t[name].bias)
        if (rms or self.cfg.norm == "rms") and x.dtype == np.float32 and x.ndim == 2:
            # ref.norm's arithmetic, the same bits, by blocks of rows in the output itself: no
            # temporary of x's size (each costs fresh pages)
            y = np.empty(x.shape, np.float32)
            eps = np.float32(self.cfg.norm_eps)
            for sl in _row_blocks(x):
                xs, ys = x[sl], y[sl]
                var = np.mean(np.square(xs, out=ys), axis=-1, keepdims=True)
                var += eps
                np.divide(xs, np.sqrt(var, out=var), out=ys)
                ys *= n.weight
            return y
        return (ref.rms_sub_norm if rms else ref.norm)(self.cfg, n, x)

    def linear(self, name, x):
        if self.fit:
            return self.run.linear(self.run.fit(name, x), x)
        self.acts[name] = x
        e = self.t[name]
        return ref.linear(Linear(name, *e.weight.shape, weight=e.weight, bias=e.bias), x)

    def rope(self, x, positions):
        out = np.empty(x.shape, np.float32)
        for sl in self._seqs(len(x)):
            out[sl] = ref.rope(x[sl], positions[sl], self.inv_freq)
        return out

    def attend(self, i, q, k, v, positions, seqs_at_once: int = 8):
        """ref.attention within each sequence, the same bits: `seqs_at_once` sequences in each
        stacked product (the same BLAS calls, one per sequence and head, without a Python loop
        over sequences; their scores take 8 x 9 x 256 x 256 x 4 bytes = 19 MB for SmolLM2)."""
        out = np.empty(q.shape, np.float32)                             # (S*Lq, H, hd)
        Lq, n = self.Lq, len(q)
        pos = np.asarray(positions).reshape(-1, Lq) if n % Lq == 0 else None
        if pos is None or not (pos == pos[:1]).all():   # sequences of different positions: one by one
            for sl in self._seqs(n):
                out[sl] = ref.attention(self.cfg, q[sl], k[sl], v[sl], positions[sl])
            return out
        cfg = self.cfg
        H, hd, hkv = q.shape[1], q.shape[2], k.shape[1]
        group = H // hkv
        masked = (np.arange(Lq)[None, :] > pos[0][:, None])[None, None]   # (1, 1, Lq, T): ref's mask
        for s0 in range(0, n // Lq, seqs_at_once):
            rows = slice(s0 * Lq, min(n, (s0 + seqs_at_once) * Lq))
            S = (rows.stop - rows.start) // Lq
            qs = q[rows].reshape(S, Lq, H, hd).transpose(0, 2, 1, 3)                              # (S, H, Lq, hd)
            ks = np.repeat(k[rows].reshape(S, Lq, hkv, hd), group, axis=2).transpose(0, 2, 3, 1)  # (S, H, hd, T)
            vs = np.repeat(v[rows].reshape(S, Lq, hkv, hd), group, axis=2).transpose(0, 2, 1, 3)  # (S, H, T, hd)
            scores = np.matmul(qs, ks) / np.float32(math.sqrt(cfg.head_dim))
            scores = np.where(masked, np.float32(-np.inf), scores)
            scores = scores - scores.max(axis=-1, keepdims=True)
            p = np.exp(scores)
            p /= p.sum(axis=-1, keepdims=True)
            out[rows] = np.matmul(p, vs).transpose(0, 2, 1, 3).reshape(S * Lq, H, hd)
        return out

    def act(self, x):
        """The activation of x, a linear layer's output that nothing else holds: SiLU overwrites x
        (ref.activation's arithmetic, the same bits, by blocks of rows: no second array of x's size)."""
        if self.cfg.act == "silu" and x.dtype == np.float32 and x.ndim == 2 and x.flags.c_contiguous \
                and x.flags.writeable:
            blocks = _row_blocks(x)
            buf = np.empty((blocks[0].stop, x.shape[1]), np.float32)
            for sl in blocks:
                xs = x[sl]
                t = np.negative(xs, out=buf[:len(xs)])
                np.exp(t, out=t)
                t += np.float32(1.0)
                np.divide(xs, t, out=xs)
            return x
        return ref.activation(self.cfg, x)

    def mlp_rotation(self, u):
        rot = self.run.fm.rotation
        if rot is None:
            return u.astype(np.float32, copy=False)
        u = np.ascontiguousarray(u, np.float32)   # act(gate) * up: a fresh array, rotated in place
        return rotate_rows(rot, u, in_place=u.flags.writeable)

    def embed(self, tokens):
        return self.t["embed"].weight[tokens].astype(np.float32)

    def pos_embed(self, positions):
        return self.t["pos_embed"].weight[positions]


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
