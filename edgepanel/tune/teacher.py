"""Knowledge distillation targets: a teacher model's next-token distributions over a text, kept as
its top-k log-probabilities and the log of the mass outside them, computed once and cached in a
safetensors file, so training never holds the teacher in memory.

    cache  ids (W, L) int32              the windows of the text
           top_ids (W, L, K) int32       position t's K most likely next tokens under the teacher
           top_logp (W, L, K) float32    their log-probabilities
           rest_logp (W, L) float32      log(1 - sum of those K probabilities)

KL(teacher || student) at a position is then  sum_k p_k (log p_k - log q_k)
+ p_rest (log p_rest - log q_rest), with q_rest = 1 - sum_k q_k: exact over the K ids, and the
rest of the vocabulary lumped into one outcome.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import FormatError
from .data import Example

CACHE_FORMAT = "edgepanel-teacher-cache"


def _log1mexp(x):
    """log(1 - exp(x)) for x <= 0, accurate near 0 and far below it."""
    x = np.minimum(np.asarray(x, np.float64), -1e-12)
    return np.where(x > -0.693, np.log(-np.expm1(x)), np.log1p(-np.exp(x)))


def windows(tokenizer, text: str, seq_len: int, count: int | None = None) -> np.ndarray:
    """(W, seq_len) int32: consecutive windows of the text's tokens (the last partial one dropped);
    `count`: that many, spread evenly over the text."""
    ids = np.asarray(tokenizer.encode(text), np.int32)
    w = len(ids) // seq_len
    if w == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of {seq_len}")
    all_w = ids[: w * seq_len].reshape(w, seq_len)
    if count is None or count >= w:
        return all_w
    return all_w[np.linspace(0, w - 1, count).round().astype(int)]


def teacher_targets(teacher, ids: np.ndarray, k: int = 64):
    """The teacher's top-k next-token log-probabilities for every position of every window;
    `teacher`: a Model, or a function from a window's ids to its logits (L, vocab)."""
    logits = teacher if callable(teacher) else teacher.logits
    W, L = ids.shape
    top_ids = np.empty((W, L, k), np.int32)
    top_logp = np.empty((W, L, k), np.float32)
    rest = np.empty((W, L), np.float32)
    for w in range(W):
        lg = np.asarray(logits(ids[w]), np.float64)               # (L, vocab)
        lg -= lg.max(axis=1, keepdims=True)
        logp = lg - np.log(np.exp(lg).sum(axis=1, keepdims=True))
        idx = np.argpartition(-logp, k - 1, axis=1)[:, :k]        # (L, k), unordered
        sel = np.take_along_axis(logp, idx, axis=1)
        order = np.argsort(-sel, axis=1, kind="stable")
        top_ids[w] = np.take_along_axis(idx, order, axis=1)
        top_logp[w] = np.take_along_axis(sel, order, axis=1)
        rest[w] = _log1mexp(np.log(np.exp(top_logp[w].astype(np.float64)).sum(axis=1)))
    return top_ids, top_logp, rest


def save_cache(path, ids, top_ids, top_logp, rest, info: dict) -> Path:
    from ..format import write_tensors
    return write_tensors(path, {"ids": ids, "top_ids": top_ids, "top_logp": top_logp, "rest_logp": rest},
                         {"format": CACHE_FORMAT, "info": json.dumps(info, sort_keys=True)})


def load_cache(path):
    from ..format import SafetensorsFile
    f = SafetensorsFile(path)
    if f.metadata.get("format") != CACHE_FORMAT:
        raise FormatError(f"{path}: not an edgepanel teacher cache")
    t = f.tensors
    try:
        ids, top_ids, top_logp, rest = (np.asarray(t[n]) for n in ("ids", "top_ids", "top_logp", "rest_logp"))
    except KeyError as exc:
        raise FormatError(f"{path}: tensor {exc} is missing") from None
    W, L = ids.shape
    if top_ids.shape[:2] != (W, L) or top_logp.shape != top_ids.shape or rest.shape != (W, L):
        raise FormatError(f"{path}: tensors of mismatched shapes")
    return ids, top_ids, top_logp, rest, json.loads(f.metadata.get("info", "{}"))


def examples(ids, top_ids, top_logp, rest) -> list[Example]:
    """One Example per window, carrying the teacher's targets (the kd objective reads them); every
    position but the last predicts a next token."""
    out = []
    for w in range(len(ids)):
        mask = np.ones(ids.shape[1], bool)
        mask[0] = False
        out.append(Example(ids[w], mask, teacher=(top_ids[w, :-1], top_logp[w, :-1], rest[w, :-1])))
    return out


def build(teacher, tokenizer, text: str, seq_len: int = 256, count: int | None = 32, k: int = 64,
          path=None, log=None) -> list[Example]:
    """KD examples from `text`: read from the cache at `path` when it holds these windows with
    these settings, else computed by `teacher` (a Model) and written there."""
    ids = windows(tokenizer, text, seq_len, count)
    info = {"seq_len": seq_len, "count": int(len(ids)), "k": k}
    if path is not None and Path(path).exists():
        c_ids, *rest_arrays, c_info = load_cache(path)
        if c_info.get("k") == k and np.array_equal(c_ids, ids):
            return examples(c_ids, *rest_arrays)
    if log:
        log(f"teacher: top-{k} log-probabilities of {len(ids)} windows of {seq_len} tokens")
    arrays = teacher_targets(teacher, ids, k)
    if path is not None:
        save_cache(path, ids, *arrays, info)
    return examples(ids, *arrays)
