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


def cpu_identity() -> dict:
    """This CPU's model name, family and model numbers (a virtual machine's name can be as bare as
    "AMD EPYC", shared by a Zen 1 and a Zen 4)."""
    from edgepanel.bench import cpu_fields
    fields = cpu_fields() or {}
    first = lambda k: (fields.get(k) or [""])[0]
    num = lambda v: int(v) if v.isdigit() else None
    return {"cpu": first("model name") or "unknown", "family": num(first("cpu family")), "model": num(first("model"))}


def same_machine(entry: dict, ident: dict, cores: int) -> bool:
    """A baseline entry measured on this CPU: the same name and core count, and the same family and
    model numbers where the entry records them."""
    return (entry["cpu"] == ident["cpu"] and entry["cores"] == cores
            and all(entry.get(k) is None or entry[k] == ident[k] for k in ("family", "model")))


def test_convert_smollm2_default_recipe(benchmark, tmp_path):
    from edgepanel import bench, hub
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
    ident, cores = cpu_identity(), os.cpu_count()
    cpu = bench.cpu_name()
    info = dict(model="SmolLM2-135M-Instruct", recipe=DEFAULT_RECIPE, cpu=cpu, cores=cores, **result)
    base = next((b for b in json.loads(BASELINE.read_text())["runs"] if same_machine(b, ident, cores)), None)
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


def test_baseline_is_chosen_by_family_and_model():
    """Two CPUs named alike ("AMD EPYC" under KVM) are told apart by their family and model numbers,
    and every stored entry that records them has its own."""
    runs = json.loads(BASELINE.read_text())["runs"]
    zen1 = {"cpu": "AMD EPYC", "family": 23, "model": 1}
    zen4 = {"cpu": "AMD EPYC", "family": 25, "model": 17}
    picked = {tuple(ident.values()): [r for r in runs if same_machine(r, ident, 2)] for ident in (zen1, zen4)}
    assert [r.get("family") for r in picked[tuple(zen1.values())]] == [23]
    assert all(r.get("family") == 25 for r in picked[tuple(zen4.values())])
    assert not [r for r in runs if same_machine(r, zen1, 4)]       # another core count is another machine
    keyed = [(r["cpu"], r.get("family"), r.get("model"), r["cores"]) for r in runs if r.get("family") is not None]
    assert len(keyed) == len(set(keyed))
