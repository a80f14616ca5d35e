"""The checks .ci/arm64.sh runs inside the arm64 root (as a Pi 4 and a Pi 5) and on the x86 host.

    python .ci/arm64_smoke.py logits MODEL OUT.npy --isa NAME   the C engine's logits of fixed ids,
        after checking here: the default variant is NAME, every variant this CPU runs and 1 or 2
        threads give the same bits, prefill equals decoding one token at a time, and the NumPy
        reference engine agrees to float32 rounding
    python .ci/arm64_smoke.py same FILE FILE...                 the files are equal bit for bit
    python .ci/arm64_smoke.py bench JSON --isa NAME --machine M  `edgepanel bench --json` names the
        variant and machine it ran on and measured positive rates
Exit 1 with one line saying what differs.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

# fixed token ids (the tiny models' vocabulary is 300): no tokenizer between the runs compared
IDS = np.array([3, 17, 99, 150, 7, 42, 200, 5, 61, 88, 13, 2, 250, 299, 1, 64], np.int32)


def fail(msg: str):
    print(f"arm64 smoke: {msg}", file=sys.stderr)
    sys.exit(1)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def logits(model: Path, out: Path, isa: str):
    import edgepanel
    from edgepanel import kernels
    from edgepanel.kernels import native
    from edgepanel.model.cengine import CEngine

    m = edgepanel.load(model, threads=1)
    if kernels.info() != f"c/{isa}" or m.engine.name != "c":
        fail(f"default kernels are {kernels.info()} (engine {m.engine.name}), expected c/{isa}")
    want = m.logits(IDS)  # (len(IDS), vocab) float32
    for variant in native.runnable_isas():
        for threads in (1, 2):
            eng = CEngine(m.weights, threads=threads, isa=variant)
            got = eng.forward(IDS, eng.new_cache(len(IDS)), all_logits=True)
            if not same_bits(got, want):
                fail(f"{variant} with {threads} threads gives other logits than {isa}")
    cache = m.engine.new_cache(len(IDS))
    steps = np.stack([m.engine.forward(IDS[i:i + 1], cache) for i in range(len(IDS))])
    if not same_bits(steps.reshape(want.shape), want):
        fail("decoding one token at a time gives other logits than one prefill")
    ref = edgepanel.load(model, threads=1, engine="reference").logits(IDS)
    err = np.abs(want - ref).max(axis=1) / np.abs(ref).max(axis=1)  # per position, relative
    if not (np.median(err) < 1e-5 and err.max() < 2e-2):
        fail(f"C logits differ from the NumPy reference: relative error median {np.median(err):.2e}, max {err.max():.2e}")
    np.save(out, want)
    print(f"logits {want.shape} from c/{isa}; bit-identical over {','.join(native.runnable_isas())} and 1-2 threads, "
          f"prefill = decode; NumPy reference within {err.max():.1e}")


def same(files: list[Path]):
    data = [np.load(f) if f.suffix == ".npy" else f.read_bytes() for f in files]
    for f, d in zip(files[1:], data[1:]):
        equal = same_bits(d, data[0]) if isinstance(d, np.ndarray) else d == data[0]
        if not equal:
            detail = ""
            if isinstance(d, np.ndarray) and d.shape == data[0].shape:
                diff = d != data[0]
                detail = f": {diff.sum()} of {diff.size} values differ, max |diff| {np.abs(d - data[0]).max():.3g}"
            fail(f"{f} is not bit for bit {files[0]}{detail}")
    print(f"bit for bit equal: {', '.join(map(str, files))}")


def bench(path: Path, isa: str, machine: str):
    rows = json.loads(path.read_text())
    rows = rows if isinstance(rows, list) else [rows]
    if not rows:
        fail(f"{path}: no results")
    for r in rows:
        if r.get("isa") != isa or r.get("machine") != machine:
            fail(f"{path}: bench ran on {r.get('machine')} / {r.get('isa')}, expected {machine} / {isa}")
        for key in ("pp_tps", "tg_tps"):
            v = r.get(key)
            mean = v.get("mean") if isinstance(v, dict) else v
            if not (isinstance(mean, (int, float)) and mean > 0):
                fail(f"{path}: {key} is {v!r}, expected a positive rate")
    print(f"bench: {len(rows)} result(s) on {machine}, kernels {isa}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("logits")
    p.add_argument("model", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--isa", required=True)
    p = sub.add_parser("same")
    p.add_argument("files", type=Path, nargs="+")
    p = sub.add_parser("bench")
    p.add_argument("json", type=Path)
    p.add_argument("--isa", required=True)
    p.add_argument("--machine", required=True)
    args = ap.parse_args()
    if args.cmd == "logits":
        logits(args.model, args.out, args.isa)
    elif args.cmd == "same":
        same(args.files)
    else:
        bench(args.json, args.isa, args.machine)


if __name__ == "__main__":
    main()
