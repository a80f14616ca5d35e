"""The sampler against a float64 reference written out here: the full stable sort for top-p.
Both of its paths, NumPy's and C's (csrc/sample.c), against that reference and each other."""
import numpy as np
import pytest

from edgepanel.errors import NonFiniteError
from edgepanel.kernels import native
from edgepanel.sample import Sampler, Sampling, draw, native_available, nucleus

# every Sampler test runs on both paths; the C one is the default wherever the kernels are built
# (they are wherever pip installs edgepanel with a compiler: test_the_c_sampler_is_built fails,
# as tests/test_fit.py does, when they are not; the skips below only keep the rest readable then)
PATHS = [False] + ([True] if native_available() else [])
paths = pytest.mark.parametrize("native_path", PATHS, ids=lambda v: "c" if v else "numpy")


def test_the_c_sampler_is_built_and_is_the_default():
    assert native_available(), f"the C kernels are not built ({native.IMPORT_ERROR}); pip install -e . builds them"
    assert Sampler(Sampling()).native


def full_sort_nucleus(probs, top_p):
    order = np.argsort(-probs, kind="stable")
    cum = np.cumsum(probs[order])
    return np.sort(order[cum - probs[order] < top_p])


def reference_draw(logits, history, p: Sampling, rng):
    """Sampler's order of operations with the whole vocabulary sorted for top-p."""
    x = np.asarray(logits, np.float64).copy()
    if p.repetition_penalty != 1.0 and len(history):
        seen = np.unique(np.asarray(history, np.int64))
        seen = seen[(seen >= 0) & (seen < x.size)]     # ids outside the vocabulary are ignored
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


@paths
def test_sampler_draws_as_the_reference(native_path):
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((40, 4000)) * rng.uniform(0.5, 6, (40, 1))).astype(np.float32)
    for params in (Sampling(seed=3), Sampling(seed=4, top_p=0.5, min_p=0.0, temperature=1.3),
                   Sampling(seed=5, top_k=40, top_p=0.99), Sampling(seed=6, temperature=0),
                   Sampling(seed=10, top_p=1.0, min_p=0.0, repetition_penalty=0.8),
                   Sampling(seed=11, top_k=4000, top_p=1.0, min_p=0.2, temperature=0.3)):
        s, ref_rng, hist = Sampler(params, native_path), np.random.default_rng(params.seed), [1, 2, 3, 2, -5, 10**6]
        for row in logits:
            a, b = s(row, hist), reference_draw(row, hist, params, ref_rng)
            assert a == b
            hist.append(a)


@paths
@pytest.mark.parametrize("params", [Sampling(seed=7), Sampling(seed=8, min_p=0.3, top_p=0.6),
                                    Sampling(seed=9, min_p=0.01, top_p=0.9999999, temperature=2.0),
                                    Sampling(seed=12, min_p=0.0, top_p=0.9),
                                    Sampling(seed=13, min_p=0.0, top_p=1.0, top_k=70)])
def test_min_p_then_top_p_on_ties_and_flat_distributions(params, native_path):
    """min-p's kept set sorted alone (within_top_p) against the full sort, on the distributions
    with ties at every level and across the candidates' edge."""
    for x in distributions():
        s, ref = Sampler(params, native_path), np.random.default_rng(params.seed)
        for _ in range(3):
            assert s(x.astype(np.float32), []) == reference_draw(x.astype(np.float32), [], params, ref)


@paths
def test_non_finite_logits_are_refused(native_path):
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(NonFiniteError, match="model produced 2 non-finite"):
            Sampler(Sampling(seed=0), native_path)(np.array([0.0, bad, 1.0, bad], np.float32), [])
        with pytest.raises(NonFiniteError, match="model produced 1 non-finite"):
            Sampler(Sampling(temperature=0), native_path)(np.array([0.0, bad, 1.0], np.float32), [])


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


@paths
def test_sampler_leaves_the_logits_alone_and_follows_a_new_vocabulary_size(native_path):
    s = Sampler(Sampling(seed=2), native_path)
    x = np.linspace(-3, 3, 500).astype(np.float32)
    before = x.copy()
    first = s(x, [])
    np.testing.assert_array_equal(x, before)
    y = np.linspace(3, -3, 70).astype(np.float32)       # another size: the working copy follows
    ref = np.random.default_rng(2)
    assert first == reference_draw(x, [], Sampling(seed=2), ref)
    assert s(y, []) == reference_draw(y, [], Sampling(seed=2), ref) < 70


CONFIGS = [Sampling(seed=20), Sampling(seed=21, temperature=0), Sampling(seed=22, top_k=50),
           Sampling(seed=23, top_p=0.5, min_p=0.0, temperature=1.3),
           Sampling(seed=24, top_p=1.0, min_p=0.0, repetition_penalty=1.0),
           Sampling(seed=25, top_k=3000, top_p=0.99, min_p=0.0, repetition_penalty=0.7),
           Sampling(seed=26, min_p=0.5, top_p=1.0, temperature=3.0)]


@pytest.mark.skipif(not native_available(), reason="the C kernels are not built")
@pytest.mark.parametrize("params", CONFIGS, ids=lambda p: f"seed{p.seed}")
def test_c_and_numpy_draw_the_same_tokens_over_a_real_vocabulary(params):
    """49152 logits shaped like a model's (a few leaders over a wide normal body), 400 steps with
    the history growing: the C path and NumPy's choose the same token at every step.  They
    differ only in the rounding of exp and of the sums (about 1e-15 of a probability), so a
    mismatch means a step done differently."""
    rng = np.random.default_rng(params.seed)
    a, b = Sampler(params, True), Sampler(params, False)
    hist = list(rng.integers(0, 49152, 30))
    for step in range(400):
        x = rng.standard_normal(49152) * rng.uniform(1, 4)
        x[rng.integers(0, 49152, 8)] += rng.uniform(0, 12, 8)
        x = x.astype(np.float32)
        ta, tb = a(x, hist), b(x, hist)
        assert ta == tb, f"step {step}"
        hist.append(ta)
    assert a.rng.random() == b.rng.random()     # the same uniforms taken


@pytest.mark.skipif(not native_available(), reason="the C kernels are not built")
def test_c_sampler_refuses_bad_arguments_by_name():
    w = native.SampleWork(10)
    x, h = np.zeros(10, np.float32), np.zeros(0, np.int64)
    assert native.sample(x, h, 1.0, 0, 1.0, 0.0, 1.0, 0.5, w) in range(10)
    for args in ((-1.0, 0, 1.0, 0.0, 1.0, 0.5), (1.0, -1, 1.0, 0.0, 1.0, 0.5), (1.0, 0, 0.0, 0.0, 1.0, 0.5),
                 (1.0, 0, 1.0, 1.0, 1.0, 0.5), (1.0, 0, 1.0, 0.0, 0.0, 0.5), (1.0, 0, 1.0, 0.0, 1.0, 1.0),
                 (float("nan"), 0, 1.0, 0.0, 1.0, 0.5)):
        with pytest.raises(ValueError, match="EP_EINVAL"):
            native.sample(x, h, *args, w)
    with pytest.raises(ValueError, match="workspace is for 10 logits, got 11"):
        native.sample(np.zeros(11, np.float32), h, 1.0, 0, 1.0, 0.0, 1.0, 0.5, w)
    with pytest.raises(ValueError, match="float32"):
        native.sample(x.astype(np.float64), h, 1.0, 0, 1.0, 0.0, 1.0, 0.5, w)


@pytest.mark.skipif(not native_available(), reason="the C kernels are not built")
def test_c_sampler_probabilities_match_float64():
    """The C path's exp and sums, seen through its draws: with every cut off, the draw switches
    from token j to the next where u crosses the float64 cumulative probability of tokens 0..j.
    u just below (1e-12 relative) gives j, just above the next: the C probabilities agree with
    float64's to about 1e-12 over five temperatures (an exp off by 1e-9 fails)."""
    rng = np.random.default_rng(5)
    n = 300
    x = (rng.standard_normal(n) * 2).astype(np.float32)
    w, h = native.SampleWork(n), np.zeros(0, np.int64)
    for t in (0.3, 0.7, 1.0, 3.0, 20.0):
        z = x.astype(np.float64) / t
        p = np.exp(z - z.max())
        cdf = np.cumsum(p / p.sum())
        checked = 0
        for j in range(n - 1):
            if p[j] / p.sum() < 1e-9 or p[j + 1] / p.sum() < 1e-9:
                continue        # a boundary too close to its neighbours for the 1e-12 probe
            below, above = cdf[j] * (1 - 1e-12), cdf[j] * (1 + 1e-12)
            assert native.sample(x, h, t, 0, 1.0, 0.0, 1.0, below, w) == j
            assert native.sample(x, h, t, 0, 1.0, 0.0, 1.0, above, w) == j + 1
            checked += 1
        assert checked > 20


@paths
def test_a_temperature_so_small_that_the_logits_overflow_is_greedy(native_path):
    """x / T past the doubles (T = 1e-308): the limit of the distribution as T -> 0, the first
    largest logit, whatever the cuts; one uniform is still taken, so both paths stay in step."""
    x = np.array([-3.0, 5.0, 2.0, 5.0, -40.0], np.float32)
    for params in (Sampling(seed=1, temperature=1e-308), Sampling(seed=1, temperature=1e-308, min_p=0.0, top_p=1.0),
                   Sampling(seed=1, temperature=1e-308, top_k=2)):
        s = Sampler(params, native_path)
        assert s(x, []) == 1
        assert s(-np.abs(x), []) == 2           # every logit negative: -inf after the division
        rng = np.random.default_rng(1)
        rng.random(), rng.random()
        assert s.rng.random() == rng.random()


@pytest.mark.skipif(not native_available(), reason="the C kernels are not built")
def test_c_and_numpy_agree_on_random_small_cases():
    """Vocabularies of 1 to 300 tokens (tails of every length past the 8- and 64-wide blocks),
    logits with ties, huge gaps and extremes of float32, every option drawn at random: the same
    token from both paths, and the same uniforms taken."""
    gen = np.random.default_rng(2026)
    for case in range(600):
        n = int(gen.integers(1, 300))
        kind = case % 4
        if kind == 0:
            x = gen.standard_normal(n) * gen.uniform(0.01, 30)
        elif kind == 1:
            x = np.round(gen.standard_normal(n) * 2)             # ties everywhere
        elif kind == 2:
            x = gen.choice([-3e38, -1e4, 0.0, 1.0, 1e4, 3e38], n)  # float32's extremes
        else:
            x = np.full(n, gen.uniform(-5, 5))
            x[gen.integers(0, n, max(1, n // 10))] += gen.uniform(0, 50)
        x = x.astype(np.float32)
        params = Sampling(seed=case, temperature=float(gen.choice([0, 0.05, 0.7, 1.0, 5.0])),
                          top_k=int(gen.choice([0, 0, 1, 3, 50, 1000])),
                          top_p=float(gen.choice([1.0, 0.95, 0.5, 1e-6])),
                          min_p=float(gen.choice([0.0, 0.05, 0.5, 0.999])),
                          repetition_penalty=float(gen.choice([1.0, 1.1, 0.5])))
        hist = list(gen.integers(-2, n + 2, int(gen.integers(0, 20))))
        a, b = Sampler(params, True), Sampler(params, False)
        for _ in range(2):
            assert a(x, hist) == b(x, hist), (case, n, params)
        assert a.rng.random() == b.rng.random()


def test_asking_for_c_without_the_kernels_names_what_is_missing(monkeypatch):
    from edgepanel.errors import BackendUnavailable
    monkeypatch.setattr(native, "lib", None)
    with pytest.raises(BackendUnavailable, match="C kernels are not built"):
        Sampler(Sampling(), native=True)
    assert Sampler(Sampling()).native is False       # the default falls back to NumPy


@pytest.mark.skipif(not native_available(), reason="the C kernels are not built")
def test_a_bad_argument_after_non_finite_logits_is_reported_as_itself():
    w, h = native.SampleWork(4), np.zeros(0, np.int64)
    assert native.sample(np.array([0, np.nan, np.inf, 1], np.float32), h, 1.0, 0, 1.0, 0.0, 1.0, 0.5, w) == -3
    with pytest.raises(ValueError, match="EP_EINVAL"):
        native.sample(np.zeros(4, np.float32), h, 1.0, 0, 1.0, 0.0, 1.0, 1.5, w)
