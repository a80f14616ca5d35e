"""What a cheaper output layer costs: the default model's int8 head re-quantized to fewer bits per
weight, each variant's held-out perplexity against the int8 head's (tools/eval_texts.py's three
texts, first 2048 tokens, windows of 512, as tools/quality.py).

    python tools/head_quality.py i4row i4g64 i5row --json docs/data/head_quality.json

Variants, all symmetric with the clipping that minimizes each row's (or group's) squared error:
iBrow (B-bit integers, one scale per row: the int8 head's kernel runs them as they are) and iBgG
(B-bit integers, one scale per group of G, then rounded back to int8 rows: an estimate of a
grouped format's quality, within the int8 rounding).  The variant files are written to a
temporary directory and removed.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_texts import TEXTS  # noqa: E402
from zo_recovery import held_out  # noqa: E402

from edgepanel import hub  # noqa: E402
from edgepanel.bench import cpu_name  # noqa: E402
from edgepanel.format import ModelFile, ModelWriter  # noqa: E402
from edgepanel.model import load  # noqa: E402
from edgepanel.quantize import int8_rows  # noqa: E402

CLIPS = np.linspace(0.5, 1.0, 26)


def rows_int(w: np.ndarray, bits: int, clips=CLIPS) -> tuple[np.ndarray, np.ndarray]:
    """(q int8 in [-2^(b-1), 2^(b-1) - 1] (-127 at 8 bits), scale float32 per row) minimizing each row's squared error."""
    lo, hi = max(-(1 << (bits - 1)), -127), (1 << (bits - 1)) - 1   # the int8 rows' kernel: -127..127
    amax = np.abs(w).max(1, keepdims=True)
    amax[amax == 0] = 1.0
    best, best_s = np.full(amax.shape, np.inf), np.ones_like(amax)
    for c in clips:
        s = amax * c / hi
        err = ((np.clip(np.rint(w / s), lo, hi) * s - w) ** 2).sum(1, keepdims=True)
        better = err < best
        best[better], best_s[better] = err[better], s[better]
    return np.clip(np.rint(w / best_s), lo, hi).astype(np.int8), best_s[:, 0].astype(np.float32)


def variant(w: np.ndarray, spec: str) -> tuple[np.ndarray, np.ndarray]:
    m = re.fullmatch(r"i(\d)(?:row|g(\d+))", spec)
    if not m or not 2 <= int(m[1]) <= 8:
        raise SystemExit(f"bad variant {spec!r} (iBrow or iBgG, B in 2..8)")
    bits = int(m[1])
    if m[2] is None:
        return rows_int(w, bits)
    g = int(m[2])
    if w.shape[1] % g:
        raise SystemExit(f"group {g} does not divide the head's {w.shape[1]} columns")
    q, s = rows_int(w.reshape(-1, g), bits)
    return int8_rows((q * s[:, None]).reshape(w.shape))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--model", type=Path, default=None, help="a model with an int8 head (default: the default model)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    src = a.model or hub.resolve_model(None)
    f = ModelFile(src)
    if "head.q" not in f.tensors:
        raise SystemExit(f"{src}: its head is not int8 rows")
    w = f.tensors["head.q"].astype(np.float32) * f.tensors["head.row_scale"][:, None]
    texts = {n: fn() for n, fn in TEXTS.items()}
    rows = [{"variant": "int8", **held_out(load(src, threads=a.threads), texts), "rel_error": 0.0}]
    print("int8     " + " ".join(f"{n} {rows[0][n]:.3f}" for n in texts), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for spec in a.variants:
            q, s = variant(w, spec)
            path = Path(tmp) / f"{spec}.ep"
            with ModelWriter(path) as out:
                for name, arr in f.tensors.items():
                    out.add(name, q if name == "head.q" else s if name == "head.row_scale" else arr)
                out.close(f.meta, f.tokenizer_json)
            rel = float(np.sqrt(((q * s[:, None] - w) ** 2).sum() / (w ** 2).sum()))
            row = {"variant": spec, **held_out(load(path, threads=a.threads), texts), "rel_error": rel}
            rows.append(row)
            path.unlink()
            print(f"{spec:8} " + " ".join(f"{n} {row[n]:.3f} ({row[n] / rows[0][n]:.4f}x)" for n in texts)
                  + f"  relative error {rel:.4f}", flush=True)
    if a.json:
        a.json.write_text(json.dumps({"model": src.name, "cpu": cpu_name(), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
