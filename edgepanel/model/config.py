"""The architecture hyper-parameters every part of the engine reads (one dataclass).

The four supported families differ only in the switches below:
  llama/mistral  rms norm, rope, gated silu MLP, optional biases
  qwen2          llama + q/k/v biases
  gpt2           layer norm (with biases), learned positions, gelu (tanh) MLP, biases everywhere
  bitnet         llama + sub-norms (before o_proj and before down_proj) and a gated relu^2 MLP
"""
from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields

import numpy as np

from ..errors import FormatError

NORMS = ("rms", "layer")
ACTS = ("silu", "gelu_tanh", "gelu", "relu2", "relu")
POS = ("rope", "learned")
INT32_MAX = 2**31 - 1      # the C engine's ep_model holds the sizes as int32, norm_eps as float32
MAX_SEQ_LEN = 2**24
F32_MAX = float(np.finfo(np.float32).max)
# rope scaling kinds -> the numeric keys each needs (Hugging Face names)
ROPE_SCALING = {"linear": ("factor",),
                "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


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
            if v > INT32_MAX:
                raise FormatError(f"config: {f} {v} does not fit the engine's 32-bit sizes")
            setattr(self, f, int(v))
        for f in ("norm_eps", "rope_theta"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v < 1e300:   # (ints beyond any float too)
                raise FormatError(f"config: {f} must be a finite positive number, got {v!r:.80}")
        if not 0 < np.float32(self.norm_eps) < np.inf:
            raise FormatError(f"config: norm_eps {self.norm_eps} is not a positive float32 (the engine's type)")
        for f in ("q_dim", "kv_dim"):
            if getattr(self, f) > INT32_MAX:
                raise FormatError(f"config: {f} (heads x head_dim) {getattr(self, f)} does not fit the engine's 32-bit sizes")
        if self.max_seq_len > MAX_SEQ_LEN:
            raise FormatError(f"config: max_seq_len {self.max_seq_len} is beyond what the engine supports (2^24)")
        for f in ("qkv_bias", "o_bias", "mlp_bias", "sub_norms", "tie_embeddings", "mlp_rotation", "gated_mlp"):
            if not isinstance(getattr(self, f), bool):
                raise FormatError(f"config: {f} must be true or false, got {getattr(self, f)!r}")
        if not isinstance(self.arch, str):
            raise FormatError(f"config: arch must be a string, got {self.arch!r}")
        self._check_rope_scaling()
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
        if self.pos == "rope" and not self._rope_top() < F32_MAX:   # e.g. a scaling factor of 1e-45
            raise FormatError(f"config: rope_theta {self.rope_theta} and rope_scaling {self.rope_scaling} "
                              "give non-finite RoPE frequencies")

    def _rope_top(self) -> float:
        """A bound on rope_inv_freq()'s largest value, without computing its head_dim/2 entries
        (head_dim is not yet checked against any tensor): theta^-(d-2)/d at most, divided by a
        scaling factor below 1 (llama3 blends between inv and inv/factor)."""
        d = self.head_dim
        try:
            top = max(1.0, float(self.rope_theta) ** (-(d - 2) / d))
        except OverflowError:
            return float("inf")
        kind = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type"))
        factor = float(self.rope_scaling["factor"]) if kind in ROPE_SCALING else 1.0
        return top / min(1.0, factor)

    def _check_rope_scaling(self):
        rs = self.rope_scaling
        if rs is None:
            return
        if not isinstance(rs, dict):
            raise FormatError(f"config: rope_scaling must be an object or null, got {type(rs).__name__}")
        kind = rs.get("rope_type", rs.get("type"))
        if kind in (None, "default"):
            return
        if not isinstance(kind, str) or kind not in ROPE_SCALING:
            raise FormatError(f"config: rope scaling {kind!r} is not supported (supported: {', '.join(ROPE_SCALING)})")
        for key in ROPE_SCALING[kind]:
            v = rs.get(key)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v < 1e300:
                raise FormatError(f"config: rope_scaling ({kind}) needs '{key}', a finite positive number; got {v!r:.80}")
        if kind == "llama3" and not rs["high_freq_factor"] > rs["low_freq_factor"]:
            raise FormatError("config: rope_scaling (llama3) needs high_freq_factor > low_freq_factor, got "
                              f"{rs['high_freq_factor']} and {rs['low_freq_factor']}")

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
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in d]
        if missing:
            raise FormatError(f"config: fields {missing} are missing")
        try:
            return cls(**d)
        except TypeError as exc:
            raise FormatError(f"config: {exc}") from None

    def rope_inv_freq(self) -> np.ndarray:
        """Inverse frequencies (head_dim/2,) float32, with the Hugging Face scaling rules."""
        d = self.head_dim
        inv = 1.0 / (self.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
        rs = self.rope_scaling   # checked in __post_init__
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
