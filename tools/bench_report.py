"""Turn pytest-benchmark JSON (benchmarks/test_kernels_bench.py) into the README's markdown table:
median time, G binary-MAC/s, GB/s of weight bytes, and the ratio to NumPy float32 on the same
shape and token count, measured in the same run."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from edgepanel.bench import cpu_name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", type=Path)
    args = ap.parse_args()
    data = json.loads(args.json.read_text())
    rows = [(b["extra_info"], b["stats"]["median"]) for b in data["benchmarks"]]
    numpy = {(e["out"], e["inp"], e["tokens"]): t for e, t in rows if e["kind"] == "numpy"}
    cpu = data.get("machine_info", {}).get("cpu", {}).get("brand_raw") or cpu_name()
    print(f"CPU: {cpu}; one thread; medians of pytest-benchmark rounds.\n")
    print("| shape (out x in) | tokens | kernel | k | median | G bin-MAC/s | weight GB/s | vs NumPy f32 |")
    print("|---|---|---|---|---|---|---|---|")
    for e, t in rows:
        if e["kind"] not in ("planes_i8", "xnor"):
            continue
        ref = numpy.get((e["out"], e["inp"], e["tokens"]))
        ratio = f"{ref / t:.1f}x" if ref else "-"
        print(f"| {e['out']}x{e['inp']} | {e['tokens']} | {e['kind']} ({e.get('isa')}) | {e['planes']} | "
              f"{t * 1e6:.1f} us | {e['macs'] / t / 1e9:.1f} | {e['weight_bytes'] / t / 1e9:.2f} | {ratio} |")
    sums = [(e, t) for e, t in rows if e["kind"] == "numpy_sum"]
    if sums:
        e0, t0 = sums[0]
        bw = e0["weight_bytes"] / t0 / 1e9
        print(f"\nDRAM: NumPy a.sum() over {e0['weight_bytes'] / 2**20:.0f} MiB reads {bw:.1f} GB/s.")
        for e, t in rows:
            if e["kind"] in ("planes_i8_dram", "xnor_dram"):
                gbs = e["weight_bytes"] / t / 1e9
                paired = ""
                if "paired_ratio" in e:
                    paired = (f"; paired with a.sum() ({e['paired_rounds']} alternating rounds, a.sum() "
                              f"{e['paired_sum_gbps']:.1f} GB/s): {e['paired_ratio']:.0%}")
                print(f"- {e['kind'][:-5]} GEMV, 1 plane, {e['out']}x{e['inp']} ({e['weight_bytes'] / 2**20:.0f} MiB "
                      f"with scales): {t * 1e3:.2f} ms, {gbs:.1f} GB/s = {gbs / bw:.0%} of a.sum(){paired}")


if __name__ == "__main__":
    main()
