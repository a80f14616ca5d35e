"""An edgepanel model as an ONNX decoder graph: `export_onnx(model_path, out_path, ExportOptions())`.

The graph runs `edgepanel.model.reference.block` itself: `_Ops` is that block's arithmetic as ONNX
nodes (as CacheOps is NumPy's), so every architecture the engine runs (norms, biases, sub-norms,
GQA, RoPE or learned positions, the MLP's rotation) is exported by the same statement of a layer.

One graph serves prefill and decode, with the names ONNX Runtime's generation tooling expects:
  input_ids, position_ids  int64 (batch, seq)        attention_mask int64 (batch, past + seq)
  past_key_values.N.key / .value  float32 (batch, kv_heads, past, head_dim)
  -> logits float32 (batch, seq, vocab), present.N.key / .value (batch, kv_heads, past + seq, head_dim)
Attention is causal by cache index and skips keys whose attention_mask is 0 (left padding);
RoPE and learned positions read position_ids.

Arithmetic, as the C engine's: the input of every binarized product is quantized to int8 per
token in the graph (absmax / 127, round half to even: Abs, ReduceMax, Div, Mul, Round), the
product runs on those integers and is scaled back, so the two runtimes differ only by float
summation order (and the rare int8 rounding that order flips).  Weights stay packed:
  standard  each plane an INT2 code (INT4 before opset 25) with its per-group scales (8-bit codes
            and row multipliers kept as such, through a DequantizeLinear of their own), dequantized
            by blocked DequantizeLinear and summed over planes; int8 rows (embeddings, head) as
            uint8 with zero point 128, the head through MatMulInteger (exact integer dots).  Every operator is standard.
  ort       the binarized products through com.microsoft MatMulNBits (2-bit codes, planes stacked
            as rows, accuracy_level 4) on the same per-token int8 integers; ONNX Runtime rounds
            them once more to int8 per block of the group's inputs (exact where a block's largest
            magnitude is 127), which is not the engine's arithmetic: logits move by that rounding,
            amplified by the model (docs/onnx.md measures it).  Weights stay 2-bit in memory.
ONNX Runtime keeps DequantizeLinear of constants unfolded (it dequantizes every call) unless the
session sets `session.disable_quant_qdq` = "1" (runtime.py does): then the weights become float32
once, at load.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import EdgepanelError
from ..format import ModelFile
from ..hub import sha256_file
from ..model.config import ModelConfig
from ..model.reference import block, embed
from ..model.weights import Linear, Rows, Weights, load_weights
from ..rotation import split_pow2
from .codes import PlaneCodes, Scales, nbits_weights, pack_low_bits, plane_codes
from .graph import ROWS, Graph, Sym

FORMATS = ("standard", "ort")
MIN_OPSET = 21          # blocked DequantizeLinear
INT2_OPSET = 25         # INT2 tensors
DESCRIPTION_VERSION = 1


def require_onnx():
    """The onnx package, or a clear error naming the optional extra."""
    try:
        import onnx
    except ImportError:
        raise EdgepanelError("ONNX export needs the onnx package: pip install 'edgepanel[onnx]'") from None
    return onnx


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class ExportOptions:
    """The one home of the exporter's defaults; `edgepanel export-onnx` reads its options' help here."""
    opset: int = _opt(INT2_OPSET, f"ONNX opset, {MIN_OPSET} or later: from {INT2_OPSET} a plane is a 2-bit code "
                                  "(INT2), before it a 4-bit one (INT4, twice the size)")
    format: str = _opt("standard", "standard: standard operators only (blocked DequantizeLinear), the engine's "
                                   "arithmetic; ort: ONNX Runtime's MatMulNBits contrib operator (weights stay "
                                   "2-bit in memory; it rounds activations to int8 once more, per block)")
    accuracy_level: int = 4   # MatMulNBits: 4 = int8 activations (its fp32 path dequantizes 2-bit weights every call)

    def check(self):
        onnx = require_onnx()
        top = onnx.defs.onnx_opset_version()
        if not isinstance(self.opset, int) or not MIN_OPSET <= self.opset <= top:
            raise ValueError(f"opset must be in {MIN_OPSET}..{top} (blocked DequantizeLinear needs {MIN_OPSET}; "
                             f"this onnx {onnx.__version__} knows up to {top}), got {self.opset!r}")
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")


class _Ops:
    """`block`'s arithmetic as ONNX nodes, by tensor name (see reference.py's docstring)."""

    def __init__(self, g: Graph, w: Weights, opts: ExportOptions, io: "_IO"):
        self.g, self.w, self.cfg, self.opts, self.io = g, w, w.cfg, opts, io
        self.int2 = opts.opset >= INT2_OPSET
        self._quantized: dict[str, tuple[Sym, Sym]] = {}
        self._rope_cs = None
        self._mask = None
        self._tables: dict[str, Sym] = {}

    def _get(self, name: str):
        if name.startswith("layers."):
            _, i, part = name.split(".")
            return getattr(self.w.layers[int(i)], part)
        return getattr(self.w, name)

    # -- the int8 activations of the engine --------------------------------------------------
    def quantize(self, x: Sym) -> tuple[Sym, Sym]:
        """x (rows, in) -> (q: integers in -127..127 as float32, scale (rows, 1)), as
        bits.quantize_i8: inv = 127 / absmax, q = rint(x * inv), scale = absmax / 127.  |x * inv|
        stays below 127.5, so no clip is needed; an all-zero row divides by 1e-30 instead of 0
        (q = 0, scale 0).  Inputs shared by several products are quantized once."""
        if x.name not in self._quantized:
            g = self.g
            amax = g.op("ReduceMax", g.op("Abs", x), g.ints([-1]), keepdims=1)
            inv = g.op("Div", g.const(127.0), g.op("Max", amax, g.const(1e-30)))
            q = g.op("Round", g.op("Mul", x, inv), dims=x.dims)
            self._quantized[x.name] = (q, g.op("Div", amax, g.const(127.0)))
        return self._quantized[x.name]

    # -- weights ----------------------------------------------------------------------------
    def _alpha_terms(self, sc: Scales, pc: PlaneCodes, hint: str) -> list[Sym]:
        """The float32 scale (out, ng) of each term of `pc`, from the scales as the file stores them."""
        g, f = self.g, pc.fold or 1
        out = []
        if sc.codes is not None:
            rows = g.initializer((sc.rows * np.float32(f)).astype(np.float32), f"{hint}.scale_rows")
        for t in range(pc.terms):
            if sc.codes is not None:    # alpha = float32(code) * (row multiplier * f): f is 1 or 2, exact
                codes = g.initializer(sc.codes[t], f"{hint}.scale_codes{t}")
                out.append(g.op("DequantizeLinear", codes, rows, axis=0))
            elif sc.values.dtype == np.float16:
                a = g.op("Cast", g.initializer(sc.values[t], f"{hint}.scales{t}"), to=self._tp.FLOAT)
                out.append(a if f == 1 else g.op("Mul", a, g.const(float(f))))
            else:
                out.append(g.initializer((sc.values[t] * np.float32(f)).astype(np.float32), f"{hint}.scales{t}"))
        return out

    @property
    def _tp(self):
        return self.g.onnx.TensorProto

    def plane_weight(self, name: str, pm) -> Sym:
        """W_hat (out, in) float32 = sum over terms of DequantizeLinear(code, scale), in plane order
        (the order bits.PlaneMatrix.rows sums a looked-up row in)."""
        g = self.g
        sc = Scales.of(pm)
        pc = plane_codes(pm, sc.alpha(), self.int2)
        block = pm.group if pm.group < pm.in_features else pm.in_features
        dtype = self._tp.INT2 if pc.bits == 2 else self._tp.INT4
        w = None
        for t, alpha in enumerate(self._alpha_terms(sc, pc, name)):
            codes = g.packed(dtype, pm.shape, pc.packed(t).tobytes(), f"{name}.codes{t}")
            term = g.op("DequantizeLinear", codes, alpha, axis=1, block_size=block, dims=pm.shape)
            w = term if w is None else w + term
        return w

    def _dense_t(self, weight: np.ndarray, hint: str) -> Sym:
        """A dense (out, in) weight as float32 (in, out): stored transposed at its own precision."""
        wt = self.g.initializer(np.ascontiguousarray(weight.T), hint)
        return wt if weight.dtype == np.float32 else self.g.op("Cast", wt, to=self._tp.FLOAT)

    def _product(self, lin: Linear, x: Sym) -> Sym:
        g = self.g
        pm = lin.planes
        if pm is None:
            y = g.op("MatMul", x, self._dense_t(lin.weight, lin.name + ".weight"))
        elif self.opts.format == "ort":
            sc = Scales.of(pm)
            alpha = sc.alpha()
            pc = plane_codes(pm, alpha, int2=True)
            b, s, blk = nbits_weights(pc, alpha, pm.group)
            n_out = pc.terms * pm.out_features
            q, scale = self.quantize(x)
            y = g.op("MatMulNBits", q, g.initializer(b, lin.name + ".nbits"), g.initializer(s.reshape(-1), lin.name + ".nbits_scales"),
                     domain="com.microsoft", K=pm.in_features, N=n_out, bits=pc.bits, block_size=blk,
                     accuracy_level=self.opts.accuracy_level)
            if pc.terms > 1:   # (rows, terms*out) -> sum over terms
                y = g.op("ReduceSum", g.op("Reshape", y, g.ints([-1, pc.terms, pm.out_features])), g.ints([1]), keepdims=0)
            y = g.op("Mul", y, scale)
        else:
            q, s = self.quantize(x)
            wt = g.op("Transpose", self.plane_weight(lin.name, pm), perm=[1, 0])
            y = g.op("Mul", g.op("MatMul", q, wt), s)
        if lin.bias is not None:
            y = g.op("Add", y, g.initializer(lin.bias, lin.name + ".bias"))
        return Sym(g, y.name, (ROWS, lin.out_features))

    # -- block's operations -----------------------------------------------------------------
    def norm(self, name, x, rms=False):
        g, nw = self.g, self._get(name)
        eps = g.const(float(np.float32(self.cfg.norm_eps)))
        w = g.initializer(nw.weight, name + ".weight")
        if rms or self.cfg.norm == "rms":      # w * (x * 1/sqrt(mean(x^2) + eps))
            ms = g.op("ReduceMean", g.op("Mul", x, x), g.ints([-1]), keepdims=1)
            r = g.op("Reciprocal", g.op("Sqrt", g.op("Add", ms, eps)))
            return g.op("Mul", w, g.op("Mul", x, r), dims=x.dims)
        d = g.op("Sub", x, g.op("ReduceMean", x, g.ints([-1]), keepdims=1))
        var = g.op("ReduceMean", g.op("Mul", d, d), g.ints([-1]), keepdims=1)
        y = g.op("Mul", g.op("Mul", d, g.op("Reciprocal", g.op("Sqrt", g.op("Add", var, eps)))), w, dims=x.dims)
        return y if nw.bias is None else g.op("Add", y, g.initializer(nw.bias, name + ".bias"), dims=x.dims)

    def linear(self, name, x):
        return self._product(self._get(name), x)

    def rope(self, x, positions):
        """x (rows, heads, hd): pairs (i, i + hd/2) rotated by the angle position * inv_freq[i]."""
        g = self.g
        if self._rope_cs is None:
            ang = g.op("Mul", g.op("Unsqueeze", g.op("Cast", positions, to=self._tp.FLOAT), g.ints([1])),
                       g.initializer(self.w.inv_freq, "rope.inv_freq"))                 # (rows, hd/2)
            self._rope_cs = tuple(g.op("Unsqueeze", g.op(f, ang), g.ints([1])) for f in ("Cos", "Sin"))
        cos, sin = self._rope_cs
        x1, x2 = g.op("Split", x, axis=2, num_outputs=2, outputs=2)
        return g.op("Concat", x1 * cos - x2 * sin, x2 * cos + x1 * sin, axis=2, dims=x.dims)

    def _attention_mask(self):
        """(batch, 1, 1, seq, total) bool: key j is seen by query i iff j <= past + i and
        attention_mask[b, j] != 0."""
        if self._mask is None:
            g, io = self.g, self.io
            kidx = g.op("Range", g.const(0, np.int64), io.total, g.const(1, np.int64))
            qidx = g.op("Range", io.past, io.total, g.const(1, np.int64))
            causal = g.op("LessOrEqual", g.op("Unsqueeze", kidx, g.ints([0])), g.op("Unsqueeze", qidx, g.ints([1])))
            keep = g.op("Unsqueeze", g.op("Cast", io.attention_mask, to=self._tp.BOOL), g.ints([1, 2, 3]))
            self._mask = g.op("And", causal, keep)
        return self._mask

    def attend(self, i, q, k, v, positions):
        """q (rows, H, hd), k and v (rows, Hkv, hd) -> (rows, H, hd); the cache grows by k, v."""
        g, io, c = self.g, self.io, self.cfg
        H, Hkv, hd = c.n_heads, c.n_kv_heads, c.head_dim
        G = H // Hkv

        def heads_first(t, n_heads):    # (rows, h, hd) -> (batch, h, seq, hd)
            t = g.op("Reshape", t, g.op("Concat", io.batch_seq, g.ints([n_heads, hd]), axis=0))
            return g.op("Transpose", t, perm=[0, 2, 1, 3])

        kc = g.op("Concat", io.past_kv[i][0], heads_first(k, Hkv), axis=2, name=f"present.{i}.key")
        vc = g.op("Concat", io.past_kv[i][1], heads_first(v, Hkv), axis=2, name=f"present.{i}.value")
        io.present.append((kc, vc))
        # query heads h = kh * G + j share key head kh: (batch, Hkv, G * seq, hd)
        qg = g.op("Reshape", heads_first(q, H), g.ints([0, Hkv, -1, hd]))
        scores = g.op("Mul", g.op("MatMul", qg, g.op("Transpose", kc, perm=[0, 1, 3, 2])),
                      g.const(float(np.float32(1.0) / np.sqrt(np.float32(hd)))))          # (b, Hkv, G*seq, total)
        scores = g.op("Reshape", scores, g.op("Concat", io.batch, g.ints([Hkv, G]), io.seq, io.total1, axis=0))
        lowest = g.const(float(np.finfo(np.float32).min))    # a finite -inf: a fully padded row stays finite
        p = g.op("Softmax", g.op("Where", self._attention_mask(), scores, lowest), axis=-1)
        p = g.op("Reshape", p, g.op("Concat", io.batch, g.ints([Hkv, -1]), io.total1, axis=0))
        o = g.op("MatMul", p, vc)                                                         # (b, Hkv, G*seq, hd)
        o = g.op("Transpose", g.op("Reshape", o, g.ints([0, H, -1, hd])), perm=[0, 2, 1, 3])  # (b, seq, H, hd)
        return g.op("Reshape", o, g.ints([-1, H, hd]), dims=(ROWS, H, hd))

    def act(self, x):
        g, kind = self.g, self.cfg.act
        if kind == "silu":       # x / (1 + exp(-x)), as the engine
            y = g.op("Div", x, g.op("Add", g.const(1.0), g.op("Exp", g.op("Neg", x))))
        elif kind == "gelu_tanh":
            inner = g.op("Mul", g.const(float(np.float32(np.sqrt(2 / np.pi)))),
                         g.op("Add", x, g.op("Mul", g.const(0.044715), g.op("Mul", x, g.op("Mul", x, x)))))
            y = g.op("Mul", g.op("Mul", g.const(0.5), x), g.op("Add", g.const(1.0), g.op("Tanh", inner)))
        elif kind == "gelu":
            erf = g.op("Erf", g.op("Mul", x, g.const(float(np.float32(1 / np.sqrt(2))))))
            y = g.op("Mul", g.op("Mul", g.const(0.5), x), g.op("Add", g.const(1.0), erf))
        elif kind == "relu2":
            r = g.op("Relu", x)
            y = g.op("Mul", r, r)
        else:
            y = g.op("Relu", x)
        return Sym(g, y.name, x.dims)

    def mlp_rotation(self, u):
        """T(u) = mix(FWHT(signs * u)) (edgepanel.rotation): the Hadamard blocks as a product with
        the +-1 matrix (INT2), then 1/sqrt(p), then the m x m mix of the blocks."""
        rot = self.w.mlp_rotation
        if rot is None:
            return u
        g = self.g
        if "rotation" not in self._tables:
            p, m = split_pow2(rot.n)
            hp = np.ones((1, 1), np.int8)
            while hp.shape[0] < p:
                hp = np.block([[hp, hp], [hp, -hp]])
            self._tables["rotation"] = g.op("DequantizeLinear", g.packed(self._tp.INT2 if self.int2 else self._tp.INT4,
                                            hp.shape, pack_low_bits(hp, 2 if self.int2 else 4), "mlp_rotation.hadamard"),
                                            g.const(1.0))
            self._tables["rotation.signs"] = g.initializer(rot.signs, "mlp_rotation.signs")
            if m > 1:
                self._tables["rotation.mix"] = g.initializer(rot.mix, "mlp_rotation.mix")
        p, m = split_pow2(rot.n)
        y = g.op("Reshape", g.op("Mul", u, self._tables["rotation.signs"]), g.ints([-1, m, p]))
        y = g.op("Mul", g.op("MatMul", y, self._tables["rotation"]), g.const(float(np.float32(1.0) / np.sqrt(np.float32(p)))))
        if m > 1:
            y = g.op("MatMul", self._tables["rotation.mix"], y)
        elif rot.mix[0, 0] != 1.0:
            y = g.op("Mul", y, g.const(float(rot.mix[0, 0])))
        return g.op("Reshape", y, g.ints([-1, rot.n]), dims=u.dims)

    # -- tables: embeddings and head ---------------------------------------------------------
    def _rows_table(self, t: Rows, transposed: bool) -> Sym:
        """An int8-rows table stored once, as uint8 q + 128 (zero point 128): (rows, cols), or
        (cols, rows) when the head reads it (MatMulInteger's B) -- a tied table is stored that way
        for both.  uint8 on both sides of MatMulInteger: ONNX Runtime's x86 kernels without
        AVX-512 VNNI multiply uint8 by int8 with vpmaddubsw, whose int16 pair sums saturate (a
        seventh of a tiny model's logits were wrong on an AVX2-only CPU); uint8 by uint8 takes
        their exact 16-bit path."""
        key = t.name + ".q"
        if key not in self._tables:
            u = (t.q.astype(np.int16) + 128).astype(np.uint8)
            self._tables[key] = self.g.initializer(np.ascontiguousarray(u.T if transposed else u), key)
            self._tables[t.name + ".row_scale"] = self.g.initializer(t.row_scale, t.name + ".row_scale")
            self._tables[t.name + ".zero"] = self.g.initializer(np.full(len(t.row_scale), 128, np.uint8),
                                                                t.name + ".zero")
        return self._tables[key]

    def _plane_table(self, t: Rows) -> Sym:
        if t.name not in self._tables:
            self._tables[t.name] = self.plane_weight(t.name, t.planes)     # (rows, cols) float32
        return self._tables[t.name]

    def embed(self, tokens):
        g, t = self.g, self.w.embed
        tied = self.w.head is None
        if t.kind == "int8_rows":
            tab = self._rows_table(t, transposed=tied)
            rows = g.op("Transpose", g.op("Gather", tab, tokens, axis=1), perm=[1, 0]) if tied else g.op("Gather", tab, tokens)
            x = g.op("DequantizeLinear", rows, g.op("Gather", self._tables[t.name + ".row_scale"], tokens),
                     g.op("Gather", self._tables[t.name + ".zero"], tokens), axis=0)
        elif t.kind == "planes":
            x = g.op("Gather", self._plane_table(t), tokens)
        else:
            x = g.op("Gather", g.initializer(t.weight, t.name + ".weight"), tokens)
            if t.weight.dtype != np.float32:
                x = g.op("Cast", x, to=self._tp.FLOAT)
        return Sym(g, x.name, (ROWS, self.cfg.dim))

    def pos_embed(self, positions):
        return self.g.op("Gather", self.g.initializer(self.w.pos_embed, "pos_embed.weight"), positions,
                         dims=(ROWS, self.cfg.dim))

    def head(self, h: Sym) -> Sym:
        """Logits (rows, vocab) from the final hidden states, as reference.head_logits."""
        g, t = self.g, self.w.embed if self.w.head is None else self.w.head
        if t.kind == "int8_rows":   # exact integer dots; ((float)dot * row_scale) * act_scale, as the engine
            q, s = self.quantize(h)
            qu = g.op("Cast", g.op("Add", q, g.const(128.0)), to=self._tp.UINT8)
            dots = g.op("MatMulInteger", qu, self._rows_table(t, transposed=True), g.const(128, np.uint8),
                        g.const(128, np.uint8))
            y = g.op("Mul", g.op("Mul", g.op("Cast", dots, to=self._tp.FLOAT), self._tables[t.name + ".row_scale"]), s)
        elif t.kind == "planes":
            q, s = self.quantize(h)
            y = g.op("Mul", g.op("MatMul", q, g.op("Transpose", self._plane_table(t), perm=[1, 0])), s)
        else:
            wt = g.op("Transpose", g.initializer(t.weight, t.name + ".weight"), perm=[1, 0])
            if t.weight.dtype != np.float32:
                wt = g.op("Cast", wt, to=self._tp.FLOAT)
            y = g.op("MatMul", h, wt)
        return y


class _IO:
    """The graph's inputs and the shape values the ops read."""

    def __init__(self, g: Graph, cfg: ModelConfig):
        TP, h = g.onnx.TensorProto, g.onnx.helper
        kv = ["batch_size", cfg.n_kv_heads, "past_sequence_length", cfg.head_dim]
        self.inputs = [h.make_tensor_value_info("input_ids", TP.INT64, ["batch_size", "sequence_length"]),
                       h.make_tensor_value_info("attention_mask", TP.INT64, ["batch_size", "total_sequence_length"]),
                       h.make_tensor_value_info("position_ids", TP.INT64, ["batch_size", "sequence_length"])]
        self.past_kv = []
        for i in range(cfg.n_layers):
            names = (f"past_key_values.{i}.key", f"past_key_values.{i}.value")
            self.inputs += [h.make_tensor_value_info(n, TP.FLOAT, kv) for n in names]
            self.past_kv.append(tuple(Sym(g, n) for n in names))
        self.attention_mask = Sym(g, "attention_mask")
        self.batch_seq = g.op("Shape", Sym(g, "input_ids"))                      # [batch, seq]
        self.batch = g.op("Slice", self.batch_seq, g.ints([0]), g.ints([1]))
        self.seq = g.op("Slice", self.batch_seq, g.ints([1]), g.ints([2]))
        self.past = g.op("Squeeze", g.op("Slice", g.op("Shape", self.past_kv[0][0]), g.ints([2]), g.ints([3])))
        self.total = g.op("Add", self.past, g.op("Squeeze", self.seq))            # scalars
        self.total1 = g.op("Unsqueeze", self.total, g.ints([0]))                   # [total]
        self.present: list[tuple[Sym, Sym]] = []


def build_model(w: Weights, opts: ExportOptions):
    """The decoder of `w` as an onnx.ModelProto."""
    opts.check()
    g = Graph()
    cfg = w.cfg
    io = _IO(g, cfg)
    ops = _Ops(g, w, opts, io)
    tokens = g.op("Reshape", Sym(g, "input_ids"), g.ints([-1]), dims=(ROWS,))
    positions = g.op("Reshape", Sym(g, "position_ids"), g.ints([-1]), dims=(ROWS,))
    x = embed(ops, cfg, tokens, positions)                                        # (rows, dim)
    for i in range(cfg.n_layers):
        x = block(ops, cfg, i, x, positions)
    logits = ops.head(ops.norm("final_norm", x))                                  # (rows, vocab)
    g.op("Reshape", logits, g.op("Concat", io.batch_seq, g.ints([cfg.vocab_size]), axis=0), name="logits")

    TP, h = g.onnx.TensorProto, g.onnx.helper
    kv = ["batch_size", cfg.n_kv_heads, "total_sequence_length", cfg.head_dim]
    outputs = [h.make_tensor_value_info("logits", TP.FLOAT, ["batch_size", "sequence_length", cfg.vocab_size])]
    for i, (k, v) in enumerate(io.present):
        outputs += [h.make_tensor_value_info(k.name, TP.FLOAT, kv), h.make_tensor_value_info(v.name, TP.FLOAT, kv)]
    graph = h.make_graph(g.nodes, "edgepanel_decoder", io.inputs, outputs, g.initializers)
    imports = [h.make_opsetid("", opts.opset)]
    if opts.format == "ort":
        imports.append(h.make_opsetid("com.microsoft", 1))
    model = h.make_model(graph, opset_imports=imports, producer_name="edgepanel")
    return model


def _check_names(model, n_layers: int):
    """The interface the runtimes' generation tooling expects, as built."""
    want_out = ["logits"] + [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    got_out = [o.name for o in model.graph.output]
    if got_out != want_out:
        raise AssertionError(f"the graph's outputs are {got_out[:3]}..., expected {want_out[:3]}...")


def description(meta, cfg: ModelConfig, opts: ExportOptions, onnx_name: str, tokenizer_name: str | None,
                source_name: str, source_sha256: str) -> dict:
    """The JSON written beside the graph: the model, its interface, and its tokenizer."""
    return {
        "format": "edgepanel-onnx", "version": DESCRIPTION_VERSION,
        "model": onnx_name, "export": asdict(opts),
        "source": {"file": source_name, "sha256": source_sha256, "architecture": meta.architecture,
                   "recipe": meta.recipe},
        "config": cfg.to_dict(),
        "inputs": {"input_ids": "int64 [batch, sequence]", "attention_mask": "int64 [batch, past + sequence]",
                   "position_ids": "int64 [batch, sequence]",
                   "past_key_values.{i}.key/value": f"float32 [batch, {cfg.n_kv_heads}, past, {cfg.head_dim}]"},
        "outputs": {"logits": f"float32 [batch, sequence, {cfg.vocab_size}]",
                    "present.{i}.key/value": f"float32 [batch, {cfg.n_kv_heads}, past + sequence, {cfg.head_dim}]"},
        "num_layers": cfg.n_layers, "num_kv_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "context_length": cfg.max_seq_len, "vocab_size": cfg.vocab_size,
        "activations": "int8 per token, as the edgepanel engine" if opts.format == "standard"
                       else "MatMulNBits int8 per block of the group (accuracy_level 4)",
        "session_options": {"session.disable_quant_qdq": "1"},
        "tokenizer": {"file": tokenizer_name, **{k: v for k, v in meta.tokenizer.items()}},
    }


def sidecar_paths(out: Path) -> tuple[Path, Path]:
    """Where the description and the tokenizer go beside OUT.onnx: OUT.json, OUT.tokenizer.json."""
    return out.with_suffix(".json"), out.with_suffix(".tokenizer.json")


def export_onnx(model_path, out_path, opts: ExportOptions | None = None, check: bool = True) -> dict:
    """Write the decoder of the model file `model_path` to `out_path` (.onnx), with OUT.json (the
    description) and OUT.tokenizer.json beside it, each atomically.  `check`: run
    onnx.checker.check_model (full check, with shape inference) before anything is replaced.
    Returns the description."""
    onnx = require_onnx()
    opts = opts or ExportOptions()
    opts.check()
    model_path, out = Path(model_path), Path(out_path)
    if out.suffix != ".onnx":
        raise ValueError(f"{out}: the output must be a .onnx file")
    if not out.parent.is_dir():
        raise EdgepanelError(f"{out.parent}: no such directory")
    f = ModelFile(model_path)
    w = load_weights(f)
    model = build_model(w, opts)
    _check_names(model, w.cfg.n_layers)
    json_path, tok_path = sidecar_paths(out)
    tok = f.tokenizer_json
    desc = description(f.meta, w.cfg, opts, out.name, tok_path.name if tok else None, model_path.name,
                       sha256_file(model_path))
    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:   # everything is written in a staging directory beside OUT, checked, then renamed into place
        files = [out.name]
        weights = sum(len(t.raw_data) for t in model.graph.initializer)
        if weights > 1_800_000_000:   # protobuf's 2 GB limit: the weights go to OUT.onnx.data
            onnx.save_model(model, stage / out.name, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=out.name + ".data", size_threshold=1024)
            files.insert(0, out.name + ".data")
        else:
            onnx.save_model(model, stage / out.name)
        if check:
            onnx.checker.check_model(str(stage / out.name), full_check=True)
        for path, text in ((tok_path, tok), (json_path, json.dumps(desc, indent=1, sort_keys=True))):
            if text is not None:
                (stage / path.name).write_text(text, encoding="utf-8")
                files.append(path.name)
        for name in files:            # the description last: present means complete
            os.replace(stage / name, out.parent / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    desc["bytes"] = out.stat().st_size
    return desc
