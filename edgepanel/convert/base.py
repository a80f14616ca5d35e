"""The machinery every source architecture shares: the registry, the source-tensor bookkeeping
(every tensor of a checkpoint is consumed or the conversion fails), and the recipe."""
from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from ..bits import GROUP_SIZES, MAX_PLANES
from ..errors import FormatError
from ..model.config import ModelConfig
from ..model.weights import slot

ARCHITECTURES: dict[str, type["Architecture"]] = {}


def register(*hf_names: str):
    """Class decorator: the architecture handles checkpoints whose config names `hf_names`."""
    def deco(cls):
        for n in hf_names:
            ARCHITECTURES[n] = cls
        cls.hf_names = hf_names
        return cls
    return deco


def architecture_for(hf_name: str) -> "Architecture":
    cls = ARCHITECTURES.get(hf_name)
    if cls is None:
        raise FormatError(f"architecture {hf_name!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}")
    return cls()


class SourceTensors:
    """Tensors of a source checkpoint by their Hugging Face names; tracks what was consumed."""

    def __init__(self, names: list[str], loader: Callable[[str], np.ndarray], where: str):
        self._names = set(names)
        self._loader = loader
        self._used: set[str] = set()
        self.where = where

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def names(self) -> list[str]:
        return sorted(self._names)

    def take(self, name: str) -> np.ndarray:
        if name not in self._names:
            raise FormatError(f"{self.where}: tensor '{name}' is missing")
        self._used.add(name)
        a = np.asarray(self._loader(name))
        if a.dtype.kind != "f":
            raise FormatError(f"{self.where}: tensor '{name}' has dtype {a.dtype}; weights must be floating point")
        return a.astype(np.float32, copy=False)

    def take_raw(self, name: str) -> np.ndarray:
        if name not in self._names:
            raise FormatError(f"{self.where}: tensor '{name}' is missing")
        self._used.add(name)
        return np.asarray(self._loader(name))

    def ignore(self, pattern: str):
        """Mark tensors matching `pattern` (fnmatch) as deliberately unused."""
        self._used.update(n for n in self._names if fnmatch.fnmatchcase(n, pattern))

    def check_all_consumed(self):
        left = sorted(self._names - self._used)
        if left:
            more = f" and {len(left) - 10} more" if len(left) > 10 else ""
            raise FormatError(f"{self.where}: {len(left)} source tensors were not used by the conversion: "
                              f"{', '.join(left[:10])}{more} (unsupported variant of the architecture?)")


@dataclass
class Emitted:
    """One tensor group in edgepanel's names: a linear layer, a norm, an embedding, ..."""
    name: str
    role: str                      # "linear" | "norm" | "embed" | "head" | "pos_embed" | "vector"
    weight: np.ndarray             # float32
    bias: np.ndarray | None = None
    ternary: bool = False          # the source is ternary {-a, 0, +a}: exactly 2 planes
    absmean: bool = False          # binarize with BitNet's absmean ternarization (then exact)
    source_dtype: str = "float32"
    source: str | None = None      # the source tensor's name, for error messages
    int8: tuple | None = None      # (q, scale): its int8 rows, when made before the float weight was released

    def int8_rows(self) -> tuple:
        """Its int8 rows (q, scale): those kept when the float weight was released, else made now."""
        from ..quantize import int8_rows
        return self.int8 if self.int8 is not None else int8_rows(self.weight)


class Architecture:
    """One Hugging Face architecture: its config, and the table from its tensors to ours."""

    hf_names: tuple[str, ...] = ()

    def config(self, hf: dict) -> ModelConfig:
        raise NotImplementedError

    def tensors(self, src: SourceTensors, cfg: ModelConfig, hf: dict) -> Iterator[Emitted]:
        raise NotImplementedError


def get(hf: dict, key: str, default=None, *, required=False, where="config.json"):
    v = hf.get(key, default)
    if required and v is None:
        raise FormatError(f"{where}: '{key}' is missing")
    return v


def integer(hf: dict, key: str, default=None, *, required=False, where="config.json"):
    """hf[key] as a positive integer (or `default` when absent or null); FormatError naming the key."""
    v = hf.get(key)
    if v is None:
        v = get({}, key, default, required=required, where=where)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
        raise FormatError(f"{where}: '{key}' must be a positive integer, got {v!r:.80}")
    return int(v)


def number(hf: dict, key: str, default=None, *, where="config.json") -> float | None:
    """hf[key] as a finite number (or `default` when absent or null); FormatError naming the key."""
    v = hf.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not _finite(v):
        raise FormatError(f"{where}: '{key}' must be a finite number, got {v!r:.80}")
    return float(v)


def _finite(v) -> bool:
    try:
        return math.isfinite(float(v))
    except OverflowError:   # a JSON integer beyond any float
        return False


def boolean(hf: dict, key: str, default: bool = False, *, where="config.json") -> bool:
    v = hf.get(key)
    if v is None:
        return default
    if not isinstance(v, (bool, np.bool_)):
        raise FormatError(f"{where}: '{key}' must be true or false, got {v!r:.80}")
    return bool(v)


def checked(emitted: Iterator[Emitted], cfg: ModelConfig, where: str) -> Iterator[Emitted]:
    """`emitted`, each tensor checked against the shape the config gives it (model/weights.py's
    slots) and for non-finite values, before anything downstream sees it."""
    for e in emitted:
        s = slot(cfg, e.name)
        what = f"{where}: tensor '{e.source or e.name}'"
        if s is None:
            raise FormatError(f"{what} ({e.name}) has no place in this model's config")
        shape, want = tuple(e.weight.shape), s.shape
        if shape != want:
            raise FormatError(f"{what} has shape {shape}; the config ({_config_summary(cfg)}) makes it {want}")
        if e.bias is not None and tuple(e.bias.shape) != (want[0],):
            raise FormatError(f"{what}: its bias has shape {tuple(e.bias.shape)}, expected {(want[0],)}")
        for part, a in (("", e.weight), (" bias", e.bias)):
            if a is not None and not np.isfinite(a).all():
                raise FormatError(f"{what}{part} holds non-finite values (NaN or infinity)")
        yield e


def _config_summary(cfg: ModelConfig) -> str:
    return (f"vocab {cfg.vocab_size}, dim {cfg.dim}, heads {cfg.n_heads}/{cfg.n_kv_heads} of {cfg.head_dim}, "
            f"MLP {cfg.hidden_dim}, context {cfg.max_seq_len}")


TUNE_GRANULARITIES = ("group", "row", "column", "tensor")
ROW_FORMATS = "int8, f16, f32, kK or kKgG (K planes, group G or the recipe's), auto"
_ROW_PLANES = re.compile(r"k(\d+)(?:g(\d+))?")


def valid_row_format(fmt) -> bool:
    if fmt in ("int8", "f16", "f32", "auto"):
        return True
    m = isinstance(fmt, str) and _ROW_PLANES.fullmatch(fmt)
    return bool(m) and 1 <= int(m[1]) <= MAX_PLANES and (m[2] is None or int(m[2]) in GROUP_SIZES)


def row_planes(fmt: str, default_group: int):
    """An embeddings/head format: (planes, group) for "kK" / "kKgG", else the string itself."""
    m = _ROW_PLANES.fullmatch(fmt)
    if not m:
        return fmt
    return int(m[1]), int(m[2]) if m[2] else default_group


def _opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class Recipe:
    """How to store each tensor: chosen per conversion, recorded in the file.  The one home of
    conversion's defaults: `edgepanel convert` builds its options' help from the `help` metadata."""
    planes: int = _opt(2, f"binary planes per weight, 1..{MAX_PLANES}")
    group: int = _opt(64, "inputs per scale: 32, 64, 128, 256, or 0 = one group per row")
    keep: list[str] = field(default_factory=list, metadata={
        "help": "leave linear layers matching this fnmatch pattern (e.g. 'layers.0.*') dense"})
    passthrough: bool = _opt(False, "keep every weight at its source precision")
    embed: str | None = _opt(None, f"embeddings: {{int8, f16, f32, kK, kKgG, auto}} (K planes, group G); "
                                   "default int8 rows, or auto (chosen) under a bit budget")
    head: str | None = _opt(None, "the output layer: as embed")
    als_iters: int = _opt(4, "alternating least-squares rounds of the data-free fit")
    calib: str | None = _opt("default", "UTF-8 text the layers are fitted on ('default': "
                                        "edgepanel/assets/calib.txt; None: data-free fitting)")
    calib_tokens: int = _opt(16384, "calibration tokens")
    seq_len: int = _opt(256, "tokens per calibration sequence")
    rotate: bool = _opt(True, "rotate the residual stream before calibration (RMS-norm models)")
    damp: float = _opt(0.01, "GPTQ damping, relative to mean diag(H)")
    refit: bool = _opt(True, "refit each row's scales jointly after GPTQ")
    act_order: bool = _opt(False, "GPTQ rounds columns by decreasing input energy (helps layers with "
                                  "outlier inputs; measured worse on SmolLM2 after rotation)")
    seed: int = _opt(0, "seed of the random rotations and of the tuning order")
    bits: float | None = _opt(None, "average bits per weight, scales included: planes and group per tensor "
                                    "by measured sensitivity")
    scales: str = _opt("f16", "plane scales: f16, or u8 (8-bit codes under a float32 multiplier per row: "
                              "half the scale bytes, the same quality on SmolLM2)")
    bits_planes: tuple = _opt((1, 2, 3, 4), "the plane counts a bit budget may choose from")
    bits_groups: tuple = _opt((64, 128, 256), "the group sizes a bit budget may choose from")
    tune_steps: int = _opt(80, "after fitting, tune the plane scales against the float model's outputs "
                               "(KL, Adam) for this many steps of one calibration sequence; 0 = off; "
                               "calibrated recipes only (see tune)")
    tune_lr: float | None = _opt(None, "learning rate of the scale tuning (a relative change per step); "
                                       "None: 1e-3 below 4 planes, 3e-4 from 4 (fo, numpy), TuneConfig's (zo)")
    tune: str = _opt("auto", "how the scales are tuned: fo (first-order, backpropagation in torch), numpy "
                             "(first-order, backpropagation in NumPy, torch-free), zo (zeroth-order kd on the C "
                             "engine, torch-free), auto (fo when torch is installed, else numpy)")
    tune_granularity: str = _opt("group", "first-order tuning: one multiplier per scale (group), per (row, plane) "
                                          "(row), per (tensor, plane, group of inputs) shared by the rows (column) "
                                          "or per (tensor, plane) (tensor); the coarser ones are what zeroth-order "
                                          "steps can train, and measure how far such a parametrization can go "
                                          "(docs/finetune.md)")
    tune_dtype: str = _opt("auto", "first-order tuning's matrix products: float32, bfloat16 (operands rounded, "
                                   "float32 sums), or auto (bfloat16 where the CPU multiplies it natively, "
                                   "AVX512-BF16 or AMX: the tuning 0.76x the time on a Xeon, held-out quality "
                                   "within a run's noise; else float32)")
    calib_dtype: str = _opt("auto", "calibration's forward through the layers already fitted: float32 (the "
                                    "engine's own kernel: int8 activations against the planes, float32 scales), "
                                    "bfloat16 (the same int8 activations against the fitted weights rounded to "
                                    "bfloat16, in torch: outputs within 0.3% of the engine's), or auto (bfloat16 "
                                    "where torch is installed and the CPU multiplies bfloat16 natively: "
                                    "2.5x the layers' speed on a Xeon with AMX; else float32)")

    def __post_init__(self):
        from .. import bits
        for what in ("embed", "head"):   # unset: int8 rows, or chosen by the bit budget
            if getattr(self, what) is None:
                setattr(self, what, "auto" if self.bits is not None else "int8")
        if not isinstance(self.planes, int) or isinstance(self.planes, bool):
            raise ValueError(f"planes must be an integer, got {self.planes!r}")
        if not 1 <= self.planes <= bits.MAX_PLANES:
            raise ValueError(f"planes must be in 1..{bits.MAX_PLANES}, got {self.planes}")
        if self.group not in bits.GROUP_SIZES and self.group != 0:
            raise ValueError(f"group must be one of {bits.GROUP_SIZES} (or 0: one group per row), got {self.group}")
        if self.bits is not None and not (self.bits > 0):
            raise ValueError(f"bits must be a positive number, got {self.bits}")
        if self.bits is not None:
            self.bits_planes = tuple(sorted(set(self.bits_planes)))
            self.bits_groups = tuple(sorted(set(self.bits_groups)))
            if not self.bits_planes or not all(isinstance(k, int) and 1 <= k <= bits.MAX_PLANES for k in self.bits_planes):
                raise ValueError(f"bits_planes must be plane counts in 1..{bits.MAX_PLANES}, got {self.bits_planes!r}")
            if not self.bits_groups or not all(g in bits.GROUP_SIZES for g in self.bits_groups):
                raise ValueError(f"bits_groups must be among {bits.GROUP_SIZES}, got {self.bits_groups!r}")
        if self.bits is not None and not self.calib:
            raise ValueError("--bits measures sensitivity on calibration data: it needs calibration")
        if not isinstance(self.tune_steps, int) or isinstance(self.tune_steps, bool) or self.tune_steps < 0:
            raise ValueError(f"tune_steps must be a non-negative int, got {self.tune_steps!r}")
        if self.tune_lr is not None and not (self.tune_lr > 0):
            raise ValueError(f"tune_lr must be positive, got {self.tune_lr!r}")
        for name, hi in (("als_iters", 1000), ("calib_tokens", 2**24), ("seq_len", 2**16), ("tune_steps", 10**6)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not (0 if name in ("als_iters", "tune_steps") else 1) <= v <= hi:
                raise ValueError(f"{name} must be an integer in {0 if name in ('als_iters', 'tune_steps') else 1}..{hi}, got {v!r}")
        if self.tune not in ("auto", "fo", "numpy", "zo"):
            raise ValueError(f"tune must be auto, fo, numpy or zo, got {self.tune!r}")
        if self.tune_granularity not in TUNE_GRANULARITIES:
            raise ValueError(f"tune_granularity must be one of {', '.join(TUNE_GRANULARITIES)}, got {self.tune_granularity!r}")
        if self.tune == "zo" and self.tune_granularity != "group":
            raise ValueError("tune_granularity applies to first-order tuning (tune fo or numpy); zeroth-order "
                             "tuning trains one multiplier per (tensor, plane)")
        if self.tune == "numpy" and self.tune_granularity == "column":
            raise ValueError("tune_granularity column is for tune fo; numpy trains group, row or tensor multipliers")
        for name in ("tune_dtype", "calib_dtype"):
            if getattr(self, name) not in ("auto", "float32", "bfloat16"):
                raise ValueError(f"{name} must be auto, float32 or bfloat16, got {getattr(self, name)!r}")
        if self.scales not in ("f16", "u8"):
            raise ValueError(f"scales must be f16 or u8, got {self.scales!r}")
        for what in ("embed", "head"):
            fmt = getattr(self, what)
            if not valid_row_format(fmt):
                raise ValueError(f"{what} format must be one of {ROW_FORMATS}, got {fmt!r}")
            if fmt == "auto" and self.bits is None:
                raise ValueError(f"{what} format 'auto' is chosen by a bit budget: it needs bits (--bits)")

    @property
    def calibrated(self) -> bool:
        return bool(self.calib) and not self.passthrough

    @property
    def tuned(self) -> bool:
        return self.calibrated and self.tune_steps > 0

    def tag(self) -> str:
        """A short name for the recipe (cache file names)."""
        if self.passthrough:
            return "passthrough"
        t = ((f"b{self.bits:g}" if self.bits else f"k{self.planes}") + f"g{self.group or 'row'}-e{self.embed}-h{self.head}"
             + ("-s8" if self.scales == "u8" else ""))
        if self.calibrated:
            from .calibrate import default_calib_edition
            t += (f"-cal{self.calib_tokens}" + ("-rot" if self.rotate else "")
                  + (f"e{default_calib_edition()}" if self.calib == "default" else "-own"))
            if self.tuned and self.tune_method() == "zo":
                t += f"-tune{self.tune_steps}zo" + (f"lr{self.tune_lr:g}" if self.tune_lr else "")
            elif self.tuned and self.tune_method() == "numpy":
                t += f"-tune{self.tune_steps}np{self.learning_rate():g}" + (
                    f"-{self.tune_granularity}" if self.tune_granularity != "group" else "")
            elif self.tuned:
                t += f"-tune{self.tune_steps}lr{self.learning_rate():g}" + (
                    f"-{self.tune_granularity}" if self.tune_granularity != "group" else "")
        return t + ("-keep" + str(len(self.keep)) if self.keep else "")

    def tune_method(self) -> str:
        """"fo", "numpy" or "zo": what tuning will run ("auto": first-order in torch when torch can
        be imported, else first-order in NumPy)."""
        if self.tune != "auto":
            return self.tune
        from . import recover
        return "fo" if recover.available() else "numpy"

    def matmul_dtype(self) -> str:
        """"float32" or "bfloat16": the first-order tuning's products ("auto": bfloat16 when the CPU
        has bfloat16 dot-product instructions, kernels.cpu_bf16())."""
        if self.tune_dtype != "auto":
            return self.tune_dtype
        from ..kernels import cpu_bf16
        return "bfloat16" if cpu_bf16() else "float32"

    def calib_matmul_dtype(self) -> str:
        """"float32" or "bfloat16": calibration's forward products ("auto": bfloat16 when torch
        can be imported and the CPU has bfloat16 dot-product instructions)."""
        if self.calib_dtype != "auto":
            return self.calib_dtype
        from ..kernels import cpu_bf16
        from . import recover
        return "bfloat16" if cpu_bf16() and recover.available() else "float32"

    def learning_rate(self) -> float:
        """The tuning's learning rate: as given, else 1e-3 below 4 planes (or a budget below 4
        bits) and 3e-4 from there (measured on SmolLM2: at k=4, 1e-3 overshoots: 1.18x/1.13x
        against 1.15x/1.14x; at k=2, 1e-3 beats 2e-3 and 5e-3)."""
        if self.tune_lr is not None:
            return self.tune_lr
        return 3e-4 if (self.bits or self.planes) >= 4 else 1e-3

    def group_for(self, n_in: int) -> int:
        """The group size used for rows of n_in inputs: the recipe's, or one group per row when
        the recipe says 0 or its group does not apply."""
        from .. import bits
        group = self.group or n_in
        return group if group in bits.GROUP_SIZES or group == n_in else n_in

    def keeps(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.keep)

    def to_dict(self) -> dict:
        return {"planes": self.planes, "group": self.group, "keep": list(self.keep),
                "passthrough": self.passthrough, "embed": self.embed, "head": self.head,
                "als_iters": self.als_iters, "calib": self.calib, "calib_tokens": self.calib_tokens,
                "seq_len": self.seq_len, "rotate": self.rotate, "damp": self.damp, "refit": self.refit,
                "act_order": self.act_order, "bits": self.bits,
                "scales": self.scales, "bits_planes": list(self.bits_planes), "bits_groups": list(self.bits_groups),
                "seed": self.seed, "tune_steps": self.tune_steps if self.tuned else 0, "tune_lr": self.learning_rate(),
                **({"tune": self.tune_method()} if self.tuned else {}),
                **({"tune_granularity": self.tune_granularity}
                   if self.tuned and self.tune_granularity != "group" and self.tune_method() in ("fo", "numpy") else {}),
                **({"tune_dtype": "bfloat16"} if self.tuned and self.tune_method() == "fo"
                   and self.matmul_dtype() == "bfloat16" else {}),
                **({"calib_dtype": "bfloat16"} if self.calibrated and self.calib_matmul_dtype() == "bfloat16" else {})}
