"""Fine-tuning cost on the default model, as ratios measured in one run, for zeroth-order steps and
for exact-gradient steps (backpropagation in NumPy, `--gradient exact`):

- time: one ZO step (two scorings of the batch, perturbation, restore, update) against one scoring
  of the same batch, alternating the two for several rounds and taking the median of the per-round
  ratios (the issue's target: at most 2.1x);
- memory: peak RSS of a process that trains against one that only scores the same batch (target:
  at most 1.1x), each in a fresh process; also the peak of the training or scoring phase alone
  (VmHWM reset after loading the model and the batch).

    python -m pytest benchmarks/test_tune_bench.py --benchmark-json=tune.json

Untimed runs (--benchmark-disable, as CI runs the benchmarks) take one round and one step.
"""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from edgepanel.kernels import native

pytestmark = pytest.mark.skipif(native.lib is None, reason="C kernels not built")
BATCH, SEQ = 4, 256


@pytest.fixture(scope="module")
def default_model():
    from edgepanel.hub import resolve_model
    return resolve_model(None, progress=False)


def _batch(model):
    from edgepanel.convert.calibrate import DEFAULT_CALIB
    from edgepanel.tune import data
    return data.from_text(model.tokenizer, DEFAULT_CALIB.read_text(encoding="utf-8"), SEQ)[:BATCH]


def _config(gradient):
    from edgepanel.tune import TuneConfig
    if gradient == "exact":   # its own recipe: a multiplier per scale, Adam
        return TuneConfig.for_objective(gradient="exact", batch=BATCH, seq_len=SEQ, steps=10**6)
    return TuneConfig(batch=BATCH, seq_len=SEQ, steps=10**6, granularity="row")


@pytest.mark.parametrize("gradient", ["spsa", "exact"])
def test_zo_step_against_scoring(benchmark, default_model, gradient):
    import edgepanel
    from edgepanel.tune import ZOTrainer
    from edgepanel.tune.objectives import nll
    m = edgepanel.load(default_model, threads=2)
    batch = _batch(m)
    trainer = ZOTrainer(m, batch, _config(gradient))
    rounds = 1 if benchmark.disabled else 7
    ratios, steps, scores = [], [], []
    for _ in range(rounds):
        t = time.perf_counter()
        nll(m, batch)
        scores.append(time.perf_counter() - t)
        t = time.perf_counter()
        trainer.do_step()
        steps.append(time.perf_counter() - t)
        ratios.append(steps[-1] / scores[-1])
    benchmark.group = f"fine-tuning step ({gradient})"
    benchmark.extra_info.update(model=default_model.name, batch=BATCH, seq_len=SEQ, rounds=rounds,
                                score_s=float(np.median(scores)), step_s=float(np.median(steps)),
                                step_over_score=float(np.median(ratios)), trained=trainer.params.size)
    benchmark.pedantic(trainer.do_step, rounds=1, iterations=1)
    assert np.isfinite(trainer.history[-1].loss if trainer.history else 0.0)


PEAK = """
import sys, edgepanel
from edgepanel.tune import ZOTrainer
sys.path.insert(0, {bench!r})
from test_tune_bench import _batch, _config
m = edgepanel.load({path!r}, threads=2)
batch = _batch(m)
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
loaded = hwm()   # (not ru_maxrss: a forked child inherits its parent's)
try:   # the peak of the phase below alone (Linux: 5 resets VmHWM to the current RSS)
    open("/proc/self/clear_refs", "w").write("5")
except OSError:
    pass
if {train}:
    t = ZOTrainer(m, batch, _config({gradient!r}))
    for _ in range(2):
        t.do_step()
else:
    from edgepanel.tune.objectives import nll
    for _ in range(4):
        nll(m, batch)
print(max(loaded, hwm()), hwm())
"""


@pytest.mark.parametrize("gradient", ["spsa", "exact"])
def test_zo_training_peak_memory_against_scoring(benchmark, default_model, gradient):
    def peak(train):
        code = PEAK.format(bench=os.path.dirname(__file__), path=str(default_model), train=train, gradient=gradient)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        return [int(v) for v in r.stdout.strip().splitlines()[-1].split()]

    (score, score_phase), (train, train_phase) = peak(False), peak(True)
    benchmark.group = f"fine-tuning memory ({gradient})"
    info = dict(score_peak_rss=score, train_peak_rss=train, train_over_score=train / score,
                score_phase_peak_rss=score_phase, train_phase_peak_rss=train_phase,
                phase_train_over_score=train_phase / score_phase)
    benchmark.extra_info.update(model=default_model.name, **info)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    assert train > 0 and score > 0
    print(json.dumps(info))
