"""Conversion time: SmolLM2-135M-Instruct with the default model's recipe (calibration, rotation,
GPTQ-style fitting, scale tuning), through the command line in its own process, on every core
(the target: <= 10 minutes on 2 cores).

    python -m pytest benchmarks/test_convert_bench.py --benchmark-json=convert.json

Untimed runs (--benchmark-disable, as CI runs the benchmarks) convert with 512 calibration
tokens and 2 tuning steps: they check that the path works, not how long it takes.
"""
import os
import subprocess
import sys


def test_convert_smollm2_default_recipe(benchmark, tmp_path):
    from edgepanel import hub
    from edgepanel.hub import DEFAULT_RECIPE

    src = hub.fetch("smollm2")
    out = tmp_path / "smollm2.ep"
    args = [sys.executable, "-m", "edgepanel", "convert", str(src), str(out), "-q"]
    for key, value in DEFAULT_RECIPE.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    if benchmark.disabled:
        args += ["--calib-tokens", "512", "--tune-steps", "2"]
    # its own process, with the thread settings a user has (benchmarks/conftest.py pins BLAS to
    # one thread for the kernel timings)
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}

    def run():
        subprocess.run(args, check=True, env=env)

    benchmark.group = "conversion"
    benchmark.extra_info.update(model="SmolLM2-135M-Instruct", recipe=DEFAULT_RECIPE, cores=os.cpu_count())
    benchmark.pedantic(run, rounds=1, iterations=1)
    assert out.exists() and out.stat().st_size > 50 * 2**20
