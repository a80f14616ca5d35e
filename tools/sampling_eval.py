"""Which sampling defaults write the best text on the default model: for each setting, continue a
fixed set of prompts (chat template, several seeds) and measure what goes wrong with a small
model's text: repetition (the share of repeated 4-grams of tokens, and the share of texts caught
in a loop: some 8-gram three times or more) and incoherence (the perplexity of the written text
under the unquantized source model; lower is more fluent, but a loop also scores low, so both
numbers are read together).

    python tools/quality.py pass                              # the source, pass-through
    python tools/sampling_eval.py --json docs/data/sampling.json
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from edgepanel import hub
from edgepanel.model import load

PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Describe a walk through a forest in autumn.",
    "Explain how a bicycle works to a child.",
    "Write a letter to a friend about your summer.",
    "Tell me about the history of the city of Rome.",
    "Write a poem about the sea.",
    "What should I cook for dinner tonight, and how?",
    "Describe your ideal weekend.",
]
SETTINGS = {
    "greedy": dict(temperature=0.0, top_p=1.0, min_p=0.0, repetition_penalty=1.0),
    "t0.7 plain (the API's old default)": dict(temperature=0.7, top_p=1.0, min_p=0.0, repetition_penalty=1.0),
    "t0.7 top-p 0.95 min-p 0.05 (no penalty)": dict(temperature=0.7, top_p=0.95, min_p=0.05, repetition_penalty=1.0),
    "t0.7 top-p 0.95 min-p 0.05 penalty 1.1 (the default)": dict(temperature=0.7, top_p=0.95, min_p=0.05,
                                                                 repetition_penalty=1.1),
    "t1.0 top-p 0.95 min-p 0.05 penalty 1.1": dict(temperature=1.0, top_p=0.95, min_p=0.05, repetition_penalty=1.1),
    "t0.7 top-p 0.95 min-p 0.05 penalty 1.3": dict(temperature=0.7, top_p=0.95, min_p=0.05, repetition_penalty=1.3),
}


def repeats(ids: list[int], n: int) -> float:
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return 1 - len(set(grams)) / max(1, len(grams))


def looped(ids: list[int]) -> bool:
    grams = Counter(tuple(ids[i:i + 8]) for i in range(len(ids) - 7))
    return bool(grams) and max(grams.values()) >= 3


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="default: the default model")
    ap.add_argument("--judge", type=Path, default=hub.cache_dir() / "quality" / "pass.ep")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("-n", type=int, default=120)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    m = load(a.model or hub.resolve_model(None, progress=False))
    judge = load(a.judge)
    rows = []
    for name, opts in SETTINGS.items():
        rep4, loops, nll, count = [], 0, 0.0, 0
        for p in PROMPTS:
            prompt = m.prompt_ids([{"role": "user", "content": p}])
            for seed in range(a.seeds if opts["temperature"] > 0 else 1):
                out = m.generate_ids(prompt, max_tokens=a.n, seed=seed, **opts)
                if len(out) < 2:
                    continue
                rep4.append(repeats(out, 4))
                loops += looped(out)
                lp = judge.score([np.asarray(prompt + out)])[0][len(prompt) - 1:]
                nll -= float(lp.sum())
                count += len(lp)
        row = {"setting": name, **opts, "texts": len(rep4), "repeated_4grams": float(np.mean(rep4)),
               "looped": loops / len(rep4), "judge_ppl": float(np.exp(nll / count))}
        rows.append(row)
        print(f"{name:55} repeated 4-grams {row['repeated_4grams']:.3f}, looped {row['looped']:.2f}, "
              f"source-model perplexity {row['judge_ppl']:.2f}", flush=True)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    sys.exit(main())
