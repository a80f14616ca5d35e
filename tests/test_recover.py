"""Scale tuning after binarization (convert/recover.py): its torch forward is the reference
forward, it lowers the KL to the float model on text it did not see, only scales change, and
without torch the conversion tunes by zeroth-order steps instead."""
import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from edgepanel import bits
from edgepanel.convert import Recipe, convert
from edgepanel.convert import calibrate as cal
from edgepanel.convert import recover
from edgepanel.convert.base import architecture_for
from edgepanel.convert.hf import open_hf
from edgepanel.errors import FormatError
from edgepanel.format import ModelFile
from edgepanel.model import reference as ref
from edgepanel.model.model import Model
from edgepanel.model.weights import Linear, load_weights

from hf_models import add_tokenizer, build

import torch  # noqa: E402  (a dev dependency: the tests need it)

ROOT = Path(__file__).resolve().parent.parent


def float_model(path, rotate=True):
    hf_arch, hf_cfg, src, _, _ = open_hf(path)
    a = architecture_for(hf_arch)
    fm = cal.FloatModel(a.config(hf_cfg), list(a.tensors(src, a.config(hf_cfg), hf_cfg)))
    if rotate:
        cal.rotate(fm, seed=1)
    return fm


@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("arch", ["llama", "llama3", "qwen2", "gpt2"])
def test_torch_forward_matches_the_reference(arch, fold, tmp_path):
    build(arch, tmp_path / "hf", seed=4)
    fm = float_model(tmp_path / "hf", rotate=cal.can_rotate(float_model(tmp_path / "hf", False).cfg))
    ids = np.array([5, 77, 3, 140, 9, 9, 250, 31, 2, 60], np.int32)
    w = cal.to_weights(fm)
    want = ref.forward(w, ids, ref.KVCache(w.cfg, len(ids)), all_logits=True)
    with torch.no_grad():
        tm = recover._TorchModel(torch, fm.cfg, fm, None, fold_rotation=fold)
        got = tm.logits(torch.from_numpy(ids.astype(np.int64))).numpy()
    assert (tm.rot is None) == (fold or fm.rotation is None)   # folded: no rotation left to apply
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_bfloat16_teacher_and_student_are_the_reference_to_their_rounding(arch, tmp_path):
    """tune_dtype bfloat16: the teacher's weights rounded once (the MLP rotation folded), the
    student's plane layers, Hadamard blocks and int8 head on bfloat16 operands; logits within 3%
    (relative norm) of the float computation, the head's table exactly the rounded int8 rows."""
    from edgepanel import quantize
    from edgepanel.model.weights import Rows
    build(arch, tmp_path / "hf", seed=4)
    fm = float_model(tmp_path / "hf", rotate=cal.can_rotate(float_model(tmp_path / "hf", False).cfg))
    ids = np.array([5, 77, 3, 140, 9, 9, 250, 31, 2, 60], np.int32)
    x = torch.from_numpy(ids.astype(np.int64))
    rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))  # noqa: E731
    w = cal.to_weights(fm)
    want = ref.forward(w, ids, ref.KVCache(w.cfg, len(ids)), all_logits=True)
    with torch.no_grad():
        teacher = recover._TorchModel(torch, fm.cfg, fm, None, fold_rotation=True, dtype=torch.bfloat16)
        assert all(lw.dtype == torch.bfloat16 for lw, _ in teacher.lin.values())
        got = teacher.logits(x).numpy()
    assert got.dtype == np.float32 and 0 < rel(got, want) < 3e-2
    fitted = {n: (quantize.fit_planes(e.weight, 2, 32), 0.0) for n, e in fm.t.items() if e.role == "linear"}
    for layer in w.layers:
        for n in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"):
            lin = getattr(layer, n)
            if lin is not None:   # GPT-2: no gate
                setattr(layer, n, Linear(lin.name, lin.out_features, lin.in_features,
                                         weight=fitted[lin.name][0].dequantize(), bias=lin.bias))
    for what in ("embed", "head"):
        if what in fm.t:
            q, s = quantize.int8_rows(fm.t[what].weight)
            setattr(w, what, Rows(what, *q.shape, weight=q.astype(np.float32) * s[:, None]))
    want = ref.forward(w, ids, ref.KVCache(w.cfg, len(ids)), all_logits=True)
    with torch.no_grad():
        student = recover._TorchModel(torch, fm.cfg, fm, fitted, dtype=torch.bfloat16)
        got = student.logits(x).numpy()
    assert 0 < rel(got, want) < 3e-2
    if student.head_q is not None:
        q, s = student.head_q
        assert torch.equal(student.head_w16, (q.float() * s[:, None]).to(torch.bfloat16))


def test_student_is_the_dequantized_model(tmp_path):
    """The binarized torch model computes with sum_i alpha_i B_i and the int8 embeddings/head."""
    from edgepanel import quantize
    from edgepanel.model.weights import Rows
    build("llama", tmp_path / "hf", seed=4)
    fm = float_model(tmp_path / "hf")
    fitted = {n: (quantize.fit_planes(e.weight, 2, 32), 0.0) for n, e in fm.t.items() if e.role == "linear"}
    w = cal.to_weights(fm)
    for layer in w.layers:
        for n in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"):
            lin = getattr(layer, n)
            setattr(layer, n, Linear(lin.name, lin.out_features, lin.in_features,
                                     weight=fitted[lin.name][0].dequantize(), bias=lin.bias))
    for what in ("embed", "head"):
        q, s = quantize.int8_rows(fm.t[what].weight)
        setattr(w, what, Rows(what, *q.shape, weight=q.astype(np.float32) * s[:, None]))
    ids = np.array([5, 77, 3, 140, 9, 9, 250, 31], np.int32)
    want = ref.forward(w, ids, ref.KVCache(w.cfg, len(ids)), all_logits=True)
    with torch.no_grad():
        got = recover._TorchModel(torch, fm.cfg, fm, fitted).logits(torch.from_numpy(ids.astype(np.int64))).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("arch, rotate", [("llama", True), ("llama3", False)])   # own head; tied
def test_student_reads_embeddings_and_head_held_as_plane_codes(arch, rotate, tmp_path):
    """Embeddings and head stored as planes: the student holds a byte a weight (the codes), reads
    the embedding rows a sequence needs and applies the head a block of rows at a time; its logits
    are the dequantized model's, and the scales' gradients those of sum_i S_i * alpha_i in float64."""
    from edgepanel import quantize
    from edgepanel.model.weights import Rows
    build(arch, tmp_path / "hf", seed=4)
    fm = float_model(tmp_path / "hf", rotate=rotate)
    names = [n for n in ("embed", "head") if n in fm.t]
    assert ("head" in names) == (arch == "llama")
    fitted = {n: (quantize.fit_planes(fm.t[n].weight, 3, 32), 0.0) for n in names}
    w = cal.to_weights(fm)
    for n, (pm, _) in fitted.items():
        setattr(w, n, Rows(n, pm.out_features, pm.in_features, weight=pm.dequantize()))
    ids = np.array([5, 77, 3, 140, 9, 9, 250, 31], np.int32)
    want = ref.forward(w, ids, ref.KVCache(w.cfg, len(ids)), all_logits=True)
    tm = recover._TorchModel(torch, fm.cfg, fm, fitted, rows=("k3", "k3"))
    assert all(tm.planes[n][1].dtype == torch.uint8 for n in names)
    got = tm.logits(torch.from_numpy(ids.astype(np.int64)))
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    # the head in blocks of 7 rows (several, the last one short) against the dense float64 product
    pm, codes, alpha0, _ = tm.planes[tm.head_name]
    alpha = alpha0.double().requires_grad_(True)
    tm.planes[tm.head_name] = (pm, codes, alpha, torch.ones((), dtype=torch.float64))
    tm.combos = {k: c.double() for k, c in tm.combos.items()}
    rng = np.random.default_rng(0)
    h = torch.from_numpy(rng.standard_normal((6, pm.in_features))).requires_grad_(True)
    gy = torch.from_numpy(rng.standard_normal((6, pm.out_features)))
    idx = torch.clamp(torch.arange(pm.in_features) // 32, max=pm.n_groups - 1)
    dense = h @ (torch.from_numpy(pm.signs().astype(np.float64)) * alpha[:, :, idx]).sum(0).T
    blocked = tm.planes_head(tm.head_name, h, block=7)
    torch.testing.assert_close(blocked, dense, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(blocked, (h, alpha), gy), torch.autograd.grad(dense, (h, alpha), gy)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_the_three_forward_passes_run_the_one_block(tmp_path, monkeypatch):
    """The reference forward, calibration and the torch forward (tuning, sensitivity) each run
    model.reference.block on their own arithmetic, every layer of it."""
    build("llama", tmp_path / "hf", seed=4)
    fm = float_model(tmp_path / "hf")
    calls, block = [], ref.block

    def counting(ops, cfg, i, x, positions):
        calls.append((type(ops).__name__, i))
        return block(ops, cfg, i, x, positions)

    monkeypatch.setattr(ref, "block", counting)
    ids = np.array([5, 77, 3, 140, 9, 9, 250, 31], np.int32)
    w = cal.to_weights(fm)
    ref.forward(w, ids, ref.KVCache(w.cfg, len(ids)))
    with torch.no_grad():
        recover._TorchModel(torch, fm.cfg, fm, None).logits(torch.from_numpy(ids.astype(np.int64)))
    cal._Run(fm, Recipe(planes=2, group=32), lambda m: None).run(ids.reshape(2, 4))
    layers = range(fm.cfg.n_layers)
    assert calls == [(ops, i) for ops in ("CacheOps", "_TorchModel", "_CalibOps") for i in layers]


def kl_to(fp: Model, m: Model, ids) -> float:
    def lp(z):
        z = z.astype(np.float64)
        z = z - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))
    p, q = lp(fp.logits(ids)), lp(m.logits(ids))
    return float((np.exp(p) * (p - q)).sum(1).mean())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tuning_lowers_the_kl_on_unseen_text_and_changes_only_scales(dtype, tmp_path):
    build("llama", tmp_path / "hf", seed=5, std=0.15)   # sharp enough distributions to matter
    add_tokenizer(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "fp.ep", Recipe(passthrough=True))
    base = dict(planes=1, group=32, calib_tokens=2048, seq_len=64)
    convert(tmp_path / "hf", tmp_path / "plain.ep", Recipe(**base, tune_steps=0))
    rep = convert(tmp_path / "hf", tmp_path / "tuned.ep", Recipe(**base, tune_steps=40, tune_lr=1e-2, tune_dtype=dtype))
    assert rep.tuning["kl_after"] < rep.tuning["kl_before"]
    assert "scale tuning: 40 steps" in rep.table()
    fp = Model(tmp_path / "fp.ep")
    ids = fp.tokenizer.encode("the dog barked at a small red bird and then the cat ran home.")
    assert kl_to(fp, Model(tmp_path / "tuned.ep"), ids) < kl_to(fp, Model(tmp_path / "plain.ep"), ids)
    a, b = load_weights(ModelFile(tmp_path / "plain.ep")), load_weights(ModelFile(tmp_path / "tuned.ep"))
    changed = 0
    for la, lb in zip(a.linears(), b.linears()):
        np.testing.assert_array_equal(la.planes.planes, lb.planes.planes)
        changed += not np.array_equal(la.planes.scales, lb.planes.scales)
    assert changed == len(list(a.linears()))
    recipe = ModelFile(tmp_path / "tuned.ep").meta.recipe
    assert recipe["tune_steps"] == 40
    assert recipe.get("tune_dtype", "float32") == dtype   # recorded when not float32


@pytest.mark.parametrize("tune, tag", [("auto", "-tune30np0.001"), ("zo", "-tune30zo")])
def test_without_torch_conversion_tunes_in_numpy_or_by_zeroth_order_steps(tmp_path, monkeypatch, tune, tag):
    """No torch: --tune auto tunes the scales by first-order kd steps in NumPy (tune/backprop.py),
    --tune zo by zeroth-order kd on the C engine (edgepanel.tune); --tune fo is a clear error."""
    build("llama", tmp_path / "hf", seed=5, std=0.15)     # peaked outputs: a KL worth lowering
    add_tokenizer(tmp_path / "hf")
    monkeypatch.setattr(recover, "available", lambda: False)
    logs = []
    recipe = Recipe(planes=2, group=32, calib_tokens=1024, seq_len=64, tune_steps=30, tune=tune)
    method = "numpy" if tune == "auto" else tune
    assert recipe.tune_method() == method and recipe.tag().endswith(tag)
    rep = convert(tmp_path / "hf", tmp_path / "t.ep", recipe, log=logs.append)
    assert rep.tuning["method"] == method and rep.tuning["steps"] == 30
    assert rep.tuning["kl_after"] < rep.tuning["kl_before"] * (0.9 if method == "numpy" else 1.0), rep.tuning
    assert any(f"scale tuning ({method})" in m for m in logs)
    f = ModelFile(tmp_path / "t.ep")
    assert f.meta.recipe["tune"] == method and f.meta.history[-1]["zo_tune"]["steps"] == 30
    assert f.meta.history[-1]["zo_tune"]["gradient"] == ("exact" if method == "numpy" else "spsa")
    plain = convert(tmp_path / "hf", tmp_path / "p.ep", Recipe(planes=2, group=32, calib_tokens=1024, seq_len=64,
                                                                  tune_steps=0))
    assert plain.tuning is None
    a, b = load_weights(ModelFile(tmp_path / "p.ep")), load_weights(f)
    for la, lb in zip(a.linears(), b.linears()):
        np.testing.assert_array_equal(la.planes.planes, lb.planes.planes)   # signs kept
    assert any(not np.array_equal(la.planes.scales, lb.planes.scales) for la, lb in zip(a.linears(), b.linears()))
    with pytest.raises(FormatError, match="needs torch"):
        convert(tmp_path / "hf", tmp_path / "x.ep", dataclasses.replace(recipe, tune="fo"))


@pytest.mark.parametrize("granularity, shared", [("row", (2,)), ("column", (1,)), ("tensor", (1, 2))])
def test_coarser_tuning_moves_scales_by_one_multiplier_per_row_column_or_plane(granularity, shared, tmp_path):
    """--tune-granularity: the tuned scales are the untuned ones times one multiplier per (row,
    plane), per (plane, group of inputs) or per plane: their ratio is constant along the shared
    axes of (plane, row, group) and moves along the others; the KL still falls; the recipe says so."""
    build("llama", tmp_path / "hf", seed=5, std=0.15)
    add_tokenizer(tmp_path / "hf")
    base = dict(planes=2, group=32, calib_tokens=1024, seq_len=64)
    convert(tmp_path / "hf", tmp_path / "plain.ep", Recipe(**base, tune_steps=0))
    recipe = Recipe(**base, tune_steps=12, tune_lr=1e-2, tune_granularity=granularity)
    assert recipe.tag().endswith("-" + granularity)
    rep = convert(tmp_path / "hf", tmp_path / "t.ep", recipe)
    assert rep.tuning["kl_after"] < rep.tuning["kl_before"]
    f = ModelFile(tmp_path / "t.ep")
    assert f.meta.recipe["tune_granularity"] == granularity
    a, b = load_weights(ModelFile(tmp_path / "plain.ep")), load_weights(f)
    moved = 0.0
    for la, lb in zip(a.linears(), b.linears()):
        np.testing.assert_array_equal(la.planes.planes, lb.planes.planes)
        r = lb.planes.alpha().astype(np.float64) / la.planes.alpha()       # (k, out, ng), float16 scales
        assert r.shape[2] > 1 and r.shape[1] > 1
        mean = r.mean(axis=shared, keepdims=True)
        np.testing.assert_allclose(r, np.broadcast_to(mean, r.shape), rtol=2e-3)
        moved = max(moved, float(np.abs(r - 1).max()))
        if granularity != "tensor":   # the unshared axis carries different multipliers
            other = {(2,): 1, (1,): 2}[shared]
            assert np.ptp(mean, axis=other).max() > 1e-3
    assert moved > 1e-3
    # tools/scale_multipliers.py reads the same structure back from the two files
    spec = importlib.util.spec_from_file_location("_scale_multipliers", ROOT / "tools" / "scale_multipliers.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    summary = tool.summarize(tmp_path / "plain.ep", tmp_path / "t.ep")
    if granularity == "tensor":
        assert summary["tensor_plane_mean_share"] > 0.99 and summary["within_sd_median"] < 2e-3
    elif granularity == "row":
        assert summary["within_sd_median"] > 1e-3


def test_tuning_granularity_is_checked_and_kept_out_of_default_files():
    assert "tune_granularity" not in Recipe(tune_steps=5).to_dict()
    assert Recipe(tune_steps=5).tag() == dataclasses.replace(Recipe(tune_steps=5), tune_granularity="group").tag()
    with pytest.raises(ValueError, match="tune_granularity must be one of"):
        Recipe(tune_granularity="rows")
    with pytest.raises(ValueError, match="first-order"):
        Recipe(tune="zo", tune_granularity="row")
    with pytest.raises(ValueError, match="numpy trains group, row or tensor"):
        Recipe(tune="numpy", tune_granularity="column")
    with pytest.raises(ValueError, match="auto, fo, numpy or zo"):
        Recipe(tune="adam")
    with pytest.raises(ValueError, match="granularity must be one of"):
        recover.mult_shape("plane", (2, 8, 3))


@pytest.mark.parametrize("bad", [dict(tune_steps=-1), dict(tune_steps=2.5), dict(tune_lr=0.0)])
def test_bad_tuning_options(bad):
    with pytest.raises(ValueError, match="tune_"):
        Recipe(**bad)


@pytest.mark.parametrize("out, n_in, k, g", [(17, 70, 4, 32), (33, 130, 3, 64), (16, 40, 1, 0), (5, 300, 2, 256)])
def test_level_codes_are_the_planes_signs(out, n_in, k, g):
    """bits.level_codes reads the packed bits: each weight's code has bit k-1-i set where plane i is +1,
    the padding of the last group code 0."""
    from edgepanel import quantize
    w = np.random.default_rng(out).standard_normal((out, n_in)).astype(np.float32)
    pm = quantize.fit_planes(w, k, g or n_in, als_iters=1)
    codes = bits.level_codes(pm)
    gs = n_in if pm.n_groups == 1 else g
    assert codes.dtype == np.uint8 and codes.shape == (out, pm.n_groups, gs)
    flat = codes.reshape(out, -1)
    want = sum((pm.signs()[i] > 0).astype(np.int64) << (k - 1 - i) for i in range(k))
    np.testing.assert_array_equal(flat[:, :n_in], want)
    assert not flat[:, n_in:].any()


@pytest.mark.parametrize("shape", [(40, 96, 3, 32), (17, 70, 2, 32), (16, 64, 4, 64), (33, 128, 1, 64)])
def test_plane_linear_gradients_equal_the_dense_formulation(shape):
    """The coded plane layer (one gather forward, one scatter-add backward) against autograd
    through sum_i S_i * alpha_i in float64: outputs equal, gradients pass gradcheck."""
    from edgepanel import quantize
    out, n_in, k, g = shape
    rng = np.random.default_rng(out)
    pm = quantize.fit_planes(rng.standard_normal((out, n_in)).astype(np.float32), k, g, als_iters=1)
    codes = torch.from_numpy(bits.level_codes(pm))
    combos = torch.from_numpy(bits.level_signs(k)).double()
    fn = recover.plane_linear(torch)
    alpha = torch.from_numpy(pm.alpha().astype(np.float64)).requires_grad_(True)
    x = torch.from_numpy(rng.standard_normal((5, n_in))).requires_grad_(True)
    gs = n_in if pm.n_groups == 1 else g
    idx = torch.clamp(torch.arange(n_in) // gs, max=pm.n_groups - 1)
    S = torch.from_numpy(pm.signs().astype(np.float64))
    want = x @ (S * alpha[:, :, idx]).sum(0).T
    got = fn.apply(x, alpha, codes, combos, n_in)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    gy = torch.from_numpy(rng.standard_normal(got.shape))
    g_got = torch.autograd.grad(got, (x, alpha), gy)
    g_want = torch.autograd.grad(want, (x, alpha), gy)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradcheck(lambda x, a: fn.apply(x, a, codes, combos, n_in), (x, alpha))


def _plane_case(shape):
    from edgepanel import quantize
    out, n_in, k, g = shape
    rng = np.random.default_rng(out + n_in)
    pm = quantize.fit_planes(rng.standard_normal((out, n_in)).astype(np.float32), k, g, als_iters=1)
    alpha = torch.from_numpy(pm.alpha().astype(np.float32))
    x = torch.from_numpy(rng.standard_normal((2, 7, n_in)).astype(np.float32))
    gy = torch.from_numpy(rng.standard_normal((2, 7, out)).astype(np.float32))
    return pm, torch.from_numpy(bits.level_codes(pm)), torch.from_numpy(bits.level_signs(k)), alpha, x, gy


def _plane_run(fn, x, alpha, codes, combos, n_in, gy):
    x, alpha = x.clone().requires_grad_(True), alpha.clone().requires_grad_(True)
    y = fn.apply(x, alpha, codes, combos, n_in)
    return (y, *torch.autograd.grad(y, (x, alpha), gy))


@pytest.mark.skipif(not recover.quantize.native_chosen(), reason="the C kernels are not built")
@pytest.mark.parametrize("shape", [(40, 96, 3, 32), (17, 70, 2, 32), (16, 64, 4, 64), (33, 128, 1, 64), (9, 40, 4, 64)])
def test_plane_linear_in_c_equals_torchs_gather_and_scatter(shape, monkeypatch):
    """The C gather (plane_weights) and signed sums (plane_grads) against torch's gather and
    scatter-add, float32: the same output and input gradient bit for bit, the scales' gradient to
    float32 rounding (the sums' order differs)."""
    pm, codes, combos, alpha, x, gy = _plane_case(shape)
    got = _plane_run(recover.plane_linear(torch), x, alpha, codes, combos, pm.in_features, gy)
    monkeypatch.setattr(recover.quantize, "native_chosen", lambda: False)
    want = _plane_run(recover.plane_linear(torch), x, alpha, codes, combos, pm.in_features, gy)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-5 * float(want[2].abs().max()))


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("shape", [(40, 96, 3, 32), (16, 64, 4, 64)])
def test_plane_linear_in_bfloat16_is_the_float64_layer_to_its_rounding(shape, native, monkeypatch):
    """tune_dtype bfloat16: operands rounded to 8 significant bits, float32 sums; each result
    within 2% (relative norm) of the float64 computation, and W is the rounded float32 W."""
    if native and not recover.quantize.native_chosen():
        pytest.skip("the C kernels are not built")
    monkeypatch.setattr(recover.quantize, "native_chosen", lambda: native)
    pm, codes, combos, alpha, x, gy = _plane_case(shape)
    fn16 = recover.plane_linear(torch, torch.bfloat16)
    got = _plane_run(fn16, x, alpha, codes, combos, pm.in_features, gy)
    want = _plane_run(recover.plane_linear(torch), x.double(), alpha.double(), codes, combos.double(),
                      pm.in_features, gy.double())
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        assert float((a.detach().double() - b.detach()).norm() / b.detach().norm()) < 2e-2
    w32 = recover.plane_linear(torch).built(alpha, codes, combos, pm.in_features)
    w16 = fn16.built(alpha, codes, combos, pm.in_features)
    assert w16.dtype == torch.bfloat16 and torch.equal(w16, w32.to(torch.bfloat16))


@pytest.mark.skipif(not recover.quantize.native_chosen(), reason="the C kernels are not built")
def test_plane_kernels_check_their_arguments():
    from edgepanel.kernels import native
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 8, (5, 3, 32)).astype(np.uint8)
    levels = rng.standard_normal((5, 3, 8)).astype(np.float32)
    want = np.take_along_axis(levels, codes.astype(np.int64), 2).reshape(5, 96)[:, :70]
    np.testing.assert_array_equal(native.plane_weights(levels, codes, 70), want)
    l16 = rng.integers(-2**15, 2**15, (5, 3, 8)).astype(np.int16)   # 16-bit values: copied as bits
    np.testing.assert_array_equal(native.plane_weights(l16, codes, 70),
                                  np.take_along_axis(l16, codes.astype(np.int64), 2).reshape(5, 96)[:, :70])
    gw = rng.standard_normal((5, 70)).astype(np.float32)
    bad = codes.copy()
    bad[4, 2, 5] = 8                                   # a code past 2^k
    with pytest.raises(ValueError, match="level code is >= 2"):
        native.plane_weights(levels, bad, 70)
    with pytest.raises(ValueError, match="level code is >= 2"):
        native.plane_grads(gw, bad, 3)
    bad[4, 2, 5] = 0
    bad[4, 2, 31] = 200                                # past n_in: padding, never read
    native.plane_weights(levels, bad, 70)
    with pytest.raises(ValueError, match="does not fit"):
        native.plane_weights(levels, codes, 97)
    with pytest.raises(ValueError, match="does not fit"):
        native.plane_weights(levels, codes, 60)        # the last group would be empty
    with pytest.raises(ValueError, match="levels must have shape"):
        native.plane_weights(np.ascontiguousarray(levels[:, :2]), codes, 70)
    with pytest.raises(TypeError, match="float32 or int16"):
        native.plane_weights(levels.astype(np.float64), codes, 70)
    with pytest.raises(ValueError, match="rows"):
        native.plane_grads(gw[:4], codes, 3)
    with pytest.raises(ValueError, match="k must be"):
        native.plane_grads(gw, codes, 9)
    with pytest.raises(TypeError):
        native.plane_grads(gw.astype(np.float64), codes, 3)
    with pytest.raises(ValueError, match="isa 'sse9'"):
        native.plane_grads(gw, codes, 3, isa="sse9")


def _lane_sums(gw, codes, k, n_in):
    """plane_grads' arithmetic written out in float32: a group's column j in lane j % 8, the
    lanes added pairwise."""
    out, ng, gs = codes.shape
    signs = bits.level_signs(k)
    ga = np.zeros((k, out, ng), np.float32)
    for o in range(out):
        for g in range(ng):
            cols = range(g * gs, min((g + 1) * gs, n_in))
            for i in range(k):
                lane = [np.float32(0)] * 8
                for j, c in enumerate(cols):
                    lane[j % 8] = np.float32(lane[j % 8] + np.float32(signs[codes[o, g, c - g * gs], i] * gw[o, c]))
                a = lane
                ga[i, o, g] = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]))
    return ga


@pytest.mark.skipif(not recover.quantize.native_chosen(), reason="the C kernels are not built")
@pytest.mark.parametrize("out, n_in, k, gs", [(5, 70, 3, 32), (7, 64, 4, 64), (3, 21, 1, 21), (4, 40, 8, 16),
                                             (6, 100, 2, 64)])
def test_plane_grads_are_each_planes_signed_sums(out, n_in, k, gs):
    """The scales' gradient from d W: each plane's signed sum over a group, against the float64
    sum to float32 rounding, bit for bit the documented lane order (groups shorter than a lane
    round, a last partial group, k = 1 and 8) on every kernel table this CPU runs, and the same on
    one thread as on several."""
    from edgepanel.kernels import native
    rng = np.random.default_rng(out * n_in + k)
    ng = -(-n_in // gs)
    codes = rng.integers(0, 2 ** k, (out, ng, gs)).astype(np.uint8)
    gw = rng.standard_normal((out, n_in)).astype(np.float32)
    got = native.plane_grads(gw, codes, k)
    signs = bits.level_signs(k).astype(np.float64)
    flat = codes.reshape(out, ng * gs)[:, :n_in]
    want = np.zeros((k, out, ng))
    for i in range(k):
        want[i] = np.add.reduceat(signs[flat, i] * gw.astype(np.float64), np.arange(0, n_in, gs), axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    np.testing.assert_array_equal(got, _lane_sums(gw, codes, k, n_in))
    for isa in native.runnable_isas():
        np.testing.assert_array_equal(got, native.plane_grads(gw, codes, k, isa=isa), err_msg=isa)
    np.testing.assert_array_equal(got, native.plane_grads(gw, codes, k, threads=1))
    np.testing.assert_array_equal(got, native.plane_grads(gw, codes, k, threads=3))


def test_tune_dtype_is_checked_and_auto_follows_the_cpu(tmp_path, monkeypatch):
    from edgepanel import kernels
    with pytest.raises(ValueError, match="tune_dtype must be"):
        Recipe(tune_dtype="float16")
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n")
    assert kernels.cpu_bf16(str(info))
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n")
    assert not kernels.cpu_bf16(str(info))
    assert not kernels.cpu_bf16(str(tmp_path / "absent"))
    for has, want in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(kernels, "cpu_bf16", lambda: has)
        r = Recipe(tune_steps=5)
        assert r.matmul_dtype() == want and Recipe(tune_steps=5, tune_dtype="float32").matmul_dtype() == "float32"
        if recover.available():
            assert r.to_dict().get("tune_dtype", "float32") == want
        assert r.tag() == Recipe(tune_steps=5, tune_dtype="float32").tag()   # one cached default model


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("stage, after", [("calib", 1), ("tune", 2)])
def test_an_interrupted_conversion_resumes_to_the_same_file(stage, after, tmp_path, monkeypatch):
    """A conversion killed after a calibration or tuning checkpoint, run again, resumes there
    (counted: it does not fit or tune from the start) and writes the file an uninterrupted run
    writes, byte for byte; the checkpoint directory is gone afterwards."""
    from edgepanel.convert import checkpoint
    build("llama", tmp_path / "hf", seed=5)
    add_tokenizer(tmp_path / "hf")
    recipe = Recipe(planes=2, group=32, calib_tokens=1024, seq_len=64, tune_steps=6, tune_lr=1e-2)
    convert(tmp_path / "hf", tmp_path / "whole.ep", recipe)
    monkeypatch.setattr(checkpoint, "EVERY", 0.0)
    saves = []
    real_save = checkpoint.WorkDir.save

    def save_then_die(self, name, tensors, state):
        real_save(self, name, tensors, state)
        saves.append(name)
        if saves.count(stage) == after:
            raise _Interrupt
    monkeypatch.setattr(checkpoint.WorkDir, "save", save_then_die)
    with pytest.raises(_Interrupt):
        convert(tmp_path / "hf", tmp_path / "resumed.ep", recipe)
    assert not (tmp_path / "resumed.ep").exists() and (tmp_path / "resumed.ep.work").is_dir()
    monkeypatch.setattr(checkpoint.WorkDir, "save", real_save)
    fits, steps = [], []
    real_fit, real_adam = cal._Run.fit, torch.optim.Adam.step
    monkeypatch.setattr(cal._Run, "fit", lambda self, *a, **k: fits.append(1) or real_fit(self, *a, **k))
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, *a, **k: steps.append(1) or real_adam(self, *a, **k))
    log = []
    convert(tmp_path / "hf", tmp_path / "resumed.ep", recipe, log=log.append)
    assert any("resumed" in m for m in log), log
    n_linear = 2 * 7   # the tiny llama: 2 layers of 7 linear layers
    if stage == "calib":
        assert 0 < len(fits) < n_linear and len(steps) == 6
    else:
        assert fits == [] and len(steps) == 6 - after
    assert (tmp_path / "resumed.ep").read_bytes() == (tmp_path / "whole.ep").read_bytes()
    assert not (tmp_path / "resumed.ep.work").exists()


def test_a_checkpoint_of_another_recipe_is_not_resumed(tmp_path, monkeypatch):
    from edgepanel.convert import checkpoint
    build("llama", tmp_path / "hf", seed=5)
    add_tokenizer(tmp_path / "hf")
    recipe = Recipe(planes=2, group=32, calib_tokens=1024, seq_len=64, tune_steps=4, tune_lr=1e-2)
    monkeypatch.setattr(checkpoint, "EVERY", 0.0)
    real_save = checkpoint.WorkDir.save

    def die(self, name, tensors, state):
        real_save(self, name, tensors, state)
        raise _Interrupt
    monkeypatch.setattr(checkpoint.WorkDir, "save", die)
    with pytest.raises(_Interrupt):
        convert(tmp_path / "hf", tmp_path / "m.ep", recipe)
    monkeypatch.setattr(checkpoint.WorkDir, "save", real_save)
    log = []
    convert(tmp_path / "hf", tmp_path / "m.ep", dataclasses.replace(recipe, planes=3), log=log.append)
    assert any("another conversion" in m for m in log) and not any("resumed" in m for m in log)
    assert ModelFile(tmp_path / "m.ep").meta.recipe["planes"] == 3


def test_topk_kl_is_the_coarsened_kl():
    """topk_kl against float64 NumPy: with every token kept it is the full KL; with k of them it
    is the KL of the distributions coarsened to those k and one outcome for the rest, never above
    the full KL."""
    rng = np.random.default_rng(0)
    zt, zs = rng.standard_normal((6, 50)) * 3, rng.standard_normal((6, 50)) * 3
    lp = lambda z: z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)  # noqa: E731
    p, q = lp(zt), lp(zs)
    full = float((np.exp(p) * (p - q)).sum(-1).mean())
    logits = torch.from_numpy(zs)
    for k in (50, 8):
        class T:
            def logits(self, ids):
                return torch.from_numpy(zt)
        target = recover.teacher_targets(torch, T(), np.zeros(6, np.int32), k)
        target = tuple(t.double() if t.is_floating_point() else t for t in target)
        got = float(recover.topk_kl(torch, target, logits))
        if k == 50:
            assert abs(got - full) < 1e-5 * full
        else:
            idx = np.argsort(-p, axis=1)[:, :k]
            pk, qk = np.take_along_axis(p, idx, 1), np.take_along_axis(q, idx, 1)
            pr, qr = np.log1p(-np.exp(pk).sum(1)), np.log1p(-np.exp(qk).sum(1))
            want = (np.exp(pk) * (pk - qk)).sum(1) + np.exp(pr) * (pr - qr)
            np.testing.assert_allclose(got, want.mean(), rtol=1e-5)
            assert got < full


def test_teacher_targets_keep_the_rest_when_the_top_holds_nearly_all():
    """The rest's log-mass is summed over the other tokens, not taken as log(1 - top mass): exact
    (to float32) against float64 even where the top k hold all but 1e-10 of the mass, where
    1 - top mass in float32 would be 0 or noise."""
    rng = np.random.default_rng(1)
    z = rng.standard_normal((5, 300)) * 2
    z[:, :4] += np.array([[30.0], [20.0], [10.0], [3.0], [0.0]])   # from almost all mass to little
    z32 = z.astype(np.float32)

    class T:
        def logits(self, ids):
            return torch.from_numpy(z32.copy())
    ids, top, rest = recover.teacher_targets(torch, T(), np.zeros(5, np.int32), 4)
    zd = z32.astype(np.float64)
    lse = np.log(np.exp(zd - zd.max(1, keepdims=True)).sum(1)) + zd.max(1)
    want_ids = np.argsort(-zd, axis=1)[:, :4]
    assert np.array_equal(np.sort(ids.numpy(), 1), np.sort(want_ids, 1))
    np.testing.assert_allclose(top.numpy(), np.take_along_axis(zd, ids.numpy(), 1) - lse[:, None], atol=2e-5)
    others = np.ones_like(zd, bool)
    np.put_along_axis(others, want_ids, False, 1)
    want_rest = np.array([np.log(np.exp(zd[i, others[i]] - lse[i]).sum()) for i in range(5)])
    assert want_rest[0] < -24   # the top 4 hold all but e^-24 of the mass
    np.testing.assert_allclose(rest.numpy(), want_rest, rtol=1e-5)


def test_sensitivity_h_is_the_mean_input_outer_product_shared_by_readers(tmp_path):
    """recover.sensitivity's H per linear layer is mean(x x^T) over the layer's inputs: checked in
    float64 against the inputs the reference forward (calibration's arithmetic) feeds each layer.
    Layers reading one input (q, k, v; gate, up) share one array, and `reduce` replaces each
    distinct H by what it returns, once per input."""
    build("llama", tmp_path / "hf", seed=6)
    fm = float_model(tmp_path / "hf")
    tokens = np.random.default_rng(0).integers(0, fm.cfg.vocab_size, (2, 12)).astype(np.int32)
    stats = recover.sensitivity(fm, tokens)
    ops, positions, x = cal._Run(fm, Recipe(planes=2, group=32), lambda m: None).stream(tokens, fit=False)
    inputs = {}
    for i in range(fm.cfg.n_layers):
        ops.acts = {}
        x = ref.block(ops, fm.cfg, i, x, positions)
        inputs.update(ops.acts)
    assert set(inputs) <= set(stats)
    for name, xin in inputs.items():
        xd = xin.astype(np.float64)
        want = xd.T @ xd / len(xd)
        f, h = stats[name]
        assert h.dtype == np.float64 and f.shape == (fm.t[name].weight.shape[0],) and np.all(f >= 0)
        np.testing.assert_allclose(h, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    # f: the mean squared output gradient, against gradients retained on every output (float64 sums)
    class Retain:
        def __init__(self):
            self.ys = {}

        def layer(self, name, x, y):
            y.retain_grad()
            self.ys[name] = y

    model, sums = recover._TorchModel(torch, fm.cfg, fm, None), {}
    for seq in tokens:
        seq = torch.from_numpy(seq.astype(np.int64))
        model.record = Retain()
        torch.nn.functional.cross_entropy(model.logits(seq)[:-1], seq[1:], reduction="sum").backward()
        for name, y in model.record.ys.items():
            sums[name] = sums.get(name, 0) + (y.grad.double() ** 2).sum(0).numpy()
    assert set(sums) == set(stats)
    for name, total in sums.items():
        np.testing.assert_allclose(stats[name][0], total / tokens.size, rtol=1e-4, atol=1e-12)
    layer0 = [n for n in inputs if n.startswith(next(iter(inputs)).rsplit(".", 1)[0] + ".")]
    by_input = {}
    for n in layer0:
        by_input.setdefault(id(inputs[n]), []).append(n)
    shared = [names for names in by_input.values() if len(names) > 1]
    assert shared, "q, k and v read one input"
    for names in shared:
        assert all(stats[n][1] is stats[names[0]][1] for n in names)
    calls = []

    def trace(h):
        calls.append(h.shape)
        return np.diag(h).copy()

    reduced = recover.sensitivity(fm, tokens, reduce=trace)
    distinct = {id(stats[n][1]) for n in stats if n != "embed"}
    assert len(calls) == len(distinct)
    for n in stats:
        if n != "embed":
            np.testing.assert_array_equal(reduced[n][1], np.diag(stats[n][1]))
            np.testing.assert_array_equal(reduced[n][0], stats[n][0])


@pytest.mark.parametrize("vocab, block", [(50, 16), (48, 16), (10, 64)])
def test_int8_head_is_the_widened_table_in_float64(vocab, block):
    """The int8 head, widened a block of rows at a time into one reused buffer: logits and the
    hidden states' gradient are those of (q * scale) in float64, the last block a partial one, and
    a second call (the buffer holding the previous rows) gives the same."""
    from edgepanel import quantize
    rng = np.random.default_rng(vocab + block)
    q, s = quantize.int8_rows(rng.standard_normal((vocab, 24)).astype(np.float32))
    q, s = torch.from_numpy(q), torch.from_numpy(s)
    fn = recover.int8_head(torch, block=block)
    w64 = q.double() * s.double()[:, None]
    h = torch.from_numpy(rng.standard_normal((2, 5, 24)).astype(np.float32))
    gy = torch.from_numpy(rng.standard_normal((2, 5, vocab)).astype(np.float32))
    runs = []
    for _ in range(2):
        hh = h.clone().requires_grad_(True)
        y = fn.apply(hh, q, s)
        (gh,) = torch.autograd.grad(y, (hh,), gy)
        runs.append((y.detach(), gh))
    torch.testing.assert_close(runs[0][0].double(), h.double() @ w64.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(runs[0][1].double(), gy.double() @ w64, rtol=1e-5, atol=1e-5)
    assert runs[0][1].shape == h.shape
    for a, b in zip(*runs):
        assert torch.equal(a, b)
