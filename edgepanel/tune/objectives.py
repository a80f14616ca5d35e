"""Losses of a batch of examples, computed by the engine's batched scoring (Model.score: the
log-probabilities at the target tokens come out of C, no (tokens x vocab) logits in Python)."""
from __future__ import annotations

import numpy as np


def nll(model, batch) -> float:
    """Mean cross-entropy (nats) over the target tokens of `batch` (Examples)."""
    lps = model.score([e.ids for e in batch], [e.mask for e in batch])
    count = sum(len(lp) for lp in lps)
    if not count:
        raise ValueError("the batch has no target tokens")
    return -float(sum(float(lp.sum()) for lp in lps)) / count


def kd(model, batch) -> float:
    """Mean KL(teacher || student) over the positions of `batch` (Examples built by
    tune/teacher.py): exact over the teacher's top-K ids, the rest of the vocabulary one outcome."""
    lq = model.score_at([e.ids for e in batch], [e.teacher[0] for e in batch])   # (n-1, K) each
    total, count = 0.0, 0
    for e, q in zip(batch, lq):
        _, lp, rest = e.teacher
        lp64, q64 = lp.astype(np.float64), q.astype(np.float64)
        q_rest = np.maximum(1.0 - np.exp(q64).sum(axis=1), 1e-12)
        kl = (np.exp(lp64) * (lp64 - q64)).sum(axis=1) + np.exp(rest) * (rest - np.log(q_rest))
        total += float(kl.sum())
        count += len(kl)
    return total / count


OBJECTIVES = {"nll": nll, "kd": kd}
