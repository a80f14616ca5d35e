"""Preferences without gradients: DPO / robust DPO / IPO losses against float64 hand computations,
reference log-probabilities computed once and cached (counted calls), the implicit reward (exactly
zero for an untuned model; the reference carried in the tuned file), best-of-n determinism, C-RLFT
weights, pair building (mismatch and model-written), the data-model loop (only improving rewrites
kept; resumes after an interruption), and bad lines named by file and line."""
import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest

import edgepanel
from edgepanel.cli import main
from edgepanel.convert import Recipe, convert
from edgepanel.format import SafetensorsFile
from edgepanel.model import load
from edgepanel.panels import dataset
from edgepanel.panels.pairs import mismatch_partners, mismatch_pairs, model_pairs, write_lines
from edgepanel.tune import TuneConfig, ZOTrainer, finetune, objectives, prefs, refine, reward
from edgepanel.tune.data import DataError
from hf_models import checkpoint_with_tokenizer

SMALL = Path(__file__).parent / "data" / "panels-small.jsonl"
SEQ = 160


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("prefs")
    convert(checkpoint_with_tokenizer(d / "hf", context=512), d / "m.ep",
            Recipe(planes=2, group=32, calib=None, scales="u8"))
    write_lines(d / "pairs.jsonl", mismatch_pairs(dataset.load(SMALL), seed=0))
    return d


def logp64(model, ex) -> float:
    """log p(continuation | prompt) from the model's full logits, in float64 (not Model.score)."""
    lg = model.logits(ex.ids).astype(np.float64)
    lse = np.log(np.exp(lg - lg.max(1, keepdims=True)).sum(1)) + lg.max(1)
    t = np.nonzero(ex.mask)[0]
    return float(np.sum(lg[t - 1, ex.ids[t]] - lse[t - 1]))


def nudge(model, factor=1.05):
    """Change the model's parameters a little (a stand-in for training)."""
    for name, a in model.parameters(["norms"]).items():
        a *= np.float32(factor)


# -- the losses -----------------------------------------------------------------------------
def test_dpo_rdpo_ipo_equal_float64_hand_computations():
    policy = np.array([[-10.0, -12.0], [-20.5, -19.0], [-7.25, -7.25]])
    ref = np.array([[-11.0, -11.5], [-20.0, -20.0], [-7.0, -8.0]])
    h = objectives.log_ratio_margins(policy, ref)
    want_h = [(-10 + 11) - (-12 + 11.5), (-20.5 + 20) - (-19 + 20), (-7.25 + 7) - (-7.25 + 8)]
    np.testing.assert_allclose(h, want_h, rtol=0, atol=1e-15)
    beta, e = 0.3, 0.2
    sig = lambda x: 1.0 / (1.0 + math.exp(-x))
    want_dpo = [-math.log(sig(beta * v)) for v in want_h]
    want_cdpo = [-(1 - e) * math.log(sig(beta * v)) - e * math.log(sig(-beta * v)) for v in want_h]
    want_rdpo = [(-(1 - e) * math.log(sig(beta * v)) + e * math.log(sig(-beta * v))) / (1 - 2 * e) for v in want_h]
    want_ipo = [(v - 1 / (2 * beta)) ** 2 for v in want_h]
    np.testing.assert_allclose(objectives.dpo_loss(h, beta), want_dpo, rtol=1e-14)
    np.testing.assert_allclose(objectives.dpo_loss(h, beta, e), want_cdpo, rtol=1e-14)
    np.testing.assert_allclose(objectives.rdpo_loss(h, beta, e), want_rdpo, rtol=1e-14)
    np.testing.assert_allclose(objectives.ipo_loss(h, beta), want_ipo, rtol=1e-14)
    assert objectives.dpo_loss(np.zeros(1), beta)[0] == pytest.approx(math.log(2), rel=1e-15)
    np.testing.assert_array_equal(objectives.rdpo_loss(h, beta, 0.0), objectives.dpo_loss(h, beta))
    assert np.isfinite(objectives.dpo_loss(np.array([-1e4, 1e4]), 1.0)).all()    # stable far out
    m = objectives.preference_metrics(policy, ref, beta)
    r = beta * (policy - ref)
    assert m == pytest.approx({"rewards/chosen": r[:, 0].mean(), "rewards/rejected": r[:, 1].mean(),
                               "rewards/margins": (r[:, 0] - r[:, 1]).mean(), "rewards/accuracies": 1 / 3})


def test_dpo_on_a_model_equals_a_float64_computation(tiny):
    m = load(tiny / "m.ep", threads=1)
    pairs = prefs.load_pairs(tiny / "pairs.jsonl", m.tokenizer, SEQ)[:4]
    ref = np.array([[logp64(m, p.chosen), logp64(m, p.rejected)] for p in pairs])
    prefs.attach_reference(m, pairs)
    np.testing.assert_allclose([p.ref for p in pairs], ref, rtol=1e-5)
    nudge(m)
    pol = np.array([[logp64(m, p.chosen), logp64(m, p.rejected)] for p in pairs])
    h = (pol[:, 0] - np.array([p.ref[0] for p in pairs])) - (pol[:, 1] - np.array([p.ref[1] for p in pairs]))
    assert np.abs(h).max() > 0.05
    sig = lambda x: 1 / (1 + np.exp(-x))
    for beta, e in ((0.1, 0.0), (0.5, 0.1)):
        want = np.mean(-(1 - e) * np.log(sig(beta * h)) - e * np.log(sig(-beta * h)))
        assert objectives.dpo(m, pairs, beta, e) == pytest.approx(want, abs=2e-5)
    assert objectives.ipo(m, pairs, 0.5) == pytest.approx(np.mean((h - 1.0) ** 2), abs=2e-4)
    got = objectives.evaluate_pairs("dpo", m, pairs, 0.5)
    assert got["rewards/accuracies"] == np.mean(h > 0) and got["rewards/margins"] == pytest.approx(0.5 * h.mean(), abs=1e-5)


def test_pairs_share_the_prompt_and_mask_the_continuation(tiny):
    m = load(tiny / "m.ep", threads=1)
    line = prefs.read_pairs(tiny / "pairs.jsonl")[0]
    p = prefs.tokenize_pair(line, m.tokenizer, 120)
    for e, text in ((p.chosen, line.chosen), (p.rejected, line.rejected)):
        assert len(e.ids) <= 120 and e.ids[e.mask].tolist() == m.tokenizer.encode(text, add_special_tokens=False)[:60]
    assert p.chosen.ids[~p.chosen.mask].tolist() == p.rejected.ids[~p.rejected.mask].tolist()


# -- the reference log-probabilities --------------------------------------------------------
def counting(model):
    calls = []
    score = model.score
    model.score = lambda seqs, masks=None, **kw: calls.append(len(seqs)) or score(seqs, masks, **kw)
    return calls


def test_reference_logps_are_computed_once_and_cached(tiny, tmp_path):
    m = load(tiny / "m.ep", threads=1)
    calls = counting(m)
    cache = tmp_path / "ref.cache"
    pairs = prefs.load_pairs(tiny / "pairs.jsonl", m.tokenizer, SEQ)
    assert prefs.attach_reference(m, pairs, cache) is True
    assert sum(calls) == 2 * len(pairs) and cache.exists()
    calls.clear()
    again = prefs.load_pairs(tiny / "pairs.jsonl", m.tokenizer, SEQ)
    assert prefs.attach_reference(m, again, cache) is False and calls == []    # read, not scored
    assert [p.ref for p in again] == [p.ref for p in pairs]
    # training scores the policy only: one scoring per loss, 2 pairs' sequences each
    cfg = TuneConfig(objective="dpo", steps=3, batch=2, seq_len=SEQ, eval_every=0, n_perturb=2, params="norms")
    t = ZOTrainer(m, again[:6], cfg, eval_data=again[6:8])
    t.run()
    assert calls == [4] * (3 * 2 * 2) + [4] and t.history[-1].eval_metrics["rewards/accuracies"] >= 0
    # other pairs, or another reference: recomputed
    calls.clear()
    assert prefs.attach_reference(m, again[:3], cache) is True and sum(calls) == 6
    shorter = prefs.load_pairs(tiny / "pairs.jsonl", m.tokenizer, SEQ - 40)[:3]
    assert prefs.attach_reference(m, shorter, cache) is True
    assert prefs.attach_reference(m, shorter, cache) is False
    nudge(m)
    assert prefs.attach_reference(m, shorter, cache) is True
    (tmp_path / "junk").write_bytes(b"junk")
    with pytest.raises(edgepanel.EdgepanelError, match="not a reference cache"):
        prefs.attach_reference(m, shorter, tmp_path / "junk")


def test_pairs_need_their_reference(tiny):
    m = load(tiny / "m.ep", threads=1)
    pairs = prefs.load_pairs(tiny / "pairs.jsonl", m.tokenizer, SEQ)[:2]
    with pytest.raises(ValueError, match="pairs.jsonl:1 has no reference log-probabilities"):
        objectives.dpo(m, pairs)


# -- the implicit reward --------------------------------------------------------------------
def test_implicit_reward_of_an_untuned_model_is_exactly_zero(tiny, tmp_path):
    m = load(tiny / "m.ep", threads=1)
    ex = dataset.load(SMALL)[0]
    assert not reward.has_reference(m)
    assert reward.reward(m, ex.panel, ex.target) == 0.0
    assert edgepanel.reward(m, "the cat sat on", " the mat.") == 0.0
    reward.save_with_reference(m, tmp_path / "same.ep")          # nothing changed: nothing to carry
    same = load(tmp_path / "same.ep")
    assert not reward.has_reference(same) and reward.reward(same, ex.panel.to_dict(), ex.target) == 0.0
    for c in reward.score_candidates(m, ex.panel, [ex.target, "the cat sat on the mat"]):
        assert c.reward == 0.0 and c.logp == c.ref_logp and c.logp < 0


def test_a_tuned_file_carries_its_reference(tiny, tmp_path):
    base = load(tiny / "m.ep", threads=1)
    m = load(tiny / "m.ep", threads=1)
    pairs = prefs.load_pairs(tiny / "pairs.jsonl", m.tokenizer, SEQ)
    prefs.attach_reference(m, pairs, tmp_path / "ref.cache")
    cfg = TuneConfig(objective="dpo", steps=6, batch=4, seq_len=SEQ, eval_every=3, lr=5e-2, beta=0.5,
                     granularity="row", params="scales,norms")
    seen = []
    finetune(m, pairs[:8], cfg, eval_data=pairs[8:], out=tmp_path / "dpo.ep", callback=seen.append)
    assert set(seen[2].eval_metrics) == {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
                                         "rewards/accuracies"}
    f = SafetensorsFile(tmp_path / "dpo.ep")
    carried = [n for n in f.tensors if n.startswith(reward.PREFIX)]
    orig = SafetensorsFile(tiny / "m.ep")
    assert carried and all(np.array_equal(f.tensors[n], orig.tensors[n[len(reward.PREFIX):]]) for n in carried)
    assert sum(f.tensors[n].nbytes for n in carried) < 0.2 * (tmp_path / "dpo.ep").stat().st_size
    tuned = load(tmp_path / "dpo.ep", threads=1)         # the loader ignores the reference tensors
    assert reward.has_reference(tuned) and reward.default_beta(tuned) == 0.5
    before = {n: a.copy() for n, a in tuned.parameters().items()}
    # the reference in the file is the model training started from: its log-probabilities are
    # the training run's cached ones, exactly
    np.testing.assert_array_equal(reward.pair_reference_logps(tuned, pairs), [p.ref for p in pairs])
    line = prefs.read_pairs(tiny / "pairs.jsonl")[9]        # candidates scored as training pairs are
    c, r = reward.score_candidates(tuned, line.source, [line.chosen, line.rejected], seq_len=SEQ)
    assert (c.ref_logp, r.ref_logp) == pairs[9].ref
    assert [c.logp, r.logp] == objectives.pair_logps(tuned, [pairs[9]])[0].tolist()
    ex = dataset.load(SMALL)[1]
    r = reward.reward(tuned, ex.panel, ex.target)
    s = prefs.sequence(*_prompt_and_cont(tuned, ex))
    want = 0.5 * (logp64(tuned, s) - logp64(base, s))
    assert r != 0 and r == pytest.approx(want, abs=1e-4)
    for n, a in tuned.parameters().items():                 # the reference was put back out exactly
        np.testing.assert_array_equal(a, before[n], err_msg=n)
    tuned.save(tmp_path / "again.ep")                       # Model.save keeps the reference
    assert reward.reward(load(tmp_path / "again.ep"), ex.panel, ex.target) == r


def _prompt_and_cont(m, ex):
    p = prefs.prompt_ids(ex.panel, m.tokenizer, m.cfg.max_seq_len - 1)
    return p, m.tokenizer.encode(ex.target, add_special_tokens=False)[:m.cfg.max_seq_len - len(p)]


def test_best_of_is_deterministic_given_a_seed(tiny, tmp_path):
    m = load(tiny / "m.ep", threads=1)
    nudge(m, 1.2)                                            # a model unlike its reference (the file)
    ex = dataset.load(SMALL)[2]
    kw = dict(max_tokens=12, temperature=1.0, top_p=1.0, min_p=0.0)
    a = reward.best_of(m, ex.panel, 4, seed=7, **kw)
    b = edgepanel.best_of(m, ex.panel, 4, seed=7, **kw)
    assert [c.__dict__ for c in a.candidates] == [c.__dict__ for c in b.candidates] and a.text == b.text
    assert len({c.seed for c in a.candidates}) == 4 and len({c.text for c in a.candidates}) > 1
    assert [c.seed for c in reward.best_of(m, ex.panel, 4, seed=8, **kw).candidates] != [c.seed for c in a.candidates]
    assert any(c.reward != 0 for c in a.candidates)
    key = [(c.reward, c.mean_logp) for c in a.candidates]
    assert key[a.index] == max(key) and a.text == a.candidates[a.index].text
    for c in a.candidates:                                   # the scores are the implicit rewards
        if c.tokens:
            assert c.reward == pytest.approx(reward.reward(m, ex.panel, c.text), abs=1e-9)
    # ties (an untuned model: every reward 0) go to the highest mean log-probability per token
    plain = load(tiny / "m.ep", threads=1)
    u = reward.best_of(plain, "the cat sat on", 3, seed=1, **kw)
    assert all(c.reward == 0 for c in u.candidates)
    assert u.index == int(np.argmax([c.mean_logp for c in u.candidates]))


# -- C-RLFT ---------------------------------------------------------------------------------
def test_crlft_weights_multiply_per_example_losses_exactly(tiny, tmp_path):
    m = load(tiny / "m.ep", threads=1)
    f = tmp_path / "c.jsonl"
    lines = [{"prompt": "the cat sat on", "target": " the mat.", "class": "book"},
             {"prompt": "once upon a time", "target": " there was a dog", "class": "model"},
             {"panel": {"plan": "the dog sat"}, "target": "the dog sat on the log", "class": "book"}]
    f.write_text("".join(json.dumps(x) + "\n" for x in lines))
    ex = prefs.load_classed(f, m.tokenizer, 64)
    assert [e.cls for e in ex] == ["book", "model", "book"]
    # the class is a condition in the prompt; the target's tokens stay the same
    as_model = prefs.tokenize_classed(prefs.read_classed(f)[0], m.tokenizer, 64, cls="model")
    assert as_model.ids[as_model.mask].tolist() == ex[0].ids[ex[0].mask].tolist()
    assert as_model.ids[~as_model.mask].tolist() != ex[0].ids[~ex[0].mask].tolist()
    sums = [-float(np.sum(m.score([e.ids], [e.mask])[0], dtype=np.float64)) for e in ex]
    counts = [e.targets for e in ex]
    w = {"book": 1.0, "model": 0.25}
    want = (sums[0] + 0.25 * sums[1] + sums[2]) / sum(counts)
    assert objectives.crlft(m, ex, w) == pytest.approx(want, rel=1e-13)
    assert objectives.crlft(m, ex, "book=1,model=1") == objectives.nll(m, ex)
    assert objectives.crlft(m, ex, "book=2,model=0") == pytest.approx(2 * (sums[0] + sums[2]) / sum(counts), rel=1e-13)
    with pytest.raises(ValueError, match="no weight for class 'model'"):
        objectives.crlft(m, ex, "book=1")
    for bad in ("book", "book=-1", "book=x", ""):
        with pytest.raises(ValueError, match="class weights"):
            objectives.parse_class_weights(bad)
    losses = prefs.class_losses(m, dataset.load(SMALL)[:2], ["book", "model"], 128)
    assert set(losses) == {"book", "model"} and losses["book"] != losses["model"]
    cfg = TuneConfig(objective="crlft", steps=2, batch=2, seq_len=64, eval_every=0, class_weights="book=1,model=0.5")
    assert finetune(m, ex, cfg, eval_data=ex).history[-1].eval_loss > 0


# -- pairs from a panel dataset ------------------------------------------------------------
def test_mismatch_pairs_are_deterministic_and_valid(tiny, tmp_path):
    ex = dataset.load(SMALL)
    a, b = tmp_path / "a.jsonl.gz", tmp_path / "b.jsonl.gz"
    write_lines(a, mismatch_pairs(ex, seed=3))
    write_lines(b, mismatch_pairs(ex, seed=3))
    assert a.read_bytes() == b.read_bytes()
    lines = prefs.read_pairs(a)
    partners = mismatch_partners(ex, 3)
    assert len(lines) == len(ex) and partners != mismatch_partners(ex, 4)
    for i, (ln, j) in enumerate(zip(lines, partners)):
        assert ln.chosen == ex[i].target and ln.rejected == ex[j].target and j != i
        assert ln.source == ex[i].panel and ln.extra["x-source"] == ex[i].extra["x-source"]
        same_book = [k for k in range(len(ex)) if k != i and
                     ex[k].extra["x-source"]["book"] == ex[i].extra["x-source"]["book"]]
        assert not same_book or j in same_book                  # another paragraph of the same book


def test_shipped_pair_files_are_the_commands_output(tmp_path):
    root = Path(__file__).resolve().parents[1] / "data" / "panels"
    write_lines(tmp_path / "eval.jsonl.gz", mismatch_pairs(dataset.load(root / "austen-eval.jsonl.gz"), seed=0))
    assert (tmp_path / "eval.jsonl.gz").read_bytes() == (root / "austen-pairs-eval.jsonl.gz").read_bytes()
    train = prefs.read_pairs(root / "austen-pairs-train.jsonl.gz")
    held = prefs.read_pairs(root / "austen-pairs-eval.jsonl.gz")
    assert (len(train), len(held)) == (3000, 300)
    assert not {x.extra["x-source"]["book"] for x in train} & {x.extra["x-source"]["book"] for x in held}


def test_model_written_pairs_are_deterministic_and_valid(tiny, tmp_path):
    m = load(tiny / "m.ep", threads=1)
    ex = dataset.load(SMALL)[:3]
    one = list(model_pairs(m, ex, seed=2, max_tokens=10))
    assert one == list(model_pairs(load(tiny / "m.ep", threads=2), ex, seed=2, max_tokens=10))
    assert one != list(model_pairs(m, ex, seed=5, max_tokens=10))
    write_lines(tmp_path / "p.jsonl", one)
    for ln, e in zip(prefs.read_pairs(tmp_path / "p.jsonl"), ex):
        assert ln.chosen == e.target and ln.rejected != e.target and ln.extra["x-rejected"]["kind"] == "model"
    write_lines(tmp_path / "c.jsonl", model_pairs(m, ex, seed=2, max_tokens=10, classes=True))
    cl = prefs.read_classed(tmp_path / "c.jsonl")
    assert [c.cls for c in cl] == ["book", "model"] * 3
    assert [c.target for c in cl[1::2]] == [p["rejected"] for p in one]


# -- the data-model loop --------------------------------------------------------------------
def test_refine_keeps_only_improving_rewrites_and_resumes(tiny, tmp_path, monkeypatch):
    cfg = refine.RefineConfig(rounds=2, threshold=0.0, limit=4, max_tokens=16)
    tune = TuneConfig(steps=2, batch=2, seq_len=200, eval_every=0, params="scales,norms", lr=2e-2, seed=5)
    held = tmp_path / "held.jsonl"
    held.write_text("".join(SMALL.read_text().splitlines(keepends=True)[-3:]))
    kw = dict(eval_data=held, threads=1)
    from edgepanel.tune import trainer
    real, seeds = trainer.finetune, []

    def recording(model, data, c, **k):
        seeds.append(c.seed)
        return real(model, data, c, **k)
    monkeypatch.setattr(trainer, "finetune", recording)
    whole = refine.refine(tiny / "m.ep", SMALL, tmp_path / "a" / "out.jsonl.gz", cfg, tune, **kw)
    assert [r.round for r in whole] == [1, 2] and all(r.held_out_after is not None for r in whole)
    # each round trains with its own seed (round 1 with the given one), not a replay of round 1's noise
    assert seeds == [5, refine.round_seed(5, 2)] and seeds[1] != 5
    # every kept rewrite lowered the target's perplexity by more than the threshold, under the
    # round's starting model; every refused one did not (or copied the target)
    m = load(tiny / "m.ep", threads=1)
    before = dataset.load(SMALL)[:4]
    after = dataset.load(whole[0].data)
    decided = []
    for old, new in zip(before, after):
        rec = new.extra["x-refine"]
        p0, p1 = (refine.perplexity(m, x.panel, old.target, 200) for x in (old, new))
        assert rec["ppl_before"] == pytest.approx(p0, rel=1e-12) and rec["ppl_after"] == pytest.approx(p1, rel=1e-12)
        if rec["kept"]:
            assert new.panel != old.panel and p1 < p0
            assert all(k["I"] > cfg.threshold for k in rec["kept"])
        else:
            assert new.panel == old.panel and p1 == p0
        assert all(r["I"] is None or r["I"] <= cfg.threshold for r in rec["refused"])
        decided += [k["I"] for k in rec["kept"]] + [r["I"] for r in rec["refused"] if r["I"] is not None]
    assert any(i > cfg.threshold for i in decided) and any(i <= cfg.threshold for i in decided)
    # a threshold above every measured improvement keeps nothing
    strict = refine.refine(tiny / "m.ep", SMALL, tmp_path / "s" / "out.jsonl",
                           refine.RefineConfig(rounds=1, threshold=max(decided) + 1, limit=4, max_tokens=16), tune)
    assert strict[0].rewrites_kept == 0
    assert [e.panel for e in dataset.load(strict[0].data)] == [e.panel for e in before]
    # interrupted in round 2 (and a line torn in the partial file), then run again: the same files
    out = tmp_path / "b" / "out.jsonl.gz"

    def stop(r, i):
        if (r, i) == (2, 1):
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        refine.refine(tiny / "m.ep", SMALL, out, cfg, tune, on_example=stop, **kw)
    partial = refine.rounds_dir(out) / "round2.partial.jsonl"
    assert len(partial.read_text().splitlines()) == 2 and not out.exists()
    with open(partial, "a") as f:
        f.write('{"panel": {"pla')
    again = refine.refine(tiny / "m.ep", SMALL, out, cfg, tune, **kw)
    assert [r.__dict__ | {"data": 0, "model": 0} for r in again] == [r.__dict__ | {"data": 0, "model": 0} for r in whole]
    a_dir, b_dir = refine.rounds_dir(tmp_path / "a" / "out.jsonl.gz"), refine.rounds_dir(out)
    for name in ("round1.jsonl.gz", "round2.jsonl.gz", "round1.ep", "round2.ep"):
        assert (a_dir / name).read_bytes() == (b_dir / name).read_bytes(), name
    assert out.read_bytes() == (tmp_path / "a" / "out.jsonl.gz").read_bytes()
    assert not partial.exists() and not list(b_dir.glob("*.ckpt"))
    with pytest.raises(ValueError, match="other settings"):
        refine.refine(tiny / "m.ep", SMALL, out, refine.RefineConfig(rounds=2, threshold=5.0, limit=4), tune, **kw)


def test_refine_control_fine_tunes_on_the_data_as_given(tiny, tmp_path, monkeypatch):
    # the control run: nothing proposed, every round trains on the given examples with the loop's
    # round seeds; round 1 is then exactly finetune on the given data with the given seed
    tune = TuneConfig(steps=2, batch=2, seq_len=200, eval_every=0, params="scales,norms", lr=2e-2, seed=5)
    held = tmp_path / "held.jsonl"
    held.write_text("".join(SMALL.read_text().splitlines(keepends=True)[-3:]))
    given = tmp_path / "given.jsonl"
    given.write_text("".join(SMALL.read_text().splitlines(keepends=True)[:4]))

    def no_proposals(*a, **k):
        raise AssertionError("the control run proposed a rewrite")
    monkeypatch.setattr(refine, "refine_example", no_proposals)
    cfg = refine.RefineConfig(rounds=2, rewrite=False)
    res = refine.refine(tiny / "m.ep", given, tmp_path / "c" / "out.jsonl", cfg, tune, eval_data=held, threads=1)
    src = dataset.load(given)
    for r in res:
        assert r.rewrites_kept == 0 and r.mean_I == 0.0
        lines = dataset.load(r.data)
        assert [(e.panel, e.target) for e in lines] == [(e.panel, e.target) for e in src]
        assert all(e.extra["x-refine"]["control"] for e in lines)
    assert res[1].held_out_before == res[0].held_out_after and res[1].held_out_after != res[0].held_out_after
    from edgepanel.tune import data as tdata
    m = load(tiny / "m.ep", threads=1)
    finetune(m, tdata.load(given, m.tokenizer, tune.seq_len), tune, out=tmp_path / "direct.ep")
    direct = load(tmp_path / "direct.ep", threads=1)
    assert refine.held_out_nll(direct, dataset.load(held), tune.seq_len) == res[0].held_out_after
    # the settings tell a control run from a loop: one never resumes the other
    with pytest.raises(ValueError, match="other settings"):
        refine.refine(tiny / "m.ep", given, tmp_path / "c" / "out.jsonl", refine.RefineConfig(rounds=2), tune,
                      eval_data=held)
    with pytest.raises(ValueError, match="rewrite must be True or False"):
        refine.RefineConfig(rewrite="no")


def test_refine_helpers():
    got = [refine.round_seed(s, r) for s in (0, 1, 10**9) for r in (1, 2, 3)]
    assert got[0::3] == [0, 1, 10**9] and len(set(got)) == 9
    assert got == [refine.round_seed(s, r) for s in (0, 1, 10**9) for r in (1, 2, 3)]   # a function of (seed, round)
    for v in got:
        TuneConfig(seed=v)      # inside the trainer's range
    assert refine.leaks("he said that the cat sat on the mat by the door", "the cat sat on the mat by the door today")
    assert not refine.leaks("the cat sat on the mat", "the cat sat on the mat by the door today")
    got = refine.parse_descriptions("Emma: a clever young woman Mr. Knightley: her old friend Harriet: -",
                                    ["Emma", "Mr. Knightley", "Harriet", "Jane"])
    assert got == {"Emma": "a clever young woman", "Mr. Knightley": "her old friend"}
    assert refine.improvement(90.0, 100.0) == pytest.approx(10.0)
    with pytest.raises(ValueError, match="fields"):
        refine.RefineConfig(fields="plan,mood")


# -- bad lines ------------------------------------------------------------------------------
PAIR = {"prompt": "the cat", "chosen": " sat", "rejected": " ran"}


@pytest.mark.parametrize("line, message", [
    ("{oops", "p.jsonl:3: not valid JSON"),
    ('["a"]', "p.jsonl:3: expected a JSON object"),
    ({"chosen": "a", "rejected": "b"}, "p.jsonl:3: a line holds {\"panel\" or \"prompt\""),
    ({"prompt": "x", "panel": {"plan": "p"}, "chosen": "a", "rejected": "b"}, "both 'panel' and 'prompt'"),
    ({"prompt": "x", "chosen": "a"}, "p.jsonl:3: a line holds {\"panel\" or \"prompt\", \"chosen\" + \"rejected\"}: missing 'rejected'"),
    ({"prompt": "x", "chosen": "a", "rejected": "b", "score": 1}, "unknown field 'score'"),
    ({"prompt": "x", "chosen": "", "rejected": "b"}, "p.jsonl:3: 'chosen' must be a non-empty string"),
    ({"prompt": "x", "chosen": "a", "rejected": 3}, "'rejected' must be a non-empty string"),
    ({"prompt": "x", "chosen": "a", "rejected": "a"}, "the same text"),
    ({"panel": {"plan": 1}, "chosen": "a", "rejected": "b"}, "p.jsonl:3: panel.plan: must be a string"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "'prompt' must be a non-empty string"),
])
def test_bad_pair_lines_are_named(tmp_path, line, message):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps(PAIR) + "\n\n" + (line if isinstance(line, str) else json.dumps(line)) + "\n")
    with pytest.raises(DataError) as e:
        prefs.read_pairs(f)
    assert message in str(e.value), str(e.value)


@pytest.mark.parametrize("line, message", [
    ({"prompt": "x", "target": "a"}, "c.jsonl:2: a line holds {\"panel\" or \"prompt\", \"target\" + \"class\"}: missing 'class'"),
    ({"prompt": "x", "target": "a", "class": "book club"}, "c.jsonl:2: 'class' must be 1-32 letters"),
    ({"prompt": "x", "target": "a", "class": 1}, "'class' must be a non-empty string"),
])
def test_bad_class_lines_are_named(tmp_path, line, message):
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"prompt": "x", "target": "a", "class": "book"}) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(DataError) as e:
        prefs.read_classed(f)
    assert message in str(e.value), str(e.value)


def test_the_trainer_names_preference_lines_given_to_nll(tiny, tmp_path):
    from edgepanel.tune import data
    m = load(tiny / "m.ep")
    with pytest.raises(DataError, match=r"pairs.jsonl:1: a preference pair: train it with --objective dpo"):
        data.load(tiny / "pairs.jsonl", m.tokenizer)


def test_old_checkpoints_resume(tiny, tmp_path):
    """A checkpoint written before the preference options existed still resumes (they default)."""
    from edgepanel.format import write_tensors
    m = load(tiny / "m.ep")
    cfg = TuneConfig(steps=2, batch=2, seq_len=32, eval_every=0, params="norms")
    t = ZOTrainer(m, _text_examples(m), cfg)
    t.run(checkpoint=tmp_path / "ck")
    f = SafetensorsFile(tmp_path / "ck")
    meta = dict(f.metadata)
    old = json.loads(meta["config"])
    for k in ("beta", "label_smoothing", "class_weights"):
        del old[k]
    meta["config"] = json.dumps(old, sort_keys=True)
    write_tensors(tmp_path / "old", {n: np.array(a) for n, a in f.tensors.items()}, meta)
    t2 = ZOTrainer(load(tiny / "m.ep"), _text_examples(m), cfg)
    t2.load_checkpoint(tmp_path / "old")
    assert t2.step == 2
    t3 = ZOTrainer(load(tiny / "m.ep"), _text_examples(m), TuneConfig(**{**cfg.__dict__, "beta": 0.3}))
    with pytest.raises(edgepanel.EdgepanelError, match="beta"):
        t3.load_checkpoint(tmp_path / "old")


def _text_examples(m):
    from edgepanel.tune import data
    return data.from_text(m.tokenizer, "the cat sat on the mat. the dog sat on the log. " * 8, 32)


# -- the command line -----------------------------------------------------------------------
def test_cli_pairs_dpo_best_of_refine(tiny, tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl.gz"
    assert main(["data", "pairs", str(SMALL), "--mismatch", "--out", str(pairs), "-q"]) == 0
    assert gzip.decompress(pairs.read_bytes()) == (tiny / "pairs.jsonl").read_bytes()   # --seed 0
    model = str(tiny / "m.ep")
    crl = tmp_path / "c.jsonl"
    assert main(["data", "pairs", str(SMALL), "--model", model, "--crlft", "--limit", "2", "-n", "8",
                 "--out", str(crl), "-q"]) == 0
    assert len(prefs.read_classed(crl)) == 4
    out = tmp_path / "dpo.ep"
    base = ["finetune", model, "--objective", "dpo", "--data", str(pairs), "--eval", str(pairs), "--out", str(out),
            "--steps", "2", "--batch", "2", "--seq-len", str(SEQ), "--eval-batches", "1", "--beta", "0.2",
            "--reference-cache", str(tmp_path / "ref")]
    assert main(base) == 0
    err = capsys.readouterr().err
    assert "rewards/accuracies" in err and "reference: log-probabilities of 24 pairs" in err
    assert (tmp_path / "ref").exists() and reward.default_beta(load(out)) == 0.2
    run = load(out).meta.history[-1]["zo_finetune"]          # the measured recipe, under the options given
    assert (run["noise"], run["n_perturb"], run["granularity"], run["steps"]) == ("hadamard", 32, "kind", 2)
    assert main(base) == 0
    assert "read from" in capsys.readouterr().err                          # the cache, reused
    assert main(["generate", str(out), "-p", "the cat sat", "--best-of", "3", "-n", "6", "--seed", "4"]) == 0
    cap = capsys.readouterr()
    assert cap.err.count("candidate") == 3 and cap.err.count("*") == 1 and cap.out.strip()
    assert main(["generate", str(out), "-p", "the cat sat", "--best-of", "3", "-n", "6", "--seed", "4", "-q"]) == 0
    assert capsys.readouterr().out == cap.out
    assert main(["finetune", model, "--objective", "crlft", "--data", str(crl), "--out", str(tmp_path / "c.ep"),
                 "--steps", "1", "--batch", "2", "--seq-len", "96", "-q"]) == 0
    assert main(["finetune", model, "--data", str(pairs), "--out", str(tmp_path / "x.ep"), "-q"]) == 1
    assert "a preference pair" in capsys.readouterr().err
    assert main(["generate", model, "-p", "hi", "--best-of", "0"]) == 1
    assert "--best-of must be at least 1" in capsys.readouterr().err
    assert main(["data", "pairs", str(SMALL), "--mismatch", "--crlft", "--out", str(tmp_path / "z")]) == 1
    assert main(["data", "refine", model, "--data", str(SMALL), "--out", str(tmp_path / "r.jsonl"), "--rounds", "1",
                 "--limit", "2", "--max-tokens", "8", "--steps", "1", "--batch", "2", "--seq-len", "128",
                 "--eval", str(SMALL), "-q"]) == 0
    assert "| 1 | 2 |" in capsys.readouterr().out and len(dataset.load(tmp_path / "r.jsonl")) == 2
    # the loop's own learning rate unless one is given (finetune keeps TuneConfig's)
    settings = json.loads((refine.rounds_dir(tmp_path / "r.jsonl") / "summary.json").read_text())["settings"]
    assert settings["tune"]["lr"] == refine.TUNE_DEFAULTS["lr"] != TuneConfig().lr
    assert settings["tune"]["steps"] == 1 and settings["tune"]["batch"] == 2 and settings["refine"]["rewrite"] is True
    assert main(["data", "refine", model, "--data", str(SMALL), "--out", str(tmp_path / "k.jsonl"), "--rounds", "1",
                 "--limit", "2", "--steps", "1", "--batch", "2", "--seq-len", "128", "--no-rewrite", "-q"]) == 0
    assert "| 1 | 2 | 0 | 0.00 |" in capsys.readouterr().out
    assert json.loads((refine.rounds_dir(tmp_path / "k.jsonl") / "summary.json").read_text())["settings"]["refine"][
        "rewrite"] is False
