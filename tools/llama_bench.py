"""llama.cpp's own `llama-bench` beside `edgepanel bench`, on the same source model and machine,
with the same threads, prompt and generation lengths, in one table.

    python tools/llama_bench.py                       # edgepanel k=1..4 beside llama.cpp Q4_0, Q8_0, Q4_1
    python tools/llama_bench.py -t 1,2 -p 128 -n 64 -r 5 --recipes k2g64 k4g64:s8 --json both.json
    python tools/llama_bench.py --dry-run             # print what would be built and run
    python tools/llama_bench.py --isa avx2            # both sides held to AVX2 on an AVX-512 machine
    python tools/llama_bench.py --rounds 5            # on a shared machine: five rounds, medians of each

llama.cpp is built once, for this CPU's ISA (cmake; isa_options), from the source distribution of
`llama-cpp-python` on PyPI (which vendors llama.cpp), into $EDGEPANEL_HOME/llama.cpp/VERSION/
outside the repository: only the `llama-bench` and `llama-quantize` targets (about 12 minutes on 2
cores).  The source model is the default model's: SmolLM2-135M-Instruct as Q4_1 GGUF (`edgepanel
fetch smollm2`); Q4_0 and Q8_0 files are made from it by `llama-quantize --allow-requantize`
(which dequantizes, then quantizes), and edgepanel converts the same file (recipes as in
tools/quality.py, conversions shared with it through $EDGEPANEL_HOME/quality/).

Both sides time the engine only (no tokenization, no sampling), as mean ± sd over -r runs after a
warm-up.  With --rounds N the two sides take turns N times (llama.cpp first in odd rounds, edgepanel
first in even ones), the table gives each cell's median over the rounds, and a second table each
edgepanel model's ratio to Q4_0 taken within each round: median (min-max).  On a shared host,
another tenant's load lands on one side of a single run; taken in turns, it lands on both.  Generation is measured after the prompt on both sides: edgepanel decodes at positions
p..p+n; llama-bench is given the same depth (-d p) when it has the option (older builds start at
position 0, which the table then says).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from edgepanel import bench, hub  # noqa: E402

LLAMA_CPP_PYTHON = "0.3.36"          # the sdist whose vendored llama.cpp is built
QUANTS = ("Q4_0", "Q8_0")
RECIPES = ("k1g64", "k2g64", "k3g64", "k4g64:s8")
TARGETS = ("llama-bench", "llama-quantize")


def sh(cmd, dry: bool, **kw):
    print("+ " + " ".join(map(str, cmd)), file=sys.stderr, flush=True)
    if not dry:
        subprocess.run(list(map(str, cmd)), check=True, **kw)


def llama_cpp_root(src: Path) -> Path:
    """The vendored llama.cpp inside the unpacked sdist: the directory with ggml/ and a CMakeLists.txt."""
    for cand in sorted(src.glob("*/vendor/llama.cpp")) + sorted(src.glob("*/vendor/*")):
        if (cand / "CMakeLists.txt").exists() and (cand / "ggml").is_dir():
            return cand
    raise SystemExit(f"no vendored llama.cpp found under {src}")


def unpack(sdist: Path, src: Path) -> Path:
    """The sdist unpacked into `src` (once; tar members outside it refused)."""
    if not src.exists():
        tmp = src.with_name("src.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        with tarfile.open(sdist) as tf:
            tf.extractall(tmp, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        tmp.rename(src)
    return src


AVX512_FLAGS = ("avx512f", "avx512_vnni", "avx512vbmi", "avx512_bf16", "avx_vnni")


def isa_options(isa: str | None = None) -> list[str]:
    """ggml's x86 ISA options from the CPU's flags, AMX left out: -DGGML_NATIVE=ON compiled AMX
    code on a KVM guest whose CPUID lists AMX, and llama-bench died with SIGILL on its first
    product (Intel Xeon, this project's development machine).  Elsewhere: the native build.
    isa "avx2": AVX-512 and VNNI off too, as on an AVX2-only core (a Zen 3, most laptops)."""
    try:
        flags = set(next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return ["-DGGML_NATIVE=ON"]
    if "avx2" not in flags:
        return ["-DGGML_NATIVE=ON"]
    if isa == "avx2":
        flags -= set(AVX512_FLAGS)
    opts = {"AVX": "avx", "AVX2": "avx2", "FMA": "fma", "F16C": "f16c", "BMI2": "bmi2", "AVX512": "avx512f",
            "AVX512_VNNI": "avx512_vnni", "AVX512_VBMI": "avx512vbmi", "AVX512_BF16": "avx512_bf16",
            "AVX_VNNI": "avx_vnni"}
    return ["-DGGML_NATIVE=OFF"] + [f"-DGGML_{k}={'ON' if v in flags else 'OFF'}" for k, v in opts.items()] + \
        [f"-DGGML_AMX_{k}=OFF" for k in ("TILE", "INT8", "BF16")]


def build(version: str, jobs: int, dry: bool, isa: str | None = None) -> Path:
    """The directory holding llama-bench and llama-quantize, built once per version (and ISA)."""
    home = hub.cache_dir() / "llama.cpp" / version
    bins = home / ("build" if isa is None else f"build-{isa}") / "bin"
    if all((bins / t).exists() for t in TARGETS):
        return bins
    dl, src = home / "download", home / "src"
    if shutil.which("cmake") is None:
        raise SystemExit("cmake is needed to build llama.cpp (pip install cmake, or the system package)")
    sdists = list(dl.glob("llama_cpp_python-*.tar.gz")) + list(dl.glob("llama-cpp-python-*.tar.gz"))
    if not sdists:
        sh([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python", "-d", dl,
            f"llama-cpp-python=={version}"], dry)
        sdists = list(dl.glob("llama_cpp_python-*.tar.gz")) + list(dl.glob("llama-cpp-python-*.tar.gz"))
    if dry:
        print(f"(dry run: would unpack the sdist into {src} and build {', '.join(TARGETS)} in {home / 'build'})")
        return bins
    if not sdists:
        raise SystemExit(f"pip downloaded no llama-cpp-python sdist into {dl}")
    root = llama_cpp_root(unpack(sdists[0], src))
    sh(["cmake", "-S", root, "-B", bins.parent, "-DCMAKE_BUILD_TYPE=Release", *isa_options(isa),
        "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF",
        "-DBUILD_SHARED_LIBS=OFF"], dry)
    sh(["cmake", "--build", bins.parent, "--config", "Release", "-j", str(jobs), "--target", *TARGETS], dry)
    return bins


def quantize(bins: Path, src: Path, dry: bool) -> list[Path]:
    """Q4_0 and Q8_0 GGUF files made from the source model (cached beside the builds)."""
    out_dir = bins.parents[1] / "models"   # shared by the ISA builds: the files do not depend on it
    outs = []
    for q in QUANTS:
        out = out_dir / src.name.replace("Q4_1", q)
        if not out.exists():
            tmp = out.with_name(out.name + ".partial")
            if not dry:
                out_dir.mkdir(parents=True, exist_ok=True)
            sh([bins / "llama-quantize", "--allow-requantize", src, tmp, q], dry, stdout=subprocess.DEVNULL)
            if not dry:
                tmp.rename(out)
        outs.append(out)
    return outs + [src]


def edgepanel_models(recipes, src: Path, dry: bool) -> list[Path]:
    from quality import parse
    from edgepanel.convert import convert
    out = []
    default = hub.converted_path(hub.DEFAULT_MODEL, hub.default_recipe().tag())
    for spec in recipes:
        path = hub.cache_dir() / "quality" / f"{spec.replace(':', '_').replace(',', '_')}.ep"
        if not path.exists() and parse(spec).tag() == hub.default_recipe().tag() and default.exists():
            path = default      # the default model is this recipe
        if not path.exists():
            print(f"+ convert {src.name} -> {path} ({spec}; several minutes)", file=sys.stderr, flush=True)
            if not dry:
                path.parent.mkdir(parents=True, exist_ok=True)
                convert(src, path, parse(spec), log=lambda m: print("  " + m, file=sys.stderr))
        out.append(path)
    return out


def llama_bench(bins: Path, ggufs, threads, p: int, n: int, r: int, dry: bool) -> tuple[list[dict], bool]:
    """llama-bench's JSON records for prompt (-n 0) and generation (-p 0, at depth p when the
    build has -d), and whether the depth was given."""
    exe = bins / "llama-bench"
    models = [a for g in ggufs for a in ("-m", g)]
    base = [exe, *models, "-t", ",".join(map(str, threads)), "-r", str(r), "-o", "json"]
    helptext = "" if dry else subprocess.run([exe, "--help"], capture_output=True, text=True).stdout
    depth = "--n-depth" in helptext or dry
    runs = [base + ["-p", str(p), "-n", "0"], base + ["-p", "0", "-n", str(n)] + (["-d", str(p)] if depth else [])]
    records = []
    for cmd in runs:
        print("+ " + " ".join(map(str, cmd)), file=sys.stderr, flush=True)
        if not dry:
            out = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, check=True).stdout
            records += json.loads(out)
    return records, depth


def table(ep: list[dict], lc: list[dict], p: int, n: int, depth: bool) -> str:
    rows = []
    for r in ep:
        rows.append((r["threads"], f"edgepanel ({r['isa']})", r["model_name"].removesuffix(".ep"), r["file_bytes"],
                     r["bits_per_weight"]["all"], r["pp_tps"], r["tg_tps"]))
    merged: dict = {}
    for r in lc:
        key = (r["n_threads"], r["model_filename"])
        d = merged.setdefault(key, {"size": r["model_size"], "params": r["model_n_params"], "type": r["model_type"]})
        d["pp" if r["n_prompt"] else "tg"] = {"mean": r["avg_ts"], "sd": r["stddev_ts"]}
    for (t, fname), d in merged.items():
        rows.append((t, "llama.cpp", Path(fname).name.removesuffix(".gguf"), d["size"], 8 * d["size"] / d["params"],
                     d.get("pp"), d.get("tg")))
    rows.sort(key=lambda x: (x[0], x[1] != "llama.cpp", x[2]))
    fmt = lambda s: f"{s['mean']:.1f} ± {s['sd']:.1f}" if s else "-"  # noqa: E731
    lines = [f"| threads | engine | model | MiB | bits/w (all) | pp{p} tok/s | tg{n} tok/s |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {t} | {e} | {m} | {size / 2**20:.1f} | {bpw:.2f} | {fmt(pp)} | {fmt(tg)} |"
              for t, e, m, size, bpw, pp, tg in rows]
    if not depth:
        lines.append(f"\n(this llama-bench has no -d: its tg{n} starts at position 0, edgepanel's at {p})")
    return "\n".join(lines)


def _median(xs):
    xs = sorted(xs)
    return (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2


def _over_rounds(rounds: list[tuple[list[dict], list[dict]]]) -> tuple[list[dict], list[dict]]:
    """One (edgepanel, llama.cpp) record list whose tokens/s are each cell's median over the rounds
    (sd: the spread of the rounds' means)."""
    def med(stats):
        means = [x["mean"] for x in stats]
        m = _median(means)
        return {"mean": m, "sd": (sum((v - m) ** 2 for v in means) / len(means)) ** 0.5}
    ep = [dict(r, pp_tps=med([rd[0][i]["pp_tps"] for rd in rounds]), tg_tps=med([rd[0][i]["tg_tps"] for rd in rounds]))
          for i, r in enumerate(rounds[0][0])]
    lc = []
    for i, r in enumerate(rounds[0][1]):
        m = med([{"mean": rd[1][i]["avg_ts"]} for rd in rounds])
        lc.append(dict(r, avg_ts=m["mean"], stddev_ts=m["sd"]))
    return ep, lc


def ratios(rounds: list[tuple[list[dict], list[dict]]]) -> str:
    """Each edgepanel model's tokens/s over llama.cpp Q4_0's at the same threads, within each round:
    median (min-max) over the rounds."""
    per: dict = {}
    for ep, lc in rounds:
        q4 = {(r["n_threads"], "pp" if r["n_prompt"] else "tg"): r["avg_ts"] for r in lc
              if Path(r["model_filename"]).name.endswith("Q4_0.gguf")}
        for r in ep:
            for kind in ("pp", "tg"):
                base = q4.get((r["threads"], kind))
                if base:
                    per.setdefault((r["model_name"].removesuffix(".ep"), kind), {}).setdefault(r["threads"], []).append(
                        r[f"{kind}_tps"]["mean"] / base)
    lines = ["| model | | " + " | ".join(f"{t} thread{'s' * (t > 1)}" for t in sorted({t for v in per.values() for t in v}))
             + " |", "|---|---|" + "---|" * len({t for v in per.values() for t in v})]
    for (name, kind), by_t in sorted(per.items()):
        cells = [f"{_median(v):.2f}x ({min(v):.2f}-{max(v):.2f})" for _, v in sorted(by_t.items())]
        lines.append(f"| {name} | {'prefill' if kind == 'pp' else 'decode'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-t", "--threads", default="1,2")
    ap.add_argument("-p", type=int, default=128)
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("-r", type=int, default=5)
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES))
    ap.add_argument("--llama-cpp-python", default=LLAMA_CPP_PYTHON, help="version whose vendored llama.cpp is built")
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 2, help="build jobs")
    ap.add_argument("--json", type=Path, help="write both sides' raw records")
    ap.add_argument("--dry-run", action="store_true", help="print the steps, build and run nothing")
    ap.add_argument("--rounds", type=int, default=1, help="the two sides in turns this many times: medians "
                    "over the rounds, and ratios to Q4_0 within each round")
    ap.add_argument("--isa", choices=["avx2"], help="hold both sides to this ISA (llama.cpp built without "
                    "AVX-512, edgepanel with EDGEPANEL_ISA); default: the best each has here")
    a = ap.parse_args()
    if a.rounds < 1:
        ap.error(f"--rounds must be at least 1, got {a.rounds}")
    if a.isa:
        os.environ["EDGEPANEL_ISA"] = a.isa
    config = bench.BenchConfig(prompt_tokens=a.p, gen_tokens=a.n, threads=a.threads, repetitions=a.r)
    src = hub.fetch("smollm2")
    bins = build(a.llama_cpp_python, a.jobs, a.dry_run, a.isa)
    ggufs = quantize(bins, src, a.dry_run)
    models = edgepanel_models(a.recipes, src, a.dry_run)
    if a.dry_run:
        llama_bench(bins, ggufs, config.threads, a.p, a.n, a.r, a.dry_run)
        print(f"+ edgepanel bench {' '.join(map(str, models))} -t {a.threads} -p {a.p} -n {a.n} -r {a.r}", file=sys.stderr)
        return
    rounds = []
    for i in range(a.rounds):
        sides = [lambda: llama_bench(bins, ggufs, config.threads, a.p, a.n, a.r, False),
                 lambda: bench.run(models, config, progress=a.rounds == 1, log=lambda m: print(m, file=sys.stderr))]
        if i % 2:
            sides.reverse()
        got = [side() for side in sides]
        (lc, depth), ep = got if i % 2 == 0 else got[::-1]
        rounds.append((ep, lc))
        if a.rounds > 1:
            print(f"round {i + 1}/{a.rounds} done", file=sys.stderr, flush=True)
    ep, lc = rounds[0] if a.rounds == 1 else _over_rounds(rounds)
    how = f"mean ± sd of {a.r} runs" if a.rounds == 1 else (
        f"median over {a.rounds} rounds (the sides in turns) of means of {a.r} runs, ± the rounds' spread")
    print(f"CPU: {bench.cpu_name()}; edgepanel {ep[0]['version']} (git {ep[0]['git']}), llama.cpp from "
          f"llama-cpp-python {a.llama_cpp_python} (build {lc[0].get('build_commit', '?') if lc else '?'}); "
          f"source: {src.name}; {how}\n")
    print(table(ep, lc, a.p, a.n, depth))
    print("\nagainst Q4_0 within each round, median (min-max):\n")
    print(ratios(rounds))
    if a.json:
        a.json.write_text(json.dumps({"edgepanel": ep, "llama.cpp": lc, "rounds": [{"edgepanel": e, "llama.cpp": c}
                                                                                   for e, c in rounds]}, indent=1))


if __name__ == "__main__":
    main()
