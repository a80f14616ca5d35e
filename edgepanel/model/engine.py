"""Forward engines: "c" runs the whole forward pass in C over the mapped weights; "reference"
is the NumPy specification (model/reference.py).  Both take token ids and a cache they made."""
from __future__ import annotations

import numpy as np

from . import reference


def check_owners(prefixes, owners, n_seqs: int) -> None:
    """The prefixes/owners arguments of an engine's logprobs: one index per sequence, each -1
    (no prefix) or naming a prefix of at least one token."""
    if prefixes is None:
        return
    if owners is None or len(owners) != n_seqs:
        raise ValueError("owners must give one prefix index (or -1) per sequence")
    bad = [o for o in owners if not -1 <= int(o) < len(prefixes)]
    if bad:
        raise ValueError(f"owner {bad[0]} names no prefix (there are {len(prefixes)})")
    if any(len(q) == 0 for q in prefixes):
        raise ValueError("a prefix must have at least one token")


class ReferenceEngine:
    """The NumPy forward pass; with `backend` (a kernels backend) its binarized products run on
    those kernels (the Numba fallback), else on the NumPy reference arithmetic."""

    name = "reference"

    def __init__(self, weights, threads=None, backend=None, kv_dtype: str | None = None):
        self.w = weights
        self.threads = threads
        self.backend = backend
        reference.kv_dtype(kv_dtype)
        self.kv_dtype = kv_dtype or reference.KV_DEFAULT

    def new_cache(self, capacity: int):
        return reference.KVCache(self.w.cfg, capacity, self.kv_dtype)

    def _linear(self, lin, x):
        if lin.planes is None or self.backend is None:
            return reference.linear(lin, x)
        q, s = self.backend.quantize_i8(np.ascontiguousarray(x, np.float32))
        y = self.backend.gemm_planes_i8(q, s, lin.planes, self.threads)
        return y + lin.bias if lin.bias is not None else y

    def forward(self, tokens: np.ndarray, cache, all_logits: bool = False) -> np.ndarray:
        return reference.forward(self.w, tokens, cache, all_logits, linear=self._linear)

    def logprobs(self, sequences, targets=None, prefixes=None, owners=None) -> list[np.ndarray]:
        """log p(seq[t] | seq[:t]) for t = 1..len-1 of every sequence, one pass each; with
        `targets` ((len-1, K) ids per sequence) the log-probabilities at those ids, float32.
        With `prefixes` and `owners` (one prefix index or -1 per sequence), sequence i continues
        after prefixes[owners[i]], whose cache is computed once and copied."""
        check_owners(prefixes, owners, len(sequences))
        caches = {}
        out = []
        for i, seq in enumerate(sequences):
            seq = np.asarray(seq, np.int64)
            o = -1 if prefixes is None else int(owners[i])
            if o < 0:
                cache = self.new_cache(len(seq))
            else:
                if o not in caches:
                    pre = np.asarray(prefixes[o], np.int64)
                    caches[o] = self.new_cache(len(pre))
                    self.forward(pre, caches[o])
                pc = caches[o]
                cache = self.new_cache(pc.length + len(seq))
                cache.k[:, :pc.length], cache.v[:, :pc.length] = pc.k[:, :pc.length], pc.v[:, :pc.length]
                cache.length = pc.length
            lg = self.forward(seq, cache, all_logits=True)[:-1]
            if targets is None:
                out.append(reference.log_softmax_at(lg, seq[1:]))
            else:
                ids = np.asarray(targets[i], np.int64)
                lp = np.stack([reference.log_softmax_at(lg, ids[:, j]) for j in range(ids.shape[1])], axis=1)
                out.append(np.where(ids < 0, 0.0, lp).astype(np.float32))
        return out


def make(weights, threads=None, name=None, kv_dtype: str | None = None):
    """`name`: "c", "reference", or None: C when the default kernels are the C ones (see
    edgepanel.kernels: EDGEPANEL_BACKEND), else the NumPy pass on the default kernels.
    `kv_dtype`: what its caches hold, "float16" (None: the default) or "float32"."""
    from .. import kernels

    reference.kv_dtype(kv_dtype)
    if name is None:
        backend = kernels.get()
        if backend.name != "c":
            return ReferenceEngine(weights, threads, backend if backend.name == "numba" else None, kv_dtype)
        name = "c"
    if name == "reference":
        return ReferenceEngine(weights, threads, kv_dtype=kv_dtype)
    if name == "c":
        import os

        from .cengine import CEngine
        return CEngine(weights, threads, os.environ.get("EDGEPANEL_ISA") or None, kv_dtype)   # None: the best here
    raise ValueError(f"unknown engine {name!r}; choose c or reference")
