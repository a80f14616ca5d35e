"""The C forward engine against the NumPy reference, and its own invariants: prefill equals
token-by-token decoding, results do not depend on threads or on the ISA variant, and the float32
parameters are read at call time (the fine-tuner changes them in place)."""
import numpy as np
import pytest

from edgepanel.convert import Recipe, convert
from edgepanel.kernels import native
from edgepanel.model.model import Model

from hf_models import add_tokenizer, build

pytestmark = pytest.mark.skipif(native.lib is None, reason="C kernels not built")
IDS = np.array([3, 17, 99, 150, 7, 42, 200, 5, 61, 88, 13, 2], np.int32)


# architecture and recipe options: rows as planes too, untied (llama: the rotation unties the
# head) and tied (gpt2: one planes table for both); 8-bit scales
VARIANTS = {"llama": ("llama", {}), "qwen2": ("qwen2", {}), "gpt2": ("gpt2", {}), "bitnet": ("bitnet", {}),
            "mistral": ("mistral", {}), "llama-rows-k2k3": ("llama", dict(embed="k2", head="k3")),
            "gpt2-rows-k2": ("gpt2", dict(embed="k2", head="k2")),
            "qwen2-s8-rows-k4g64": ("qwen2", dict(scales="u8", embed="k4g64", head="k4g64"))}


def _convert(variant, tmp_path_factory):
    arch, opts = VARIANTS[variant]
    d = tmp_path_factory.mktemp("e_" + variant)
    build(arch, d / "hf")
    add_tokenizer(d / "hf")
    convert(d / "hf", d / "m.ep", Recipe(planes=3, group=32, calib_tokens=2048, seq_len=64, **opts))  # calibrated, rotated
    return d / "m.ep"


@pytest.fixture(scope="module", params=list(VARIANTS))
def binarized(request, tmp_path_factory):
    return _convert(request.param, tmp_path_factory)


@pytest.fixture(scope="module", params=[v for v, (_, opts) in VARIANTS.items() if "embed" in opts])
def planes_rows(request, tmp_path_factory):
    return _convert(request.param, tmp_path_factory)


def per_position_rel(a, b):
    return np.abs(a - b).max(axis=1) / np.abs(b).max(axis=1)


def test_c_matches_reference_binarized(binarized):
    """Same integers, float sums in another order: positions agree to float32 rounding, except
    where that rounding moves an activation across an int8 rounding boundary (rare, small).
    float32 caches: a float16 cache would round both engines' keys, and a last-bit difference
    there can land on either side of a float16 midpoint (the float16 test below)."""
    ref, c = Model(binarized, engine="reference", kv_dtype="float32"), Model(binarized, engine="c", kv_dtype="float32")
    err = per_position_rel(c.logits(IDS), ref.logits(IDS))
    assert np.median(err) < 1e-5 and err.max() < 2e-2, err


def test_prefill_equals_decode_steps_and_threads(binarized):
    m = Model(binarized, engine="c", threads=1)
    full = m.logits(IDS)
    cache = m.engine.new_cache(len(IDS))
    steps = np.stack([m.engine.forward(IDS[i:i + 1], cache) for i in range(len(IDS))])
    np.testing.assert_array_equal(full, steps)
    for threads in (2, 3):   # 3 threads on 2 cores: any split of the ranges, the same values
        for _ in range(2):
            np.testing.assert_array_equal(Model(binarized, engine="c", threads=threads).logits(IDS), full)
        mt = Model(binarized, engine="c", threads=threads)   # decode: a task per query head, not per key head
        cache = mt.engine.new_cache(len(IDS))
        np.testing.assert_array_equal(np.stack([mt.engine.forward(IDS[i:i + 1], cache) for i in range(len(IDS))]), full)
        # a prompt's last logits: its head (planes in the -rows variants) reads one token, as a team
        np.testing.assert_array_equal(mt.engine.forward(IDS, mt.engine.new_cache(len(IDS))), full[-1])
    m2 = Model(binarized, engine="c", threads=2)
    cache = m2.engine.new_cache(len(IDS))
    half = m2.engine.forward(IDS[:5], cache, all_logits=True)
    rest = m2.engine.forward(IDS[5:], cache, all_logits=True)
    np.testing.assert_array_equal(np.concatenate([half, rest]), full)


def test_float16_cache_stores_numpys_rounding_and_halves_the_memory(binarized):
    """The default cache holds float16: layer 0's keys and values (which no attention has touched
    yet) are NumPy's float16 rounding of the float32 cache's, bit for bit; the logits stay near
    float32's (the activations after attention are quantized to int8 again, so a relative 2^-11
    moves a few of their roundings: about 1% on these tiny random models); the reference engine's float16 cache gives the C engine's
    logits; a cache of another type, or an unknown kv_dtype, is refused by name."""
    m16, m32 = Model(binarized, engine="c"), Model(binarized, engine="c", kv_dtype="float32")
    c16, c32 = m16.engine.new_cache(len(IDS)), m32.engine.new_cache(len(IDS))
    l16, l32 = m16.engine.forward(IDS, c16, all_logits=True), m32.engine.forward(IDS, c32, all_logits=True)
    assert c16.k.dtype == np.float16 and c32.k.dtype == np.float32 and 2 * c16.k.nbytes == c32.k.nbytes
    for a16, a32 in ((c16.k, c32.k), (c16.v, c32.v)):
        np.testing.assert_array_equal(a16[0].view(np.uint16), a32[0].astype(np.float16).view(np.uint16))
        assert not np.array_equal(a16[0].astype(np.float32), a32[0])     # something was rounded
    err = per_position_rel(l16, l32)
    assert 0 < err.max() < 3e-2 and np.median(err) < 1.5e-2, err   # float16's 2^-11 moves some int8 roundings
    ref = Model(binarized, engine="reference")
    assert ref.engine.kv_dtype == "float16" and ref.engine.new_cache(1).k.dtype == np.float16
    err = per_position_rel(l16, ref.logits(IDS))
    assert err.max() < 3e-2 and np.median(err) < 1.5e-2, err
    bad = m16.engine.new_cache(len(IDS))
    bad.k = bad.k.astype(np.float64)
    with pytest.raises(ValueError, match="float16 or float32"):
        m16.engine.forward(IDS, bad)
    for engine in ("c", "reference"):
        with pytest.raises(ValueError, match="kv_dtype must be one of float16, float32, got 'bfloat16'"):
            Model(binarized, engine=engine, kv_dtype="bfloat16")


def test_isa_variants_give_identical_logits(binarized):
    isas = native.runnable_isas()
    outs = []
    for isa in isas:
        m = Model(binarized, engine="c")
        from edgepanel.model.cengine import CEngine
        m.engine = CEngine(m.weights, isa=isa)
        outs.append(m.logits(IDS))
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])


def test_parameters_are_read_at_call_time(binarized):
    m = Model(binarized, engine="c")
    before = m.logits(IDS)
    codes = any(owner.planes.scale_rows is not None for _, _, _, owner, attr in m.weights.named_parameters() if attr == "planes")
    params = m.parameters()
    widened = m.logits(IDS)
    if codes:   # 8-bit codes: their float32 values round each plane, not each group (Model.parameters)
        np.testing.assert_allclose(widened, before, rtol=0, atol=1e-5 * np.abs(before).max())
        before = widened
    np.testing.assert_array_equal(widened, before)  # float16 scales widened exactly
    assert all(p.dtype == np.float32 and p.flags.writeable for p in params.values())
    scales = params["layers.0.wq.scales"]
    saved = scales.copy()
    scales *= 1.5                      # in place, as a zeroth-order perturbation does
    assert not np.array_equal(m.logits(IDS), before)
    scales[...] = saved
    np.testing.assert_array_equal(m.logits(IDS), before)
    norm = params["final_norm.weight"]
    norm += 0.1
    assert not np.array_equal(m.logits(IDS), before)


def test_numba_fallback_engine(binarized, monkeypatch):
    """Without the C kernels (here: EDGEPANEL_BACKEND=numba) the NumPy forward pass runs the
    products on the Numba kernels; it agrees with the C engine like the reference does."""
    c = Model(binarized, engine="c", kv_dtype="float32").logits(IDS)
    monkeypatch.setenv("EDGEPANEL_BACKEND", "numba")
    m = Model(binarized, kv_dtype="float32")
    assert m.engine.name == "reference" and m.engine.backend.name == "numba"
    err = per_position_rel(m.logits(IDS), c)
    assert np.median(err) < 1e-5 and err.max() < 2e-2, err


def test_batched_forward_equals_one_pass_per_sequence(binarized):
    """ep_forward_batch runs every product over all sequences' tokens at once; each sequence's
    log-probabilities are bit for bit those of its own forward pass, and match the float64
    log-softmax of its logits (the reference engine's score)."""
    m = Model(binarized, engine="c", threads=2)
    rng = np.random.default_rng(5)
    seqs = [rng.integers(0, m.cfg.vocab_size, n).astype(np.int32) for n in (12, 1, 37, 5, 64)]
    batched = m.engine.logprobs(seqs)
    for s, lp in zip(seqs, batched):
        assert lp.shape == (len(s) - 1,)
        np.testing.assert_array_equal(lp, m.engine.logprobs([s])[0])
        if len(s) > 1:
            lg = m.logits(s)[:-1].astype(np.float64)
            want = lg[np.arange(len(s) - 1), s[1:]] - np.log(np.exp(lg - lg.max(1, keepdims=True)).sum(1)) - lg.max(1)
            np.testing.assert_allclose(lp, want, rtol=0, atol=1e-5)
    # Model.score splits into batches; masks keep the counted tokens
    masks = [rng.random(len(s)) < 0.5 for s in seqs]
    scored = m.score(seqs, masks, batch_tokens=40)
    for lp, full, mk in zip(scored, batched, masks):
        np.testing.assert_array_equal(lp, full[mk[1:]])
    ref = Model(binarized, engine="reference").score(seqs[:1])[0]
    np.testing.assert_allclose(batched[0], ref, atol=2e-2)


def test_batched_forward_rejects_bad_batches(binarized):
    m = Model(binarized, engine="c")
    with pytest.raises(ValueError, match="masks"):
        m.score([IDS, IDS], masks=[np.ones(len(IDS), bool)])
    with pytest.raises(ValueError, match=r"masks\[0\]"):
        m.score([IDS], masks=[np.ones(3, bool)])
    with pytest.raises(ValueError, match="token ids"):
        m.score([IDS, np.array([m.cfg.vocab_size])])


def test_rows_as_planes_are_read_at_call_time(planes_rows):
    """Embeddings and head stored as planes (the C engine looks rows up as PlaneMatrix.rows: the
    other tests compare its logits with the reference's): their scales are trainable float32
    arrays like every other plane scale, read at call time."""
    m = Model(planes_rows, engine="c")
    tables = list(m.weights.plane_tables())
    assert {t.name for t in tables} == ({"embed", "head"} if m.weights.head is not None else {"embed"})
    params = m.parameters()
    before = m.logits(IDS)
    for t in tables:
        scales = params[t.name + ".scales"]
        saved = scales.copy()
        scales *= 0.5
        assert not np.array_equal(m.logits(IDS), before), t.name
        scales[...] = saved
    np.testing.assert_array_equal(m.logits(IDS), before)


def test_edgepanel_isa_reaches_the_c_engine(monkeypatch, tmp_path):
    """EDGEPANEL_ISA picks the C engine's kernel table too, not only the kernels' backend."""
    from edgepanel.model.engine import make
    from edgepanel.kernels import native as nat
    w = type("W", (), {})()
    seen = {}

    class Fake:
        def __init__(self, weights, threads=None, isa=None, kv_dtype=None):
            seen["isa"] = isa
    monkeypatch.setattr("edgepanel.model.cengine.CEngine", Fake)
    monkeypatch.setenv("EDGEPANEL_ISA", "scalar")
    make(w, 1, "c")
    assert seen["isa"] == "scalar"
    monkeypatch.delenv("EDGEPANEL_ISA")
    make(w, 1, "c")
    assert seen["isa"] is None and nat is not None
