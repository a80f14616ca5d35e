"""How tuning moved the plane scales of a model: the multipliers tuned / untuned of two files with
the same planes (the untuned conversion and a tuned one), summarized per (row, plane).

    python tools/scale_multipliers.py UNTUNED.ep TUNED.ep

Prints how much of the log-multipliers' energy is each tensor-plane's mean (what one multiplier
per (tensor, plane) can express), their spread within a tensor, and their correlation with each
row's scale magnitude (a feature a coarser parametrization could use).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from edgepanel.format import ModelFile  # noqa: E402
from edgepanel.model.weights import load_weights  # noqa: E402


def summarize(untuned: Path, tuned: Path) -> dict:
    a, b = load_weights(ModelFile(untuned)), load_weights(ModelFile(tuned))
    total = within = 0.0
    sds, corrs, means = [], [], []
    for la, lb in zip(a.linears(), b.linears()):
        if not np.array_equal(la.planes.planes, lb.planes.planes):
            raise SystemExit(f"{tuned}: its planes differ from {untuned}'s: not the same conversion")
        alpha = la.planes.alpha().astype(np.float64)                       # (k, out, groups)
        ratio = lb.planes.alpha().astype(np.float64) / np.where(alpha > 0, alpha, np.nan)
        for p in range(alpha.shape[0]):
            lm = np.log(np.nanmean(ratio[p], axis=1))                       # one value per row
            lm = lm[np.isfinite(lm)]
            total += float((lm ** 2).sum())
            within += float(((lm - lm.mean()) ** 2).sum())
            sds.append(float(lm.std()))
            means.append(float(lm.mean()))
            mag = np.log(alpha[p].mean(axis=1))
            mag = mag[np.isfinite(mag)]
            if len(mag) == len(lm) and lm.std() > 0 and mag.std() > 0:
                corrs.append(float(np.corrcoef(mag, lm)[0, 1]))
    return {"tensor_plane_mean_share": 1 - within / total if total else 0.0,
            "tensor_plane_mean_rms": float(np.sqrt(np.mean(np.square(means)))),
            "within_sd_median": float(np.median(sds)),
            "corr_with_row_scale_median": float(np.median(corrs)) if corrs else None,
            "corr_with_row_scale_quartiles": [float(q) for q in np.percentile(corrs, [25, 75])] if corrs else None}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("untuned", type=Path)
    ap.add_argument("tuned", type=Path)
    a = ap.parse_args()
    print(json.dumps(summarize(a.untuned, a.tuned), indent=1))


if __name__ == "__main__":
    main()
