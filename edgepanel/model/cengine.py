"""The C forward engine: the model described to csrc/forward.c as plain structs pointing into
the mapped weights and the float32 parameter arrays (which stay changeable between calls).

One engine may be called from several Python threads at once (the C call releases the GIL): each
thread has its own workspace, and a call holds the structs it started with (with everything they
point to) until it returns, even if another thread rebuilds them meanwhile."""
from __future__ import annotations

import threading

import numpy as np

from ..errors import BackendUnavailable
from ..kernels import native
from .engine import check_owners
from .reference import KVCache
from .reference import kv_dtype as kv_dtype_of
from .weights import Linear, Norm, Rows, Weights


class CEngine:
    name = "c"

    def __init__(self, weights: Weights, threads: int | None = None, isa: str | None = None,
                 kv_dtype: str | None = None):
        if native.lib is None:
            raise BackendUnavailable(f"the C kernels are not built ({native.IMPORT_ERROR})")
        self.ffi, self.lib = native.ffi, native.lib
        self.kt = native.CBackend(isa).table
        self.w = weights
        self.threads = threads or 0
        self.kv_dtype = np.dtype(kv_dtype_of(kv_dtype)).name
        self._lock = threading.Lock()
        self._local = threading.local()     # per-thread workspace
        self._keep: list = []               # what the structs being built point to
        self._built = (self._build(), self._keep, weights.version)

    @property
    def model(self):
        return self._structs()[0]

    def _structs(self):
        """(structs, what they point to, version), rebuilt when a parameter's storage was replaced
        since they were built (Weights.parameters widening stored scales to float32): no stale
        pointers.  A caller keeps the tuple for the length of its C call."""
        built = self._built
        if built[2] != self.w.version:
            with self._lock:
                if self._built[2] != self.w.version:
                    version = self.w.version
                    self._keep = []
                    self._built = (self._build(), self._keep, version)
                built = self._built
        return built

    # -- building the structs ---------------------------------------------------------------
    def _ptr(self, ctype, a):
        if a is None:
            return self.ffi.NULL
        self._keep.append(a)
        return self.ffi.cast(ctype, a.ctypes.data)

    def _matrix(self, dst, m):
        lib = self.lib
        if isinstance(m, Linear):
            dst.rows, dst.cols = m.out_features, m.in_features
            dst.bias = self._ptr("float *", m.bias)
            if m.planes is not None:
                dst.kind = lib.EP_MAT_PLANES
                dst.k, dst.group = m.planes.k, m.planes.group
                dst.planes = self._ptr("uint8_t *", m.planes.planes)
                dst.scales = self._ptr("void *", m.planes.scales)
                dst.scales_kind = m.planes.scales_kind
                dst.scale_rows = self._ptr("float *", m.planes.scale_rows)
            else:
                dst.kind = lib.EP_MAT_F16 if m.weight.dtype == np.float16 else lib.EP_MAT_F32
                dst.weight = self._ptr("void *", np.ascontiguousarray(m.weight))
        elif isinstance(m, Rows):
            dst.rows, dst.cols = m.rows, m.cols
            if m.planes is not None:
                self._matrix(dst, m.as_linear())
            elif m.q is not None:
                dst.kind = lib.EP_MAT_I8ROWS
                dst.weight = self._ptr("void *", m.q)
                dst.row_scale = self._ptr("float *", m.row_scale)
            else:
                dst.kind = lib.EP_MAT_F16 if m.weight.dtype == np.float16 else lib.EP_MAT_F32
                dst.weight = self._ptr("void *", np.ascontiguousarray(m.weight))

    def _norm(self, dst, n: Norm | None):
        if n is not None:
            dst.weight = self._ptr("float *", n.weight)
            dst.bias = self._ptr("float *", n.bias)

    def _build(self):
        ffi, w, c = self.ffi, self.w, self.w.cfg
        m = ffi.new("ep_model *")
        m.vocab, m.dim, m.n_layers = c.vocab_size, c.dim, c.n_layers
        m.n_heads, m.n_kv_heads, m.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        m.hidden_dim, m.max_seq = c.hidden_dim, c.max_seq_len
        m.norm = getattr(self.lib, "EP_NORM_" + c.norm.upper())  # config.NORMS / ACTS by name (edgepanel.h)
        m.act, m.gated, m.norm_eps = getattr(self.lib, "EP_ACT_" + c.act.upper()), int(c.gated_mlp), c.norm_eps
        m.inv_freq = self._ptr("float *", w.inv_freq)
        m.pos_embed = self._ptr("float *", None if w.pos_embed is None else np.ascontiguousarray(w.pos_embed, np.float32))
        self._matrix(m.embed, w.embed)
        self._matrix(m.head, w.head if w.head is not None else w.embed)
        self._norm(m.final_norm, w.final_norm)
        layers = ffi.new("ep_layer[]", c.n_layers)
        for i, L in enumerate(w.layers):
            d = layers[i]
            for name in ("attn_norm", "attn_sub_norm", "mlp_norm", "mlp_sub_norm"):
                self._norm(getattr(d, name), getattr(L, name))
            for name in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"):
                lin = getattr(L, name)
                if lin is not None:
                    self._matrix(getattr(d, name), lin)
        m.layers = layers
        self._keep.append(layers)
        if w.mlp_rotation is not None:
            from ..rotation import split_pow2
            m.rot_p, m.rot_m = split_pow2(c.hidden_dim)
            m.rot_signs = self._ptr("float *", np.ascontiguousarray(w.mlp_rotation.signs, np.float32))
            m.rot_mix = self._ptr("float *", np.ascontiguousarray(w.mlp_rotation.mix, np.float32))
        return m

    # -- running ----------------------------------------------------------------------------
    def new_cache(self, capacity: int) -> KVCache:
        return KVCache(self.w.cfg, capacity, self.kv_dtype)

    def _kv_type(self, k, v) -> int:
        """The C cache kind of arrays k, v (float16 or float32, C-contiguous, alike)."""
        if k.dtype != v.dtype or k.dtype not in (np.float16, np.float32) or not (k.flags.c_contiguous and v.flags.c_contiguous):
            raise ValueError(f"a cache's keys and values must be C-contiguous float16 or float32 arrays of one type, "
                             f"got {k.dtype} and {v.dtype}")
        return self.lib.EP_KV_F16 if k.dtype == np.float16 else self.lib.EP_KV_F32

    def _workspace(self, model, n: int):
        need = self.lib.ep_forward_workspace(model, n, self.threads)
        buf = getattr(self._local, "work", None)
        if buf is None or buf.nbytes < need + 64:
            buf = self._local.work = np.empty(need + 64, np.uint8)
        off = -buf.ctypes.data % 64
        return self.ffi.cast("void *", buf.ctypes.data + off), buf.nbytes - off

    def forward(self, tokens: np.ndarray, cache: KVCache, all_logits: bool = False) -> np.ndarray:
        tokens = np.ascontiguousarray(tokens, np.int32)
        n = len(tokens)
        if cache.length + n > cache.capacity:
            raise ValueError(f"{cache.length + n} positions do not fit the cache ({cache.capacity})")
        logits = np.empty((n if all_logits else 1, self.w.cfg.vocab_size), np.float32)
        built = self._structs()
        work, nbytes = self._workspace(built[0], n)
        ffi = self.ffi
        kv = self._kv_type(cache.k, cache.v)
        rc = self.lib.ep_forward(self.kt, built[0], ffi.cast("void *", cache.k.ctypes.data),
                                 ffi.cast("void *", cache.v.ctypes.data), kv, cache.capacity,
                                 ffi.cast("int32_t *", tokens.ctypes.data), n, cache.length, int(all_logits),
                                 ffi.cast("float *", logits.ctypes.data), work, nbytes, self.threads)
        if rc != 0:
            raise ValueError(f"forward pass failed in C ({native.error_name(rc)}): tokens out of range "
                             f"or context full?")
        cache.length += n
        return logits if all_logits else logits[0]

    def logprobs(self, sequences: list[np.ndarray], targets=None, prefixes=None, owners=None) -> list[np.ndarray]:
        """log p(seq[t] | seq[:t]) for t = 1..len-1 of every sequence (float64 (len-1,)), or with
        `targets` (one int32 (len-1, K) array per sequence) log p(targets[t-1, j] | seq[:t])
        (float32 (len-1, K)); in one batched pass (ep_forward_batch: all products over all tokens
        at once, the log-softmax in C: no logits come out).  With `prefixes` (token arrays) and
        `owners` (one index per sequence, -1 for none), sequence i continues after
        prefixes[owners[i]]: each prefix is run once, its keys and values copied to the sequences
        that share it, and the probabilities are conditioned on prefix + seq[:t]."""
        seqs = [np.ascontiguousarray(s, np.int32) for s in sequences]
        lens = np.array([len(s) for s in seqs], np.int64)
        n = int(lens.sum())
        pos = np.zeros(len(seqs), np.int64)
        if prefixes is not None:
            check_owners(prefixes, owners, len(seqs))
            pre = [np.ascontiguousarray(q, np.int32) for q in prefixes]
            pos = np.array([len(pre[o]) if o >= 0 else 0 for o in owners], np.int64)
        cap = int((lens + pos).max())
        tokens = np.concatenate(seqs)
        if targets is None:
            kt = 1
            tg = np.concatenate([np.append(s[1:], -1).astype(np.int32) for s in seqs])
        else:
            kt = int(targets[0].shape[1])
            pad = np.full((1, kt), -1, np.int32)
            tg = np.ascontiguousarray(np.concatenate([np.concatenate([np.asarray(t, np.int32), pad]) for t in targets]))
        c = self.w.cfg
        shape = (len(seqs), c.n_layers, cap, c.n_kv_heads, c.head_dim)
        k, v = np.empty(shape, self.kv_dtype), np.empty(shape, self.kv_dtype)
        if prefixes is not None and pre:
            pk, pv = self._prefill(pre)
            for i, o in enumerate(owners):
                if o >= 0:
                    k[i, :, :pos[i]] = pk[o, :, :pos[i]]
                    v[i, :, :pos[i]] = pv[o, :, :pos[i]]
        out = np.empty((n, kt), np.float32)
        self._batch(k, v, cap, tokens, lens, pos, self.lib.EP_OUT_LOGPROB, tg, kt, out)
        ends = np.cumsum(lens)
        if targets is None:
            return [out[e - ln:e - 1, 0].astype(np.float64) for e, ln in zip(ends, lens)]
        return [out[e - ln:e - 1] for e, ln in zip(ends, lens)]

    def _batch(self, k, v, cap, tokens, lens, pos, kind, tg, kt, out):
        """One ep_forward_batch call over the sequences (caches k, v of capacity cap each)."""
        built = self._structs()
        work, nbytes = self._workspace(built[0], len(tokens))
        p = lambda t, a: self.ffi.cast(t, a.ctypes.data)  # noqa: E731
        rc = self.lib.ep_forward_batch(self.kt, built[0], p("void *", k), p("void *", v), self._kv_type(k, v), cap,
                                       p("int32_t *", tokens), len(tokens), p("int64_t *", lens), p("int64_t *", pos),
                                       len(lens), kind, self.ffi.NULL if tg is None else p("int32_t *", tg), kt,
                                       p("float *", out), work, nbytes, self.threads)
        if rc != 0:
            raise ValueError(f"batched forward pass failed in C ({native.error_name(rc)})")

    def _prefill(self, prefixes):
        """Keys and values (P, n_layers, cap, n_kv_heads, head_dim) of each prefix from an empty
        context, in one batched pass (the last tokens' logits are computed and dropped)."""
        lens = np.array([len(q) for q in prefixes], np.int64)
        cap = int(lens.max())
        c = self.w.cfg
        shape = (len(prefixes), c.n_layers, cap, c.n_kv_heads, c.head_dim)
        k, v = np.empty(shape, self.kv_dtype), np.empty(shape, self.kv_dtype)
        out = np.empty((len(prefixes), c.vocab_size), np.float32)
        self._batch(k, v, cap, np.concatenate(prefixes), lens, np.zeros(len(prefixes), np.int64),
                    self.lib.EP_OUT_LAST, None, 0, out)
        return k, v
