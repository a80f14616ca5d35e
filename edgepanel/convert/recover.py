"""Recovery after binarization: tune the continuous parameters of the binarized model (every plane
scale, signs fixed) so that its next-token distributions match the
float model's, by backpropagation of KL(float || binarized) on the calibration tokens.

Layer-by-layer fitting (calibrate.py) makes each layer's outputs close to the float layer's; the
errors still add up through 30 layers.  Tuning the scales against the end-to-end output recovers
much of that: the signs (the bits) stay where the fitting put them, only the float16 scales move.

This needs torch (an optional dependency, used at conversion only; the engine never imports it).
The tuned model is the one the kernels run except for the int8 activation rounding, which the
tuning does not model.  Deterministic given the seed (and the torch thread count).
"""
from __future__ import annotations

import math
import time
import warnings

import numpy as np

from .. import bits, quantize
from ..errors import FormatError
from ..kernels import usable_cpus
from ..model import reference as ref
from . import memory


def available() -> bool:
    """Whether torch is installed, without importing it (an import costs ~190 MB of memory, and
    resolving the default model's file name asks this on every run)."""
    import importlib.util
    return importlib.util.find_spec("torch") is not None


def _require_torch():
    try:
        import torch
    except ImportError:
        raise FormatError("scale tuning (--tune-steps) needs torch: pip install 'edgepanel[tune]' "
                          "(or convert with --tune-steps 0)") from None
    return torch


class _TorchModel:
    """The float model (teacher) or the binarized one (student) as a torch forward pass over
    whole sequences: model.reference.block with torch arithmetic (it is the `ops`)."""

    def __init__(self, torch, cfg, fm, fitted: dict | None, rows: tuple[str, str] = ("int8", "int8"),
                 fold_rotation: bool = False, granularity: str = "group", dtype=None):
        """fold_rotation (the float model only): the MLP rotation folded into down_proj's weights
        (W R, exact up to rounding) rather than applied to every activation: a third of the
        teacher's arithmetic spared; not for sensitivity(), which reads down_proj's rotated inputs.
        granularity: what each trainable multiplier covers (mult_shape).  dtype (torch.bfloat16):
        the linear layers' and the head's products in it, float32 elsewhere; the student's plane
        layers through plane_linear, the float model's weights (and an int8 head's widened rows)
        rounded to it once, when the model is built (2 bytes a weight)."""
        self.torch, self.cfg, self.dtype = torch, cfg, dtype
        t = fm.t
        fold = fold_rotation and fitted is None and fm.rotation is not None
        rot_matrix = fm.rotation.matrix() if fold else None

        def T(a):  # shares memory with the (read-only) float model: never written in place
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                return torch.from_numpy(np.ascontiguousarray(a, np.float32))
        self.lin: dict[str, tuple] = {}
        self.planes: dict[str, tuple] = {}   # name -> (pm, signs tensor, alpha0, multiplier)
        for name, e in t.items():
            if e.role not in ("linear", "head", "embed"):
                continue
            pm = None if fitted is None else (fitted.get(name) or (None,))[0]
            bias = None if e.bias is None else T(e.bias)
            if pm is None:
                if e.role == "linear":
                    folded = fold and name.endswith("w_down")
                    w = T(e.weight @ rot_matrix if folded else e.weight)
                    # the teacher in bfloat16: its weights rounded once, not at every product
                    self.lin[name] = (w if dtype is None or fitted is not None else w.to(dtype), bias)
                continue
            alpha0 = T(pm.alpha())                                           # (k, out, ng)
            mult = torch.ones(mult_shape(granularity, tuple(alpha0.shape)), requires_grad=True)
            # each weight's plane combination as one uint8 code (out, ng, gs), a byte a weight,
            # for linear layers and for embeddings or head stored as planes (read by rows)
            self.planes[name] = (pm, torch.from_numpy(bits.level_codes(pm)), alpha0, mult)
            self.lin[name] = (None, bias)
        self.norms = {}
        for name, e in t.items():
            if e.role == "norm":
                self.norms[name] = (T(e.weight), None if e.bias is None else T(e.bias))
        def stored(name, fmt):  # the student sees embeddings and head as the file will hold them
            w = t[name].weight
            if name in self.planes:
                return None  # built from its planes (and tuned scales) at every use
            if fitted is None or fmt == "f32":
                return T(w)
            if fmt == "f16":
                return T(w.astype(np.float16))
            q, s = t[name].int8_rows()
            return T(q.astype(np.float32) * s[:, None])

        self.embed_q = self.head_q = self.head_w16 = None
        if fitted is not None and rows[0] == "int8" and "embed" not in self.planes and "head" in t:
            # read by rows: the rows a sequence needs are widened, never the whole table
            q, s = t["embed"].int8_rows()
            self.embed_q, self.embed_w = (torch.from_numpy(q), torch.from_numpy(s)), None
        else:
            self.embed_w = stored("embed", rows[0])
        self.head_name = "head" if "head" in t else "embed"
        if fitted is not None and rows[1] == "int8" and "head" in t and "head" not in self.planes:
            # float32: the int8 table widened a block of rows at a time (int8_head), never whole;
            # bfloat16: widened once, 2 bytes a weight (57 MB for SmolLM2's head), each row q * scale
            # in float32, then rounded
            q, s = t["head"].int8_rows()
            self.head_q, self.head_w = (torch.from_numpy(q), torch.from_numpy(s)), None
            if dtype is None:
                self.head_fn = int8_head(torch)
            else:
                self.head_w16 = torch.empty(q.shape, dtype=dtype)
                for r0 in range(0, q.shape[0], 4096):
                    self.head_w16[r0:r0 + 4096] = self.head_q[0][r0:r0 + 4096].float() * self.head_q[1][r0:r0 + 4096, None]
        else:
            self.head_w = stored("head", rows[1]) if "head" in t else self.embed_w
            if dtype is not None and fitted is None:
                self.head_w16 = self.head_w.to(dtype)
        self.pos_embed_w = T(t["pos_embed"].weight) if "pos_embed" in t else None
        self.record = None
        self._rope = None   # (positions, cos, sin) of the sequence being run
        self._mask = None   # the causal mask (L, L) of the sequence length being run
        # the MLP rotation as rotation.py defines it: signs, a Hadamard product per 2^a block, the
        # m x m mix of the blocks (a third of the dense n x n product's arithmetic at n = 1536)
        self.rot = None
        if fm.rotation is not None and not fold:
            from ..rotation import _hadamard, split_pow2
            p, m = split_pow2(fm.rotation.n)
            if dtype is not None:
                # in bfloat16 the Hadamard blocks' product takes its operands in it as the linear
                # layers' do, the matrix as its entries' signs (exact), 1/sqrt(p) applied after
                had = (T(_hadamard(p)) * np.float32(np.sqrt(p))).round().to(dtype)
            else:
                # float32: H_p = H_a (x) H_b (Sylvester order, p = a b), applied as two products
                # over a block's two axes: (a + b) multiply-adds an entry rather than p (48 against
                # 512 at p = 512, where the dense product was a tenth of a tuning step's)
                a = 1 << ((p.bit_length() - 1) // 2)
                had = (T(_hadamard(a)), T(_hadamard(p // a)))
            self.rot = (T(fm.rotation.signs), had, T(fm.rotation.mix), p, m)
        self.inv_freq = T(cfg.rope_inv_freq()) if cfg.pos == "rope" else None
        self.plane_fn = plane_linear(torch, dtype)
        self.combos = {k: torch.from_numpy(bits.level_signs(k)) for k in range(1, bits.MAX_PLANES + 1)}

    def weight(self, name, rows=None):
        """The (out, in) weight, or only its rows `rows` (a tensor of indices)."""
        if name == "embed" and self.embed_q is not None and rows is not None:
            q, s = self.embed_q
            return q[rows].to(self.torch.float32) * s[rows, None]   # the product int8_rows' table holds
        if name not in self.planes:
            w = self.lin[name][0] if name in self.lin else (self.embed_w if name == "embed" else self.head_w)
            return w if rows is None else w[rows]
        if rows is None:
            raise AssertionError(f"{name}: a coded layer is applied by linear() or read by rows, not built whole")
        pm, codes, alpha0, mult = self.planes[name]
        return self.plane_fn.weight((alpha0 * mult)[:, rows], codes[rows], self.combos[pm.k], pm.in_features)

    def planes_head(self, name, h, block: int = 4096):
        """h @ W^T for a head (or tied embedding) stored as planes: the coded layer applied
        `block` rows at a time, so neither W nor its gradient exists whole (4 bytes a weight)."""
        pm, codes, alpha0, mult = self.planes[name]
        alpha, combos = alpha0 * mult, self.combos[pm.k]
        return self.torch.cat([self.plane_fn.apply(h, alpha[:, r0:r0 + block], codes[r0:r0 + block],
                                                   combos, pm.in_features)
                               for r0 in range(0, codes.shape[0], block)], dim=-1)

    def linear(self, name, x):
        _, b = self.lin[name]
        if name in self.planes:
            pm, codes, alpha0, mult = self.planes[name]
            y = self.plane_fn.apply(x, alpha0 * mult, codes, self.combos[pm.k], pm.in_features)
        else:
            y = _mm(x, self.weight(name).T, self.dtype)
        y = y if b is None else y + b
        if self.record is not None:   # sensitivity(): inputs and output gradients of every layer
            self.record.layer(name, x, y)
        return y

    def norm(self, name, x, rms=None):
        torch, cfg = self.torch, self.cfg
        w, b = self.norms[name]
        if rms or cfg.norm == "rms":
            return w * x * torch.rsqrt((x * x).mean(-1, keepdim=True) + cfg.norm_eps)
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), w, b, cfg.norm_eps)

    def act(self, x):
        F, a = self.torch.nn.functional, self.cfg.act
        if a == "silu":
            return F.silu(x)
        if a == "gelu_tanh":
            return F.gelu(x, approximate="tanh")
        if a == "gelu":
            return F.gelu(x)
        if a == "relu2":
            return F.relu(x) ** 2
        return F.relu(x)

    def rope(self, x, pos):
        torch = self.torch
        if self._rope is None or self._rope[0] is not pos:   # once per sequence, not per layer
            f = pos[:, None] * self.inv_freq[None, :]
            self._rope = (pos, torch.cos(f)[:, None, :], torch.sin(f)[:, None, :])
        _, cos, sin = self._rope
        h = x.shape[-1] // 2
        x1, x2 = x[..., :h], x[..., h:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    def attend(self, i, q, k, v, pos):
        G = self.cfg.n_heads // self.cfg.n_kv_heads
        torch, L = self.torch, q.shape[0]
        k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)    # (L, H, hd)
        if self._mask is None or self._mask.shape[0] != L:
            self._mask = torch.full((L, L), float("-inf")).triu(1)
        # written out: torch's scaled_dot_product_attention takes its generic path on the CPU
        # here, three times slower than these three operations (2.7 against 0.9 ms a layer)
        s = (q.transpose(0, 1) @ k.permute(1, 2, 0)) * (q.shape[-1] ** -0.5) + self._mask
        return (torch.softmax(s, -1) @ v.transpose(0, 1)).transpose(0, 1)     # (L, H, hd)

    def mlp_rotation(self, u):
        if self.rot is None:
            return u
        signs, had, mix, p, m = self.rot
        if self.dtype is None:   # each block of p by the Hadamard matrix, one axis of a x b at a time
            ha, hb = had
            y = (ha @ ((u * signs).reshape(-1, m, ha.shape[0], hb.shape[0]) @ hb)).reshape(-1, m, p)
        else:
            y = _mm((u * signs).reshape(-1, p), had, self.dtype).mul_(float(p) ** -0.5).reshape(-1, m, p)
        return (mix @ y).reshape(u.shape)                       # out[:, i] = sum_j mix[i, j] y[:, j]

    def embed(self, tokens):
        return self.weight("embed", tokens)

    def pos_embed(self, pos):
        return self.pos_embed_w[:len(pos)]   # whole sequences: positions 0..L-1

    def logits(self, tokens):
        """tokens (L,) int64 tensor -> logits (L, vocab)."""
        torch, cfg = self.torch, self.cfg
        pos = torch.arange(tokens.shape[0], dtype=torch.float32)
        x = ref.embed(self, cfg, tokens, pos)                                # (L, dim)
        if self.record is not None:   # gradients flow from here even when no weight needs them
            x = x.detach().requires_grad_(True)
            self.record.layer("embed", None, x)
        for i in range(cfg.n_layers):
            x = ref.block(self, cfg, i, x, pos)
        h = self.norm("final_norm", x)
        if self.head_w16 is not None:
            y = _mm(h, self.head_w16.T, self.dtype)
        elif self.head_q is not None:
            y = self.head_fn.apply(h, *self.head_q)
        elif self.head_name in self.planes:
            y = self.planes_head(self.head_name, h)
        else:
            y = _mm(h, self.weight(self.head_name).T, self.dtype)
        if self.record is not None:
            self.record.layer("head", h, y)
        return y


def mult_shape(granularity: str, shape: tuple) -> tuple:
    """The multipliers' shape over scales alpha0 (k, out, n_groups), broadcast against them:
    group, one per scale; row, one per (row, plane); column, one per (plane, group of inputs),
    shared by the rows; tensor, one per plane."""
    k, out, ng = shape
    shapes = {"group": (k, out, ng), "row": (k, out, 1), "column": (k, 1, ng), "tensor": (k, 1, 1)}
    if granularity not in shapes:
        raise ValueError(f"granularity must be one of {', '.join(shapes)}, got {granularity!r}")
    return shapes[granularity]


def _mm(a, b, dtype=None):
    """a @ b in float32; with `dtype` (torch.bfloat16), both operands rounded to it, the product
    (float32 accumulation in the CPU's bfloat16 instructions) widened back to float32."""
    if dtype is None:
        return a @ b
    return (a.to(dtype) @ b.to(dtype)).float()


def plane_linear(torch, dtype=None):
    """x @ W^T for W = sum_i S_i * alpha_i (signs fixed, scales per group), with autograd for x
    and alpha only: W is built by one gather of each group's 2^k levels by the weights' codes,
    and d alpha from d W through the same codes (each plane's signed sums of a group).  Nothing of size (k, out, in)
    exists at any time (the dense formulation's products, repeats and saved tensors took most of
    the 7 GB the first-order tuning used to peak at).  When the kernels are built, the gather runs
    in C (kernels.native.plane_weights), and d alpha is summed from d W in C with each plane's
    signs (plane_grads) rather than through the levels; their pool threads sleep as soon as they
    are done rather than spin on the cores torch's products take next, and they read the codes as
    they are (torch.gather's index would be an int64 copy: 8 bytes a weight at every call).
    dtype (torch.bfloat16): the three matrix products of a layer take their operands in it
    (tune_dtype); W is then built in it directly, the levels rounded before the gather."""
    from ..kernels import native
    native_ok = quantize.native_chosen()

    class PlaneLinear(torch.autograd.Function):
        @staticmethod
        def weight(alpha, codes, combos, n_in):
            out, ng, gs = codes.shape
            levels = torch.einsum("lk,kon->onl", combos, alpha)                 # (out, ng, 2^k)
            w = torch.gather(levels, 2, codes.long()).reshape(out, ng * gs)
            return w[:, :n_in].contiguous() if ng * gs != n_in else w

        @staticmethod
        def built(alpha, codes, combos, n_in):
            """weight() outside autograd, in the products' dtype (the same values: a gather
            of rounded levels is the rounded gather)."""
            if not native_ok or alpha.dtype != torch.float32:
                w = PlaneLinear.weight(alpha, codes, combos, n_in)
                return w if dtype is None else w.to(dtype)
            levels = torch.einsum("lk,kon->onl", combos, alpha)
            levels = (levels if dtype is None else levels.to(dtype)).contiguous()
            if levels.dtype == torch.float32:
                return torch.from_numpy(native.plane_weights(levels.numpy(), codes.numpy(), n_in))
            w = native.plane_weights(levels.view(torch.int16).numpy(), codes.numpy(), n_in)
            return torch.from_numpy(w).view(levels.dtype)      # the same bits, read as bfloat16

        @staticmethod
        def forward(ctx, x, alpha, codes, combos, n_in):
            # in float32, W is built again for the backward pass rather than kept (every layer's
            # W would cost 4 bytes a weight until then); in bfloat16 it is kept (2 bytes a weight,
            # 0.2 GiB for SmolLM2-135M: a fifth of a step's gathers spared)
            w = PlaneLinear.built(alpha.detach(), codes, combos, n_in)
            keep = dtype is not None
            ctx.save_for_backward(x, alpha, codes, combos, *((w,) if keep else ()))
            ctx.n_in = n_in
            return _mm(x, w.T, dtype)

        @staticmethod
        def backward(ctx, gy):
            x, alpha, codes, combos, *kept = ctx.saved_tensors
            out, ng, gs = codes.shape
            gx = None
            if ctx.needs_input_grad[0]:
                w = kept[0] if kept else PlaneLinear.built(alpha.detach(), codes, combos, ctx.n_in)
                gx = _mm(gy, w, dtype)
            gw = _mm(gy.reshape(-1, out).T, x.reshape(-1, x.shape[-1]), dtype)      # (out, in) float32
            if native_ok and gw.dtype == torch.float32:   # each plane's signed sums, in C
                galpha = native.plane_grads(gw.detach().contiguous().numpy(), codes.numpy(), combos.shape[1])
                return gx, torch.from_numpy(galpha), None, None, None
            if ng * gs != gw.shape[1]:
                gw = torch.nn.functional.pad(gw, (0, ng * gs - gw.shape[1]))
            bins = torch.zeros(out, ng, combos.shape[0], dtype=gw.dtype)
            bins.scatter_add_(2, codes.long(), gw.reshape(out, ng, gs))
            return gx, torch.einsum("lk,onl->kon", combos.to(gw.dtype), bins), None, None, None

    return PlaneLinear


def int8_head(torch, block: int = 4096):
    """h @ W^T in float32 for the int8 rows W = q * scale (vocab, dim), with autograd for h only: W
    is widened `block` rows at a time in the forward and the backward pass, so the float table (4
    bytes a weight: 113 MB for SmolLM2's head) never exists.  (In bfloat16 the student widens the
    table once instead: _TorchModel.head_w16.)  The blocks are widened into one buffer kept by the
    function (9 MB for SmolLM2's width), in place: fresh blocks (two a block, as `q.float() * s`
    makes them) were mapped anew and page-faulted at every step, 7% of a float32 tuning step."""
    buf = {}

    def widened(q, scale, r0, dtype):
        n = min(block, q.shape[0] - r0)
        b = buf.get(dtype)
        if b is None or b.shape[1] != q.shape[1] or b.shape[0] < n:
            b = buf[dtype] = torch.empty((min(block, q.shape[0]), q.shape[1]), dtype=dtype)
        w = b[:n]
        w.copy_(q[r0:r0 + n])                  # int8 -> float, exact
        return w.mul_(scale[r0:r0 + n, None])  # the rows' q * scale, as the file's table holds them

    class Int8Head(torch.autograd.Function):
        @staticmethod
        def forward(ctx, h, q, scale):
            ctx.save_for_backward(q, scale)
            y = h.new_empty(h.shape[:-1] + (q.shape[0],))
            for r0 in range(0, q.shape[0], block):
                w = widened(q, scale, r0, h.dtype)
                torch.matmul(h, w.T, out=y[..., r0:r0 + w.shape[0]])
            return y

        @staticmethod
        def backward(ctx, gy):
            q, scale = ctx.saved_tensors
            gy2 = gy.reshape(-1, gy.shape[-1])
            gh = gy.new_zeros((gy2.shape[0], q.shape[1]))
            for r0 in range(0, q.shape[0], block):
                w = widened(q, scale, r0, gy.dtype)
                gh.addmm_(gy2[:, r0:r0 + w.shape[0]], w)
            return gh.reshape(gy.shape[:-1] + (q.shape[1],)), None, None

    return Int8Head


TEACHER_K = 128   # the teacher's most likely next tokens kept per position (and the rest as one)


def teacher_targets(torch, teacher, tokens: np.ndarray, k: int = TEACHER_K) -> tuple:
    """The teacher's top-k next-token log-probabilities at every position of one sequence, and the
    log of the probability outside them: (ids (L, k) int64, logp (L, k), rest (L,)) tensors."""
    with torch.no_grad():
        z = teacher.logits(torch.from_numpy(tokens.astype(np.int64))).float()
        return _top_and_rest(torch, z, k)


def _top_and_rest(torch, z, k: int) -> tuple:
    """teacher_targets' arithmetic on logits z (L, vocab), overwritten: the top k by the logits
    (log-softmax keeps their order), and the rest's log-mass as the log-sum-exp over the others
    (z with the top k set to -inf) rather than log(1 - exp(their mass)), which cancels when they
    hold nearly all of it: float32 throughout, about half the time of a float64 log-softmax of
    the whole row."""
    k = min(k, z.shape[-1])
    top, ids = torch.topk(z, k, dim=-1)
    z.scatter_(-1, ids, float("-inf"))
    rest = torch.logsumexp(z, -1) if k < z.shape[-1] else torch.full(z.shape[:-1], float("-inf"))
    lse = torch.logaddexp(rest, torch.logsumexp(top, -1))
    # no mass outside: a finite log whose exp is 0, so that topk_kl's rest term is 0, not nan
    return ids, top - lse[..., None], (rest - lse).clamp_min(-1e4)


def _log1mexp(torch, x):
    """log(1 - exp(x)) for x < 0, finite as x -> 0 (the mass outside a top-k can round to 0)."""
    x = torch.clamp(x, max=-1e-7 if x.dtype == torch.float32 else -1e-12)
    return torch.where(x > -0.693, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def topk_kl(torch, target, logits):
    """Mean over positions of KL(teacher || student) with the vocabulary coarsened to the teacher's
    top k tokens and one outcome for the rest: exact on those k, and never above the full KL."""
    ids, p_log, p_rest = target
    q_all = torch.log_softmax(logits, -1)
    q_log = q_all.gather(-1, ids)
    q_rest = _log1mexp(torch, torch.logsumexp(q_log, -1))
    kl = (p_log.exp() * (p_log - q_log)).sum(-1) + p_rest.exp() * (p_rest - q_rest)
    return kl.mean()


def _mean_kl(torch, targets, student, tokens) -> float:
    with torch.no_grad():
        return float(np.mean([float(topk_kl(torch, t, student.logits(torch.from_numpy(seq.astype(np.int64)))))
                              for t, seq in zip(targets, tokens)]))


def release_float(fm, fitted: dict):
    """Drop the float weights of every matrix `fitted` holds planes for, linear layers and
    embeddings or head stored as planes (the file is written from the planes; only the shape is
    read), keeping the shape: 4 bytes a weight given back before the tuning's own memory is taken."""
    for name, res in fitted.items():
        e = fm.t.get(name)
        if res[0] is not None and e is not None and e.role in ("linear", "embed", "head"):
            e.weight = np.broadcast_to(np.float32(0.0), e.weight.shape)


def release_rows(fm, fitted: dict, rows: tuple[str, str]):
    """Embeddings and head stored as int8 rows (and not as planes): their int8 rows made now and
    kept (Emitted.int8, what the file will hold and the student reads), their float weights dropped
    (shape kept): 8 bytes a row entry given back for the two tables."""
    for role, fmt in zip(("embed", "head"), rows):
        e = fm.t.get(role)
        if e is None or fmt != "int8" or (fitted.get(role) or (None,))[0] is not None:
            continue
        if role == "embed" and "head" not in fm.t:   # tied: the head reads the same table
            continue
        if e.int8 is None:
            e.int8 = quantize.int8_rows(e.weight)
        e.weight = np.broadcast_to(np.float32(0.0), e.weight.shape)


def tune(fm, fitted: dict, tokens: np.ndarray, steps: int, lr: float = 1e-3,
         seed: int = 0, eval_seqs: int = 2, rows: tuple[str, str] = ("int8", "int8"), log=None,
         work=None, progress: bool = False, granularity: str = "group", dtype: str = "float32") -> dict:
    """Tune the plane scales of `fitted` (name -> (PlaneMatrix, error), as calibration returns it)
    in place for `steps` Adam steps, one calibration sequence (a row of `tokens`) per step, in a
    seeded order; `rows`: the formats (int8 | f16 | f32) embeddings and head are stored in.
    (Tuning the norm weights as well gained almost nothing on SmolLM2.)  Each scale is
    alpha0 * m with m starting at 1, so `lr` is a relative change per step; `granularity`
    (mult_shape) shares one m among a row's groups, a column's rows or a whole plane.  The loss is the KL
    from the float model over its top TEACHER_K tokens and the rest as one outcome (topk_kl), its
    targets computed before the first step, after which the float weights of the fitted layers
    are released (release_float: the float model is not held while tuning).  Returns that KL on
    the first `eval_seqs` sequences before and after, and the time taken.
    `work` (a checkpoint.WorkDir): the multipliers and Adam's state are saved there now and then,
    and a run finding them resumes, bit for bit (Adam's arithmetic does not depend on the
    thread count; the matrix products' sums may, as for any torch run).
    dtype: "bfloat16" runs the linear layers' and the head's products on bfloat16 operands, the
    student's forward and backward (plane_linear) and the teacher's, whose weights are rounded
    once; norms, attention, the loss and Adam stay float32."""
    torch = _require_torch()
    log = log or (lambda m: None)
    if steps <= 0:
        return {}
    t0 = time.time()
    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(usable_cpus())
    try:
        cfg = fm.cfg
        if not any(res[0] is not None for res in fitted.values()):
            return {}
        held = tokens[:max(1, min(eval_seqs, len(tokens)))]
        order = np.random.default_rng(seed).permutation(np.tile(np.arange(len(tokens)), math.ceil(steps / len(tokens))))
        saved = work.load("tune") if work is not None else None
        start = saved[1]["step"] if saved is not None else 0
        # the float model's part, all at once: its targets for the sequences still to come (each is
        # read once when there are fewer steps than sequences, so this costs no more forwards than
        # computing them step by step), then its float linear weights go (see release_float)
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
        tdtype = torch.bfloat16 if dtype == "bfloat16" else None
        teacher = _TorchModel(torch, cfg, fm, None, fold_rotation=True, dtype=tdtype)
        if tdtype is not None:   # the teacher holds its own rounded copies: the float weights can go now
            release_float(fm, fitted)
            memory.give_back()
        # the held-out sequences are tokens' first rows: their targets are computed once, whether
        # or not the steps read them too
        need = sorted(set(order[start:steps].tolist()) | set(range(len(held))))
        targets = {i: teacher_targets(torch, teacher, tokens[i]) for i in need}
        held_targets = [targets[i] for i in range(len(held))]
        del teacher
        release_float(fm, fitted)
        release_rows(fm, fitted, rows)
        memory.give_back()
        student = _TorchModel(torch, cfg, fm, fitted, rows, granularity=granularity,
                              dtype=torch.bfloat16 if dtype == "bfloat16" else None)
        names = sorted(student.planes)
        mults = [student.planes[n][3] for n in names]
        opt = torch.optim.Adam(mults, lr=lr)
        kls = []
        if saved is not None:
            arrays, state = saved
            kls, kl_before = state["kls"], state["kl_before"]
            with torch.no_grad():
                for n, m in zip(names, mults):
                    m.copy_(torch.from_numpy(arrays[n + ".mult"]))
                    opt.state[m] = {"step": torch.tensor(float(start)),
                                    "exp_avg": torch.from_numpy(arrays[n + ".exp_avg"]),
                                    "exp_avg_sq": torch.from_numpy(arrays[n + ".exp_avg_sq"])}
            log(f"tuning scales: resumed at step {start}/{steps}")
        else:
            kl_before = _mean_kl(torch, held_targets, student, held)
        from ..progress import bar
        steps_bar = bar(range(start, steps), total=steps, initial=start, desc="tuning", unit="step",
                        disable=not progress)
        t1 = time.time()
        for step in steps_bar:
            seq = torch.from_numpy(tokens[order[step]].astype(np.int64))
            kl = topk_kl(torch, targets[int(order[step])], student.logits(seq))
            opt.zero_grad(set_to_none=True)
            kl.backward()
            opt.step()
            kls.append(float(kl.detach()))
            if step % 5 == 4:   # the step's freed blocks back to the system (memory.py: they pile up in the heaps)
                memory.give_back()
            if hasattr(steps_bar, "set_postfix"):
                steps_bar.set_postfix(KL=f"{np.mean(kls[-10:]):.4f}", refresh=False)
            if (step + 1) % 10 == 0 or step + 1 == steps:
                left = (time.time() - t1) / (step + 1 - start) * (steps - step - 1)
                log(f"tuning scales: step {step + 1}/{steps}, KL {np.mean(kls[-10:]):.4f} "
                    f"({time.time() - t0:.0f} s; about {left:.0f} s left)")
            if work is not None and step + 1 < steps and work.due("tune"):
                arrays = {}
                for n, m in zip(names, mults):
                    st = opt.state[m]
                    arrays.update({n + ".mult": m.detach().numpy().copy(), n + ".exp_avg": st["exp_avg"].numpy().copy(),
                                   n + ".exp_avg_sq": st["exp_avg_sq"].numpy().copy()})
                work.save("tune", arrays, {"step": step + 1, "kls": kls, "kl_before": kl_before})
        kl_after = _mean_kl(torch, held_targets, student, held)
        with torch.no_grad():
            for name, (pm, _, alpha0, mult) in student.planes.items():
                alpha = (alpha0 * mult).numpy()   # broadcast: (k, out, ng) at every granularity
                if not np.all(np.isfinite(alpha)):
                    raise FormatError(f"{name}: scale tuning diverged (lower --tune-lr)")
                new = bits.PlaneMatrix(pm.planes, bits.tile_scales(alpha), pm.out_features, pm.in_features, pm.group)
                fitted[name] = (new,) + tuple(fitted[name][1:])
        return {"steps": steps, "seconds": time.time() - t0, "kl_before": kl_before, "kl_after": kl_after,
                "eval_tokens": int(held.size)}
    finally:
        torch.set_num_threads(threads)


class _Recorder:
    """sensitivity()'s sums, taken as the layers run: x^T x of each distinct input during the
    forward pass (layers called one after another on the same tensor -- q, k, v; gate, up --
    share one sum), and the output gradients' squares by a hook during the backward pass, so
    neither the inputs nor the gradients outlive their use."""

    def __init__(self, torch):
        self.torch = torch
        self.f: dict = {}        # name -> sum over tokens of (d loss / d output)^2
        self.h: dict = {}        # first reader's name -> float32 sum of x^T x
        self.reader: dict = {}   # name -> first reader's name of its input
        self._last = (None, None)   # (input tensor, its first reader) of the previous layer

    def layer(self, name, x, y):
        y.register_hook(lambda g, name=name: self._grad(name, g))
        if x is None:
            return
        last, src = self._last
        if x is not last:
            src = name
            self._last = (x, name)
        self.reader.setdefault(name, src)
        if src == name:
            with self.torch.no_grad():
                xd = x.detach()
                self.h[name] = self.h[name].addmm_(xd.T, xd) if name in self.h else xd.T @ xd

    def forward_done(self):
        """A sequence's forward pass is over: its last input is let go."""
        self._last = (None, None)

    def _grad(self, name, g):
        with self.torch.no_grad():
            g2 = (g * g).sum(0)
            self.f[name] = self.f[name] + g2 if name in self.f else g2


def sensitivity(fm, tokens: np.ndarray, log=None, reduce=None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """For every linear layer of the float model and its head, from next-token cross-entropy on
    the sequences in `tokens`: f (out,), the mean square of d loss / d output per token, and H
    (in, in), the mean of x x^T over its input vectors.  Quantizing W to W_hat (E = W - W_hat)
    then raises the loss by about 1/2 sum_r f_r E_r H E_r^T (the output errors weighted by how
    much each output matters), which, unlike a diagonal Fisher on the weights, sees the inputs'
    correlations.  For the embeddings ("embed"): f (dim,) at the embedding output and p (vocab,),
    how often each row is read (add-one smoothed frequencies of `tokens`).

    Layers that read the same input (q, k and v; gate and up) share one H: one float32 sum while
    the sequences run, one float64 array in the result.  `reduce`, if given, maps each distinct H
    (float64) to what the caller keeps of it, one at a time, so the float64 matrices never all
    exist at once; the result then holds reduce(H) in H's place."""
    torch = _require_torch()
    log = log or (lambda m: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(usable_cpus())
    try:
        with memory.large_blocks_mapped():   # each sequence's graph mapped on its own, unmapped when freed
            model = _TorchModel(torch, fm.cfg, fm, None)
            rec = _Recorder(torch)
            t0 = time.time()
            for seq in tokens:
                seq = torch.from_numpy(seq.astype(np.int64))
                model.record = rec
                loss = torch.nn.functional.cross_entropy(model.logits(seq)[:-1], seq[1:], reduction="sum")
                model.record = None
                rec.forward_done()
                loss.backward()
                del loss
            n = tokens.size
            log(f"sensitivity from {len(tokens)} sequences ({time.time() - t0:.0f} s)")
            counts = np.bincount(tokens.reshape(-1), minlength=fm.cfg.vocab_size).astype(np.float64) + 1.0
            f, h = rec.f, rec.h
            out = {"embed": ((f.pop("embed") / n).numpy().astype(np.float64), counts / counts.sum())}
            kept = {}
            for name in f:
                src = rec.reader[name]
                if src not in kept:
                    hm = h.pop(src).numpy().astype(np.float64) / n
                    kept[src] = reduce(hm) if reduce is not None else hm
                    del hm
                out[name] = ((f[name] / n).numpy().astype(np.float64), kept[src])
            return out
    finally:
        torch.set_num_threads(threads)
