"""BitNetForCausalLM (BitNet b1.58): llama + sub-norms and a gated relu^2 MLP.

Its linear weights are ternary: either packed (uint8, four 2-bit values per byte along the rows,
plus `weight_scale`: W = (unpacked - 1) / weight_scale) or float master weights that the model
quantizes on the fly with absmean.  Both become exactly two planes (bits.ternary_to_planes)."""
from __future__ import annotations

import numpy as np

from ..errors import FormatError
from .. import quantize
from .base import Emitted, SourceTensors, register
from .llama import LlamaLike


def unpack_ternary(packed: np.ndarray) -> np.ndarray:
    """(rows/4, cols) uint8 -> (rows, cols) in {-1, 0, 1}: value i of a byte is bits 2i..2i+1,
    and block i of rows comes from value i (the Hugging Face BitNet packing)."""
    if packed.dtype != np.uint8 or packed.ndim != 2:
        raise FormatError(f"packed BitNet weight must be a 2-D uint8 tensor, got {packed.dtype} {packed.shape}")
    blocks = [((packed >> (2 * i)) & 3).astype(np.int8) - 1 for i in range(4)]
    return np.concatenate(blocks, axis=0)


@register("BitNetForCausalLM")
class BitNet(LlamaLike):
    arch = "bitnet"
    sub_norms = True

    def config(self, hf):
        qc = hf.get("quantization_config") or {}
        if not isinstance(qc, dict):
            raise FormatError(f"config.json: 'quantization_config' must be an object, got {type(qc).__name__}")
        self.packed = qc.get("quant_method") == "bitnet"
        return super().config(hf)

    def linear(self, src: SourceTensors, hf_name: str, name: str, bias: bool) -> Emitted:
        if self.packed:
            raw = src.take_raw(hf_name + ".weight")
            scale = np.asarray(src.take(hf_name + ".weight_scale")).reshape(-1)
            if scale.size != 1:
                raise FormatError(f"{src.where}: {hf_name}.weight_scale must hold one number, got {scale.size}")
            scale = float(scale[0])
            if not scale > 0 or not np.isfinite(scale):
                raise FormatError(f"{src.where}: {hf_name}.weight_scale must be positive, got {scale}")
            w = unpack_ternary(raw).astype(np.float32) / np.float32(scale)
            e = Emitted(name, "linear", w, src.take(hf_name + ".bias") if bias else None, ternary=True,
                        source=hf_name + ".weight")
            return e
        e = super().linear(src, hf_name, name, bias)
        e.ternary = quantize.ternary_scale(e.weight) is not None
        e.absmean = not e.ternary  # float master weights: BitNet's own ternarization when binarized
        return e
