"""Losses of a batch of examples, computed by the engine's batched scoring (Model.score: the
log-probabilities at the target tokens come out of C, no (tokens x vocab) logits in Python).

    nll     mean cross-entropy of the target tokens                         Examples
    kd      KL(teacher || student) over a teacher's cached top-k            Examples (tune/teacher.py)
    dpo     -(1-e) log s(b h) - e log s(-b h)   (e: label smoothing, as cDPO) Pairs (tune/prefs.py)
    rdpo    robust DPO: [-(1-e) log s(b h) + e log s(-b h)] / (1 - 2e)       Pairs
    ipo     (h - 1/(2b))^2                                                   Pairs
    crlft   sum_i w(class_i) * NLL_i / sum_i n_i  (C-RLFT, OpenChat)         Examples carrying a class

with s the logistic function, b = beta, and for a pair (chosen c, rejected r) given prompt x

    h = [log pi(c|x) - log pi_ref(c|x)] - [log pi(r|x) - log pi_ref(r|x)]

log-probabilities summed over the continuation's tokens; pi_ref's are computed once before
training and cached (Pair.ref, tune/prefs.py), so no reference model is held.  The implicit
reward of a continuation is b [log pi(y|x) - log pi_ref(y|x)] (tune/reward.py).
"""
from __future__ import annotations

import numpy as np

PREFERENCE = ("dpo", "rdpo", "ipo")        # the objectives that train on Pairs


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


# -- preferences --------------------------------------------------------------------------------

def pair_logps(model, pairs) -> np.ndarray:
    """(P, 2) float64: log pi(chosen | x), log pi(rejected | x) of each pair, summed over the
    continuation's tokens; all 2P sequences go through one batched scoring."""
    seqs, masks = [], []
    for p in pairs:
        seqs += [p.chosen.ids, p.rejected.ids]
        masks += [p.chosen.mask, p.rejected.mask]
    lps = model.score(seqs, masks)
    return np.array([float(np.sum(lp, dtype=np.float64)) for lp in lps], np.float64).reshape(-1, 2)


def reference_logps(pairs) -> np.ndarray:
    """(P, 2) float64: the cached reference log-probabilities (tune/prefs.attach_reference)."""
    missing = [p.where or str(i) for i, p in enumerate(pairs) if p.ref is None]
    if missing:
        raise ValueError(f"pair {missing[0]} has no reference log-probabilities: "
                         "compute them first (tune.prefs.attach_reference)")
    return np.array([p.ref for p in pairs], np.float64)


def log_ratio_margins(policy: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """h (P,): (log pi(c) - log pi_ref(c)) - (log pi(r) - log pi_ref(r)), from (P, 2) arrays."""
    d = np.asarray(policy, np.float64) - np.asarray(reference, np.float64)
    return d[:, 0] - d[:, 1]


def dpo_loss(h: np.ndarray, beta: float, label_smoothing: float = 0.0) -> np.ndarray:
    """Per-pair DPO loss; with label smoothing e, the chosen is taken to be the better one with
    probability 1 - e (conservative DPO).  -log s(x) = log(1 + exp(-x)), computed stably."""
    z = beta * np.asarray(h, np.float64)
    return (1.0 - label_smoothing) * np.logaddexp(0.0, -z) + label_smoothing * np.logaddexp(0.0, z)


def rdpo_loss(h: np.ndarray, beta: float, label_smoothing: float = 0.0) -> np.ndarray:
    """Per-pair robust DPO loss (Chowdhury et al. 2024): unbiased when each label is flipped with
    probability e < 1/2."""
    z = beta * np.asarray(h, np.float64)
    e = label_smoothing
    return ((1.0 - e) * np.logaddexp(0.0, -z) - e * np.logaddexp(0.0, z)) / (1.0 - 2.0 * e)


def ipo_loss(h: np.ndarray, beta: float) -> np.ndarray:
    """Per-pair IPO loss: the margin h regressed to 1/(2 beta)."""
    return (np.asarray(h, np.float64) - 1.0 / (2.0 * beta)) ** 2


def preference_losses(kind: str, h: np.ndarray, beta: float, label_smoothing: float = 0.0) -> np.ndarray:
    if kind == "dpo":
        return dpo_loss(h, beta, label_smoothing)
    if kind == "rdpo":
        return rdpo_loss(h, beta, label_smoothing)
    if kind == "ipo":
        return ipo_loss(h, beta)
    raise ValueError(f"preference loss must be one of {PREFERENCE}, got {kind!r}")


def preference_metrics(policy: np.ndarray, reference: np.ndarray, beta: float) -> dict:
    """The usual DPO metrics (the names other DPO tools report): mean implicit rewards of chosen
    and rejected, their mean margin, and the fraction of pairs whose chosen reward is higher."""
    r = beta * (np.asarray(policy, np.float64) - np.asarray(reference, np.float64))     # (P, 2)
    return {"rewards/chosen": float(r[:, 0].mean()), "rewards/rejected": float(r[:, 1].mean()),
            "rewards/margins": float((r[:, 0] - r[:, 1]).mean()),
            "rewards/accuracies": float((r[:, 0] > r[:, 1]).mean())}


def _preference(kind: str, model, batch, beta: float, label_smoothing: float) -> float:
    h = log_ratio_margins(pair_logps(model, batch), reference_logps(batch))
    return float(preference_losses(kind, h, beta, label_smoothing).mean())


def dpo(model, batch, beta: float = 0.1, label_smoothing: float = 0.0) -> float:
    """Mean DPO loss over the pairs of `batch`."""
    return _preference("dpo", model, batch, beta, label_smoothing)


def rdpo(model, batch, beta: float = 0.1, label_smoothing: float = 0.0) -> float:
    """Mean robust-DPO loss over the pairs of `batch`."""
    return _preference("rdpo", model, batch, beta, label_smoothing)


def ipo(model, batch, beta: float = 0.1) -> float:
    """Mean IPO loss over the pairs of `batch`."""
    return _preference("ipo", model, batch, beta, 0.0)


def evaluate_pairs(kind: str, model, pairs, beta: float, label_smoothing: float = 0.0) -> dict:
    """{"loss": mean loss, "rewards/...": ...} over `pairs`, scored once."""
    policy, reference = pair_logps(model, pairs), reference_logps(pairs)
    h = log_ratio_margins(policy, reference)
    return {"loss": float(preference_losses(kind, h, beta, label_smoothing).mean()),
            **preference_metrics(policy, reference, beta)}


# -- conditioned, reward-weighted fine-tuning ---------------------------------------------------

def parse_class_weights(spec) -> dict[str, float]:
    """'book=1,model=0.1' (or a dict) -> {"book": 1.0, "model": 0.1}; weights finite and >= 0."""
    if isinstance(spec, dict):
        items = list(spec.items())
    else:
        items = []
        for part in str(spec or "").split(","):
            if not part.strip():
                continue
            name, eq, value = part.partition("=")
            try:
                items.append((name.strip(), float(value)) if eq else (name.strip(), None))
            except ValueError:
                items.append((name.strip(), None))
    out = {}
    for name, w in items:
        if not name or w is None or not np.isfinite(w) or w < 0:
            raise ValueError(f"class weights look like 'book=1,model=0.1' (finite, >= 0), got {spec!r}")
        out[name] = float(w)
    if not out:
        raise ValueError(f"class weights name at least one class, got {spec!r}")
    return out


def crlft(model, batch, class_weights="book=1,model=0.1") -> float:
    """C-RLFT: each example's summed target NLL times its class's weight, over the batch's target
    tokens (with every weight 1 this is nll).  The class is also in the prompt (tune/prefs.py)."""
    weights = parse_class_weights(class_weights)
    lps = model.score([e.ids for e in batch], [e.mask for e in batch])
    count = sum(len(lp) for lp in lps)
    if not count:
        raise ValueError("the batch has no target tokens")
    total = 0.0
    for e, lp in zip(batch, lps):
        if e.cls not in weights:
            raise ValueError(f"no weight for class {e.cls!r}: class weights are {weights}")
        total += weights[e.cls] * -float(np.sum(lp, dtype=np.float64))
    return total / count


OBJECTIVES = {"nll": nll, "kd": kd, "dpo": dpo, "rdpo": rdpo, "ipo": ipo, "crlft": crlft}
