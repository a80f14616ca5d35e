"""What a panel is worth: over the targets' tokens, the mean loss (nats), next-token accuracy and
mean predictive entropy (nats) of a model given the full panel, no panel (the bare instruction),
and the panel without each field in turn.

    {"examples": N, "tokens": T,
     "conditions": {"full": {"loss": .., "accuracy": .., "entropy": .., "shortened": ..},
                    "none": {...}, "-plan": {...}, ...}}

Means are over tokens (every target token weighs the same).  "shortened": how many examples' panels
were cut to fit `seq_len` under that condition.
"""
from __future__ import annotations

import numpy as np

from ..progress import bar
from .dataset import PanelExample, conditions_for, tokenize


def token_stats(logits: np.ndarray, targets: np.ndarray):
    """Per position: loss (−log p(target)), whether the target is the argmax, and the entropy of
    the predicted distribution; computed in float64.  logits (n, V), targets (n,)."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=1))
    logp = z - lse[:, None]
    loss = -logp[np.arange(len(targets)), targets]
    correct = logits.argmax(axis=1) == targets
    entropy = -(np.exp(logp) * logp).sum(axis=1)
    return loss, correct, entropy


def target_logits(model, ids: np.ndarray, start: int) -> np.ndarray:
    """Logits predicting ids[start:] (one row per target token), the prompt run through the cache
    first so the head is computed for the targets only.  (n - start, vocab) float32."""
    engine = model.engine
    cache = engine.new_cache(len(ids))
    if start > 1:
        engine.forward(np.ascontiguousarray(ids[:start - 1]), cache)
    return engine.forward(np.ascontiguousarray(ids[start - 1:-1]), cache, all_logits=True)


def evaluate(model, examples: list[PanelExample], conditions: list[str] | None = None, seq_len: int = 1024,
             progress: bool = True) -> dict:
    conditions = conditions or conditions_for(examples)
    tok = model.tokenizer
    sums = {c: np.zeros(3) for c in conditions}
    shortened = {c: 0 for c in conditions}
    tokens = None
    steps = bar(total=len(conditions) * len(examples), desc="eval", unit="ex", disable=not progress)
    for c in conditions:
        count = 0
        for ex in examples:
            t = tokenize(ex, tok, seq_len, c)
            start = int(np.argmax(t.mask))
            loss, correct, entropy = token_stats(target_logits(model, t.ids, start), t.ids[start:])
            sums[c] += (loss.sum(), correct.sum(), entropy.sum())
            count += len(loss)
            shortened[c] += bool(t.rendered.dropped)
            steps.update(1)
        tokens = count
    steps.close()
    out = {"examples": len(examples), "tokens": tokens, "seq_len": seq_len, "conditions": {}}
    for c in conditions:
        loss, acc, ent = sums[c] / tokens
        out["conditions"][c] = {"loss": float(loss), "accuracy": float(acc), "entropy": float(ent),
                                "shortened": shortened[c]}
    return out


def table(result: dict) -> str:
    """The result as a Markdown table, best loss first after full and none."""
    rows = ["| condition | loss (nats) | accuracy | entropy (nats) | Δ loss vs full |", "|---|---|---|---|---|"]
    full = result["conditions"].get("full", {}).get("loss")
    for c, v in result["conditions"].items():
        d = "" if full is None or c == "full" else f"{v['loss'] - full:+.3f}"
        rows.append(f"| {c} | {v['loss']:.3f} | {v['accuracy']:.3f} | {v['entropy']:.3f} | {d} |")
    return "\n".join(rows) + f"\n\n{result['examples']} examples, {result['tokens']} target tokens"
