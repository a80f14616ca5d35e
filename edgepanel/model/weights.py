"""Typed views of a model file's tensors, checked against the config and the recipe.

Packed planes, dense weights and int8 rows are views into the mapped file (never copied); the
continuous parameters (plane scales, norms, biases) are float32 arrays of their own, so the
fine-tuner can perturb them in place and the kernels read them at call time.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from .. import bits
from ..errors import FormatError
from ..rotation import Rotation, split_pow2
from ..format import ModelFile
from . import names as N
from .config import ModelConfig


@dataclass
class Linear:
    """y = x W^T + b, W binarized (planes) or dense."""
    name: str
    out_features: int
    in_features: int
    planes: bits.PlaneMatrix | None = None   # binarized
    weight: np.ndarray | None = None          # dense (out, in) float32 or float16 view
    bias: np.ndarray | None = None            # float32 (out,)

    @property
    def kind(self) -> str:
        return "planes" if self.planes is not None else "dense"


@dataclass
class Rows:
    """A (rows, cols) table read by rows (embeddings) or multiplied (head): int8 with one scale
    per row, k binary planes, or dense."""
    name: str
    rows: int
    cols: int
    q: np.ndarray | None = None               # int8 view
    row_scale: np.ndarray | None = None       # float32
    weight: np.ndarray | None = None          # float32/float16 view
    planes: bits.PlaneMatrix | None = None    # binarized (planes are views, scales as Linear's)

    @property
    def kind(self) -> str:
        return "planes" if self.planes is not None else "int8_rows" if self.q is not None else "dense"

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        if self.planes is not None:
            return self.planes.rows(ids)
        if self.q is not None:
            return self.q[ids].astype(np.float32) * self.row_scale[ids, None]
        return self.weight[ids].astype(np.float32)

    def as_linear(self) -> Linear:
        """The planes table as the head's linear layer (shares the planes and scales)."""
        return Linear(self.name, self.rows, self.cols, planes=self.planes)

    def dense(self) -> np.ndarray:
        return self.lookup(np.arange(self.rows))


@dataclass
class Norm:
    weight: np.ndarray                        # float32 (dim,)
    bias: np.ndarray | None = None


@dataclass
class Layer:
    attn_norm: Norm
    wq: Linear
    wk: Linear
    wv: Linear
    wo: Linear
    mlp_norm: Norm
    w_up: Linear
    w_down: Linear
    w_gate: Linear | None = None
    attn_sub_norm: Norm | None = None
    mlp_sub_norm: Norm | None = None

    def linears(self):
        for n in N.LINEARS:
            lin = getattr(self, n)
            if lin is not None:
                yield lin


@dataclass
class Weights:
    cfg: ModelConfig
    embed: Rows
    layers: list[Layer]
    final_norm: Norm
    head: Rows | Linear | None                # None: tied to embed
    pos_embed: np.ndarray | None = None       # float32 (max_seq, dim)
    inv_freq: np.ndarray | None = None        # float32 (head_dim/2,)
    mlp_rotation: "Rotation | None" = None    # applied to the MLP's inner activations before down
    file: ModelFile | None = field(default=None, repr=False)
    version: int = 0                          # bumped when a parameter's storage is replaced
    stored_planes: dict = field(default_factory=dict, repr=False)  # scales' name -> PlaneMatrix as the file holds it

    def linears(self):
        for layer in self.layers:
            yield from layer.linears()
        if isinstance(self.head, Linear):
            yield self.head

    def plane_tables(self):
        """Embeddings and head stored as planes (Rows), each once."""
        for t in (self.embed, self.head):
            if isinstance(t, Rows) and t.planes is not None:
                yield t

    def named_parameters(self):
        """Every continuous parameter as (name, kind, layer or None, owner, attribute): plane
        scales, norm weights and biases, linear biases, and the scales of embeddings and head
        (plane scales, or int8 rows' row scales).  Dense weights are views of the mapped file and
        the sign planes are bits: neither is a parameter."""
        for i, layer in enumerate(self.layers):
            for n in N.NORMS:
                norm = getattr(layer, n)
                if norm is not None:
                    yield N.layer(i, n) + ".weight", "norms", i, norm, "weight"
                    if norm.bias is not None:
                        yield N.layer(i, n) + ".bias", "norms", i, norm, "bias"
            for lin in layer.linears():
                if lin.planes is not None:
                    yield lin.name + ".scales", "scales", i, lin, "planes"
                if lin.bias is not None:
                    yield lin.name + ".bias", "biases", i, lin, "bias"
        yield "final_norm.weight", "norms", None, self.final_norm, "weight"
        if self.final_norm.bias is not None:
            yield "final_norm.bias", "norms", None, self.final_norm, "bias"
        tables = [("embed", self.embed, "embeddings")]
        if self.head is not None:
            tables.append(("head", self.head, "head"))
        for name, t, kind in tables:
            if t.planes is not None:
                yield name + ".scales", kind, None, t, "planes"
            elif isinstance(t, Rows) and t.q is not None:
                yield name + ".row_scale", kind, None, t, "row_scale"
            if isinstance(t, Linear) and t.bias is not None:
                yield name + ".bias", kind, None, t, "bias"

    def parameters(self, kinds=None, layers=None) -> dict[str, np.ndarray]:
        """The continuous parameters of `kinds` (a subset of PARAMETER_KINDS; None: all) in the
        layers `layers` (None: every layer and the model-level ones; else a range or a set of layer
        indices, and the model-level parameters are left out), as float32 arrays the engines read
        at every call: change them in place and the next forward pass sees it.  Plane scales stored
        as float16 or 8-bit codes are widened to float32 copies the first time they are asked for
        (float16 exactly, the same results; 8-bit codes to code * row, whose products then round
        each plane: see Model.parameters); `version` counts such changes of storage, so an engine
        holding pointers knows to rebuild (see CEngine)."""
        kinds = set(PARAMETER_KINDS if kinds is None else ([kinds] if isinstance(kinds, str) else kinds))
        unknown = kinds - set(PARAMETER_KINDS)
        if unknown:
            raise ValueError(f"unknown parameter kinds {sorted(unknown)}; choose from {', '.join(PARAMETER_KINDS)}")
        if layers is not None:
            layers = set(layers)
            bad = sorted(i for i in layers if not (isinstance(i, (int, np.integer)) and 0 <= i < self.cfg.n_layers))
            if bad:
                raise ValueError(f"layers must be in 0..{self.cfg.n_layers - 1}, got {bad[:5]}")
        out = {}
        for name, kind, layer, owner, attr in self.named_parameters():
            if kind not in kinds or (layers is not None and (layer is None or layer not in layers)):
                continue
            if attr == "planes":
                pm = owner.planes
                if pm.scales.dtype != np.float32 or not pm.scales.flags.writeable:
                    self.stored_planes.setdefault(name, pm)   # what the file holds, for Model.save
                    owner.planes = bits.PlaneMatrix(pm.planes, pm.float_scales(), pm.out_features,
                                                    pm.in_features, pm.group)
                    self.version += 1
                out[name] = owner.planes.scales
            else:
                out[name] = getattr(owner, attr)
        return out


# What Weights.parameters selects by: plane scales of the layers' linear maps, norm weights (and
# layer norms' biases), the linear maps' biases, and embeddings' and head's scales (and bias).
PARAMETER_KINDS = ("scales", "norms", "biases", "embeddings", "head")


class _Reader:
    def __init__(self, f: ModelFile):
        self.f = f
        self.recipes = f.meta.tensors

    def recipe(self, name: str) -> dict:
        r = self.recipes.get(name)
        if not isinstance(r, dict) or "kind" not in r:
            raise FormatError(f"{self.f.path}: no recipe recorded for '{name}'")
        return r

    def vec(self, name: str, n: int) -> np.ndarray:
        return np.array(self.f.get(name, np.float32, (n,)), dtype=np.float32)  # own, writable copy

    def norm(self, name: str, n: int, with_bias: bool) -> Norm:
        return Norm(self.vec(name + ".weight", n), self.vec(name + ".bias", n) if with_bias else None)

    def planes(self, name: str, r: dict, out: int, inp: int) -> bits.PlaneMatrix:
        k, group = r.get("k"), r.get("group")
        if not isinstance(k, int) or not 1 <= k <= bits.MAX_PLANES:
            raise FormatError(f"{self.f.path}: '{name}' recipe has invalid k={k!r}")
        try:
            bits.check_group(inp, group)
        except (TypeError, ValueError) as exc:
            raise FormatError(f"{self.f.path}: '{name}' recipe: {exc}") from None
        tiles, ncol = bits.padded_out(out) // bits.TILE, bits.padded_in(inp) // 8
        planes = self.f.get(name + ".planes", np.uint8, (k, tiles, ncol, bits.TILE))
        scales = self.f.get(name + ".scales", (np.float16, np.float32, np.uint8), (k, tiles, bits.n_groups(inp, group), bits.TILE))
        rows = self.f.get(name + ".scale_rows", np.float32, (tiles, bits.TILE)) if scales.dtype == np.uint8 else None
        return bits.PlaneMatrix(planes, scales, out, inp, group, rows)  # views: the kernels read them as stored

    def linear(self, name: str, out: int, inp: int, bias: bool) -> Linear:
        r = self.recipe(name)
        b = self.vec(name + ".bias", out) if bias else None
        if r["kind"] == "planes":
            return Linear(name, out, inp, planes=self.planes(name, r, out, inp), bias=b)
        if r["kind"] == "dense":
            w = self.f.get(name + ".weight", (np.float32, np.float16), (out, inp))
            return Linear(name, out, inp, weight=w, bias=b)
        raise FormatError(f"{self.f.path}: '{name}' has unknown kind {r['kind']!r}")

    def rows(self, name: str, rows: int, cols: int) -> Rows:
        r = self.recipe(name)
        if r["kind"] == "int8_rows":
            q = self.f.get(name + ".q", np.int8, (rows, cols))
            if q.size and int(q.min()) < -127:   # the kernels take the sign of w (format: clip to +-127)
                raise FormatError(f"{self.f.path}: '{name}.q' holds -128; int8 rows are stored in -127..127")
            return Rows(name, rows, cols, q=q, row_scale=self.vec(name + ".row_scale", rows))
        if r["kind"] == "dense":
            return Rows(name, rows, cols, weight=self.f.get(name + ".weight", (np.float32, np.float16), (rows, cols)))
        if r["kind"] == "planes":
            return Rows(name, rows, cols, planes=self.planes(name, r, rows, cols))
        raise FormatError(f"{self.f.path}: '{name}' has unknown kind {r['kind']!r}")


@dataclass(frozen=True)
class Slot:
    """One tensor group of a model, as its config fixes it."""
    role: str        # "linear": (out, in) | "rows": embed, head (rows, cols) | "norm": (n,) | "pos_embed": (max_seq, dim)
    shape: tuple
    bias: bool = False


def layer_slots(cfg: ModelConfig) -> dict[str, Slot]:
    """The tensor groups of every layer, by part name (the same for each layer)."""
    ln, d, q, kv, h = cfg.norm == "layer", cfg.dim, cfg.q_dim, cfg.kv_dim, cfg.hidden_dim
    slots = {"attn_norm": Slot("norm", (d,), ln),
             "wq": Slot("linear", (q, d), cfg.qkv_bias), "wk": Slot("linear", (kv, d), cfg.qkv_bias),
             "wv": Slot("linear", (kv, d), cfg.qkv_bias), "wo": Slot("linear", (d, q), cfg.o_bias),
             "mlp_norm": Slot("norm", (d,), ln),
             "w_up": Slot("linear", (h, d), cfg.mlp_bias), "w_down": Slot("linear", (d, h), cfg.mlp_bias)}
    if cfg.gated_mlp:
        slots["w_gate"] = Slot("linear", (h, d), cfg.mlp_bias)
    if cfg.sub_norms:
        slots["attn_sub_norm"] = Slot("norm", (q,))
        slots["mlp_sub_norm"] = Slot("norm", (h,))
    return slots


def model_slots(cfg: ModelConfig) -> dict[str, Slot]:
    """The tensor groups outside the layers, by name."""
    slots = {"embed": Slot("rows", (cfg.vocab_size, cfg.dim)), "final_norm": Slot("norm", (cfg.dim,), cfg.norm == "layer")}
    if not cfg.tie_embeddings:
        slots["head"] = Slot("rows", (cfg.vocab_size, cfg.dim))
    if cfg.pos == "learned":
        slots["pos_embed"] = Slot("pos_embed", (cfg.max_seq_len, cfg.dim))
    return slots


def slot(cfg: ModelConfig, name: str) -> Slot | None:
    """The tensor group `name` ("embed", "layers.3.wq", ...) of a model of `cfg`; None if it has none."""
    m = re.fullmatch(r"layers\.(\d+)\.(\w+)", name)
    if m:
        return layer_slots(cfg).get(m[2]) if int(m[1]) < cfg.n_layers else None
    return model_slots(cfg).get(name)


def load_weights(f: ModelFile) -> Weights:
    try:
        cfg = ModelConfig.from_dict(f.meta.config)
    except FormatError as exc:
        raise FormatError(f"{f.path}: {exc}") from None
    rd = _Reader(f)
    per_layer, top = layer_slots(cfg), model_slots(cfg)

    def part(name, s: Slot):
        if s.role == "norm":
            return rd.norm(name, s.shape[0], s.bias)
        return rd.linear(name, *s.shape, s.bias)

    layers = []
    for i in range(cfg.n_layers):
        layers.append(Layer(**{p: part(N.layer(i, p), s) for p, s in per_layer.items()}))
    w = Weights(
        cfg=cfg, embed=rd.rows("embed", *top["embed"].shape), layers=layers,
        final_norm=part("final_norm", top["final_norm"]),
        head=rd.rows("head", *top["head"].shape) if "head" in top else None,
        pos_embed=np.asarray(f.get("pos_embed.weight", np.float32, top["pos_embed"].shape)) if "pos_embed" in top else None,
        inv_freq=rd.vec("rope.inv_freq", cfg.head_dim // 2) if cfg.pos == "rope" else None,
        mlp_rotation=_rotation(f, "mlp_rotation", cfg.hidden_dim) if cfg.mlp_rotation else None,
        file=f)
    _check_finite(w)
    return w


def _check_finite(w: Weights):
    """Refuse non-finite continuous parameters (they would give NaN logits).  Dense weights are
    views of the file, left unread here: a NaN among them is the engine's non-finite logits error."""
    where = w.file.path if w.file is not None else "model"
    arrays = [(name, getattr(owner, attr)) for name, _, _, owner, attr in w.named_parameters()]
    arrays += [("rope.inv_freq", w.inv_freq), ("pos_embed.weight", w.pos_embed)]
    if w.mlp_rotation is not None:
        arrays += [("mlp_rotation.signs", w.mlp_rotation.signs), ("mlp_rotation.mix", w.mlp_rotation.mix)]
    for name, a in arrays:
        if isinstance(a, bits.PlaneMatrix):
            a = a.scales if a.scale_rows is None else a.scale_rows   # uint8 codes are always finite
        if a is not None and not np.isfinite(a).all():
            raise FormatError(f"{where}: tensor '{name}' holds non-finite values (NaN or infinity)")


def _rotation(f: ModelFile, name: str, n: int) -> Rotation:
    m = split_pow2(n)[1]
    return Rotation(np.array(f.get(name + ".signs", np.float32, (n,))), np.array(f.get(name + ".mix", np.float32, (m, m))))
