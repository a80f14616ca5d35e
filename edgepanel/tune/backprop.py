"""Exact gradients of a fine-tuning loss by backpropagation in NumPy: the first-order counterpart
of the zeroth-order estimates (tune/zo.py), torch-free, for the same trained values (Trainable).

The zeroth-order steps move a few hundred multipliers well; the per-scale or per-row moves that
recover most of a binarized model's quality (docs/finetune.md, "first-order ceiling") are out of
their reach, since an estimate's variance grows with the number of coordinates.  One forward and
one backward pass give the gradient of every scale at once, at about three forward passes' cost.

The pass is the engine's forward (model/reference.py's `block`, the same order of operations) in
float32 without the int8 rounding of the activations before each product, as the conversion's
first-order tuning (convert/recover.py) models it: the rounding is a step function of the scales
whose derivative is zero almost everywhere, so it is left out of the gradient (straight through).
Each binarized weight matrix is built from its planes' level codes (one byte a weight, kept) and
the current scales when a layer runs, forward and backward, and never kept; its gradient goes
back to the scales through the codes (kernels.native.plane_grads in C, or NumPy).

Memory: the codes (one byte a weight), each layer's saved activations for one sequence (about
12 MB a layer at 256 tokens for SmolLM2-135M) and one (tokens x vocab) logits block: about the
conversion's tuning, not inference's.  Sequences run one at a time; the batch's gradients add.
"""
from __future__ import annotations

import math

import numpy as np

from .. import bits
from ..errors import EdgepanelError
from ..model import names as N
from ..model.weights import Linear

SUPPORTED_KINDS = ("scales", "norms", "biases")
OBJECTIVES = ("kd", "nll")
_HEAD_BLOCK = 8192   # head rows widened to float32 at a time (never the whole table)


class _Planes:
    """One binarized matrix for the pass: its codes, and W and the scales' gradient through them."""

    def __init__(self, pm: bits.PlaneMatrix):
        self.k, self.n_in = pm.k, pm.in_features
        self.codes = bits.level_codes(pm)
        self.combos = bits.level_signs(pm.k)

    def weight(self, pm: bits.PlaneMatrix) -> np.ndarray:
        """W (out, in) float32 from the current scales."""
        levels = np.einsum("lk,kon->onl", self.combos, pm.alpha()).astype(np.float32)   # (out, ng, 2^k)
        from ..kernels import native
        if native.lib is not None:
            return native.plane_weights(np.ascontiguousarray(levels), self.codes, self.n_in)
        out, ng, gs = self.codes.shape
        w = np.take_along_axis(levels, self.codes.astype(np.intp), axis=2).reshape(out, ng * gs)
        return np.ascontiguousarray(w[:, :self.n_in])

    def scale_grad(self, gw: np.ndarray) -> np.ndarray:
        """d loss / d scales, (k, out_pad/16, n_groups, 16), from d loss / d W (out, in)."""
        from ..kernels import native
        out, ng, gs = self.codes.shape
        if native.lib is not None:
            return bits.tile_scales(native.plane_grads(np.ascontiguousarray(gw, np.float32), self.codes, self.k))
        g = np.zeros((out, ng * gs), np.float32)
        g[:, :self.n_in] = gw
        g = g.reshape(out, ng, gs)
        b = np.zeros((out, ng, 2 ** self.k), np.float32)
        for lv in range(2 ** self.k):
            b[:, :, lv] = np.where(self.codes == lv, g, 0).sum(-1)
        return bits.tile_scales(np.einsum("lk,onl->kon", self.combos, b))


def _act(name: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(act(x), act'(x))."""
    if name == "silu":
        s = 1.0 / (1.0 + np.exp(-x))
        return x * s, s * (1.0 + x * (1.0 - s))
    if name == "gelu_tanh":
        c = np.float32(math.sqrt(2.0 / math.pi))
        t = np.tanh(c * (x + np.float32(0.044715) * x ** 3))
        return 0.5 * x * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + np.float32(3 * 0.044715) * x * x)
    if name == "relu2":
        r = np.maximum(x, 0)
        return r * r, 2 * r
    if name == "relu":
        return np.maximum(x, 0), (x > 0).astype(x.dtype)
    raise EdgepanelError(f"exact gradients: activation {name!r} is not supported (silu, gelu_tanh, relu, relu2)")


class _Norm:
    """An RMS or layer norm's forward (keeping what its backward needs) and backward."""

    @staticmethod
    def forward(kind, eps, n, x):
        if kind == "rms":
            r = 1.0 / np.sqrt(np.mean(x * x, -1, keepdims=True) + np.float32(eps))
            xh = x * r
            return n.weight * xh, (xh, r)
        mu = x.mean(-1, keepdims=True)
        r = 1.0 / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + np.float32(eps))
        xh = (x - mu) * r
        y = xh * n.weight
        return (y + n.bias if n.bias is not None else y), (xh, r)

    @staticmethod
    def backward(kind, n, saved, g):
        """(d x, d weight, d bias or None)."""
        xh, r = saved
        gw = (g * xh).sum(0)
        gxh = g * n.weight
        if kind == "rms":
            gx = r * (gxh - xh * np.mean(gxh * xh, -1, keepdims=True))
            return gx, gw, None
        gx = r * (gxh - gxh.mean(-1, keepdims=True) - xh * np.mean(gxh * xh, -1, keepdims=True))
        return gx, gw, (g.sum(0) if n.bias is not None else None)


class ExactGradient:
    """Loss and exact gradient of a Trainable's theta over a batch of Examples, objective kd or nll."""

    def __init__(self, model, params, dtype=np.float32):
        """dtype: the pass's arithmetic (float64: a reference for tests; the weights are the same)."""
        self.model, self.cfg, self.params, self.dtype = model, model.cfg, params, np.dtype(dtype)
        w = model.weights
        kind_of = {name: kind for name, kind, *_ in w.named_parameters()}
        bad = sorted({kind_of[n] for n in params.target} - set(SUPPORTED_KINDS))
        if bad:
            raise EdgepanelError(f"exact gradients train {', '.join(SUPPORTED_KINDS)}, not {', '.join(bad)}")
        _act(self.cfg.act, np.zeros(1, np.float32))   # an activation without a derivative here: said now
        self.planes: dict[str, _Planes] = {}
        for lin in w.linears():
            if lin.planes is not None:
                self.planes[lin.name] = _Planes(lin.planes)
        head = w.embed if w.head is None else w.head
        self.head_planes = _Planes(head.planes) if getattr(head, "planes", None) is not None else None
        self.wanted = set(params.target)

    # -- pieces ----------------------------------------------------------------------------------
    def _get(self, name: str):
        if name.startswith("layers."):
            _, i, part = name.split(".")
            return getattr(self.model.weights.layers[int(i)], part)
        return getattr(self.model.weights, name)

    def _weight(self, lin: Linear) -> np.ndarray:
        if lin.planes is not None:
            return self.planes[lin.name].weight(lin.planes).astype(self.dtype, copy=False)
        return np.asarray(lin.weight, self.dtype)

    def _linear(self, name, x):
        lin = self._get(name)
        y = x @ self._weight(lin).T
        return y + lin.bias if lin.bias is not None else y

    def _linear_back(self, name, x, gy, grads):
        """d x; the scales' and the bias's gradients into grads where they are trained."""
        lin = self._get(name)
        w = self._weight(lin)
        if lin.planes is not None and name + ".scales" in self.wanted:
            gw = gy.T @ x
            _add(grads, name + ".scales", self.planes[name].scale_grad(gw))
        if lin.bias is not None and name + ".bias" in self.wanted:
            _add(grads, name + ".bias", gy.sum(0))
        return gy @ w

    def _norm(self, name, x, rms=False):
        kind = "rms" if rms else self.cfg.norm
        return _Norm.forward(kind, self.cfg.norm_eps, self._get(name), x)

    def _norm_back(self, name, saved, g, grads, rms=False):
        kind = "rms" if rms else self.cfg.norm
        n = self._get(name)
        gx, gw, gb = _Norm.backward(kind, n, saved, g)
        if name + ".weight" in self.wanted:
            _add(grads, name + ".weight", gw)
        if gb is not None and name + ".bias" in self.wanted:
            _add(grads, name + ".bias", gb)
        return gx

    def _rope(self, x, cos, sin, sign=1.0):
        h = x.shape[-1] // 2
        x1, x2 = x[..., :h], x[..., h:]
        s = sin * np.float32(sign)
        return np.concatenate([x1 * cos - x2 * s, x2 * cos + x1 * s], axis=-1)

    def _rotate(self, u, transpose=False):
        rot = self.model.weights.mlp_rotation
        return u if rot is None else rot.apply_rows(u, transpose)

    def _head_blocks(self):
        """(r0, r1, W rows r0:r1 as float32) of the output layer, a block at a time."""
        w = self.model.weights
        head = w.embed if w.head is None else w.head
        if self.head_planes is not None:
            wt = self.head_planes.weight(head.planes).astype(self.dtype, copy=False)
            yield 0, wt.shape[0], wt
            return
        if isinstance(head, Linear):
            yield 0, head.out_features, np.asarray(head.weight, self.dtype)
            return
        for r0 in range(0, head.rows, _HEAD_BLOCK):
            r1 = min(head.rows, r0 + _HEAD_BLOCK)
            if head.q is not None:
                yield r0, r1, head.q[r0:r1].astype(self.dtype) * head.row_scale[r0:r1, None]
            else:
                yield r0, r1, np.asarray(head.weight[r0:r1], self.dtype)

    def _embed(self, ids):
        w = self.model.weights
        x = np.asarray(w.embed.lookup(ids), self.dtype)
        if self.cfg.pos == "learned":
            x = x + w.pos_embed[:len(ids)]
        return x

    # -- the pass ---------------------------------------------------------------------------------
    def _forward_layer(self, i, x, cos, sin, mask):
        cfg = self.cfg
        L = lambda p: N.layer(i, p)  # noqa: E731
        n, H, Hkv, hd = x.shape[0], cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        s = {}
        h, s["n1"] = self._norm(L("attn_norm"), x)
        s["h"] = h
        q = self._linear(L("wq"), h).reshape(n, H, hd)
        k = self._linear(L("wk"), h).reshape(n, Hkv, hd)
        v = self._linear(L("wv"), h).reshape(n, Hkv, hd)
        if cfg.pos == "rope":
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        G = H // Hkv
        Q = q.transpose(1, 0, 2)                                           # (H, n, hd)
        K = np.repeat(k, G, axis=1).transpose(1, 0, 2)
        V = np.repeat(v, G, axis=1).transpose(1, 0, 2)
        sc = np.float32(1.0 / math.sqrt(hd))
        S = Q @ K.transpose(0, 2, 1) * sc + mask
        S -= S.max(-1, keepdims=True)
        P = np.exp(S)
        P /= P.sum(-1, keepdims=True)
        a = (P @ V).transpose(1, 0, 2).reshape(n, cfg.q_dim)
        s.update(Q=Q, K=K, V=V, P=P)
        if cfg.sub_norms:
            s["a_pre"] = a
            a, s["sn1"] = self._norm(L("attn_sub_norm"), a, rms=True)
        s["a"] = a
        x = x + self._linear(L("wo"), a)
        s["x1"] = x
        h2, s["n2"] = self._norm(L("mlp_norm"), x)
        s["h2"] = h2
        if cfg.gated_mlp:
            gate, up = self._linear(L("w_gate"), h2), self._linear(L("w_up"), h2)
            act, dact = _act(cfg.act, gate)
            u = act * up
            s.update(up=up, act=act, dact=dact)
        else:
            up = self._linear(L("w_up"), h2)
            u, dact = _act(cfg.act, up)
            s["dact"] = dact
        if cfg.sub_norms:
            u, s["sn2"] = self._norm(L("mlp_sub_norm"), u, rms=True)
        r = self._rotate(u)
        s["r"] = r
        return x + self._linear(L("w_down"), r), s

    def _backward_layer(self, i, g, s, cos, sin, grads):
        cfg = self.cfg
        L = lambda p: N.layer(i, p)  # noqa: E731
        n, H, Hkv, hd = g.shape[0], cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        gu = self._rotate(self._linear_back(L("w_down"), s["r"], g, grads), transpose=True)
        if cfg.sub_norms:
            gu = self._norm_back(L("mlp_sub_norm"), s["sn2"], gu, grads, rms=True)
        if cfg.gated_mlp:
            ggate = gu * s["up"] * s["dact"]
            gup = gu * s["act"]
            gh2 = self._linear_back(L("w_gate"), s["h2"], ggate, grads)
            gh2 += self._linear_back(L("w_up"), s["h2"], gup, grads)
        else:
            gh2 = self._linear_back(L("w_up"), s["h2"], gu * s["dact"], grads)
        g = g + self._norm_back(L("mlp_norm"), s["n2"], gh2, grads)          # d x1
        ga = self._linear_back(L("wo"), s["a"], g, grads)
        if cfg.sub_norms:
            ga = self._norm_back(L("attn_sub_norm"), s["sn1"], ga, grads, rms=True)
        Q, K, V, P = s["Q"], s["K"], s["V"], s["P"]
        gO = ga.reshape(n, H, hd).transpose(1, 0, 2)                          # (H, n, hd)
        gV = P.transpose(0, 2, 1) @ gO
        gP = gO @ V.transpose(0, 2, 1)
        gS = P * (gP - (gP * P).sum(-1, keepdims=True))
        sc = np.float32(1.0 / math.sqrt(hd))
        gQ = (gS @ K) * sc
        gK = (gS.transpose(0, 2, 1) @ Q) * sc
        G = H // Hkv
        gq = gQ.transpose(1, 0, 2)                                            # (n, H, hd)
        gk = gK.reshape(Hkv, G, n, hd).sum(1).transpose(1, 0, 2)              # (n, Hkv, hd)
        gv = gV.reshape(Hkv, G, n, hd).sum(1).transpose(1, 0, 2)
        if cfg.pos == "rope":
            gq, gk = self._rope(gq, cos, sin, -1.0), self._rope(gk, cos, sin, -1.0)
        h = s["h"]
        gh = self._linear_back(L("wq"), h, np.ascontiguousarray(gq.reshape(n, -1)), grads)
        gh += self._linear_back(L("wk"), h, np.ascontiguousarray(gk.reshape(n, -1)), grads)
        gh += self._linear_back(L("wv"), h, np.ascontiguousarray(gv.reshape(n, -1)), grads)
        return g + self._norm_back(L("attn_norm"), s["n1"], gh, grads)

    def sequence(self, ids, objective: str, target, grads: dict) -> tuple[float, int]:
        """Forward and backward over one sequence: (summed loss, positions counted); the loss
        gradients (of the summed loss) added into grads.  target: for kd the teacher's
        (top_ids, top_logp, rest_logp) of positions 0..n-2, for nll the mask (n,)."""
        cfg = self.cfg
        ids = np.asarray(ids, np.int64)
        n = len(ids)
        cos = sin = None
        if cfg.pos == "rope":
            f = np.arange(n, dtype=np.float32)[:, None] * self.model.weights.inv_freq[None, :]
            f = f.astype(self.dtype)
            cos, sin = np.cos(f)[:, None, :], np.sin(f)[:, None, :]
        mask = np.triu(np.full((n, n), -np.inf, self.dtype), 1)
        x = self._embed(ids)
        saved = []
        for i in range(cfg.n_layers):
            x, s = self._forward_layer(i, x, cos, sin, mask)
            saved.append(s)
        hf, nf = self._norm("final_norm", x)
        z = np.empty((n, self._vocab()), self.dtype)
        for r0, r1, wb in self._head_blocks():
            np.matmul(hf, wb.T, out=z[:, r0:r1])
        if self.head_planes is None and isinstance(self._head(), Linear) and self._head().bias is not None:
            z += self._head().bias
        loss, count, gz = _loss_grad(objective, z[:-1], ids, target)
        del z
        ghf = np.zeros_like(hf)
        for r0, r1, wb in self._head_blocks():
            ghf[:-1] += gz[:, r0:r1] @ wb
        del gz
        g = self._norm_back("final_norm", nf, ghf, grads)
        for i in reversed(range(cfg.n_layers)):
            g = self._backward_layer(i, g, saved.pop(), cos, sin, grads)
        return loss, count

    def _head(self):
        w = self.model.weights
        return w.embed if w.head is None else w.head

    def _vocab(self) -> int:
        h = self._head()
        return h.out_features if isinstance(h, Linear) else h.rows

    # -- over a batch, onto theta -----------------------------------------------------------------
    def loss_and_grad(self, batch, objective: str) -> tuple[float, dict]:
        """(mean loss per counted position over the batch, d mean loss / d theta by name)."""
        if objective not in OBJECTIVES:
            raise EdgepanelError(f"exact gradients: objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
        self.params.apply()
        grads: dict[str, np.ndarray] = {}
        total, count = 0.0, 0
        for e in batch:
            if objective == "kd" and e.teacher is None:
                raise EdgepanelError("kd: an example carries no teacher targets (tune/teacher.py builds them)")
            t, c = self.sequence(e.ids, objective, e.teacher if objective == "kd" else e.mask, grads)
            total += t
            count += c
        if not count:
            raise ValueError("the batch has no target tokens")
        return total / count, self.params.theta_grad(grads, 1.0 / count)


def _add(grads: dict, name: str, g: np.ndarray):
    if name in grads:
        grads[name] += g
    else:
        grads[name] = np.array(g, np.float32)


def _loss_grad(objective: str, z: np.ndarray, ids: np.ndarray, target) -> tuple[float, int, np.ndarray]:
    """Summed loss over positions 0..n-2 (logits z (n-1, vocab)) and d loss / d z in z's dtype (the
    sums in float64)."""
    m = z.max(-1, keepdims=True)
    e = np.exp(z - m)
    ssum = e.sum(-1, keepdims=True, dtype=np.float64)
    q = (e / ssum).astype(z.dtype)                                      # softmax, (n-1, V)
    lse = (m[:, 0].astype(np.float64) + np.log(ssum[:, 0]))
    rows = np.arange(z.shape[0])
    if objective == "nll":
        mask = np.asarray(target, bool)[1:]
        nxt = ids[1:]
        lp = z[rows, nxt].astype(np.float64) - lse
        loss = float(-(lp * mask).sum())
        g = q * mask[:, None].astype(z.dtype)
        g[rows[mask], nxt[mask]] -= 1.0
        return loss, int(mask.sum()), g
    top_ids, top_logp, rest = (np.asarray(a) for a in target)
    lp = top_logp.astype(np.float64)
    lq = z[rows[:, None], top_ids].astype(np.float64) - lse[:, None]       # student's log q at the ids
    qk = np.exp(lq)
    QK = qk.sum(-1)
    q_rest = np.maximum(1.0 - QK, 1e-12)
    p = np.exp(lp)
    p_rest = np.exp(rest.astype(np.float64))
    kl = (p * (lp - lq)).sum(-1) + p_rest * (rest - np.log(q_rest))
    # d/dz of -sum_k p_k log q_k - p_rest log q_rest
    a = p.sum(-1) - p_rest * QK / q_rest                                    # coefficient of q on every id
    g = q * a[:, None].astype(z.dtype)
    np.add.at(g, (rows[:, None], top_ids), (-p + (p_rest / q_rest)[:, None] * qk).astype(z.dtype))
    return float(kl.sum()), int(len(kl)), g
