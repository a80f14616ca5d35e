"""The zeroth-order trainer: the step's algebra on a quadratic, noise regenerated from its key,
exact restore after +eps/-eps, the loss mask, resume and thread-count determinism, a tiny model
that learns, and bad data files named by line."""
import json

import numpy as np
import pytest

import edgepanel
from edgepanel.convert import Recipe, convert
from edgepanel.kernels import native
from edgepanel.tune import TuneConfig, ZOTrainer, data, finetune, zo
from edgepanel.tune.objectives import nll
from edgepanel.tune.params import Trainable, parse_layers

from hf_models import checkpoint_with_tokenizer

TEXT = ("the cat sat on the mat. the dog sat on the log. the cat saw the dog and the dog saw the cat. "
        "once upon a time there was a cat who sat on a mat, and a dog who sat on a log. ") * 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tune")
    convert(checkpoint_with_tokenizer(d / "hf"), d / "m.ep", Recipe(planes=2, group=32, calib_tokens=1024, seq_len=64, tune_steps=0))
    (d / "train.txt").write_text(TEXT)
    return d


def examples(model, seq_len=32):
    return data.from_text(model.tokenizer, TEXT, seq_len)


# -- the step's algebra ---------------------------------------------------------------------------

def test_spsa_on_a_quadratic_converges_at_the_expected_rate():
    """L = |theta|^2 / 2, Rademacher z in d dimensions: the two-point estimate is exact along z,
    so E|theta'|^2 = (1 - 2 lr + lr^2 d) |theta|^2 per step."""
    d, lr, steps, runs = 10, 0.05, 60, 64
    ratios = []
    for seed in range(runs):
        theta = {"w": np.random.default_rng(seed).standard_normal(d).astype(np.float32)}
        start = float(theta["w"] @ theta["w"])
        for t in range(steps):
            saved = theta["w"].copy()
            zo.perturb(theta, seed, t, 0, 1e-3)
            lp = 0.5 * float(np.float64(theta["w"]) @ np.float64(theta["w"]))
            zo.perturb(theta, seed, t, 0, -2e-3)
            lm = 0.5 * float(np.float64(theta["w"]) @ np.float64(theta["w"]))
            theta["w"][...] = saved
            g = zo.projected_gradient(lp, lm, 1e-3)
            theta["w"] -= np.float32(lr) * zo.gradient("w", (d,), seed, t, [g])
        ratios.append(float(theta["w"] @ theta["w"]) / start)
    expected = (1 - 2 * lr + lr * lr * d) ** steps
    assert 0.5 < np.mean(ratios) / expected < 2.0, (np.mean(ratios), expected)


def test_noise_is_regenerated_exactly_from_its_key():
    a = zo.noise(3, 17, 1, "layers.0.wq.scales", (4, 5))
    np.testing.assert_array_equal(a, zo.noise(3, 17, 1, "layers.0.wq.scales", (4, 5)))
    assert set(np.unique(a)) <= {-1.0, 1.0} and a.dtype == np.float32
    for other in [(4, 17, 1, "layers.0.wq.scales"), (3, 18, 1, "layers.0.wq.scales"),
                  (3, 17, 0, "layers.0.wq.scales"), (3, 17, 1, "layers.0.wk.scales")]:
        assert not np.array_equal(a, zo.noise(*other, (4, 5)))
    g = zo.noise(0, 0, 0, "x", (200000,), "gaussian")
    assert abs(g.mean()) < 0.01 and abs(g.std() - 1) < 0.01
    with pytest.raises(ValueError, match="distribution"):
        zo.noise(0, 0, 0, "x", (2,), "uniform")


def test_hadamard_directions_are_orthogonal_and_give_the_exact_gradient_of_a_quadratic():
    """Three tensors, D = 27 values, m = 32: the 32 perturbations of a step are distinct +-1 rows
    with sum_k z_k z_k^T = 32 I over the values of all tensors together, so the mean of g_k z_k
    over them is the gradient of a quadratic (float64 losses; the gradient's float32 rounding
    bounds the error). Regenerated exactly; another step draws other rows and signs."""
    rng = np.random.default_rng(0)
    shapes = {"layers.1.wq.scales": (2, 3, 1, 1), "layers.0.wk.scales": (4, 1, 1, 1), "norm": (17,)}
    theta = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    where = zo.layout(theta)
    assert where["layers.0.wk.scales"] == (0, 27) and where["norm"] == (10, 27)

    def flat(step, k):
        return np.concatenate([zo.noise(5, step, k, n, shapes[n], "hadamard", where[n]).ravel() for n in sorted(shapes)])

    z = np.stack([flat(3, k) for k in range(32)])
    assert set(np.unique(z)) == {-1.0, 1.0} and z.dtype == np.float32
    assert len({zo.hadamard_row(5, 3, k, 27) for k in range(32)}) == 32
    np.testing.assert_array_equal(z.T @ z, 32 * np.eye(27))
    np.testing.assert_array_equal(z[7], flat(3, 7))
    assert not np.array_equal(z, np.stack([flat(4, k) for k in range(32)]))

    a = rng.standard_normal((27, 27))
    A, b = a @ a.T, rng.standard_normal(27)             # L = x^T A x / 2 + b.x, in float64

    def loss(th):
        x = np.concatenate([th[n].astype(np.float64).ravel() for n in sorted(th)])
        return 0.5 * x @ A @ x + b @ x

    x0 = np.concatenate([theta[n].astype(np.float64).ravel() for n in sorted(theta)])
    grads = []
    for k in range(32):
        saved = {n: t.copy() for n, t in theta.items()}
        zo.perturb(theta, 5, 3, k, 1e-2, "hadamard")
        lp = loss(theta)
        zo.perturb(theta, 5, 3, k, -2e-2, "hadamard")
        lm = loss(theta)
        theta = saved
        grads.append(zo.projected_gradient(lp, lm, 1e-2))
    est = np.concatenate([zo.gradient(n, shapes[n], 5, 3, grads, "hadamard", where[n]).ravel() for n in sorted(shapes)])
    exact = A @ x0 + b
    # the perturbed theta is float32: its rounding (2^-24 |x|) enters L+/-, divided by 2 eps
    assert np.abs(est - exact).max() < 1e-3 * np.abs(exact).max(), np.abs(est - exact).max()
    iid = np.mean([np.dot(zo.noise(5, 3, k, "v", (27,)), exact) * zo.noise(5, 3, k, "v", (27,)) for k in range(32)], 0)
    assert np.abs(iid - exact).max() > 0.1 * np.abs(exact).max()   # 32 independent directions are far off
    with pytest.raises(ValueError, match="layout"):
        zo.noise(0, 0, 0, "x", (2,), "hadamard")


def test_preference_objectives_default_to_their_measured_recipe():
    c = TuneConfig.for_objective(objective="dpo", lr=2e-3)
    assert (c.granularity, c.noise, c.n_perturb, c.optimizer, c.eps, c.lr) == ("kind", "hadamard", 32, "adam", 0.05, 2e-3)
    assert TuneConfig.for_objective(objective="rdpo", noise="rademacher").noise == "rademacher"
    assert TuneConfig.for_objective(objective="nll") == TuneConfig() == TuneConfig.for_objective()
    assert TuneConfig.for_objective(objective="ipo").granularity == TuneConfig().granularity


def test_projected_gradient_is_clipped_and_refuses_nan():
    assert zo.projected_gradient(2.0, 1.0, 0.01) == pytest.approx(50.0)
    assert zo.projected_gradient(2.0, 1.0, 0.01, clip=5) == 5
    with pytest.raises(FloatingPointError):
        zo.projected_gradient(float("nan"), 1.0, 0.01)


# -- on a model -----------------------------------------------------------------------------------

@pytest.mark.parametrize("granularity", ["group", "row", "tensor", "kind", "shared"])
def test_perturb_and_restore_is_exact(tiny, granularity):
    m = edgepanel.load(tiny / "m.ep")
    before = m.logits([3, 17, 99, 150, 7])
    p = Trainable(m, ("scales", "norms", "biases"), None, granularity)
    params = {n: a.copy() for n, a in m.parameters().items()}
    saved = p.copy()
    zo.perturb(p.theta, 0, 0, 0, 1e-2)
    p.apply()
    assert not np.array_equal(m.logits([3, 17, 99, 150, 7]), before)
    zo.perturb(p.theta, 0, 0, 0, -2e-2)
    p.apply()
    p.restore(saved)
    for n, a in m.parameters().items():
        np.testing.assert_array_equal(a, params[n], err_msg=n)
    np.testing.assert_array_equal(m.logits([3, 17, 99, 150, 7]), before)


def test_granularity_sizes(tiny):
    m = edgepanel.load(tiny / "m.ep")
    sizes = {g: Trainable(m, ("scales",), None, g).size for g in ("group", "row", "tensor")}
    n_tensors = len(m.parameters("scales"))
    assert sizes["tensor"] == 2 * n_tensors and sizes["tensor"] < sizes["row"] < sizes["group"]


def test_kind_granularity_moves_every_layer_together(tiny):
    """One multiplier per (kind, plane) for scales and one per norm kind, each multiplying every
    layer's tensor of that kind exactly (float32 base * multiplier), and nothing else."""
    m = edgepanel.load(tiny / "m.ep")
    before = {n: a.copy() for n, a in m.parameters().items()}
    p = Trainable(m, ("scales", "norms"), None, "kind")
    kinds = {n.split(".", 2)[2] for n in before if n.startswith("layers.") and n.endswith(".scales")}
    assert {k for k in p.theta if p.theta[k].ndim == 4} == kinds
    assert p.theta["wq.scales"].shape == (2, 1, 1, 1) and p.theta["attn_norm.weight"].shape == (1,)
    assert "final_norm.weight" in p.theta and p.size == 2 * len(kinds) + 3
    p.theta["wq.scales"][1] = 1.5
    p.theta["attn_norm.weight"][0] = 0.5
    p.apply()
    after = m.parameters()
    for n, a in after.items():
        if n.endswith(".wq.scales"):
            want = before[n].copy()
            want[1] = before[n][1] * np.float32(1.5)
            np.testing.assert_array_equal(a, want, err_msg=n)
        elif n.endswith(".attn_norm.weight"):
            np.testing.assert_array_equal(a, before[n] * np.float32(0.5), err_msg=n)
        else:
            np.testing.assert_array_equal(a, before[n], err_msg=n)
    p.theta["wk.scales"][...] = -1    # a scale multiplier stays non-negative; a norm's may not
    p.theta["mlp_norm.weight"][...] = -1
    p.project()
    assert (p.theta["wk.scales"] == 0).all() and (p.theta["mlp_norm.weight"] == -1).all()
    assert p.anchor("wq.scales") == 1.0 and not p.decays("attn_norm.weight") and p.decays("wq.scales")



def test_tensors_choose_among_the_kinds(tiny):
    m = edgepanel.load(tiny / "m.ep")
    p = Trainable(m, ("scales", "norms"), None, "kind", tensors="wq,wk,final_norm")
    assert sorted(p.theta) == ["final_norm.weight", "wk.scales", "wq.scales"] and p.size == 2 + 2 + 1
    before = {n: a.copy() for n, a in m.parameters().items()}
    p.theta["wk.scales"][...] = 2
    p.apply()
    changed = sorted(n for n, a in m.parameters().items() if not np.array_equal(a, before[n]))
    assert changed and all(n.endswith(".wk.scales") for n in changed)
    s = Trainable(m, ("scales",), None, "shared", tensors="wq,wk")    # one value per kind: every plane
    assert {n: a.shape for n, a in s.theta.items()} == {"wq.scales": (1, 1, 1, 1), "wk.scales": (1, 1, 1, 1)}
    m2 = edgepanel.load(tiny / "m.ep")
    s = Trainable(m2, ("scales",), None, "shared", tensors="wq")
    base = {n: a.copy() for n, a in m2.parameters("scales").items()}
    s.theta["wq.scales"][...] = 1.25
    s.apply()
    for n, a in m2.parameters("scales").items():
        np.testing.assert_array_equal(a, base[n] * np.float32(1.25) if n.endswith(".wq.scales") else base[n])
    t = Trainable(m, ("scales",), parse_layers("0", m.cfg.n_layers), "tensor", tensors=["w_up"])
    assert list(t.theta) == ["layers.0.w_up.scales"]
    with pytest.raises(ValueError, match="not among.*wq"):
        Trainable(m, ("scales",), None, "kind", tensors="wq,attn_norm")   # a norm, but only scales asked
    with pytest.raises(ValueError, match="nope"):
        Trainable(m, ("scales",), None, "row", tensors="wq,nope")
    with pytest.raises(ValueError, match="tensors"):
        TuneConfig(tensors=" , ")


def test_nll_counts_the_target_tokens_only_and_equals_float64(tiny):
    m = edgepanel.load(tiny / "m.ep")
    ex = data.from_pair(m.tokenizer, "the dog sat on", " the log.", 64)
    assert ex.mask.sum() == len(m.tokenizer.encode(" the log.", add_special_tokens=False))
    lg = m.logits(ex.ids).astype(np.float64)
    lse = np.log(np.exp(lg - lg.max(1, keepdims=True)).sum(1)) + lg.max(1)
    t = np.nonzero(ex.mask)[0]
    want = -np.mean(lg[t - 1, ex.ids[t]] - lse[t - 1])
    assert nll(m, [ex]) == pytest.approx(want, rel=1e-5)
    # the context's own next-token predictions never count: counting them changes the loss
    widened = data.Example(ex.ids, np.ones_like(ex.mask))
    assert nll(m, [widened]) != nll(m, [ex])


def _train(path, steps, threads=None, **kw):
    m = edgepanel.load(path, threads=threads)
    cfg = TuneConfig(steps=steps, batch=2, seq_len=32, eval_every=0, granularity="row",
                     params="scales,norms", lr=5e-3, **kw)
    return m, ZOTrainer(m, examples(m), cfg)


@pytest.mark.parametrize("noise", ["rademacher", "hadamard"])
def test_resume_equals_an_uninterrupted_run(tiny, tmp_path, noise):
    m1, straight = _train(tiny / "m.ep", 6, optimizer="adam", noise=noise)
    straight.run()
    m2, first = _train(tiny / "m.ep", 3, optimizer="adam", noise=noise)
    first.run(checkpoint=tmp_path / "ck.safetensors")
    m3, second = _train(tiny / "m.ep", 6, optimizer="adam", noise=noise)
    second.load_checkpoint(tmp_path / "ck.safetensors")
    assert second.step == 3
    second.run()
    for n, a in straight.params.theta.items():
        np.testing.assert_array_equal(second.params.theta[n], a, err_msg=n)
    for n, a in m1.parameters().items():
        np.testing.assert_array_equal(m3.parameters()[n], a, err_msg=n)


def test_checkpoint_of_other_options_is_refused(tiny, tmp_path):
    _, t = _train(tiny / "m.ep", 1)
    t.run(checkpoint=tmp_path / "ck.safetensors")
    _, other = _train(tiny / "m.ep", 2, seed=9)
    with pytest.raises(edgepanel.EdgepanelError, match="seed"):
        other.load_checkpoint(tmp_path / "ck.safetensors")


@pytest.mark.skipif(native.lib is None, reason="the C engine's thread pool")
def test_same_seed_same_parameters_on_one_and_two_threads(tiny):
    _, a = _train(tiny / "m.ep", 4, threads=1)
    _, b = _train(tiny / "m.ep", 4, threads=2)
    a.run()
    b.run()
    for n, t in a.params.theta.items():
        np.testing.assert_array_equal(b.params.theta[n], t, err_msg=n)


def test_a_tiny_model_learns_and_the_result_is_saved(tiny, tmp_path):
    """nll on plain text lowers the loss on held-out text of the same kind."""
    m = edgepanel.load(tiny / "m.ep")
    every = examples(m)
    train, held = every[::2], every[1::2]
    before, held_before = nll(m, train), nll(m, held)
    cfg = TuneConfig(steps=60, batch=4, seq_len=32, eval_every=20, granularity="row", params="scales,norms",
                     lr=2e-2, optimizer="adam", n_perturb=2)
    seen = []
    t = finetune(m, train, cfg, eval_data=held, out=tmp_path / "tuned.ep", callback=seen.append)
    after = nll(m, train)
    assert len(seen) == 60 and seen[19].eval_loss is not None
    assert after < before - 0.05, (before, after)
    assert seen[-1].eval_loss == pytest.approx(nll(m, held)) and nll(m, held) < held_before - 0.03
    back = edgepanel.load(tmp_path / "tuned.ep")
    assert back.meta.history[-1]["steps"] == 60 and back.meta.history[-1]["zo_finetune"]["lr"] == 2e-2
    assert nll(back, train) == pytest.approx(after, abs=2e-3)    # float16 rounding of the scales
    assert t.history[-1].eval_loss is not None


def test_parse_layers():
    assert parse_layers("2-4,7", 10) == [2, 3, 4, 7] and parse_layers(None, 10) is None
    with pytest.raises(ValueError, match="outside"):
        parse_layers("8-12", 10)
    with pytest.raises(ValueError, match="look like"):
        parse_layers("a-b", 10)


@pytest.mark.parametrize("line,msg", [
    ("{not json", "not a JSON object"),
    ('["a"]', "expected a JSON object"),
    ('{"prompt": "a", "target": 3}', "'target' must be a string"),
    ('{"prompt": "a"}', "holds"),
    ('{"prompt": "a", "target": ""}', "'target' is empty"),
])
def test_a_bad_data_line_is_named(tiny, tmp_path, line, msg):
    m = edgepanel.load(tiny / "m.ep")
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "the cat sat"}) + "\n\n" + line + "\n")
    with pytest.raises(data.DataError, match=f"d.jsonl:3: .*{msg}"):
        data.load(f, m.tokenizer)


@pytest.mark.parametrize("opts,msg", [
    (dict(steps=0), "steps must be"), (dict(lr=-1), "lr must be"), (dict(granularity="x"), "granularity"),
    (dict(optimizer="lion"), "optimizer"), (dict(clip=0), "clip"), (dict(objective="kl"), "objective"),
])
def test_bad_options_are_named(opts, msg):
    with pytest.raises(ValueError, match=msg):
        TuneConfig(**opts)


def test_cli_finetune_resumes_to_the_same_file(tiny, tmp_path, capsys):
    from edgepanel import cli
    base = ["finetune", str(tiny / "m.ep"), "--data", str(tiny / "train.txt"), "--batch", "2", "--seq-len", "32",
            "--granularity", "row", "--params", "scales,norms", "-q"]
    assert cli.main(base + ["--steps", "6", "--out", str(tmp_path / "a.ep")]) == 0
    assert cli.main(base + ["--steps", "4", "--out", str(tmp_path / "b.ep")]) == 0
    assert (tmp_path / "b.ep.ckpt").exists()
    assert cli.main(base + ["--steps", "6", "--out", str(tmp_path / "b.ep"),
                            "--resume", str(tmp_path / "b.ep.ckpt")]) == 0
    assert (tmp_path / "a.ep").read_bytes() == (tmp_path / "b.ep").read_bytes()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "the cat"}\n{"prompt": 1, "target": "x"}\n')
    assert cli.main(base + ["--steps", "1", "--data", str(bad), "--out", str(tmp_path / "c.ep")]) == 1
    err = capsys.readouterr().err
    assert "bad.jsonl:2: 'prompt' must be a string" in err and "Traceback" not in err
    assert not (tmp_path / "c.ep").exists()


@pytest.mark.parametrize("engine", ["c", "reference"])
def test_score_at_equals_float64_log_softmax(tiny, engine):
    if engine == "c" and native.lib is None:
        pytest.skip("C kernels not built")
    m = edgepanel.load(tiny / "m.ep", engine=engine)
    seqs = [np.array([3, 17, 99, 150, 7, 42], np.int32), np.array([5, 61, 88, 13], np.int32)]
    rng = np.random.default_rng(1)
    ids = [rng.integers(0, m.cfg.vocab_size, (len(s) - 1, 5)).astype(np.int32) for s in seqs]
    ids[1][0, 2] = -1                     # skipped: 0
    got = m.score_at(seqs, ids, batch_tokens=7)     # two batches
    for s, a, g in zip(seqs, ids, got):
        lg = m.logits(s)[:-1].astype(np.float64)
        lse = np.log(np.exp(lg - lg.max(1, keepdims=True)).sum(1, keepdims=True)) + lg.max(1, keepdims=True)
        want = np.where(a < 0, 0.0, np.take_along_axis(lg - lse, np.maximum(a, 0), axis=1))
        np.testing.assert_allclose(g, want, atol=2e-5)
    # the one-target path is the score path
    nxt = [s[1:, None] for s in seqs]
    np.testing.assert_allclose(np.concatenate([g[:, 0] for g in m.score_at(seqs, nxt)]),
                               np.concatenate(m.score(seqs)), atol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        m.score_at(seqs, [ids[0], ids[0]])


def test_kd_equals_a_float64_kl(tiny):
    from edgepanel.tune import teacher
    from edgepanel.tune.objectives import kd
    checkpoint_with_tokenizer(tiny / "sharp", std=0.15)      # peaked distributions: a KL far from 0
    convert(tiny / "sharp", tiny / "teacher.ep", Recipe(passthrough=True))
    convert(tiny / "sharp", tiny / "student.ep", Recipe(planes=1, group=64, calib=None))
    t, student = edgepanel.load(tiny / "teacher.ep"), edgepanel.load(tiny / "student.ep")
    ex = teacher.build(t, t.tokenizer, TEXT, seq_len=24, count=3, k=16, path=tiny / "kd.cache")
    again = teacher.build(None, t.tokenizer, TEXT, seq_len=24, count=3, k=16, path=tiny / "kd.cache")  # cached
    np.testing.assert_array_equal(again[1].teacher[1], ex[1].teacher[1])
    want = []
    for e in ex:
        p = t.logits(e.ids)[:-1].astype(np.float64)
        q = student.logits(e.ids)[:-1].astype(np.float64)
        lp = p - (np.log(np.exp(p - p.max(1, keepdims=True)).sum(1, keepdims=True)) + p.max(1, keepdims=True))
        lq = q - (np.log(np.exp(q - q.max(1, keepdims=True)).sum(1, keepdims=True)) + q.max(1, keepdims=True))
        top = np.argsort(-lp, axis=1, kind="stable")[:, :16]
        pt, qt = np.take_along_axis(lp, top, 1), np.take_along_axis(lq, top, 1)
        pr, qr = 1 - np.exp(pt).sum(1), 1 - np.exp(qt).sum(1)
        want.append((np.exp(pt) * (pt - qt)).sum(1) + pr * (np.log(pr) - np.log(qr)))
    want = float(np.concatenate(want).mean())
    assert want > 0.05 and kd(student, ex) == pytest.approx(want, rel=1e-4)
    assert kd(t, ex) == pytest.approx(0.0, abs=1e-5)      # the teacher against itself


def test_cli_finetune_kd_against_a_teacher(tiny, tmp_path):
    from edgepanel import cli
    from edgepanel.format import ModelFile
    convert(tiny / "hf", tiny / "teacher_cli.ep", Recipe(passthrough=True))
    out = tmp_path / "kd.ep"
    args = ["finetune", str(tiny / "m.ep"), "--objective", "kd", "--teacher", str(tiny / "teacher_cli.ep"),
            "--data", str(tiny / "train.txt"), "--out", str(out), "--steps", "3", "--batch", "2",
            "--seq-len", "32", "--teacher-k", "8", "-q"]
    assert cli.main(args) == 0
    assert (tmp_path / "kd.ep.teacher-top8").exists()
    assert ModelFile(out).meta.history[-1]["zo_finetune"]["objective"] == "kd"
    assert cli.main(args[:4] + args[6:]) == 1     # kd without a teacher


# -- exact gradients (tune/backprop.py) -------------------------------------------------------------

@pytest.fixture(scope="module")
def sharp(tmp_path_factory):
    """Per architecture: a pass-through teacher, a binarized student (k=2) and kd examples over it."""
    from edgepanel.tune import teacher
    made = {}

    def get(arch):
        if arch not in made:
            d = tmp_path_factory.mktemp("exact_" + arch)
            checkpoint_with_tokenizer(d / "hf", arch=arch, std=0.15)   # peaked distributions
            convert(d / "hf", d / "t.ep", Recipe(passthrough=True))
            convert(d / "hf", d / "s.ep", Recipe(planes=2, group=32, calib_tokens=512, seq_len=64, tune_steps=0))
            t = edgepanel.load(d / "t.ep")
            made[arch] = (d, teacher.build(t, t.tokenizer, TEXT, seq_len=24, count=3, k=16))
        return made[arch]
    return get


def _directional(arch_dir, batch, objective, granularity, kinds=("scales", "norms", "biases")):
    """(the exact gradient along a random direction, the float64 central difference of the loss)."""
    from edgepanel.tune.backprop import ExactGradient
    m = edgepanel.load(arch_dir / "s.ep")
    p = Trainable(m, kinds, granularity=granularity)
    loss, g = ExactGradient(m, p).loss_and_grad(batch, objective)
    rng = np.random.default_rng(1)
    dirs = {n: rng.standard_normal(a.shape).astype(np.float32) for n, a in p.theta.items()}
    base, f64, h = p.copy(), ExactGradient(m, p, np.float64), 1e-3

    def at(sign):
        for n in p.theta:
            p.theta[n][...] = base[n] + np.float32(sign * h) * dirs[n]
        return f64.loss_and_grad(batch, objective)[0]
    fd = (at(1) - at(-1)) / (2 * h)
    p.restore(base)
    return m, loss, sum(float(np.vdot(g[n].astype(np.float64), dirs[n])) for n in g), fd


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "bitnet"])
@pytest.mark.parametrize("granularity", ["group", "row", "tensor", "kind"])
def test_exact_gradient_equals_a_float64_difference(sharp, arch, granularity):
    """Every piece of the backward pass (rotation, RoPE, grouped attention, RMS and layer norms,
    SiLU, tanh-GELU and squared-ReLU MLPs, BitNet's sub-norms, biases, int8 head) against a central
    difference of the float64 loss along a random direction of theta: agreement to 2e-3 relative
    (float32 gradients; the difference's own error is about 1e-5 at h = 1e-3)."""
    from edgepanel.tune.objectives import kd
    d, ex = sharp(arch)
    for objective, batch in (("kd", ex), ("nll", [data.Example(e.ids, e.mask) for e in ex])):
        m, loss, exact, fd = _directional(d, batch, objective, granularity)
        assert abs(fd) > 1e-4, (objective, fd)
        assert exact == pytest.approx(fd, rel=2e-3, abs=1e-6), (objective, exact, fd)
        # the pass models the engine except its int8 rounding of activations
        engine = (kd if objective == "kd" else nll)(m, batch)
        assert loss == pytest.approx(engine, rel=2e-2, abs=2e-3), objective


def test_exact_nll_counts_the_target_tokens_only(sharp):
    """The summed loss and gradient over targets A and B are those over A plus those over B, and
    the mean matches the engine's (whose masks are exact: test_nll_counts_the_target_tokens_only...)."""
    from edgepanel.tune.backprop import ExactGradient
    d, ex = sharp("llama")
    m = edgepanel.load(d / "s.ep")
    eg = ExactGradient(m, Trainable(m, ("scales", "norms"), granularity="tensor"))
    ids, n = ex[0].ids, len(ex[0].ids)
    a, b = np.zeros(n, bool), np.zeros(n, bool)
    a[5:12], b[12:] = True, True
    parts = [(eg.loss_and_grad([data.Example(ids, mk)], "nll"), int(mk[1:].sum())) for mk in (a, b, a | b)]
    (la, ga), na = parts[0]
    (lb, gb), nb = parts[1]
    (lab, gab), nab = parts[2]
    assert nab == na + nb and lab * nab == pytest.approx(la * na + lb * nb, rel=1e-5)
    for k in gab:
        np.testing.assert_allclose(gab[k] * nab, ga[k] * na + gb[k] * nb, rtol=1e-4, atol=1e-6, err_msg=k)
    assert lb == pytest.approx(nll(m, [data.Example(ids, b)]), rel=2e-2)
    with pytest.raises(ValueError, match="no target tokens"):
        eg.loss_and_grad([data.Example(ids, np.zeros(n, bool))], "nll")


def _exact(path, steps, **kw):
    m = edgepanel.load(path)
    cfg = TuneConfig.for_objective(objective="nll", gradient="exact", steps=steps, batch=2, seq_len=32,
                                   eval_every=0, **kw)
    return m, ZOTrainer(m, examples(m), cfg)


def test_exact_training_lowers_the_loss_and_resumes_bit_for_bit(tiny, tmp_path):
    m, t = _exact(tiny / "m.ep", 8, lr=3e-2, params="scales,norms")
    assert t.cfg.granularity == "group" and t.cfg.optimizer == "adam"     # the exact recipe
    ex = examples(m)
    before = nll(m, ex)
    t.run()
    assert nll(m, ex) < before - 0.08
    _, first = _exact(tiny / "m.ep", 4, lr=3e-2, params="scales,norms")
    first.run(checkpoint=tmp_path / "ck.safetensors")
    _, second = _exact(tiny / "m.ep", 8, lr=3e-2, params="scales,norms")
    second.load_checkpoint(tmp_path / "ck.safetensors")
    second.run()
    for n, a in t.params.theta.items():
        np.testing.assert_array_equal(second.params.theta[n], a, err_msg=n)


def test_exact_training_is_the_same_on_one_and_two_threads(tiny, tmp_path):
    import subprocess
    import sys
    code = ("import sys, numpy as np, edgepanel\n"
            "from edgepanel.tune import TuneConfig, ZOTrainer, data\n"
            f"m = edgepanel.load({str(tiny / 'm.ep')!r}, threads=int(sys.argv[1]))\n"
            f"ex = data.from_text(m.tokenizer, {TEXT!r}, 32)\n"
            "cfg = TuneConfig.for_objective(objective='nll', gradient='exact', steps=3, batch=2, eval_every=0, lr=3e-3)\n"
            "t = ZOTrainer(m, ex, cfg); t.run()\n"
            "np.savez(sys.argv[2], **{k.replace('.', '_'): v for k, v in t.params.theta.items()})\n")
    outs = []
    for n in (1, 2):
        env = dict(__import__("os").environ, OPENBLAS_NUM_THREADS=str(n), OMP_NUM_THREADS=str(n))
        subprocess.run([sys.executable, "-c", code, str(n), str(tmp_path / f"t{n}.npz")], check=True, env=env)
        outs.append(np.load(tmp_path / f"t{n}.npz"))
    assert outs[0].files
    for k in outs[0].files:
        np.testing.assert_array_equal(outs[0][k], outs[1][k], err_msg=k)


@pytest.mark.parametrize("opts,msg", [
    (dict(gradient="exact", objective="dpo"), "kd or nll"),
    (dict(gradient="adjoint"), "spsa or exact"),
])
def test_bad_exact_options_are_named(opts, msg):
    with pytest.raises(ValueError, match=msg):
        TuneConfig(**opts)


def test_exact_gradients_refuse_what_they_cannot_train(tiny):
    from edgepanel.tune.backprop import ExactGradient
    m = edgepanel.load(tiny / "m.ep")
    with pytest.raises(edgepanel.EdgepanelError, match="embeddings"):
        ExactGradient(m, Trainable(m, ("scales", "embeddings"), granularity="tensor"))
