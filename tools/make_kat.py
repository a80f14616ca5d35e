"""Write tests/data/kernels_kat.bin: known answers from the NumPy reference (edgepanel.bits) that
the standalone C checker (tests/c/kernel_check.c) verifies on every ISA, natively and under
emulation.  tests/test_c_variants.py checks this file is what this script writes.

Layout (little-endian): b"EPKAT01\\n", uint32 count, then per case: int64 n, k, out, in, group;
x float32 (n, in); planes uint8; scales float32; q int8 (n, in); qscale float32 (n);
bits uint8 (n, in_pad/8); bscale float32 (n); y_i8 float32 (n, out); y_xnor float32 (n, out).
"""
from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np

from edgepanel import bits

CASES = [  # n, k, out, in, group
    (1, 1, 1, 1, 32),
    (2, 2, 3, 7, 7),
    (3, 3, 17, 65, 64),
    (2, 4, 20, 130, 32),
    (1, 2, 16, 576, 128),
    (2, 1, 5, 300, 256),
    (4, 2, 33, 1000, 1000),
]


def build(seed: int = 2024) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    buf.write(b"EPKAT01\n")
    buf.write(np.uint32(len(CASES)).tobytes())
    for n, k, n_out, n_in, group in CASES:
        x = (rng.standard_normal((n, n_in)) * 2).astype(np.float32)
        tiles, ncol = bits.padded_out(n_out) // 16, bits.padded_in(n_in) // 8
        planes = rng.integers(0, 256, (k, tiles, ncol, 16), dtype=np.uint8)  # padding bits too
        alpha = rng.standard_normal((k, n_out, bits.n_groups(n_in, group))).astype(np.float32)
        w = bits.PlaneMatrix(planes, bits.tile_scales(alpha), n_out, n_in, group)
        q, qs = bits.quantize_i8(x)
        b, bs = bits.binarize(x)
        y8 = bits.gemm_planes_i8(q, qs, w)
        yx = bits.gemm_xnor(b, bs, w)
        buf.write(np.array([n, k, n_out, n_in, group], np.int64).tobytes())
        for a in (x, planes, w.scales, q, qs, b, bs, y8, yx):
            buf.write(np.ascontiguousarray(a).tobytes())
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests/data/kernels_kat.bin")
    args = ap.parse_args()
    args.out.write_bytes(build())
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
