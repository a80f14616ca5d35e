"""What the zeroth-order trainer moves: a set of named float32 tensors theta, and how they map onto
the model's continuous parameters (Model.parameters).

The variance of a zeroth-order estimate grows with the number of perturbed coordinates, so plane
scales are trained through multipliers at a chosen granularity, each starting at 1:

    group   one multiplier per scale (every group of every row and plane)   scales = base * m
    row     one per (row, plane), shared by the row's groups                (k, tiles, 1, 16)
    tensor  one per (tensor, plane)                                         (k, 1, 1, 1)
    kind    one per (kind of tensor, plane), shared by every layer: "wq.scales" moves all the
            layers' wq scales together; a norm ("attn_norm.weight", "final_norm.weight") is one multiplier of its
            weights, a bias kind one multiplier of its biases                (k, 1, 1, 1) or (1,)
            (plane i's multiplier is shared by the kind's tensors that have a plane i)
    shared  one per kind of tensor, shared by every layer and plane           (1, 1, 1, 1) or (1,)

so eps and the learning rate are relative changes whatever the scales' magnitudes.  At the finer
granularities norm weights and biases are trained as they are.  The packed sign bits never change.
A zeroth-order estimate's variance grows with the number of coordinates, and a direction shared by
all layers can be one whose effect agrees across examples (docs/preferences.md measures this).
"""
from __future__ import annotations

import numpy as np

GRANULARITIES = ("group", "row", "tensor", "kind", "shared")
KINDS = ("scales", "norms", "biases", "embeddings", "head")


def parse_layers(spec, n_layers: int):
    """'20-29', '3', '0-3,7' or None -> a sorted list of layer indices (None: all)."""
    if spec is None or spec == "":
        return None
    if not isinstance(spec, str):
        return sorted(int(i) for i in spec)
    out = set()
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            a, b = int(lo), int(hi) if hi else int(lo)
        except ValueError:
            raise ValueError(f"layers must look like '20-29' or '0-3,7', got {spec!r}") from None
        if not 0 <= a <= b < n_layers:
            raise ValueError(f"layers {part.strip()!r} are outside 0..{n_layers - 1}")
        out.update(range(a, b + 1))
    return sorted(out)


class Trainable:
    """theta (name -> float32 array) over a model's parameters of `kinds` in `layers`."""

    def __init__(self, model, kinds=("scales",), layers=None, granularity: str = "row", tensors=None):
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        kinds = tuple(kinds)
        bad = [k for k in kinds if k not in KINDS]
        if bad or not kinds:
            raise ValueError(f"parameter kinds must be among {', '.join(KINDS)}, got {list(kinds)}")
        self.granularity = granularity
        self.target = model.parameters(kinds, layers)      # the arrays the engine reads
        if not self.target:
            raise ValueError(f"the model has no parameters of kinds {list(kinds)} in those layers")
        if tensors:
            wanted = [t.strip() for t in (tensors.split(",") if isinstance(tensors, str) else tensors) if t.strip()]
            have = sorted({tensor_name(n) for n in self.target})
            unknown = [t for t in wanted if t not in have]
            if unknown or not wanted:
                raise ValueError(f"tensors {unknown or tensors!r}: not among the {', '.join(kinds)} of those layers "
                                 f"({', '.join(have)})")
            self.target = {n: a for n, a in self.target.items() if tensor_name(n) in wanted}
        # the scales before training, which the multipliers multiply: read again from the file's
        # stored form (8-bit codes or float16) at every apply when they are still the file's, so
        # training holds no second float32 copy of every scale
        self.base: dict[str, object] = {}
        self.theta: dict[str, np.ndarray] = {}
        self.members: dict[str, list[str]] = {}            # theta name -> the target arrays it sets
        self.multipliers: set[str] = set()                 # theta names that multiply a base (start at 1)
        stored = model.weights.stored_planes
        for name, arr in self.target.items():
            if name.endswith(".scales"):
                pm = stored.get(name)
                self.base[name] = pm if pm is not None and np.array_equal(pm.float_scales(), arr) else arr.copy()
            elif granularity in ("kind", "shared"):
                self.base[name] = arr.copy()
            if granularity in ("kind", "shared"):
                # plane i's multiplier is shared by the kind's tensors that have a plane i (a bit
                # budget may give the layers different plane counts)
                key = kind_of(name)
                planes = arr.shape[0] if granularity == "kind" else 1
                shape = (planes, 1, 1, 1) if name.endswith(".scales") else (1,)
                if key not in self.theta or self.theta[key].shape[0] < shape[0]:
                    self.theta[key] = np.ones(shape, np.float32)
                self.members.setdefault(key, []).append(name)
                self.multipliers.add(key)
            elif name.endswith(".scales"):
                self.theta[name] = np.ones(self._mult_shape(arr.shape), np.float32)
                self.members[name] = [name]
                self.multipliers.add(name)
            else:
                self.theta[name] = arr.copy()
                self.members[name] = [name]

    def _mult_shape(self, shape):
        k, tiles, ng, lanes = shape                        # scales: (k, out_pad/16, n_groups, 16)
        return {"group": shape, "row": (k, tiles, 1, lanes), "tensor": (k, 1, 1, 1)}[self.granularity]

    @property
    def size(self) -> int:
        return int(sum(a.size for a in self.theta.values()))

    def apply(self):
        """Write theta into the model's parameters (in place: the engine sees it next call)."""
        for key, t in self.theta.items():
            for name in self.members[key]:
                if key in self.multipliers:
                    b, out = self.base[name], self.target[name]
                    m = t[: out.shape[0]] if t.ndim == 4 else t
                    np.multiply(b if isinstance(b, np.ndarray) else b.float_scales(), m, out=out)
                else:
                    self.target[name][...] = t

    def theta_grad(self, target_grads: dict[str, np.ndarray], scale: float = 1.0) -> dict[str, np.ndarray]:
        """d loss / d theta from d loss / d (the model's parameters) (by target name; a missing
        name has gradient 0), times `scale`: a multiplier's is the sum, over what it covers, of
        the parameter's gradient times its base value (apply's chain rule)."""
        out = {key: np.zeros_like(t) for key, t in self.theta.items()}
        for key, t in self.theta.items():
            for name in self.members[key]:
                g = target_grads.get(name)
                if g is None:
                    continue
                if key not in self.multipliers:
                    out[key] += g
                    continue
                b = self.base[name]
                gb = g * (b if isinstance(b, np.ndarray) else b.float_scales())
                if t.ndim == 4:
                    k = gb.shape[0]
                    axes = tuple(a for a in range(4) if t.shape[a] == 1 and gb.shape[a] != 1)
                    out[key][:k] += gb.sum(axis=axes, keepdims=True)
                else:
                    out[key] += gb.sum()
            out[key] *= np.float32(scale)
        return out

    def project(self):
        """Keep what must stay non-negative so: scale multipliers (a plane scale is a magnitude)."""
        for key in self.multipliers:
            if self.members[key][0].endswith(".scales"):
                np.maximum(self.theta[key], 0, out=self.theta[key])

    def copy(self) -> dict[str, np.ndarray]:
        return {n: a.copy() for n, a in self.theta.items()}

    def restore(self, saved: dict[str, np.ndarray]):
        for n, a in saved.items():
            self.theta[n][...] = a
        self.apply()

    def decays(self, name: str) -> bool:
        """Weight decay pulls multipliers toward 1 and biases toward 0; never norms."""
        return "norm" not in name

    def anchor(self, name: str) -> float:
        """Where weight decay pulls theta[name]: 1 for a multiplier, 0 for a bias."""
        return 1.0 if name in self.multipliers else 0.0


def kind_of(name: str) -> str:
    """'layers.3.wq.scales' -> 'wq.scales', 'layers.0.attn_norm.weight' -> 'attn_norm.weight',
    'final_norm.weight' as it is: the name a tensor shares with its counterparts in every layer."""
    parts = name.split(".")
    return ".".join(parts[2:]) if parts[0] == "layers" and len(parts) > 2 else name


def tensor_name(name: str) -> str:
    """'layers.3.wq.scales' -> 'wq', 'layers.0.attn_norm.weight' -> 'attn_norm', 'final_norm.weight'
    -> 'final_norm', 'head.row_scale' -> 'head'."""
    return kind_of(name).split(".")[0]
