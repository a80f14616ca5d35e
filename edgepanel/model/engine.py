"""Forward engines: "c" runs the whole forward pass in C over the mapped weights; "reference"
is the NumPy specification (model/reference.py).  Both take token ids and a cache they made."""
from __future__ import annotations

import numpy as np

from . import reference


class ReferenceEngine:
    name = "reference"

    def __init__(self, weights, threads=None):
        self.w = weights
        self.threads = threads

    def new_cache(self, capacity: int):
        return reference.KVCache(self.w.cfg, capacity)

    def forward(self, tokens: np.ndarray, cache, all_logits: bool = False) -> np.ndarray:
        return reference.forward(self.w, tokens, cache, all_logits)


def make(weights, threads=None, name=None):
    """`name`: "c", "reference", or None for C when the kernels are built."""
    from ..kernels import _cffi

    if name is None:
        name = "c" if _cffi.lib is not None else "reference"
    if name == "reference":
        return ReferenceEngine(weights, threads)
    if name == "c":
        from .cengine import CEngine
        return CEngine(weights, threads)
    raise ValueError(f"unknown engine {name!r}; choose c or reference")
