"""What the zeroth-order trainer moves: a set of named float32 tensors theta, and how they map onto
the model's continuous parameters (Model.parameters).

The variance of a zeroth-order estimate grows with the number of perturbed coordinates, so plane
scales are trained through multipliers at a chosen granularity, each starting at 1:

    group   one multiplier per scale (every group of every row and plane)   scales = base * m
    row     one per (row, plane), shared by the row's groups                (k, tiles, 1, 16)
    tensor  one per (tensor, plane)                                         (k, 1, 1, 1)

so eps and the learning rate are relative changes whatever the scales' magnitudes.  Norm weights
and biases are trained as they are.  The packed sign bits never change.
"""
from __future__ import annotations

import numpy as np

GRANULARITIES = ("group", "row", "tensor")
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

    def __init__(self, model, kinds=("scales",), layers=None, granularity: str = "row"):
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
        # the scales before training, which the multipliers multiply: read again from the file's
        # stored form (8-bit codes or float16) at every apply when they are still the file's, so
        # training holds no second float32 copy of every scale
        self.base: dict[str, object] = {}
        self.theta: dict[str, np.ndarray] = {}
        stored = model.weights.stored_planes
        for name, arr in self.target.items():
            if name.endswith(".scales"):
                pm = stored.get(name)
                self.base[name] = pm if pm is not None and np.array_equal(pm.float_scales(), arr) else arr.copy()
                self.theta[name] = np.ones(self._mult_shape(arr.shape), np.float32)
            else:
                self.theta[name] = arr.copy()

    def _mult_shape(self, shape):
        k, tiles, ng, lanes = shape                        # scales: (k, out_pad/16, n_groups, 16)
        return {"group": shape, "row": (k, tiles, 1, lanes), "tensor": (k, 1, 1, 1)}[self.granularity]

    @property
    def size(self) -> int:
        return int(sum(a.size for a in self.theta.values()))

    def apply(self):
        """Write theta into the model's parameters (in place: the engine sees it next call)."""
        for name, t in self.theta.items():
            if name in self.base:
                b = self.base[name]
                np.multiply(b if isinstance(b, np.ndarray) else b.float_scales(), t, out=self.target[name])
            else:
                self.target[name][...] = t

    def project(self):
        """Keep what must stay non-negative so: scale multipliers (a plane scale is a magnitude)."""
        for name in self.base:
            np.maximum(self.theta[name], 0, out=self.theta[name])

    def copy(self) -> dict[str, np.ndarray]:
        return {n: a.copy() for n, a in self.theta.items()}

    def restore(self, saved: dict[str, np.ndarray]):
        for n, a in saved.items():
            self.theta[n][...] = a
        self.apply()

    def decays(self, name: str) -> bool:
        """Weight decay pulls scale multipliers toward 1 and biases toward 0; never norms."""
        return "norm" not in name
