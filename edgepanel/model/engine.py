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
    if name in (None, "reference"):
        return ReferenceEngine(weights, threads)
    raise ValueError(f"unknown engine {name!r}")
