"""Perplexity of SmolLM2-135M-Instruct under binarization recipes, relative to pass-through, on
the held-out texts of tools/eval_texts.py (first --tokens tokens of each, windows of 512).

    python tools/quality.py k4g64 k3g64 k2g64 k2g64:nocal k2g64:norot --json quality.json

A recipe is kK gG (planes, group) or bB gG (a budget of B bits per weight, planes per layer by
sensitivity), plus options after ':' joined by ',':
  nocal (data-free greedy+ALS), norot (no rotation), norefit (no joint scale refit),
  tokensN (calibration tokens), dampX (GPTQ damping),
  tuneN / tunelrX (scale tuning steps, default 80; its learning rate), fp32 / bf16 (the tuning's
  products: float32, or bfloat16; default: bfloat16 where the CPU has it), calfp32 / calbf16 (the
  same for calibration's forward: the engine's kernel, or bfloat16 in torch), byG (one tuning
  multiplier per scale, row, column or tensor: the first-order ceiling of a coarser parametrization),
  fo / np / zo (the tuning: first-order in torch, first-order in NumPy, zeroth-order);
  for budgets: ksKK (plane counts to choose from, e.g. ks34), gsG-G (group sizes, e.g.
  gs64-128-256), rows (embeddings and head chosen by the budget too); embedF / headF (their
  formats: int8, f16, f32, kK, kKgG); s8 (8-bit scales).
Prints a markdown table; conversions are cached in $EDGEPANEL_HOME/quality/, each made in a
child process with its time and peak memory beside it (NAME.cost.json).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_texts import TEXTS  # noqa: E402

from edgepanel import hub  # noqa: E402
from edgepanel.convert import Recipe, convert  # noqa: E402
from edgepanel.model.model import load  # noqa: E402


def parse(spec: str) -> Recipe:
    if spec == "pass":
        return Recipe(passthrough=True)
    base, _, opts = spec.partition(":")
    m = re.fullmatch(r"(k|b)([\d.]+)g(\d+)", base)
    if not m:
        raise SystemExit(f"bad recipe {spec!r}")
    r = Recipe(group=int(m[3])) if m[1] == "b" else Recipe(planes=int(m[2]), group=int(m[3]))
    if m[1] == "b":
        r.bits = float(m[2])
    for o in filter(None, opts.split(",")):
        if o == "nocal":
            r.calib = None
        elif o == "norot":
            r.rotate = False
        elif o == "norefit":
            r.refit = False
        elif o.startswith("damp"):
            r.damp = float(o[4:])
        elif o in ("fp32", "bf16"):      # the first-order tuning's products (tune_dtype)
            r.tune_dtype = "float32" if o == "fp32" else "bfloat16"
        elif o in ("calfp32", "calbf16"):   # calibration's forward products (calib_dtype)
            r.calib_dtype = "float32" if o == "calfp32" else "bfloat16"
        elif o in ("fo", "np", "zo"):     # how the scales are tuned: torch, NumPy, zeroth-order
            r.tune = {"np": "numpy"}.get(o, o)
        elif o.startswith("by"):          # byrow, bycolumn, bytensor: the tuning's multipliers
            r.tune_granularity = o[2:]
        elif o.startswith("tunelr"):
            r.tune_lr = float(o[6:])
        elif o.startswith("tune"):
            r.tune_steps = int(o[4:])
        elif o.startswith("tokens"):
            r.calib_tokens = int(o[6:])
        elif o.startswith("ks"):          # plane counts a budget may choose: ks34
            r.bits_planes = tuple(int(c) for c in o[2:])
        elif o.startswith("gs"):          # group sizes a budget may choose: gs64-128-256
            r.bits_groups = tuple(int(c) for c in o[2:].split("-"))
        elif o == "s8":                   # 8-bit scales
            r.scales = "u8"
        elif o == "rows":                 # embeddings and head chosen by the budget too
            r.embed = r.head = "auto"
        elif o.startswith("embed") or o.startswith("head"):   # embedK / headKgG / headint8
            what = "embed" if o.startswith("embed") else "head"
            setattr(r, what, o[len(what):])
        else:
            raise SystemExit(f"unknown option {o!r} in {spec!r}")
    return dataclasses.replace(r)   # validated


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipes", nargs="+")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    src = hub.fetch("smollm2")
    texts = {name: fn() for name, fn in TEXTS.items()}
    out_dir = hub.cache_dir() / "quality"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in ["pass"] + [r for r in args.recipes if r != "pass"]:
        recipe = parse(spec)
        path = out_dir / f"{spec.replace(':', '_').replace(',', '_')}.ep"
        cost = path.with_suffix(".cost.json")   # the conversion's time and peak memory, kept beside it
        if not path.exists():
            cost.write_text(json.dumps(_convert_alone(src, path, recipe)))
        spent = json.loads(cost.read_text()) if cost.exists() else {}
        secs, peak = spent.get("seconds"), spent.get("peak_rss")
        m = load(path)
        row = {"recipe": spec, "file_mib": path.stat().st_size / 2**20, "convert_s": secs,
               "convert_peak_gib": peak / 2**30 if peak else None,
               "bits": _linear_bits(m), "bits_all": _linear_bits(m, with_rows=True)}
        for name, text in texts.items():
            ids = m.tokenizer.encode(text)[:args.tokens]
            row[name] = m.perplexity(m.tokenizer.decode(ids), window=args.window)
        rows.append(row)
        base = rows[0]
        print(f"{spec:28} " + " ".join(f"{n} {row[n]:9.2f} ({row[n] / base[n]:.2f}x)" for n in texts)
              + f"  {row['bits']:.2f} bits/w ({row['bits_all']:.2f} with embeddings and head), {row['file_mib']:.1f} MiB"
              + (f", converted in {secs:.0f} s" if secs else "")
              + (f", peak memory {peak / 2**30:.2f} GiB" if peak else ""), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


def _convert(src, path, recipe, queue):
    t = time.time()
    report = convert(src, path, recipe, log=lambda m: print("  " + m, file=sys.stderr, flush=True))
    queue.put({"seconds": time.time() - t, "peak_rss": report.peak_rss})


def _convert_alone(src, path, recipe) -> dict:
    """Convert in a fresh process, so that its peak memory (VmHWM) is this conversion's alone."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_convert, args=(src, path, recipe, queue))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise SystemExit(f"converting {path.name} failed (exit code {child.exitcode})")
    return queue.get()


def _stored_bits(t) -> float:
    """Bits a linear layer or embeddings/head table takes in the file."""
    pm = getattr(t, "planes", None)
    if pm is not None:   # (parameters() would have widened the scales: not called here)
        return 8 * (pm.planes.nbytes + pm.scales.nbytes + (0 if pm.scale_rows is None else pm.scale_rows.nbytes))
    if getattr(t, "q", None) is not None:
        return 8 * (t.q.nbytes + t.row_scale.nbytes)
    return 8 * t.weight.nbytes


def _linear_bits(m, with_rows: bool = False) -> float:
    """Bits per weight over the linear layers (and embeddings and head with `with_rows`)."""
    w = m.weights
    tables = list(w.linears())
    if with_rows:
        tables += [t for t in (w.embed, w.head) if t is not None and t not in tables]
    tot = sum(getattr(t, "out_features", 0) * getattr(t, "in_features", 0) or t.rows * t.cols for t in tables)
    return sum(_stored_bits(t) for t in tables) / tot


if __name__ == "__main__":
    main()
