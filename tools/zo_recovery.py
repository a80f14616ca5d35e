"""Recovery of a binarized SmolLM2 by zeroth-order fine-tuning, torch-free: the student (a
calibrated, untuned conversion) is tuned against the pass-through source's next-token
distributions (kd, top-k cached once) on the shipped calibration text, within a wall-time
budget; the held-out perplexity of tools/eval_texts.py's three texts (first 2048 tokens,
windows of 512, as tools/quality.py) is measured along the way.

    python tools/quality.py k2g64:tune0                      # makes pass.ep and k2g64_tune0.ep
    python tools/zo_recovery.py --minutes 30 --json docs/data/zo_k2_row.json [training options]

Training options are edgepanel finetune's (TuneConfig), e.g. --granularity row --lr 2e-3.
The JSON holds the run's options, the machine, and a list of points (seconds of training, step,
train loss, perplexity per text).  tools/plot_recovery.py draws them.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_texts import TEXTS  # noqa: E402

from edgepanel import hub  # noqa: E402
from edgepanel.bench import cpu_name  # noqa: E402
from edgepanel.cli.options import given, option  # noqa: E402
from edgepanel.convert.calibrate import DEFAULT_CALIB  # noqa: E402
from edgepanel.model import load  # noqa: E402
from edgepanel.tune import TuneConfig, ZOTrainer, teacher  # noqa: E402


def held_out(m, texts, tokens=2048, window=512) -> dict:
    out = {}
    for name, text in texts.items():
        ids = m.tokenizer.encode(text)[:tokens]
        out[name] = m.perplexity(m.tokenizer.decode(ids), window=window)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", type=Path, default=hub.cache_dir() / "quality" / "k2g64_tune0.ep")
    ap.add_argument("--teacher", type=Path, default=hub.cache_dir() / "quality" / "pass.ep")
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--eval-minutes", type=float, default=5.0, help="held-out perplexity every this many minutes")
    ap.add_argument("--steps", type=int, default=None,
                    help="stop after this many steps (--minutes still caps the time); runs on different "
                         "thread counts or machines compare by step, since a step's noise comes from the seed")
    ap.add_argument("--eval-steps", type=int, default=None, help="held-out perplexity every this many steps "
                                                                 "(instead of --eval-minutes)")
    ap.add_argument("--windows", type=int, default=32, help="calibration windows the teacher scores")
    ap.add_argument("--k", type=int, default=64, help="teacher's top-k kept")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, required=True)
    g = ap.add_argument_group("training (TuneConfig)")
    for name, typ in (("gradient", str), ("params", str), ("layers", str), ("granularity", str), ("lr", float), ("eps", float),
                      ("n_perturb", int), ("noise", str), ("optimizer", str), ("schedule", str), ("warmup", int), ("weight_decay", float),
                      ("clip", float), ("batch", int), ("seq_len", int), ("seed", int)):
        option(g, TuneConfig, name, "--" + name.replace("_", "-"), type=typ)
    a = ap.parse_args()
    # --steps is the run's length, which a cosine schedule decays over
    cfg = TuneConfig.for_objective(**{**given(a, TuneConfig), "objective": "kd", "steps": a.steps or 10**9,
                                      "eval_every": 0})
    texts = {n: fn() for n, fn in TEXTS.items()}
    student = load(a.student, threads=a.threads)
    cache = hub.cache_dir() / "quality" / f"teacher-top{a.k}-w{a.windows}-s{cfg.seq_len}.cache"
    t0 = time.time()
    train = teacher.build(load(a.teacher, threads=a.threads), student.tokenizer,
                          DEFAULT_CALIB.read_text(encoding="utf-8"), cfg.seq_len, a.windows, a.k, cache,
                          log=lambda m: print(m, file=sys.stderr))
    teacher_s = time.time() - t0
    trainer = ZOTrainer(student, train, cfg)
    points = [{"seconds": 0.0, "step": 0, "train_loss": None, **held_out(student, texts)}]
    print(json.dumps(points[-1]), flush=True)
    spent, next_eval, losses, trace = 0.0, a.eval_minutes * 60, [], []
    steps = a.steps if a.steps is not None else 10**9

    def done() -> bool:
        return spent >= a.minutes * 60 or trainer.step >= steps

    while not done():
        t = time.time()
        info = trainer.do_step()
        spent += time.time() - t
        losses.append(info.loss)
        trace.append({"loss": info.loss, "grad": info.grad})
        due = info.step % a.eval_steps == 0 if a.eval_steps else spent >= next_eval
        if due or done():
            next_eval += a.eval_minutes * 60
            points.append({"seconds": spent, "step": info.step, "train_loss": sum(losses[-20:]) / len(losses[-20:]),
                           **held_out(student, texts)})
            print(json.dumps(points[-1]), flush=True)
    result = {"config": {**vars(cfg)}, "student": str(a.student), "teacher": str(a.teacher),
              "teacher_seconds": teacher_s, "windows": len(train), "k": a.k, "trained_values": trainer.params.size, "cpu": cpu_name(),
              "threads": student.threads or "all", "points": points, "trace": trace}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(result, indent=1))
    first, last = points[0], points[-1]
    print(" ".join(f"{n} {first[n]:.2f} -> {last[n]:.2f} ({100 * (1 - last[n] / first[n]):+.1f}%)" for n in texts))


if __name__ == "__main__":
    main()
