"""The measurements of docs/preferences.md (tools/prefs_experiment.sh runs them), each writing one
JSON file:

    python tools/prefs_eval.py pairs  MODEL PAIRS OUT.json [--seq-len 384]
        held-out rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies of a tuned
        model against the reference its file carries (an untuned model: all 0); and how often the
        model alone gives the chosen paragraph the higher log-probability (sum, and per token)
    python tools/prefs_eval.py best-of BASE TUNED PANELS OUT.json [--n 4] [--limit 50] [--max-tokens 160]
                                       [--seq-len 384]
        per held-out panel: the book's paragraph and n-1 paragraphs BASE writes (seeded); how often
        each rule picks the book's: the implicit reward under TUNED, the mean log-probability per
        token under TUNED and under BASE
    python tools/prefs_eval.py crlft  BASE TUNED PANELS OUT.json [--limit 100] [--seq-len 384]
        held-out loss of the book paragraphs under the "book" and "model" conditions, both models
    python tools/prefs_eval.py landscape MODEL PAIRS OUT.json [--tensors wq,wk] [--layers 0-29]
                                         [--eps 1e-4,2e-4,0.05,-0.05,0.1,-0.1] [--limit 8] [--seq-len 384]
        what the zeroth-order trainer's two loss evaluations see: every plane scale or norm weight of
        the named tensors (in those layers; "wq,wk;final_norm": one direction each) multiplied by 1 + eps, for each eps, and each pair's DPO margin
        change (log pi(c) - log pi_0(c)) - (log pi(r) - log pi_0(r)) against the model as it is.
        A tiny eps measures the noise floor of the quantized forward pass (activations are rounded
        to int8 before every product, so the log-probabilities are piecewise constant in the
        scales); for each +-eps, the odd part (h(+eps) - h(-eps)) / 2 is the slope's estimate
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from edgepanel.bench import cpu_name
from edgepanel.model import load
from edgepanel.panels import dataset
from edgepanel.panels.pairs import paragraph_seed, write_paragraph
from edgepanel.tune import objectives, prefs, reward


def write(path, obj, threads=None):
    obj = {**obj, "cpu": cpu_name(), "threads": threads or os.cpu_count()}
    tmp = Path(f"{path}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    print(json.dumps(obj, indent=1))


def cmd_pairs(a):
    m = load(a.model, threads=a.threads)
    pairs = prefs.load_pairs(a.pairs, m.tokenizer, a.seq_len)
    t = time.time()
    policy = objectives.pair_logps(m, pairs)
    ref = reward.pair_reference_logps(m, pairs, policy)
    lengths = np.array([[p.chosen.targets, p.rejected.targets] for p in pairs], np.float64)
    out = {"model": str(a.model), "pairs": len(pairs), "beta": reward.default_beta(m),
           **objectives.preference_metrics(policy, ref, reward.default_beta(m)),
           "model_prefers_chosen": float(np.mean(policy[:, 0] > policy[:, 1])),
           "model_prefers_chosen_per_token": float(np.mean(policy[:, 0] / lengths[:, 0] > policy[:, 1] / lengths[:, 1])),
           "seconds": time.time() - t}
    write(a.out, out, a.threads)


def cmd_best_of(a):
    base = load(a.base, threads=a.threads)
    tuned = load(a.tuned, threads=a.threads)
    ex = dataset.load(a.panels)[: a.limit]
    picks = {"implicit reward (tuned)": 0, "mean log-prob (tuned)": 0, "mean log-prob (base)": 0,
             "implicit reward per token (tuned)": 0}
    details = []
    t = time.time()
    for i, e in enumerate(ex):
        texts = [e.target] + [write_paragraph(base, e, paragraph_seed(a.seed, i * a.n + k), a.max_tokens)
                              for k in range(a.n - 1)]
        texts = [x for x in texts if x] or [e.target]
        tuned_scores = reward.score_candidates(tuned, e.panel, texts, seq_len=a.seq_len)
        base_scores = reward.score_candidates(base, e.panel, texts, seq_len=a.seq_len)
        picks["implicit reward (tuned)"] += reward.pick(tuned_scores) == 0
        picks["mean log-prob (tuned)"] += int(np.argmax([c.mean_logp for c in tuned_scores])) == 0
        picks["mean log-prob (base)"] += int(np.argmax([c.mean_logp for c in base_scores])) == 0
        # the length control: a reward that only tracked a uniform drift per token would favour the
        # shortest candidate; per token it cannot
        picks["implicit reward per token (tuned)"] += int(np.argmax([c.reward / max(1, c.tokens) for c in tuned_scores])) == 0
        details.append({"tokens": [c.tokens for c in tuned_scores],
                        "reward": [round(c.reward, 4) for c in tuned_scores],
                        "mean_logp_base": [round(c.mean_logp, 4) for c in base_scores]})
    write(a.out, {"base": str(a.base), "tuned": str(a.tuned), "panels": len(ex), "candidates": a.n,
                  "book_picked": {k: v / len(ex) for k, v in picks.items()},
                  "book_is_shortest": float(np.mean([d["tokens"][0] == min(d["tokens"]) for d in details])),
                  "per_panel": details, "seconds": time.time() - t}, a.threads)


def cmd_crlft(a):
    ex = dataset.load(a.panels)[: a.limit]
    out = {"panels": len(ex), "seq_len": a.seq_len}
    t = time.time()
    for name, path in (("base", a.base), ("tuned", a.tuned)):
        m = load(path, threads=a.threads)
        out[name] = {"model": str(path), **prefs.class_losses(m, ex, ["book", "model"], a.seq_len)}
    out["seconds"] = time.time() - t
    write(a.out, out, a.threads)


def cmd_landscape(a):
    from edgepanel.tune.params import Trainable, parse_layers
    m = load(a.model, threads=a.threads)
    pairs = prefs.load_pairs(a.pairs, m.tokenizer, a.seq_len)
    pairs = [pairs[round(i * (len(pairs) - 1) / max(1, a.limit - 1))] for i in range(min(a.limit, len(pairs)))]
    directions = {}   # spec -> the trainer's own parametrization of it: one multiplier per kind, every layer given
    for spec in a.tensors.split(";"):
        what, _, where = spec.partition("@")
        try:
            directions[spec] = Trainable(m, ("scales", "norms"), parse_layers(where or a.layers, m.cfg.n_layers),
                                         "shared", tensors=what)
        except ValueError as e:
            raise SystemExit(f"direction {spec!r}: {e}") from None
    eps_list = [float(e) for e in a.eps.split(",")]
    t = time.time()
    base = objectives.pair_logps(m, pairs)
    out = {}
    for spec, d in directions.items():
        names = [n for members in d.members.values() for n in members]
        margins = {}
        for eps in eps_list:
            for theta in d.theta.values():
                theta[...] = np.float32(1 + eps)
            d.apply()
            margins[eps] = objectives.log_ratio_margins(objectives.pair_logps(m, pairs), base)
        for theta in d.theta.values():
            theta[...] = 1
        d.apply()
        rows = {f"{e:g}": {"margins": h.round(4).tolist(), "rms": float(np.sqrt(np.mean(h ** 2))),
                           "positive": float(np.mean(h > 0))} for e, h in margins.items()}
        for e in margins:
            if e > 0 and -e in margins:
                odd = (margins[e] - margins[-e]) / 2
                even = (margins[e] + margins[-e]) / 2
                rows[f"{e:g}"].update(odd=odd.round(4).tolist(), odd_rms=float(np.sqrt(np.mean(odd ** 2))),
                                      odd_mean=float(np.mean(odd)), even_rms=float(np.sqrt(np.mean(even ** 2))),
                                      odd_positive=float(np.mean(odd > 0)))
        out[spec] = {"tensors": len(names), "eps": rows}
        print(f"{spec}: " + ", ".join(f"eps {e}: positive {r['positive']:.3f}" + (
            f", odd mean {r['odd_mean']:+.3f} positive {r['odd_positive']:.3f}" if "odd" in r else "")
            for e, r in rows.items()), flush=True)
    first = next(iter(out.values()))
    write(a.out, {"model": str(a.model), "pairs": len(pairs), "layers": a.layers or "all",
                  "directions": out, "tensors": a.tensors.split(";")[0].split(","), "scales": first["tensors"],
                  "eps": first["eps"], "seconds": time.time() - t}, a.threads)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("pairs")
    s.add_argument("model")
    s.add_argument("pairs")
    s.add_argument("out")
    s.add_argument("--seq-len", type=int, default=384)
    s.set_defaults(func=cmd_pairs)
    s = sub.add_parser("best-of")
    s.add_argument("base")
    s.add_argument("tuned")
    s.add_argument("panels")
    s.add_argument("out")
    s.add_argument("--n", type=int, default=4)
    s.add_argument("--limit", type=int, default=50)
    s.add_argument("--max-tokens", type=int, default=160)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--seq-len", type=int, default=384, help="candidates tokenized as training pairs are")
    s.set_defaults(func=cmd_best_of)
    s = sub.add_parser("crlft")
    s.add_argument("base")
    s.add_argument("tuned")
    s.add_argument("panels")
    s.add_argument("out")
    s.add_argument("--limit", type=int, default=100)
    s.add_argument("--seq-len", type=int, default=384)
    s.set_defaults(func=cmd_crlft)
    s = sub.add_parser("landscape")
    s.add_argument("model")
    s.add_argument("pairs")
    s.add_argument("out")
    s.add_argument("--tensors", default="wq,wk", help="tensor names, e.g. wq,wk,wv,wo,w_gate,w_up,w_down, attn_norm, "
                   "mlp_norm, final_norm; several directions separated by ';' share one base evaluation; 'wq,wk@20-29': "
                   "that direction in those layers only")
    s.add_argument("--layers", default=None, help="e.g. 20-29 (default: all)")
    s.add_argument("--eps", default="1e-4,2e-4,0.05,-0.05,0.1,-0.1")
    s.add_argument("--limit", type=int, default=8, help="pairs, evenly spaced over the file")
    s.add_argument("--seq-len", type=int, default=384)
    s.set_defaults(func=cmd_landscape)
    for s in sub.choices.values():
        s.add_argument("-t", "--threads", type=int, default=None)
    a = p.parse_args()
    a.func(a)


if __name__ == "__main__":
    main()
