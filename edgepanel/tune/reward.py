"""The language model as its own reward model: after preference tuning, a continuation y of a
panel or prompt x scores

    r(x, y) = beta * (log pi(y | x) - log pi_ref(y | x))      (log-probabilities summed over y's tokens)

Only the continuous parameters change in training, so a tuned model file carries its reference:
`save_with_reference` writes, beside the tuned tensors, a copy of every tensor that training
changed as the file training started from held it, under the name "reference/NAME" (8-bit scale
codes, their row multipliers, norms: a few MB for SmolLM2-135M; the sign planes never change).
The loader reads tensors by name and ignores these; `Model.save` copies them along.  For log
pi_ref the reference values are written into the model's parameters in place, the continuation
scored, and the tuned values put back: one model file, one set of bits, no second model.

A file without reference tensors is its own reference: the implicit reward of an untuned model is
exactly zero.  The parameters are swapped in place: do not score the same Model from another
thread meanwhile.

Best-of-n (`best_of`): n continuations sampled with seeds derived from one seed, the one with the
highest implicit reward returned (ties, as for an untuned model, by the mean log-probability per
token), every candidate's scores with it.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import bits
from ..errors import EdgepanelError, FormatError
from ..panels.render import uses_chat
from ..panels.schema import Panel
from .objectives import PREFERENCE

PREFIX = "reference/"


# -- the reference in the model file ---------------------------------------------------------

def has_reference(model) -> bool:
    return any(n.startswith(PREFIX) for n in model.file.tensors)


def reference_parameters(model) -> dict[str, np.ndarray]:
    """Every continuous parameter (Model.parameters' names) as the reference holds it, float32:
    the file's "reference/NAME" copy when there is one, else the file's own tensor."""
    f = model.file
    for n in f.tensors:
        if n.startswith(PREFIX) and n.endswith(".planes"):
            raise FormatError(f"{model.path}: '{n}': a reference with other sign planes is not supported")

    def stored(name):
        return f.tensors.get(PREFIX + name, f.tensors.get(name))

    out = {}
    for name, _, _, owner, attr in model.weights.named_parameters():
        if attr == "planes":
            pm, base = owner.planes, name[:-len(".scales")]
            codes = stored(name)
            rows = stored(base + ".scale_rows") if codes.dtype == np.uint8 else None
            out[name] = bits.PlaneMatrix(pm.planes, codes, pm.out_features, pm.in_features, pm.group,
                                         rows).float_scales()
        else:
            a = stored(name)
            if a is None:
                raise FormatError(f"{model.path}: tensor '{name}' is missing")
            out[name] = np.asarray(a, np.float32)
    return out


@contextmanager
def reference_applied(model):
    """Within the block, the model computes with its reference's parameters (exactly: the values
    are put back bit for bit after it).  Only the parameters that differ are touched."""
    ref = reference_parameters(model)
    params = model.parameters()
    saved = {}
    try:
        for name, a in params.items():
            r = ref[name]
            if not np.array_equal(a, r):
                saved[name] = a.copy()
                a[...] = r
        yield bool(saved)
    finally:
        for name, a in saved.items():
            params[name][...] = a


def save_with_reference(model, path, history: dict | None = None) -> Path:
    """Model.save(path, history), the file also carrying the parameters of the file `model` was
    loaded from (the reference) for every tensor whose stored bytes changed.  Atomic."""
    from ..format import ModelWriter, SafetensorsFile
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tuned.tmp")
    try:
        model.save(tmp, history)
        tuned, src = SafetensorsFile(tmp), model.file
        try:
            with ModelWriter(path) as w:
                for name, a in tuned.tensors.items():
                    if name.startswith(PREFIX):      # an older run's reference: replaced by this one's
                        continue
                    w.add(name, a)
                    old = src.tensors.get(name)
                    if old is None or _same_bytes(old, a):
                        continue
                    if name.endswith(".planes"):
                        raise EdgepanelError(f"{name}: the sign planes changed in training; "
                                             "the reference cannot be stored as parameters")
                    w.add(PREFIX + name, old)
                w.close_with(tuned.metadata)
        finally:
            tuned.close()
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return np.array_equal(np.ascontiguousarray(a).view(np.uint8), np.ascontiguousarray(b).view(np.uint8))


def default_beta(model) -> float:
    """beta of the last preference run recorded in the model file, else TuneConfig's default."""
    from .trainer import TuneConfig
    for h in reversed(model.meta.history):
        run = h.get("zo_finetune") if isinstance(h, dict) else None
        if isinstance(run, dict) and run.get("objective") in PREFERENCE and isinstance(run.get("beta"), (int, float)):
            return float(run["beta"])
    return TuneConfig().beta


# -- scoring ----------------------------------------------------------------------------------

@dataclass
class Candidate:
    text: str
    tokens: int            # the continuation's tokens as scored
    logp: float            # log pi(y | x), summed
    ref_logp: float        # log pi_ref(y | x)
    reward: float          # beta * (logp - ref_logp); -inf for an empty continuation
    seed: int | None = None

    @property
    def mean_logp(self) -> float:
        """The length-normalized likelihood (mean log-probability per token)."""
        return self.logp / self.tokens if self.tokens else -np.inf


def source_ids(model, source, budget: int | None = None, chat: bool | None = None) -> list[int]:
    """The prompt's tokens: a Panel (or a panel's JSON dict) rendered as in training, a plain
    prompt encoded as in training (chat=True: in the chat template), chat messages, or ids."""
    from .prefs import prompt_ids
    if isinstance(source, dict):
        source = Panel.from_dict(source)
    budget = model.cfg.max_seq_len - 1 if budget is None else budget
    if isinstance(source, (Panel, str)):
        return prompt_ids(source, model.tokenizer, budget, chat=chat)
    return model.prompt_ids(source, chat)


def as_parameters(model) -> None:
    """Put the model's scales in the float32 form the reference is applied in (Model.parameters
    widens 8-bit codes once, which changes their rounding): the policy and its
    reference then score with the same arithmetic, and a first call as every later one."""
    model.parameters()


def score_candidates(model, source, texts, beta: float | None = None, chat: bool | None = None,
                     prompt: list[int] | None = None, seq_len: int | None = None) -> list[Candidate]:
    """Each text's log-probabilities after `source` under the model and its reference, and its
    implicit reward.  Two batched scorings in all (one when the model is its own reference).
    seq_len: tokenized as training pairs are (each text at most seq_len/2 tokens, the panel
    shortened into the rest); None: the whole context."""
    from .prefs import sequence
    as_parameters(model)
    beta = default_beta(model) if beta is None else float(beta)
    conts = [model.tokenizer.encode(t, add_special_tokens=False) for t in texts]
    if seq_len is not None:
        conts = [c[:seq_len // 2] for c in conts]
    if prompt is None:
        budget = None if seq_len is None else seq_len - max(map(len, conts), default=0)
        p = source_ids(model, source, budget, chat=chat)
    else:
        p = list(prompt)
    room = model.cfg.max_seq_len - len(p)
    conts = [c[:max(0, room)] for c in conts]
    seqs = [sequence(p, c) for c in conts]
    scored = [i for i, c in enumerate(conts) if c]

    def logps():
        out = np.zeros(len(seqs))
        lps = model.score([seqs[i].ids for i in scored], [seqs[i].mask for i in scored]) if scored else []
        for i, lp in zip(scored, lps):
            out[i] = float(np.sum(lp, dtype=np.float64))
        return out

    policy = logps()
    with reference_applied(model) as differs:
        ref = logps() if differs else policy.copy()
    return [Candidate(t, len(c), float(lp), float(rl), float(beta * (lp - rl)) if c else -np.inf)
            for t, c, lp, rl in zip(texts, conts, policy, ref)]


def reward(model, source, continuation: str, beta: float | None = None, chat: bool | None = None,
           seq_len: int | None = None) -> float:
    """The implicit reward beta * (log pi(y|x) - log pi_ref(y|x)) of `continuation` after `source`
    (a Panel or panel dict, a plain prompt, chat messages or ids).  beta: the training run's;
    seq_len: as score_candidates'."""
    if not isinstance(continuation, str) or not continuation:
        raise ValueError("the continuation must be a non-empty string")
    c = score_candidates(model, source, [continuation], beta, chat, seq_len=seq_len)[0]
    if not c.tokens:
        raise ValueError("the continuation has no tokens (or no room is left in the context)")
    return c.reward


def pair_reference_logps(model, pairs, policy: np.ndarray | None = None) -> np.ndarray:
    """(P, 2) float64 log pi_ref(chosen), log pi_ref(rejected) from the reference the model file
    carries (for metrics of a tuned file, without the training run's cache).  `policy`: the
    pairs' log-probabilities under the model, returned as they are when the model is its own
    reference (no second scoring)."""
    from .prefs import reference_logps
    as_parameters(model)
    with reference_applied(model) as differs:
        if not differs and policy is not None:
            return np.array(policy, np.float64)
        return reference_logps(model, pairs)


# -- best of n --------------------------------------------------------------------------------

@dataclass
class BestOf:
    text: str                     # the chosen continuation
    index: int                    # its place among the candidates
    candidates: list[Candidate]


def candidate_seeds(seed: int | None, n: int) -> list[int]:
    """n sampling seeds derived from one (distinct, the same for the same seed on any machine);
    seed None: fresh entropy."""
    seed = np.random.SeedSequence().entropy if seed is None else seed
    return [int(s) for s in np.random.SeedSequence([int(seed), 0xB357]).generate_state(n, np.uint32)]


def pick(candidates: list[Candidate]) -> int:
    """The highest reward; ties by the mean log-probability per token, then the earliest."""
    return max(range(len(candidates)), key=lambda i: (candidates[i].reward, candidates[i].mean_logp, -i))


def prepare(model, source, max_tokens: int, chat: bool | None = None,
            ctx: int | None = None) -> tuple[list[int], list[str]]:
    """What best-of-n samples after: (the prompt's ids, the stop strings it implies).  A panel
    (or a panel's JSON dict) is rendered shortened to leave max_tokens of the context `ctx`
    (default: the model's), and a panel rendered as plain text ends its paragraph at a blank line
    (["\\n\\n"]; [] otherwise); a prompt, chat messages or ids are kept whole (the caller checks
    their length).  The server renders its `panel` requests with this too."""
    if isinstance(source, dict):
        source = Panel.from_dict(source)
    if not isinstance(source, Panel):
        return source_ids(model, source, 2**31, chat), []
    ctx = model.cfg.max_seq_len if ctx is None else ctx
    ids = source_ids(model, source, max(1, ctx - 1 - max_tokens), chat)
    return ids, ([] if uses_chat(model.tokenizer, chat) else ["\n\n"])


def rank(model, ids: list[int], texts: list[str], seeds: list[int], beta: float | None = None) -> BestOf:
    """Candidates `texts` sampled after `ids` with `seeds`, scored (score_candidates) and the
    best picked (pick)."""
    cands = score_candidates(model, None, texts, beta, prompt=ids)
    for c, s in zip(cands, seeds):
        c.seed = s
    best = pick(cands)
    return BestOf(cands[best].text, best, cands)


def best_of(model, source, n: int = 4, *, seed: int | None = 0, beta: float | None = None,
            chat: bool | None = None, max_tokens: int | None = None, truncate: bool = False, **sampling) -> BestOf:
    """Sample n continuations of `source` (a Panel or panel dict, a prompt, chat messages or ids)
    and return the one with the highest implicit reward, with every candidate's scores.  Sampling
    options as Model.generate's (defaults: edgepanel.sample.Sampling); seed None: fresh seeds."""
    from ..sample import Sampling
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"best_of needs n >= 1 candidates, got {n!r}")
    max_tokens = Sampling.default("max_tokens") if max_tokens is None else max_tokens
    ids, stop = prepare(model, source, max_tokens, chat)
    ids = model.fit_prompt(ids, truncate)
    if stop:
        sampling.setdefault("stop", stop)
    seeds = candidate_seeds(seed, n)
    as_parameters(model)   # before sampling too: the same candidates at the first call as at later ones
    texts = [model.generate(ids, max_tokens=max_tokens, seed=s, **sampling) for s in seeds]
    return rank(model, ids, texts, seeds, beta)
