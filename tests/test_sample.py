"""The sampler against a float64 reference written out here: the full stable sort for top-p."""
import numpy as np
import pytest

from edgepanel.errors import NonFiniteError
from edgepanel.sample import Sampler, Sampling, draw, nucleus


def full_sort_nucleus(probs, top_p):
    order = np.argsort(-probs, kind="stable")
    cum = np.cumsum(probs[order])
    return np.sort(order[cum - probs[order] < top_p])


def reference_draw(logits, history, p: Sampling, rng):
    """Sampler's order of operations with the whole vocabulary sorted for top-p."""
    x = np.asarray(logits, np.float64).copy()
    if p.repetition_penalty != 1.0 and len(history):
        seen = np.unique(np.asarray(history, np.int64))
        v = x[seen]
        x[seen] = np.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
    if p.temperature == 0:
        return int(np.argmax(x))
    x /= p.temperature
    if p.top_k and p.top_k < x.size:
        x[x < np.partition(x, -p.top_k)[-p.top_k]] = -np.inf
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    if p.top_p < 1.0:
        keep = np.zeros(probs.size, bool)
        keep[full_sort_nucleus(probs, p.top_p)] = True
        probs[~keep] = 0
    if p.min_p > 0:
        probs[probs < p.min_p * probs.max()] = 0
    probs /= probs.sum()
    return int(rng.choice(probs.size, p=probs))


def distributions():
    rng = np.random.default_rng(0)
    V = 5000
    for scale in (0.3, 1.0, 3.0, 10.0):                      # flat .. peaked: sets of every size
        yield rng.standard_normal(V) * scale
    yield np.zeros(V)                                        # every probability tied
    yield np.round(rng.standard_normal(V) * 2) / 2           # many ties at every level
    one = np.full(V, -50.0); one[1234] = 0
    yield one                                                # one token holds the mass
    yield np.concatenate([np.full(70, 1.0), np.zeros(V - 70)])   # a tie across the first cut (m = 64)


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.95, 0.999, 0.9999999])
def test_nucleus_is_the_full_sorts_set(top_p):
    for x in distributions():
        probs = np.exp(x - x.max())
        probs /= probs.sum()
        got = np.sort(nucleus(probs, top_p))
        np.testing.assert_array_equal(got, full_sort_nucleus(probs, top_p))
        assert probs[got].sum() >= min(top_p, probs.sum()) - 1e-12 or got.size == probs.size


def test_sampler_draws_as_the_reference():
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((40, 4000)) * rng.uniform(0.5, 6, (40, 1))).astype(np.float32)
    for params in (Sampling(seed=3), Sampling(seed=4, top_p=0.5, min_p=0.0, temperature=1.3),
                   Sampling(seed=5, top_k=40, top_p=0.99), Sampling(seed=6, temperature=0)):
        s, ref_rng, hist = Sampler(params), np.random.default_rng(params.seed), [1, 2, 3, 2]
        for row in logits:
            a, b = s(row, hist), reference_draw(row, hist, params, ref_rng)
            assert a == b
            hist.append(a)


@pytest.mark.parametrize("params", [Sampling(seed=7), Sampling(seed=8, min_p=0.3, top_p=0.6),
                                    Sampling(seed=9, min_p=0.01, top_p=0.9999999, temperature=2.0)])
def test_min_p_then_top_p_on_ties_and_flat_distributions(params):
    """min-p's kept set sorted alone (within_top_p) against the full sort, on the distributions
    with ties at every level and across the candidates' edge."""
    for x in distributions():
        s, ref = Sampler(params), np.random.default_rng(params.seed)
        for _ in range(3):
            assert s(x.astype(np.float32), []) == reference_draw(x.astype(np.float32), [], params, ref)


def test_non_finite_logits_are_refused():
    with pytest.raises(NonFiniteError, match="non-finite"):
        Sampler(Sampling(seed=0))(np.array([0.0, np.nan, 1.0], np.float32), [])


def test_draw_picks_as_numpys_choice_over_the_nonzero_entries():
    """draw() walks the nonzero probabilities only; the index must be rng.choice's, whatever the
    sparsity (one entry, the first or last index, ties, mass spread over thousands)."""
    gen = np.random.default_rng(11)
    cases = [np.eye(1, 300, 0)[0], np.eye(1, 300, 299)[0], np.full(8, 0.125)]
    for _ in range(300):
        n = int(gen.integers(1, 6000))
        p = gen.random(n) ** gen.uniform(1, 12)
        p[gen.random(n) < gen.uniform(0, 0.999)] = 0
        if not p.any():
            p[gen.integers(n)] = 1.0
        cases.append(p / p.sum())
    for i, probs in enumerate(cases):
        a, b = np.random.default_rng(i), np.random.default_rng(i)
        for _ in range(4):
            assert draw(a, probs) == int(b.choice(probs.size, p=probs))
        assert a.random() == b.random()     # one uniform a draw, as choice takes


def test_sampler_leaves_the_logits_alone_and_follows_a_new_vocabulary_size():
    s = Sampler(Sampling(seed=2))
    x = np.linspace(-3, 3, 500).astype(np.float32)
    before = x.copy()
    first = s(x, [])
    np.testing.assert_array_equal(x, before)
    y = np.linspace(3, -3, 70).astype(np.float32)       # another size: the working copy follows
    ref = np.random.default_rng(2)
    assert first == reference_draw(x, [], Sampling(seed=2), ref)
    assert s(y, []) == reference_draw(y, [], Sampling(seed=2), ref) < 70
