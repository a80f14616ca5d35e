"""The architecture hyper-parameters every part of the engine reads (one dataclass).

The four supported families differ only in the switches below:
  llama/mistral  rms norm, rope, gated silu MLP, optional biases
  qwen2          llama + q/k/v biases
  gpt2           layer norm (with biases), learned positions, gelu (tanh) MLP, biases everywhere
  bitnet         llama + sub-norms (before o_proj and before down_proj) and a gated relu^2 MLP
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

from ..errors import FormatError

NORMS = ("rms", "layer")
ACTS = ("silu", "gelu_tanh", "gelu", "relu2", "relu")
POS = ("rope", "learned")


@dataclass
class ModelConfig:
    arch: str
    vocab_size: int
    dim: int                 # residual width
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int          # MLP inner width
    max_seq_len: int
    norm: str = "rms"
    norm_eps: float = 1e-5
    act: str = "silu"
    gated_mlp: bool = True   # act(gate(x)) * up(x); else act(up(x))
    pos: str = "rope"
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sub_norms: bool = False
    tie_embeddings: bool = False
    mlp_rotation: bool = False  # the MLP's inner activations are rotated (edgepanel.rotation) before down

    def __post_init__(self):
        for f in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "max_seq_len"):
            v = getattr(self, f)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
                raise FormatError(f"config: {f} must be a positive integer, got {v!r}")
        for f in ("norm_eps", "rope_theta"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v < float("inf"):
                raise FormatError(f"config: {f} must be a finite positive number, got {v!r}")
        if self.max_seq_len > 2**24:
            raise FormatError(f"config: max_seq_len {self.max_seq_len} is beyond what the engine supports (2^24)")
        if self.n_heads % self.n_kv_heads:
            raise FormatError(f"config: n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.norm not in NORMS:
            raise FormatError(f"config: norm must be one of {NORMS}, got {self.norm!r}")
        if self.act not in ACTS:
            raise FormatError(f"config: act must be one of {ACTS}, got {self.act!r}")
        if self.pos not in POS:
            raise FormatError(f"config: pos must be one of {POS}, got {self.pos!r}")
        if self.pos == "rope" and self.head_dim % 2:
            raise FormatError(f"config: rope needs an even head_dim, got {self.head_dim}")

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        if not isinstance(d, dict):
            raise FormatError("config: not a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise FormatError(f"config: unknown fields {unknown} (a newer edgepanel wrote this file?)")
        try:
            return cls(**d)
        except TypeError as exc:
            raise FormatError(f"config: {exc}") from None

    def rope_inv_freq(self) -> np.ndarray:
        """Inverse frequencies (head_dim/2,) float32, with the Hugging Face scaling rules."""
        d = self.head_dim
        inv = 1.0 / (self.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
        rs = self.rope_scaling
        if not rs:
            return inv.astype(np.float32)
        kind = rs.get("rope_type", rs.get("type"))
        if kind in (None, "default"):
            return inv.astype(np.float32)
        if kind == "linear":
            return (inv / float(rs["factor"])).astype(np.float32)
        if kind == "llama3":
            factor, lo, hi = float(rs["factor"]), float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
            old = float(rs["original_max_position_embeddings"])
            lo_wavelen, hi_wavelen = old / lo, old / hi
            wavelen = 2 * np.pi / inv
            out = np.where(wavelen > lo_wavelen, inv / factor, inv)
            smooth = (old / wavelen - lo) / (hi - lo)
            mid = (1 - smooth) * out / factor + smooth * out
            is_mid = (wavelen >= hi_wavelen) & (wavelen <= lo_wavelen)
            return np.where(is_mid, mid, out).astype(np.float32)
        raise FormatError(f"config: rope scaling {kind!r} is not supported (supported: linear, llama3)")
