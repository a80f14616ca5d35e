"""Choosing the next token: greedy, temperature, top-k, top-p, min-p, repetition penalty,
reproducible with a seed.  Order: repetition penalty, temperature, top-k, top-p, min-p, draw.
`Sampler` runs it in C (csrc/sample.c, a third of NumPy's time) when the kernels are built, and
in NumPy (below: the reference the C follows) otherwise.

`Sampling` is the one home of the generation defaults: `Model.generate`, `edgepanel generate`
and `edgepanel chat` all read them from here (the command line builds its options from the
fields' `help` metadata, so nothing is restated).  The defaults suit a small model: a 135M model
at temperature 0.7 with no cut-offs wanders into rare-token gibberish, which min-p 0.05 and
top-p 0.95 remove, and it loops on a phrase, which a repetition penalty of 1.1 breaks."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import BackendUnavailable, NonFiniteError
from .kernels import native as ckernels   # not `native`: Sampler's argument of that name


def _opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class Sampling:
    temperature: float = _opt(0.7, "softmax temperature; 0 = greedy")
    top_k: int = _opt(0, "keep the k most likely tokens; 0 = off")
    top_p: float = _opt(0.95, "nucleus sampling: the smallest set of tokens holding this mass; 1 = off")
    min_p: float = _opt(0.05, "drop tokens below min_p times the best one's probability; 0 = off")
    repetition_penalty: float = _opt(1.1, "divide positive logits (multiply negative ones) of tokens "
                                          "already in the context by this; 1 = off")
    seed: int | None = _opt(None, "random seed: the same seed gives the same text")
    max_tokens: int = _opt(256, "tokens to generate at most")
    stop: list[str] = field(default_factory=list, metadata={"help": "stop at this string (repeatable)"})

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"{name} {why}, got {getattr(self, name)!r}")

        if not isinstance(self.temperature, (int, float)) or not (0 <= self.temperature < float("inf")):
            bad("temperature", "must be a finite number >= 0")
        if not isinstance(self.top_k, (int, np.integer)) or isinstance(self.top_k, bool) or self.top_k < 0:
            bad("top_k", "must be an integer >= 0")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not isinstance(self.min_p, (int, float)) or not 0 <= self.min_p < 1:
            bad("min_p", "must be in [0, 1)")
        if not isinstance(self.repetition_penalty, (int, float)) or not 0 < self.repetition_penalty < float("inf"):
            bad("repetition_penalty", "must be a finite number > 0")
        if not isinstance(self.max_tokens, (int, np.integer)) or isinstance(self.max_tokens, bool) or self.max_tokens < 0:
            bad("max_tokens", "must be an integer >= 0")
        if self.seed is not None and (not isinstance(self.seed, (int, np.integer)) or self.seed < 0):
            bad("seed", "must be None or an integer >= 0")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a string or a list of non-empty strings, got {self.stop!r}")
        self.stop = list(self.stop)


    @classmethod
    def default(cls, name: str):
        """The default value of field `name` (one place for the API and the command line)."""
        f = cls.__dataclass_fields__[name]
        return f.default_factory() if callable(f.default_factory) else f.default


class Sampler:
    """Draws tokens with one Sampling's parameters and its own random stream (one uniform number
    per token drawn; none for greedy).  In C (csrc/sample.c) when the kernels are built and the
    logits are float32, else in NumPy (`native=False` forces NumPy); both follow the same order
    of operations in float64 and differ only in the rounding of exp and of the sums, about 1e-15
    of a probability, so they draw the same tokens for a seed (tests/test_sample.py)."""

    def __init__(self, params: Sampling, native: bool | None = None):
        self.p = params
        self.rng = np.random.default_rng(params.seed)
        self._x = np.empty(0)   # the float64 working copy, reused: a fresh 400 KB array page-faults every token
        self.native = native_available() if native is None else bool(native)
        if self.native and not native_available():
            raise BackendUnavailable(f"the C kernels are not built ({ckernels.IMPORT_ERROR})")
        self._work = None
        self._hist = np.empty(0, np.int64)

    def __call__(self, logits: np.ndarray, history) -> int:
        p = self.p
        logits = np.asarray(logits)
        if self.native and logits.dtype == np.float32 and logits.ndim == 1:
            return self._native(np.ascontiguousarray(logits), history)
        if self._x.shape != logits.shape:
            self._x = np.empty(logits.shape, np.float64)
        x = self._x
        np.copyto(x, logits)
        if not np.all(np.isfinite(x)):   # never a token picked from garbage (e.g. NaN parameters)
            raise non_finite(np.count_nonzero(~np.isfinite(x)))
        if p.repetition_penalty != 1.0 and len(history):
            seen = np.unique(np.asarray(history, np.int64))
            seen = seen[(seen >= 0) & (seen < x.size)]
            v = x[seen]
            x[seen] = np.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
        if p.temperature == 0:
            return int(np.argmax(x))
        if not np.isfinite(float(x.max()) / p.temperature):   # x / T overflows: T -> 0 is greedy
            self.rng.random()                          # (the draw's uniform, as the C path takes)
            return int(np.argmax(x))
        x /= p.temperature
        if p.top_k and p.top_k < x.size:
            kth = np.partition(x, -p.top_k)[-p.top_k]
            x[x < kth] = -np.inf
        x -= x.max()
        probs = np.exp(x, out=x)
        probs /= probs.sum()
        if p.min_p > 0:   # top-p keeps the top token, so min-p's bar is the same after it
            kept = np.flatnonzero(probs >= p.min_p * probs.max())
            if p.top_p < 1.0:
                kept = within_top_p(probs, kept, p.top_p)
        elif p.top_p < 1.0:
            kept = nucleus(probs, p.top_p)
        if p.min_p > 0 or p.top_p < 1.0:
            drop = np.ones(probs.size, bool)
            drop[kept] = False
            probs[drop] = 0
        probs /= probs.sum()
        return draw(self.rng, probs)

    def _native(self, logits: np.ndarray, history) -> int:
        p, n = self.p, logits.shape[0]
        if self._work is None or self._work.n != n:
            self._work = ckernels.SampleWork(n)
        hist = self._history(history) if p.repetition_penalty != 1.0 else self._hist[:0]
        u = self.rng.random() if p.temperature != 0 else 0.0
        tok = ckernels.sample(logits, hist, float(p.temperature), int(p.top_k), float(p.top_p),
                            float(p.min_p), float(p.repetition_penalty), u, self._work)
        if tok < 0:
            raise non_finite(-1 - tok)
        return tok

    def _history(self, history) -> np.ndarray:
        """history as int64, in a buffer kept between tokens (a list grows by one a token)."""
        m = len(history)
        if self._hist.size < m:
            self._hist = np.empty(max(m, 2 * self._hist.size, 256), np.int64)
        h = self._hist[:m]
        h[:] = history
        return h


def native_available() -> bool:
    """Whether Sampler can draw in C (the kernels are built)."""
    return ckernels.lib is not None


def non_finite(count: int) -> NonFiniteError:
    return NonFiniteError(f"the model produced {count} non-finite logits: its parameters are not "
                          "finite or out of range")


def draw(rng: np.random.Generator, probs: np.ndarray) -> int:
    """One index with probability probs[i] (non-negative, summing to 1), as
    `rng.choice(probs.size, p=probs)` draws it (one `rng.random()` against the running sums,
    normalized by their last, first sum above it), but over the nonzero entries alone: after
    top-p and min-p a few dozen of 49152, where `choice` checks and sums them all (0.25 ms a
    token).  The running sums at those entries are the full ones (adding zeros changes no bit), so
    the index is `choice`'s: the same tokens for a seed (tests/test_sample.py)."""
    nz = np.flatnonzero(probs)
    cdf = np.cumsum(probs[nz])
    cdf /= cdf[-1]
    return int(nz[np.searchsorted(cdf, rng.random(), side="right")])


def within_top_p(probs: np.ndarray, head: np.ndarray, top_p: float) -> np.ndarray:
    """The tokens of `head` that top-p keeps, where head (in index order) is every token at or
    above some probability (min-p's kept set): those lead the full stable sort by decreasing
    probability, so their preceding masses are the full sort's, bit for bit, and top-p then min-p
    keeps exactly these.  Sorting the few dozen min-p leaves replaces sorting the nucleus, which
    grows to thousands of tokens when the distribution is flat (0.5 ms a token)."""
    p = probs[head]
    order = np.argsort(-p, kind="stable")             # ties keep index order, as the full sort
    before = np.cumsum(p[order]) - p[order]
    return head[order[before < top_p]]


def nucleus(probs: np.ndarray, top_p: float, first: int = 64) -> np.ndarray:
    """The indices of the smallest set of most likely tokens whose mass reaches top_p: those whose
    preceding mass, in the order of a stable sort by decreasing probability (ties by index), is
    below top_p.  The same set as that full sort gives, without sorting the vocabulary (7 ms a
    token at 49152 on a 2 GHz Zen): only the tokens above the m-th largest probability are sorted
    (m = 64, then 8x more while the set reaches that far), so the prefix sums are the full sort's,
    bit for bit."""
    n, m = probs.size, first
    while m < n:
        v = np.partition(probs, n - m)[n - m]             # the m-th largest probability
        cand = np.flatnonzero(probs > v)                  # fewer than m, in index order
        p = probs[cand]
        order = np.argsort(-p, kind="stable")             # ties keep index order, as the full sort
        before = np.cumsum(p[order]) - p[order]
        keep = before < top_p
        if keep.size and not keep[-1]:                   # the set ends inside the candidates
            return cand[order[keep]]
        m *= 8
    order = np.argsort(-probs, kind="stable")
    before = np.cumsum(probs[order]) - probs[order]
    return order[before < top_p]
