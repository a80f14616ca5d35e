"""The readable forward pass in NumPy: the specification the C engine is tested against, and the
fallback when the C kernels are not built.  Top to bottom: embed, then per layer norm, q/k/v,
RoPE, attention over the cache, o, residual, norm, MLP, residual; final norm; head.

Binarized linear layers compute exactly what the kernels do: int8 activations per token, integer
sums per group, float scales (edgepanel.bits).  Dense layers are float32 matmuls.

`block` is the one statement of a layer's order of operations; three passes run it, each with its
own arithmetic (an `ops` object): this forward (CacheOps: attention over a KV cache), calibration
(convert/calibrate.py: NumPy over S sequences at once, each linear layer fitted as it is reached)
and scale tuning (convert/recover.py: torch, with autograd).  `ops` provides, by tensor name
(edgepanel.model.names):
  norm(name, x, rms=False)         rms: an RMS norm whatever cfg.norm is (BitNet's sub-norms)
  linear(name, x)                  (n, in) -> (n, out)
  rope(x, positions)               x (n, heads, head_dim), rotated at each token's position
  attend(i, q, k, v, positions)    q (n, H, hd), k and v (n, Hkv, hd) -> (n, H, hd), causal
  act(x)                           the MLP activation
  mlp_rotation(u)                  the MLP's inner rotation before down (identity without)
  embed(tokens), pos_embed(positions)   rows of the embeddings and learned positions (`embed`)
"""
from __future__ import annotations

import math

import numpy as np

from .. import bits
from . import names as N
from .config import ModelConfig
from .weights import Linear, Norm, Rows, Weights


KV_DTYPES = {"float16": np.float16, "float32": np.float32}
KV_DEFAULT = "float16"    # what the engines' caches hold unless told otherwise


def kv_dtype(name) -> type:
    """The NumPy type of a cache holding `name` ("float16" or "float32"; None: KV_DEFAULT)."""
    name = KV_DEFAULT if name is None else name
    if name not in KV_DTYPES:
        raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {name!r}")
    return KV_DTYPES[name]


class KVCache:
    """Keys and values per layer: (n_layers, capacity, n_kv_heads, head_dim), float32 or float16
    ("float16": each key and value rounded to nearest even when it is stored, half the bytes;
    attention widens them back exactly)."""

    def __init__(self, cfg: ModelConfig, capacity: int, dtype: str = "float32"):
        shape = (cfg.n_layers, capacity, cfg.n_kv_heads, cfg.head_dim)
        t = kv_dtype(dtype)
        self.k = np.zeros(shape, t)
        self.v = np.zeros(shape, t)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[1]


def linear(lin: Linear, x: np.ndarray) -> np.ndarray:
    """x (n, in) float32 -> (n, out) float32."""
    if lin.planes is not None:
        q, s = bits.quantize_i8(x)
        y = bits.gemm_planes_i8(q, s, lin.planes)
    else:
        y = (x.astype(np.float32) @ lin.weight.T.astype(np.float32)).astype(np.float32)
    if lin.bias is not None:
        y = y + lin.bias
    return y.astype(np.float32)


def norm(cfg: ModelConfig, n: Norm, x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    if cfg.norm == "rms":
        var = np.mean(x * x, axis=-1, keepdims=True)
        return (n.weight * (x / np.sqrt(var + np.float32(cfg.norm_eps)))).astype(np.float32)
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    y = (x - mean) / np.sqrt(var + np.float32(cfg.norm_eps)) * n.weight
    return (y + n.bias if n.bias is not None else y).astype(np.float32)


def rms_sub_norm(cfg: ModelConfig, n: Norm, x: np.ndarray) -> np.ndarray:
    """BitNet's sub-norms are RMS norms whatever the block norm is."""
    var = np.mean(x * x, axis=-1, keepdims=True)
    return (n.weight * (x / np.sqrt(var + np.float32(cfg.norm_eps)))).astype(np.float32)


def activation(cfg: ModelConfig, x: np.ndarray) -> np.ndarray:
    if cfg.act == "silu":
        return x / (1.0 + np.exp(-x))
    if cfg.act == "gelu_tanh":
        return 0.5 * x * (1.0 + np.tanh(np.float32(math.sqrt(2.0 / math.pi)) * (x + np.float32(0.044715) * x ** 3)))
    if cfg.act == "gelu":
        erf = np.frompyfunc(math.erf, 1, 1)
        return (0.5 * x * (1.0 + erf(x / math.sqrt(2.0)).astype(np.float32))).astype(np.float32)
    if cfg.act == "relu2":
        r = np.maximum(x, 0)
        return r * r
    return np.maximum(x, 0)


def rope(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """x (n, heads, head_dim): rotate pairs (i, i + head_dim/2), the Hugging Face convention."""
    freqs = positions.astype(np.float32)[:, None] * inv_freq[None, :]   # (n, hd/2)
    cos, sin = np.cos(freqs)[:, None, :], np.sin(freqs)[:, None, :]
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(np.float32)


def attention(cfg: ModelConfig, q: np.ndarray, k_all: np.ndarray, v_all: np.ndarray, positions) -> np.ndarray:
    """q (n, H, hd); k_all, v_all (T, Hkv, hd) for positions 0..T-1; causal by position."""
    group = cfg.n_heads // cfg.n_kv_heads
    k = np.repeat(k_all, group, axis=1)                    # (T, H, hd)
    v = np.repeat(v_all, group, axis=1)
    scores = np.matmul(q.transpose(1, 0, 2), k.transpose(1, 2, 0)) / np.float32(math.sqrt(cfg.head_dim))  # (H, n, T)
    T = k_all.shape[0]
    mask = np.arange(T)[None, :] > np.asarray(positions)[:, None]   # (n, T)
    scores = np.where(mask[None], np.float32(-np.inf), scores)
    scores = scores - scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    p /= p.sum(axis=-1, keepdims=True)
    return np.matmul(p.astype(np.float32), v.transpose(1, 0, 2)).transpose(1, 0, 2).astype(np.float32)   # (n, H, hd)


def head_logits(w: Weights, h: np.ndarray, linear=linear) -> np.ndarray:
    """Logits from the final hidden states h (n, dim)."""
    head = w.embed if w.head is None else w.head
    if isinstance(head, Linear):
        return linear(head, h)
    if head.planes is not None:
        return linear(head.as_linear(), h)
    if head.q is not None:   # int8 rows: int8 activations, exact integer dots, two float scales
        q, s = bits.quantize_i8(h)
        dots = q.astype(np.float64) @ head.q.T.astype(np.float64)
        return (dots * head.row_scale[None, :].astype(np.float64) * s[:, None]).astype(np.float32)
    return (h @ head.weight.T.astype(np.float32)).astype(np.float32)


def log_softmax_at(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log-softmax of each row of logits (n, vocab) at targets (n,), in float64."""
    lg = logits.astype(np.float64)
    mx = lg.max(axis=1, keepdims=True)
    lse = np.log(np.exp(lg - mx).sum(axis=1)) + mx[:, 0]
    return lg[np.arange(len(targets)), targets] - lse


def embed(ops, cfg: ModelConfig, tokens, positions):
    """The residual stream's start for tokens (n,) at positions (n,): (n, dim)."""
    x = ops.embed(tokens)
    if cfg.pos == "learned":
        x = x + ops.pos_embed(positions)
    return x


def block(ops, cfg: ModelConfig, i: int, x, positions):
    """Layer i on the residual stream x (n, dim) of the tokens at positions (n,); NumPy or torch
    arrays, `ops` doing the arithmetic (see the module docstring)."""
    L = lambda p: N.layer(i, p)  # noqa: E731
    n = x.shape[0]
    h = ops.norm(L("attn_norm"), x)
    q = ops.linear(L("wq"), h).reshape(n, cfg.n_heads, cfg.head_dim)      # (n, H, hd)
    k = ops.linear(L("wk"), h).reshape(n, cfg.n_kv_heads, cfg.head_dim)   # (n, Hkv, hd)
    v = ops.linear(L("wv"), h).reshape(n, cfg.n_kv_heads, cfg.head_dim)
    if cfg.pos == "rope":
        q, k = ops.rope(q, positions), ops.rope(k, positions)
    a = ops.attend(i, q, k, v, positions).reshape(n, cfg.q_dim)           # (n, q_dim)
    if cfg.sub_norms:
        a = ops.norm(L("attn_sub_norm"), a, rms=True)
    x = x + ops.linear(L("wo"), a)
    h = ops.norm(L("mlp_norm"), x)
    if cfg.gated_mlp:
        u = ops.act(ops.linear(L("w_gate"), h)) * ops.linear(L("w_up"), h)
    else:
        u = ops.act(ops.linear(L("w_up"), h))
    if cfg.sub_norms:
        u = ops.norm(L("mlp_sub_norm"), u, rms=True)
    return x + ops.linear(L("w_down"), ops.mlp_rotation(u))


class CacheOps:
    """`block`'s arithmetic for the reference forward: NumPy on engine Weights, keys and values
    written to the cache at cache.length.. and attended over there; `linear` computes the
    linear layers."""

    def __init__(self, w: Weights, cache: KVCache, linear=linear):
        self.w, self.cfg, self.cache, self._linear = w, w.cfg, cache, linear

    def _get(self, name: str):
        if name.startswith("layers."):
            _, i, part = name.split(".")
            return getattr(self.w.layers[int(i)], part)
        return getattr(self.w, name)

    def norm(self, name, x, rms=False):
        return (rms_sub_norm if rms else norm)(self.cfg, self._get(name), x)

    def linear(self, name, x):
        return self._linear(self._get(name), x)

    def rope(self, x, positions):
        return rope(x, positions, self.w.inv_freq)

    def attend(self, i, q, k, v, positions):
        c, p0 = self.cache, self.cache.length
        c.k[i, p0:p0 + len(q)] = k
        c.v[i, p0:p0 + len(q)] = v
        k_all, v_all = c.k[i, :p0 + len(q)], c.v[i, :p0 + len(q)]
        return attention(self.cfg, q, k_all.astype(np.float32, copy=False), v_all.astype(np.float32, copy=False), positions)

    def act(self, x):
        return activation(self.cfg, x)

    def mlp_rotation(self, u):
        rot = self.w.mlp_rotation
        return (u if rot is None else rot.apply(u)).astype(np.float32)

    def embed(self, tokens):
        return self.w.embed.lookup(tokens)

    def pos_embed(self, positions):
        return self.w.pos_embed[positions]


def forward(w: Weights, tokens, cache: KVCache, all_logits: bool = False, linear=linear) -> np.ndarray:
    """Run `tokens` (n,) at positions cache.length.. ; returns logits (n, vocab) or (vocab,).
    `linear` computes the linear layers (the kernels' backends plug in here)."""
    cfg = w.cfg
    tokens = np.asarray(tokens, np.int64)
    n, p0 = len(tokens), cache.length
    positions = np.arange(p0, p0 + n)
    if p0 + n > cache.capacity:
        raise ValueError(f"{p0 + n} positions do not fit the cache ({cache.capacity})")
    ops = CacheOps(w, cache, linear)
    x = embed(ops, cfg, tokens, positions)                  # (n, dim)
    for i in range(cfg.n_layers):
        x = block(ops, cfg, i, x, positions)
    cache.length = p0 + n
    h = ops.norm("final_norm", x if all_logits else x[-1:])
    logits = head_logits(w, h, linear)
    return logits if all_logits else logits[0]
