"""Conversion time and peak memory: SmolLM2-135M-Instruct with the default model's recipe
(calibration, rotation, GPTQ-style fitting, scale tuning), through the command line in its own
process, on every core, beside the previous implementation's figures on the same CPU
(benchmarks/data/convert_baseline.json: measured before issue 24's changes, with the command
below, at the revision it names).

    python -m pytest benchmarks/test_convert_bench.py --benchmark-json=convert.json -s

Untimed runs (--benchmark-disable, as CI runs the benchmarks) convert with 512 calibration
tokens and 2 tuning steps: they check that the path works, not how long it takes.
"""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

BASELINE = Path(__file__).parent / "data" / "convert_baseline.json"


def cpu_model() -> str:
    try:
        return next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


def test_convert_smollm2_default_recipe(benchmark, tmp_path):
    from edgepanel import hub
    from edgepanel.hub import DEFAULT_RECIPE

    src = hub.fetch("smollm2")
    out = tmp_path / "smollm2.ep"
    args = [sys.executable, "-m", "edgepanel", "convert", str(src), str(out)]
    for key, value in DEFAULT_RECIPE.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    if benchmark.disabled:
        args += ["--calib-tokens", "512", "--tune-steps", "2"]
    # its own process, with the thread settings a user has (benchmarks/conftest.py pins BLAS to
    # one thread for the kernel timings)
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    result = {}

    def run():
        t = time.perf_counter()
        p = subprocess.run(args, check=True, env=env, capture_output=True, text=True)
        result["seconds"] = time.perf_counter() - t
        m = re.search(r"peak memory ([\d.]+) GiB", p.stdout)
        result["peak_gib"] = float(m[1]) if m else None

    benchmark.group = "conversion"
    benchmark.pedantic(run, rounds=1, iterations=1)
    assert out.exists() and out.stat().st_size > 50 * 2**20
    assert result["peak_gib"] is not None, "the conversion report names its peak memory"
    cpu, cores = cpu_model(), os.cpu_count()
    info = dict(model="SmolLM2-135M-Instruct", recipe=DEFAULT_RECIPE, cpu=cpu, cores=cores, **result)
    base = next((b for b in json.loads(BASELINE.read_text())["runs"]
                 if b["cpu"] == cpu and b["cores"] == cores), None)
    if base and not benchmark.disabled:
        info.update(baseline=base, speedup=base["seconds"] / result["seconds"])
        before = f"{base['seconds']:.0f} s"
        memory = ""
        if base.get("peak_gib"):        # not recorded for every machine (the file's note says why)
            info["memory_ratio"] = result["peak_gib"] / base["peak_gib"]
            before += f", {base['peak_gib']:.2f} GiB"
            memory = f", {1 / info['memory_ratio']:.2f}x less memory"
        print(f"\nconversion on {cpu} ({cores} cores): {result['seconds']:.0f} s, peak {result['peak_gib']:.2f} GiB; "
              f"before ({base['revision']}): {before}: {info['speedup']:.2f}x faster{memory}")
    benchmark.extra_info.update(info)
