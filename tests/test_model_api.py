"""The Python API around the engine: generation options, streaming, stop strings, chat templates,
scoring, and every bad input getting a clear error."""
import numpy as np
import pytest

import edgepanel
from edgepanel.convert import Recipe, convert
from edgepanel.model.model import ContextOverflow, streamed_tensors
from edgepanel.tokenizer import TokenizerMissing

from hf_models import add_tokenizer, build


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("api")
    build("llama", d / "hf")
    add_tokenizer(d / "hf")
    convert(d / "hf", d / "m.ep", Recipe(planes=2, group=32))
    build("qwen2", d / "bare")  # no tokenizer
    convert(d / "bare", d / "bare.ep", Recipe(planes=2, group=32, calib=None))
    return d


@pytest.fixture(scope="module")
def model(tiny):
    return edgepanel.load(tiny / "m.ep")


def test_load_and_repr(model):
    assert "llama" in repr(model) and model.cfg.vocab_size == 300
    assert model.tokenizer.available and model.tokenizer.eos_ids


def test_mapped_and_read_into_memory_give_the_same_logits(tiny, monkeypatch):
    import edgepanel.format as fmt
    mapped, copied = edgepanel.load(tiny / "m.ep", mmap=True), edgepanel.load(tiny / "m.ep", mmap=False)
    names = set(copied.file.tensors)
    assert not mapped.file.copied
    assert copied.file.copied == set(streamed_tensors(names)) and any(".planes" in n for n in copied.file.copied)
    if any(n.startswith("head.") for n in names):   # an untied embedding table stays on disk, but for the rows looked up
        assert not any(n.startswith("embed.") for n in copied.file.copied)
    np.testing.assert_array_equal(mapped.logits([1, 2, 3, 4]), copied.logits([1, 2, 3, 4]))
    monkeypatch.setenv("EDGEPANEL_MMAP", "1")
    assert not edgepanel.load(tiny / "m.ep").file.copied
    monkeypatch.setenv("EDGEPANEL_MMAP", "0")
    assert edgepanel.load(tiny / "m.ep").file.copied
    assert not edgepanel.load(tiny / "m.ep", mmap=True).file.copied, "the argument wins over the variable"
    monkeypatch.delenv("EDGEPANEL_MMAP")   # the default: read into memory where huge pages are offered
    assert bool(edgepanel.load(tiny / "m.ep").file.copied) is fmt.huge_pages()
    monkeypatch.setattr(fmt, "THP_SETTING", str(tiny / "no-such-setting"))
    assert not edgepanel.load(tiny / "m.ep").file.copied, "no transparent huge pages: mapped"


def test_streamed_tensors_leave_out_an_untied_embedding_table():
    untied = ["embed.q", "embed.row_scale", "head.q", "head.row_scale", "layers.0.wq.planes", "final_norm.weight"]
    assert streamed_tensors(untied) == ["head.q", "head.row_scale", "layers.0.wq.planes", "final_norm.weight"]
    tied = ["embed.q", "embed.row_scale", "layers.0.wq.planes"]   # the head reads the embedding table: streamed
    assert streamed_tensors(tied) == tied


@pytest.mark.parametrize("env, arg, err, msg", [
    ("yes", None, edgepanel.EdgepanelError, r"EDGEPANEL_MMAP must be 1 \(map the model file\) or 0 \(read it into memory\), got 'yes'"),
    (None, "no", ValueError, r"mmap must be True, False or None, got 'no'"),
])
def test_bad_mmap_options(tiny, monkeypatch, env, arg, err, msg):
    if env:
        monkeypatch.setenv("EDGEPANEL_MMAP", env)
    with pytest.raises(err, match=msg):
        edgepanel.load(tiny / "m.ep", mmap=arg)


def test_seeded_sampling_is_reproducible(model):
    kw = dict(max_tokens=20, temperature=1.0, top_p=0.9, seed=7)
    a, b = model.generate("the cat", **kw), model.generate("the cat", **kw)
    assert a == b
    others = {model.generate("the cat", max_tokens=20, temperature=1.0, top_p=0.9, seed=s) for s in range(8)}
    assert len(others) > 1, "different seeds should not all give the same text"


def test_stream_equals_whole(model):
    kw = dict(max_tokens=15, temperature=0.8, seed=3)
    pieces = list(model.generate("once upon", stream=True, **kw))
    assert "".join(pieces) == model.generate("once upon", **kw)
    assert len(pieces) >= 1


def test_stop_strings_cut_the_text(model):
    full = model.generate("hello", max_tokens=30, temperature=0)
    assert len(full) > 4
    stop = full[2:4]
    cut = model.generate("hello", max_tokens=30, temperature=0, stop=[stop])
    assert cut == full[:full.find(stop)]
    assert "".join(model.generate("hello", max_tokens=30, temperature=0, stop=[stop], stream=True)) == cut


def test_greedy_ids_and_max_tokens(model):
    ids = model.generate_ids("the cat", max_tokens=7, temperature=0)
    assert 1 <= len(ids) <= 7
    assert model.generate("the cat", max_tokens=0) == ""


def test_chat_template(model):
    text = model.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|user|>hi<|end|><|assistant|>"
    out = model.generate([{"role": "user", "content": "hello world"}], max_tokens=5, temperature=0)
    assert isinstance(out, str)
    with pytest.raises(ValueError, match="messages\\[0\\] must be a dict"):
        model.generate([{"role": "user"}], max_tokens=3)


def test_scoring(model):
    ids = model.tokenizer.encode("the cat sat on the mat")
    lp = model.token_logprobs(ids)
    logits = model.logits(ids).astype(np.float64)
    ls = logits - logits.max(1, keepdims=True)
    ls -= np.log(np.exp(ls).sum(1, keepdims=True))
    np.testing.assert_allclose(lp, ls[np.arange(len(ids) - 1), ids[1:]], rtol=1e-6)
    ppl = model.perplexity("the cat sat on the mat")
    assert ppl == pytest.approx(np.exp(-lp.mean()), rel=1e-6)
    masked = model.score([ids], [np.array([0, 0, 1, 1, 1, 1] + [0] * (len(ids) - 6), bool)])[0]
    np.testing.assert_allclose(masked, lp[1:5])



def test_shared_prefixes_score_exactly_as_alone(tiny, model):
    """Sequences with the same tokens before their first counted position (a prompt and several
    continuations) run the prompt once; every log-probability equals scoring each one alone, and
    the C engine's agree with the NumPy reference engine's."""
    rng = np.random.default_rng(0)
    v = model.cfg.vocab_size
    prompts = [rng.integers(0, v, n) for n in (9, 1, 14)]
    seqs, masks = [], []
    for j, (p, conts) in enumerate(zip(prompts, ((5, 3, 7), (4, 6), (8,)))):
        for c in conts:
            seqs.append(np.concatenate([p, rng.integers(0, v, c)]))
            m = np.zeros(len(seqs[-1]), bool)
            m[len(p):] = True
            if j == 0 and c == 7:
                m[-2] = False          # a gap after the first counted token
            masks.append(m)
    seqs.append(rng.integers(0, v, 6))  # no mask beyond the first token: everything counts
    masks.append(np.ones(6, bool))
    alone = [model.score([q], [m])[0] for q, m in zip(seqs, masks)]
    for batch_tokens in (2048, 20, 1):   # one batch, several, one group per batch
        together = model.score(seqs, masks, batch_tokens=batch_tokens)
        for a, b in zip(alone, together):
            assert a.dtype == b.dtype and np.array_equal(a, b)
    calls = []
    real = model.engine.logprobs
    model.engine.logprobs = lambda *a, **k: calls.append(sum(map(len, a[0])) + sum(map(len, a[2] or []))) or real(*a, **k)
    try:
        model.score(seqs, masks)
    finally:
        del model.engine.logprobs
    assert calls == [sum(map(len, seqs)) - 2 * 8]   # prompt 0 up to its last token once; 1 is too short
    ref = edgepanel.load(tiny / "m.ep", engine="reference")
    for a, b in zip(together, ref.score(seqs, masks)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    direct = ref.engine.logprobs([q[len(prompts[0]):] for q in seqs[:3]], None, [prompts[0]], [0, 0, 0])
    for q, d in zip(seqs[:3], direct):
        np.testing.assert_allclose(d, ref.token_logprobs(q)[len(prompts[0]):], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="owners"):
        model.engine.logprobs(seqs[:2], None, [prompts[0]], [0])
    for eng in (model.engine, ref.engine):
        with pytest.raises(ValueError, match="owner 1 names no prefix"):
            eng.logprobs(seqs[:2], None, [prompts[0]], [0, 1])


@pytest.mark.parametrize("opt,val,msg", [
    ("temperature", -1.0, "temperature"), ("top_p", 0.0, "top_p"), ("top_p", 1.5, "top_p"),
    ("top_k", -2, "top_k"), ("min_p", 1.0, "min_p"), ("repetition_penalty", 0.0, "repetition_penalty"),
    ("seed", -5, "seed"), ("stop", [""], "stop"),
])
def test_bad_sampling_options(model, opt, val, msg):
    with pytest.raises(ValueError, match=msg):
        model.generate("hi", max_tokens=3, **{opt: val})


def test_context_overflow_and_truncation(model):
    long = list(np.random.default_rng(0).integers(5, 200, model.cfg.max_seq_len + 10))
    with pytest.raises(ContextOverflow, match="context"):
        model.generate(long, max_tokens=2)
    with pytest.raises(ContextOverflow):
        model.logits(long)
    assert isinstance(model.generate(long, max_tokens=2, truncate=True, temperature=0), str)


def test_bad_token_ids(model):
    with pytest.raises(ValueError, match="token ids must be in"):
        model.logits([1, 2, 5000])
    with pytest.raises(ValueError, match="non-empty"):
        model.logits([])
    with pytest.raises(TypeError, match="prompt must be"):
        model.generate(3.5)


def test_missing_tokenizer(tiny):
    m = edgepanel.load(tiny / "bare.ep")
    with pytest.raises(TokenizerMissing, match="no tokenizer"):
        m.generate("hello", max_tokens=2)
    assert len(m.generate_ids([1, 2, 3], max_tokens=4, temperature=0)) == 4  # ids still work


def test_missing_tensor_is_a_format_error(tiny, tmp_path):
    from edgepanel.errors import FormatError
    from edgepanel.format import ModelFile, ModelWriter
    f = ModelFile(tiny / "m.ep")
    with ModelWriter(tmp_path / "broken.ep") as w:
        for name, arr in f.tensors.items():
            if name != "layers.1.wk.planes":
                w.add(name, arr)
        w.close(f.meta, f.tokenizer_json)
    with pytest.raises(FormatError, match="'layers.1.wk.planes' is missing"):
        edgepanel.load(tmp_path / "broken.ep")
