"""Instructions per planes product, counted exactly: the NEON variants under qemu-aarch64 (every
instruction a translation block of its own, `-singlestep -d nochain,exec`, one log line each) and
the x86 AVX2 variant under callgrind, for SmolLM2-135M's matrix shapes.  The counts repeat
exactly, so a change on the board's path shows here without a board; they are not speeds.

    python tools/kernel_counts.py [--k 1 2 4] [--tokens 1 4] [--scales f32] [--json OUT.json]

tools/c/product_count.c runs one product `reps` times; each count is that of reps = 2 minus
reps = 1, so set-up and exit are left out.  Needs gcc-aarch64-linux-gnu, qemu-user and valgrind
(Debian packages); the AVX-512 variants are not counted (valgrind does not decode AVX-512).
--scales u8 counts the default model's 8-bit scales (each group's planes summed as integers, one
float multiply-add per group); f32 and f16 take the per-plane float pass.
Output: one table, instructions per product and per weight-token (divided by out x in x tokens,
whatever k).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from edgepanel.kernels import _build  # noqa: E402

SHAPES = {"q, o (576 x 576)": (576, 576), "k, v (192 x 576)": (192, 576),
          "gate, up (1536 x 576)": (1536, 576), "down (576 x 1536)": (576, 1536)}
GROUP = 64
# (variant, how it is run): the Pi 4's A72 has no dot product, the Pi 5's A76 has it
RUNS = {"neon": ("aarch64", "cortex-a72"), "neon_dotprod": ("aarch64", "cortex-a76"), "avx2": ("x86_64", None)}


def build(tmp: Path, machine: str) -> Path:
    exe = tmp / f"product_count_{machine}"
    cc = "aarch64-linux-gnu-gcc" if machine == "aarch64" else "gcc"
    static = ["-static"] if machine == "aarch64" else []
    cmd = [cc, *_build.compile_args(machine), *static, "-Icsrc/include", *_build.sources(machine),
           "tools/c/product_count.c", "-o", str(exe), "-lm", "-pthread"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    return exe


def count(exe: Path, variant: str, cpu: str | None, args: list[int], reps: int, scales: str = "f32") -> int:
    argv = [str(exe), variant, *map(str, args), str(reps), scales]
    if cpu is not None:   # one log line per executed instruction, counted as it streams
        proc = subprocess.Popen(["qemu-aarch64", "-cpu", cpu, "-singlestep", "-d", "nochain,exec",
                                 "-D", "/dev/stdout", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        n = sum(1 for line in proc.stdout if line.startswith(b"Trace"))
        if proc.wait() != 0:
            raise SystemExit(f"{variant}: {proc.stderr.read().decode()[-500:]}")
        return n
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "cg.out"
        res = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *argv],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"{variant}: {res.stderr[-500:]}")
        for line in out.read_text().splitlines():
            if line.startswith("summary:") or line.startswith("totals:"):
                return int(line.split()[1])
    raise SystemExit("callgrind wrote no totals")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, nargs="+", default=[1, 2, 4], help="plane counts")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4], help="tokens per product (1: decode)")
    ap.add_argument("--variants", nargs="+", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--scales", default="f32", choices=["f32", "f16", "u8"],
                    help="scale storage (u8: the default model's 8-bit codes, integer arithmetic)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    for tool, pkg in (("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"), ("qemu-aarch64", "qemu-user"),
                      ("valgrind", "valgrind")):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} not found (Debian: apt-get install {pkg})")
    if platform.machine() != "x86_64" and "avx2" in args.variants:
        raise SystemExit("the x86 count runs natively: an x86-64 host")
    rows = []
    git = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as d:   # the revision built, not the one at the end of a long run
        exes = {m: build(Path(d), m) for m in {RUNS[v][0] for v in args.variants}}
        for name, (out, n_in) in SHAPES.items():
            for k in args.k:
                for n in args.tokens:
                    row = {"shape": name, "out": out, "in": n_in, "k": k, "group": GROUP, "tokens": n,
                           "scales": args.scales}
                    for v in args.variants:
                        machine, cpu = RUNS[v]
                        shape = [n, k, out, n_in, GROUP]
                        row[v] = (count(exes[machine], v, cpu, shape, 2, args.scales)
                                  - count(exes[machine], v, cpu, shape, 1, args.scales))
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
    head = "| shape | k | tokens | " + " | ".join(f"{v}: per product | per weight-token" for v in args.variants) + " |"
    print(head)
    print("|" + "---|" * (3 + 2 * len(args.variants)))
    for r in rows:
        per = r["out"] * r["in"] * r["tokens"]
        print(f"| {r['shape']} | {r['k']} | {r['tokens']} | "
              + " | ".join(f"{r[v]:,} | {r[v] / per:.3f}" for v in args.variants) + " |")
    if args.json:
        args.json.write_text(json.dumps({"command": " ".join(["python", "tools/kernel_counts.py", *sys.argv[1:]]),
                                         "git": git,
                                         "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
