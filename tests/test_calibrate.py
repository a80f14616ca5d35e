"""Calibration-aware binarization: each fitting step helps on real inputs, the rotation is exact,
ternary checkpoints stay exact."""
import json

import numpy as np
import pytest

from edgepanel import bits, quantize
from edgepanel.convert import Recipe, convert
from edgepanel.convert import calibrate as cal
from edgepanel.convert.base import architecture_for
from edgepanel.convert.hf import open_hf
from edgepanel.model import reference as ref
from edgepanel.model.model import Model

from hf_models import add_tokenizer, build


def correlated_layer(seed=0, n_in=256, n_out=96, n=2048):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 24)) @ rng.standard_normal((24, n_in)) + 0.3 * rng.standard_normal((n, n_in))
    x[:, :4] *= 8  # a few outlier inputs, as in real activations
    w = rng.standard_normal((n_out, n_in)).astype(np.float32)
    x = x.astype(np.float32)
    return w, (x.T @ x).astype(np.float64)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("group", [32, 64])
def test_each_fitting_step_lowers_the_error_on_calibration_inputs(k, group):
    w, h = correlated_layer(seed=k)
    s, a = quantize.greedy_planes(w, k, group)
    steps = [bits.PlaneMatrix.from_signs(s, a, group)]                     # greedy residual
    steps.append(quantize.fit_planes(w, k, group))                        # + alternating LS
    steps.append(quantize.gptq_planes(w, h, k, group, refit=False))       # + error feedback
    steps.append(quantize.refit_scales(w, steps[-1], h))                  # + joint scale refit
    errs = [quantize.weighted_error(w, p, h) for p in steps]
    if k == 1:  # one plane: sign and mean |w| are already the least-squares fit; ALS keeps them
        assert errs[1] <= errs[0] * (1 + 1e-6), errs
    else:
        assert errs[1] < errs[0], errs
    assert errs[2] < errs[1] and errs[3] < errs[2], errs


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("group", [32, 64, 256])
def test_act_order_helps_when_a_few_inputs_dominate(k, group):
    """Act-order (columns by decreasing diag(H), groups still the contiguous ones the kernels
    read) rounds the outlier inputs first, while the most columns remain to absorb their error:
    on such a layer its error is lower.  (On SmolLM2, rotated, it measured worse: README.)"""
    w, h = correlated_layer(seed=k)
    plain = quantize.gptq_planes(w, h, k, group, refit=False)
    ordered = quantize.gptq_planes(w, h, k, group, refit=False, act_order=True)
    assert ordered.group == plain.group and ordered.planes.shape == plain.planes.shape
    assert quantize.weighted_error(w, ordered, h) < quantize.weighted_error(w, plain, h)


@pytest.mark.parametrize("arch", ["llama", "llama3", "qwen2", "mistral"])
def test_rotation_is_exact(arch, tmp_path):
    build(arch, tmp_path / "hf")
    hf_arch, hf_cfg, src, _, _ = open_hf(tmp_path / "hf")
    a = architecture_for(hf_arch)
    ids = np.array([3, 17, 99, 150, 7, 42, 200, 5], np.int32)

    def logits(rotated):
        fm = cal.FloatModel(a.config(hf_cfg), list(a.tensors(open_hf(tmp_path / "hf")[2], a.config(hf_cfg), hf_cfg)))
        if rotated:
            cal.rotate(fm, seed=3)
        w = cal.to_weights(fm)
        return ref.forward(w, ids, ref.KVCache(w.cfg, len(ids)), all_logits=True)

    plain, rot = logits(False), logits(True)
    assert np.abs(rot - plain).max() <= 1e-5 * np.abs(plain).max() + 1e-6


def test_calibrated_conversion_beats_data_free(tmp_path):
    """On a tiny model, calibrated + rotated k=2 is closer to the float model than data-free k=2."""
    from edgepanel.model.model import Model
    build("llama", tmp_path / "hf", seed=5)
    add_tokenizer(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "fp.ep", Recipe(passthrough=True))
    convert(tmp_path / "hf", tmp_path / "free.ep", Recipe(planes=2, group=32, calib=None))
    rep = convert(tmp_path / "hf", tmp_path / "cal.ep", Recipe(planes=2, group=32, calib_tokens=2048, seq_len=64))
    assert any(r.calibrated for r in rep.rows)
    fp = Model(tmp_path / "fp.ep")
    text = "once upon a time there was a dog. the cat sat on the mat."
    ids = fp.tokenizer.encode(text)
    target = fp.logits(ids)

    def kl(m):
        lp = lambda z: z - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)) - z.max(1, keepdims=True)  # noqa: E731
        p, q = lp(target.astype(np.float64)), lp(m.logits(ids).astype(np.float64))
        return float((np.exp(p) * (p - q)).sum(1).mean())

    assert kl(Model(tmp_path / "cal.ep")) < kl(Model(tmp_path / "free.ep"))


def test_ternary_checkpoints_convert_exactly(tmp_path):
    import torch
    from safetensors.torch import save_file
    from transformers.integrations.bitnet import pack_weights

    model = build("bitnet", tmp_path / "hf", ternary=True)
    # a packed checkpoint as the BitNet quantizer writes it: uint8 weights + weight_scale
    packed_dir = tmp_path / "packed"
    packed_dir.mkdir()
    sd, expect = {}, {}
    for name, p in model.state_dict().items():
        if p.ndim == 2 and "embed" not in name and "lm_head" not in name:
            a = p.abs().max()
            t = torch.round(p / a).clamp(-1, 1)
            sd[name] = pack_weights(t.to(torch.int8).clone())  # it adds the +1 offset itself
            sd[name.replace(".weight", ".weight_scale")] = torch.tensor([1.0 / float(a)])
            expect[name] = (t * a).float().numpy()
        else:
            sd[name] = p.contiguous()
    save_file(sd, str(packed_dir / "model.safetensors"))
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitnet", "linear_class": "bitlinear"}
    (packed_dir / "config.json").write_text(json.dumps(cfg))
    from edgepanel.format import ModelFile
    from edgepanel.model.weights import load_weights
    for d, name in ((tmp_path / "hf", "float.ep"), (packed_dir, "packed.ep")):
        convert(d, tmp_path / name, Recipe(calib=None))
        w = load_weights(ModelFile(tmp_path / name))
        for lin in w.linears():
            assert lin.planes.k == 2
            hf_name = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
                       "wo": "self_attn.o_proj", "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj",
                       "w_down": "mlp.down_proj"}[lin.name.split(".")[-1]]
            key = f"model.layers.{lin.name.split('.')[1]}.{hf_name}.weight"
            want = expect[key] if d == packed_dir else model.state_dict()[key].float().numpy()
            np.testing.assert_allclose(lin.planes.dequantize(), want, rtol=1e-3, atol=1e-7)


def _budget_used(path, names=None, scales="f16"):
    """(bits per weight over the tensors stored as planes or int8 rows -- or over `names` --,
    and their formats), from the file's own records."""
    from edgepanel.convert.budget import format_bits
    from edgepanel.format import ModelFile
    f = ModelFile(path)
    c = f.meta.config
    q, kv = c["n_heads"] * c["head_dim"], c["n_kv_heads"] * c["head_dim"]
    dims = {"wq": (q, c["dim"]), "wk": (kv, c["dim"]), "wv": (kv, c["dim"]), "wo": (c["dim"], q),
            "w_gate": (c["hidden_dim"], c["dim"]), "w_up": (c["hidden_dim"], c["dim"]),
            "w_down": (c["dim"], c["hidden_dim"]), "embed": (c["vocab_size"], c["dim"]),
            "head": (c["vocab_size"], c["dim"])}
    total = used = 0
    formats = {}
    for name, rec in f.meta.tensors.items():
        if rec["kind"] not in ("planes", "int8_rows") or (names is not None and name not in names):
            continue
        formats[name] = fmt = "int8" if rec["kind"] == "int8_rows" else (rec["k"], rec["group"])
        n_out, n_in = dims[name.split(".")[-1]]
        total += n_out * n_in
        used += n_out * n_in * format_bits(fmt, n_in, scales)
    return used / total, formats


@pytest.mark.parametrize("with_torch", [True, False], ids=["torch", "no-torch"])
def test_bit_budget_is_respected(tmp_path, with_torch, monkeypatch):
    """--bits over the linear layers: formats (planes, group) mixed by estimated sensitivity,
    the budget never exceeded and nearly spent."""
    from edgepanel.convert import recover
    if not with_torch:
        monkeypatch.setattr(recover, "available", lambda: False)
    build("llama", tmp_path / "hf", seed=2)
    add_tokenizer(tmp_path / "hf")
    logs = []
    recipe = Recipe(bits=2.6, bits_groups=(32, 64), calib_tokens=1024, seq_len=64, embed="int8", head="int8")
    convert(tmp_path / "hf", tmp_path / "b.ep", recipe, log=logs.append)
    assert any(("gradient" in m) == with_torch for m in logs if m.startswith("estimated the loss"))
    used, formats = _budget_used(tmp_path / "b.ep")
    assert formats.pop("embed") == formats.pop("head") == "int8"   # fixed formats: outside the budget
    used, _ = _budget_used(tmp_path / "b.ep", set(formats))
    assert len(set(formats.values())) > 1, "a budget between two formats mixes them"
    assert 2.6 - 0.5 < used <= 2.6 + 1e-9


def test_bit_budget_chooses_embeddings_and_head(tmp_path):
    """With embeddings and head 'auto', the budget counts them and chooses their formats (int8
    rows or planes); the file records the choice; the engine runs it."""
    build("llama", tmp_path / "hf", seed=2)
    add_tokenizer(tmp_path / "hf")
    for budget in (2.0, 5.0):
        out = tmp_path / f"b{budget}.ep"
        convert(tmp_path / "hf", out, Recipe(bits=budget, embed="auto", head="auto", calib_tokens=1024, seq_len=64,
                                             tune_steps=2))
        used, formats = _budget_used(out)
        assert used <= budget + 1e-9
        m = Model(out)
        assert m.cfg.vocab_size and np.isfinite(m.logits([1, 2, 3])).all()
        rec = m.file.meta.recipe
        for role in ("embed", "head"):
            assert rec[role] == ("int8" if formats[role] == "int8" else "k%dg%d" % formats[role])
        if budget == 2.0:   # int8 rows (8.5 bits) cannot fit: planes
            assert formats["embed"] != "int8" and formats["head"] != "int8"


def test_bit_budget_estimates_by_row_blocks_are_the_whole_table_estimates():
    """The budget's estimates, 1/2 sum_r f_r sum_j E_rj^2 d_j of a greedy fit and of int8 rows,
    computed a block of rows at a time (a 49152-row head never has its errors whole) equal the
    same sums over the whole table at once in float64."""
    from edgepanel.convert.budget import greedy_losses, int8_loss
    rng = np.random.default_rng(3)
    w = rng.standard_normal((203, 96)).astype(np.float32)
    f, d = rng.random(203), rng.random(96)
    weigh = lambda rs, e2: float(0.5 * (f[rs] @ e2 @ d))  # noqa: E731
    whole = {}
    for g in (32, 96):
        s, a = quantize.greedy_planes(w, 3, g)
        approx = np.zeros(w.shape, np.float64)
        for k in (1, 2, 3):
            approx += (quantize.expand_scales(a[k - 1], g, 96) * s[k - 1]).astype(np.float64)
            if k != 2:
                whole[(k, g)] = float(0.5 * (f @ (w - approx) ** 2 @ d))
    for block in (7, 64, 4096):
        got = greedy_losses(w, (1, 3), (96, 32, 32), weigh, block=block)
        assert got.keys() == whole.keys()
        for o, v in whole.items():
            assert got[o] == pytest.approx(v, rel=1e-5), (block, o)
        q, sc = quantize.int8_rows(w)
        want = float(0.5 * (f @ (w.astype(np.float64) - q * sc[:, None].astype(np.float64)) ** 2 @ d))
        assert int8_loss(w, weigh, block=block) == pytest.approx(want, rel=1e-12)


def test_bit_budget_recipes_are_checked():
    with pytest.raises(ValueError, match="needs calibration"):
        Recipe(bits=3, calib=None)
    with pytest.raises(ValueError, match="'auto' is chosen by a bit budget"):
        Recipe(embed="auto")
    with pytest.raises(ValueError, match="head format must be one of"):
        Recipe(head="k5")
    with pytest.raises(ValueError, match="bits_groups"):
        Recipe(bits=3, bits_groups=(48,))


@pytest.mark.parametrize("n", [1, 7, 64, 96, 576, 1536])
def test_rotation_as_matrix_products_matches_the_butterflies(n):
    """Calibration rotates many rows at once with the Hadamard blocks as one matrix product: the
    same transform as the butterflies (the specification) to float32 rounding."""
    from edgepanel.rotation import Rotation
    r = Rotation.random(n, 5)
    x = np.random.default_rng(n).standard_normal((300, n)).astype(np.float32)
    a, b = r.apply(x), r.apply_blas(x)
    assert b.dtype == np.float32 and b.shape == x.shape
    assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()


@pytest.mark.parametrize("n", [1, 7, 96, 576])
def test_rotation_on_rows_and_its_transpose_keep_the_dtype(n):
    """The scale tuner's rotation (apply_rows): T as the butterflies compute it, and T's transpose,
    in float64 to float64 rounding, checked against the transform's matrix."""
    from edgepanel.rotation import Rotation
    r = Rotation.random(n, 5)
    x = np.random.default_rng(n).standard_normal((40, n))
    a = r.matrix().astype(np.float64)                          # T(x) = A x
    fwd, back = r.apply_rows(x), r.apply_rows(x, transpose=True)
    assert fwd.dtype == back.dtype == np.float64
    np.testing.assert_allclose(fwd, x @ a.T, atol=1e-5)       # the matrix itself is float32
    np.testing.assert_allclose(back, x @ a, atol=1e-5)
    np.testing.assert_allclose(r.apply_rows(fwd, transpose=True), x, atol=1e-6)    # orthogonal (float32 mix)


def rotation_matrix64(r) -> np.ndarray:
    """The transform as an exact float64 matrix, built apart from the butterflies:
    A = kron(mix, H_p / sqrt(p)) diag(signs), H_p the Sylvester Hadamard matrix (rotation.py)."""
    from edgepanel.rotation import split_pow2
    p, m = split_pow2(r.n)
    h = np.ones((1, 1))
    while len(h) < p:
        h = np.kron(np.array([[1.0, 1.0], [1.0, -1.0]]), h)
    return np.kron(r.mix.astype(np.float64), h / np.sqrt(p)) * r.signs.astype(np.float64)[None, :]


@pytest.mark.parametrize("n", [1536, 576, 64, 96, 24, 7, 2, 1])   # p * m: 512*3, 64*9, 64*1, 32*3, 8*3, 1*7
@pytest.mark.parametrize("rows", [1, 3, 37])
def test_rotation_in_c_matches_the_butterflies(n, rows):
    """The C rotation (csrc/forward.c, the engine's) on rows: Rotation.apply's values to float32
    rounding, the float64 matrix's too, and the same bits on any number of threads."""
    from edgepanel.kernels import native
    from edgepanel.rotation import Rotation
    assert native.lib is not None, "the C kernels are not built (pip install -e . builds them)"
    r = Rotation.random(n, 11)
    x = (np.random.default_rng(n + rows).standard_normal((rows, n)) * np.linspace(0.1, 10, n)).astype(np.float32)
    exact = x.astype(np.float64) @ rotation_matrix64(r).T
    y = native.rotate_rows(r.signs, r.mix, x.copy(), threads=1)
    assert y.dtype == np.float32 and y.shape == x.shape
    scale = np.abs(exact).max()
    assert np.abs(y - exact).max() <= 2e-6 * scale
    assert np.abs(y - r.apply(x)).max() <= 2e-6 * scale
    for threads in (2, 3, 0):
        np.testing.assert_array_equal(native.rotate_rows(r.signs, r.mix, x.copy(), threads=threads), y)


def test_calibration_rotates_in_c_or_in_numpy(monkeypatch):
    """calibrate.rotate_rows takes the C kernel when it is built (EDGEPANEL_BACKEND=numpy: apply_blas):
    the same transform either way, in place when asked (the MLP activations)."""
    from edgepanel.kernels import native
    from edgepanel.rotation import Rotation
    r = Rotation.random(96, 2)
    x = np.random.default_rng(0).standard_normal((2, 5, 96)).astype(np.float32)
    calls = []
    real = native.rotate_rows
    monkeypatch.setattr(native, "rotate_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    results = {}
    for backend in ("c", "numpy"):
        monkeypatch.setenv("EDGEPANEL_BACKEND", backend)
        calls.clear()
        y = cal.rotate_rows(r, x)
        assert y is not x and bool(calls) == (backend == "c")
        z = x.copy()
        assert cal.rotate_rows(r, z, in_place=True) is z
        np.testing.assert_array_equal(z, y)
        results[backend] = y
    ref = r.apply(x)
    for y in results.values():
        assert np.abs(y - ref).max() <= 2e-6 * np.abs(ref).max()
    for bad in (x.astype(np.float64), np.zeros((4, 192), np.float32)[:, ::2]):
        with pytest.raises(ValueError, match="in_place needs"):
            cal.rotate_rows(r, bad, in_place=True)
    w = np.random.default_rng(1).standard_normal((96, 40)).astype(np.float32)
    exact = rotation_matrix64(r) @ w
    assert np.abs(cal.rotate_columns(r, w) - exact).max() <= 2e-6 * np.abs(exact).max()


@pytest.mark.parametrize("change, error, message", [
    (dict(x=np.zeros((3, 96))), TypeError, "x must have dtype float32"),
    (dict(x=np.zeros((3, 48), np.float32)), ValueError, "x has 48 columns; this rotation needs 96"),
    (dict(x=np.zeros((3, 192), np.float32)[:, ::2]), ValueError, "x must be C-contiguous"),
    (dict(x=np.zeros(96, np.float32)), ValueError, "x must have 2 dimensions"),
    (dict(mix=np.eye(2, dtype=np.float32)), ValueError, r"mix must have shape \(3, 3\)"),
    (dict(signs=np.ones(0, np.float32)), ValueError, "signs must not be empty"),
    (dict(signs=np.ones(96)), TypeError, "signs must have dtype float32"),
])
def test_bad_input_to_the_c_rotation_is_a_clear_error(change, error, message):
    from edgepanel.kernels import native
    args = dict(signs=np.ones(96, np.float32), mix=np.eye(3, dtype=np.float32), x=np.zeros((3, 96), np.float32))
    args.update(change)
    with pytest.raises(error, match=message):
        native.rotate_rows(**args)
    ro = np.zeros((3, 96), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="x must be writeable"):
        native.rotate_rows(np.ones(96, np.float32), np.eye(3, dtype=np.float32), ro)


def test_c_rotation_checks_its_own_arguments():
    from edgepanel.kernels import native
    lib, ffi = native.lib, native.ffi
    assert lib is not None, "the C kernels are not built"
    s, m, x = np.ones(96, np.float32), np.eye(3, dtype=np.float32), np.ones((2, 96), np.float32)
    ptr = lambda a: ffi.cast("float *", a.ctypes.data)  # noqa: E731
    good = [ptr(s), ptr(m), 96, ptr(x), 2, 1]
    assert lib.ep_rotate_rows(*good) == lib.EP_OK
    assert lib.ep_rotate_rows(ptr(s), ptr(m), 96, ptr(x), 0, 1) == lib.EP_OK   # no rows: nothing to do
    for pos, bad in ((0, ffi.NULL), (1, ffi.NULL), (2, 0), (2, -4), (3, ffi.NULL), (4, -1)):
        args = list(good)
        args[pos] = bad
        assert lib.ep_rotate_rows(*args) == lib.EP_EINVAL, pos


@pytest.mark.parametrize("backend", ["c", "numpy"])
@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_rotate_matches_float64_matrices(arch, backend, tmp_path, monkeypatch):
    """rotate() against the float64 products it stands for: embeddings and q/k/v/gate/up inputs
    rotated (norm weights fused), o/down outputs rotated, each value head on v_proj's rows and
    o_proj's columns, down_proj's inputs by the MLP rotation; llama has biases, mistral a head
    dimension of 8 * 3."""
    from edgepanel.rotation import Rotation
    monkeypatch.setenv("EDGEPANEL_BACKEND", backend)
    build(arch, tmp_path / "hf")
    hf_arch, hf_cfg, _, _, _ = open_hf(tmp_path / "hf")
    a = architecture_for(hf_arch)
    cfg = a.config(hf_cfg)
    fm = cal.FloatModel(cfg, list(a.tensors(open_hf(tmp_path / "hf")[2], cfg, hf_cfg)))
    src = {k: (e.weight.astype(np.float64), None if e.bias is None else e.bias.astype(np.float64))
           for k, e in fm.t.items()}
    seed = 3
    cal.rotate(fm, seed=seed)
    A = rotation_matrix64(Rotation.random(cfg.dim, seed))
    M = rotation_matrix64(Rotation.random(cfg.hidden_dim, seed + 1))
    hd, G = cfg.head_dim, cfg.n_heads // cfg.n_kv_heads

    def check(name, want, bias=None):
        got = fm.t[name]
        assert np.abs(got.weight - want).max() <= 2e-6 * np.abs(want).max(), name
        if bias is not None:
            assert np.abs(got.bias - bias).max() <= 2e-6 * np.abs(bias).max(), name

    head = src["embed" if "head" not in src else "head"][0] * src["final_norm"][0][None, :]
    check("embed", src["embed"][0] @ A.T)
    check("head", head @ A.T)
    for i in range(cfg.n_layers):
        L = lambda p: f"layers.{i}.{p}"  # noqa: E731
        V = [rotation_matrix64(Rotation.random(hd, seed + 1000 + i * cfg.n_kv_heads + kh))
             for kh in range(cfg.n_kv_heads)]
        v_rows = np.zeros((cfg.n_kv_heads * hd,) * 2)
        o_cols = np.zeros((cfg.q_dim,) * 2)
        for kh, v in enumerate(V):
            v_rows[kh * hd:(kh + 1) * hd, kh * hd:(kh + 1) * hd] = v
            for h in range(kh * G, (kh + 1) * G):
                o_cols[h * hd:(h + 1) * hd, h * hd:(h + 1) * hd] = v
        ga, gm = src[L("attn_norm")][0], src[L("mlp_norm")][0]
        for lin in ("wq", "wk"):
            check(L(lin), (src[L(lin)][0] * ga) @ A.T)
        wv, bv = src[L("wv")]
        check(L("wv"), v_rows @ (wv * ga) @ A.T, None if bv is None else v_rows @ bv)
        wo, bo = src[L("wo")]
        check(L("wo"), A @ wo @ o_cols.T, None if bo is None else A @ bo)
        for lin in ("w_gate", "w_up"):
            check(L(lin), (src[L(lin)][0] * gm) @ A.T)
        wd, bd = src[L("w_down")]
        check(L("w_down"), A @ wd @ M.T, None if bd is None else A @ bd)
        assert np.all(fm.t[L("attn_norm")].weight == 1) and np.all(fm.t[L("mlp_norm")].weight == 1)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bitnet"])
def test_calibration_norms_give_the_reference_bits(arch, tmp_path):
    """_CalibOps computes RMS norms and SiLU by blocks of rows without temporaries of the
    activations' size: the same bits as ref.norm, ref.rms_sub_norm and ref.activation (layer norms
    and other activations go through them)."""
    from edgepanel.model.weights import Norm
    build(arch, tmp_path / "hf")
    hf_arch, hf_cfg, _, _, _ = open_hf(tmp_path / "hf")
    a = architecture_for(hf_arch)
    cfg = a.config(hf_cfg)
    fm = cal.FloatModel(cfg, list(a.tensors(open_hf(tmp_path / "hf")[2], cfg, hf_cfg)))
    ops = cal._CalibOps(cal._Run(fm, Recipe(), print), 8)
    for rows in (1, 37, 5000):   # 5000 rows of 64: two blocks
        x = (np.random.default_rng(rows).standard_normal((rows, cfg.dim)) * 3).astype(np.float32)
        name = "layers.0.attn_norm"
        e = fm.t[name]
        assert not np.all(e.weight == 1)
        np.testing.assert_array_equal(ops.norm(name, x), ref.norm(cfg, Norm(e.weight, e.bias), x))
        np.testing.assert_array_equal(ops.norm(name, x, rms=True), ref.rms_sub_norm(cfg, Norm(e.weight, e.bias), x))
        assert ops.norm(name, x).dtype == np.float32
        g = (x[:, :1] * x).astype(np.float32)     # a linear layer's output, overwritten by act
        with np.errstate(over="ignore"):          # exp(-x) overflows for x < -88: SiLU's -0
            want = ref.activation(cfg, g.copy())
            got = ops.act(g)
        assert got.dtype == np.float32 and got.shape == g.shape
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])   # grouped and one key/value head per query head
@pytest.mark.parametrize("n_seqs", [1, 3, 11])           # fewer than, and not a multiple of, 8 at once
def test_calibration_attention_by_stacks_gives_the_reference_bits(arch, n_seqs, tmp_path):
    """_CalibOps.attend runs several sequences in each stacked product: the same bits as
    ref.attention sequence by sequence, and sequences of different positions one by one."""
    build(arch, tmp_path / "hf")
    hf_arch, hf_cfg, _, _, _ = open_hf(tmp_path / "hf")
    a = architecture_for(hf_arch)
    cfg = a.config(hf_cfg)
    fm = cal.FloatModel(cfg, list(a.tensors(open_hf(tmp_path / "hf")[2], cfg, hf_cfg)))
    Lq = 24
    ops = cal._CalibOps(cal._Run(fm, Recipe(), print), Lq)
    rng = np.random.default_rng(n_seqs)
    n = n_seqs * Lq
    q = (rng.standard_normal((n, cfg.n_heads, cfg.head_dim)) * 2).astype(np.float32)
    k = (rng.standard_normal((n, cfg.n_kv_heads, cfg.head_dim)) * 2).astype(np.float32)
    v = rng.standard_normal((n, cfg.n_kv_heads, cfg.head_dim)).astype(np.float32)
    for positions in (np.tile(np.arange(Lq), n_seqs), np.arange(n) % (Lq + 5)):
        want = np.concatenate([ref.attention(cfg, q[s:s + Lq], k[s:s + Lq], v[s:s + Lq], positions[s:s + Lq])
                               for s in range(0, n, Lq)])
        got = ops.attend(0, q, k, v, positions)
        assert got.dtype == np.float32 and got.shape == q.shape
        np.testing.assert_array_equal(got, want)


def _fitted_linear(n_in, n_out, k, seed, bias):
    from edgepanel.model.weights import Linear
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_out, n_in)).astype(np.float32)
    pm = quantize.gptq_planes(w, np.eye(n_in), k, 64)
    b = rng.standard_normal(n_out).astype(np.float32) if bias else None
    return Linear("layers.0.wq", n_out, n_in, planes=pm, bias=b)


@pytest.mark.parametrize("n_in, n_out, k, rows", [(64, 24, 1, 1), (128, 96, 4, 37), (192, 64, 2, 300)])
def test_calibration_forward_in_bfloat16_is_the_engine_product_to_its_rounding(n_in, n_out, k, rows, monkeypatch):
    """calib_dtype bfloat16: the engine's int8 activations against the dequantized weights
    rounded to bfloat16, in torch; within 1% (relative norm) of the same product in float64,
    which the engine's kernel (calib_dtype float32) matches to float32 rounding; the same bits
    with one torch thread or two; the dequantized weights handed from fit to the forward are
    the ones the forward would compute."""
    torch = pytest.importorskip("torch")
    from edgepanel import kernels
    lin = _fitted_linear(n_in, n_out, k, rows, bias=rows % 2 == 1)
    x = (np.random.default_rng(rows).standard_normal((rows, n_in)) * 2).astype(np.float32)
    run16 = cal._Run(None, Recipe(calib_dtype="bfloat16"), print)
    run32 = cal._Run(None, Recipe(calib_dtype="float32"), print)
    assert run16.torch is torch and run32.torch is None
    q, s = kernels.get().quantize_i8(x)
    want = (q.astype(np.float64) * s[:, None].astype(np.float64)) @ lin.planes.dequantize_rows(0, n_out).T.astype(np.float64)
    if lin.bias is not None:
        want += lin.bias
    rel = lambda y: float(np.linalg.norm(y - want) / np.linalg.norm(want))   # noqa: E731
    y32, y16 = run32.linear(lin, x), run16.linear(lin, x)
    assert y16.dtype == np.float32 and y16.shape == (rows, n_out)
    assert rel(y32) < 1e-5 and 1e-5 < rel(y16) < 1e-2
    monkeypatch.setattr(kernels, "usable_cpus", lambda: 1)
    np.testing.assert_array_equal(run16.linear(lin, x), y16)
    run16._dense = (lin.name, lin.planes.dequantize_rows(0, n_out))
    np.testing.assert_array_equal(run16.linear(lin, x), y16)
    assert run16._dense is None


def test_calib_dtype_is_checked_and_auto_follows_the_cpu_and_torch(monkeypatch):
    from edgepanel import kernels
    from edgepanel.convert import recover
    with pytest.raises(ValueError, match="calib_dtype must be"):
        Recipe(calib_dtype="int8")
    for cpu, torch_ok, want in ((True, True, "bfloat16"), (True, False, "float32"), (False, True, "float32")):
        monkeypatch.setattr(kernels, "cpu_bf16", lambda: cpu)
        monkeypatch.setattr(recover, "available", lambda: torch_ok)
        r = Recipe()
        assert r.calib_matmul_dtype() == want
        assert Recipe(calib_dtype="float32").calib_matmul_dtype() == "float32"
        assert r.to_dict().get("calib_dtype", "float32") == want         # recorded (and in checkpoints' identity)
        assert "calib_dtype" not in Recipe(calib=None).to_dict()
        assert r.tag() == Recipe(calib_dtype="float32").tag()          # one cached default model


def test_calibration_in_bfloat16_without_torch_is_a_clear_error(monkeypatch):
    import builtins
    real = builtins.__import__

    def no_torch(name, *a, **k):
        if name == "torch":
            raise ImportError("no torch here")
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_torch)
    with pytest.raises(cal.FormatError, match="--calib-dtype float32"):
        cal._Run(None, Recipe(calib_dtype="bfloat16"), print)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_conversion_calibrated_in_bfloat16_fits_as_well_as_in_float32(arch, tmp_path):
    """The whole calibration with either forward: the same tensors fitted, the errors within 5%
    of each other (the fitted layers see inputs that differ by bfloat16's rounding)."""
    pytest.importorskip("torch")
    build(arch, tmp_path / "hf")
    add_tokenizer(tmp_path / "hf")
    reps = {d: convert(tmp_path / "hf", tmp_path / f"{d}.ep", Recipe(planes=2, calib_tokens=512, seq_len=64,
                                                                     tune_steps=0, calib_dtype=d))
            for d in ("float32", "bfloat16")}
    e32 = {r.name: r.error for r in reps["float32"].rows if r.kind == "planes"}
    e16 = {r.name: r.error for r in reps["bfloat16"].rows if r.kind == "planes"}
    assert e32.keys() == e16.keys() and len(e32) > 4
    assert e32 != e16
    a, b = np.array([e32[n] for n in e32]), np.array([e16[n] for n in e32])
    assert abs(b.mean() / a.mean() - 1) < 0.05
    from edgepanel.format import ModelFile
    for d in ("float32", "bfloat16"):
        assert ModelFile(tmp_path / f"{d}.ep").meta.recipe.get("calib_dtype", "float32") == d   # recorded when bfloat16


def test_calibration_in_bfloat16_gives_memory_back_after_every_layer(tmp_path, monkeypatch):
    """torch's temporaries (bfloat16 copies of the activations, the products) left glibc's heaps
    fragmented, the resident memory growing by 16-100 MB a layer of SmolLM2: the heaps are
    trimmed after every layer on that path."""
    pytest.importorskip("torch")
    from edgepanel.convert import memory
    build("llama", tmp_path / "hf")
    add_tokenizer(tmp_path / "hf")
    calls = []
    real = memory.give_back
    monkeypatch.setattr(memory, "give_back", lambda: calls.append(1) or real())
    convert(tmp_path / "hf", tmp_path / "m.ep", Recipe(planes=2, calib_tokens=256, seq_len=64, tune_steps=0,
                                                       calib_dtype="bfloat16"))
    n_layers = json.loads((tmp_path / "hf" / "config.json").read_text())["num_hidden_layers"]
    assert len(calls) >= n_layers


@pytest.mark.parametrize("code, env, want", [
    ("import edgepanel, numpy", {}, "4 True"),             # edgepanel first: OpenBLAS reads it
    ("import numpy, edgepanel", {}, "4 False"),            # too late for this process: reported
    ("import edgepanel, numpy", {"OPENBLAS_THREAD_TIMEOUT": "12"}, "12 True"),   # the user's wins
])
def test_blas_threads_are_told_to_sleep_when_idle(code, env, want):
    """NumPy's OpenBLAS threads spun for ~0.1 s after each product on the cores the fitting's C
    kernels use next (calibration 10-20% slower on 2 cores): edgepanel sets their timeout before
    NumPy loads OpenBLAS, unless the user set it, and knows when it came too late."""
    import os
    import subprocess
    import sys
    base = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    out = subprocess.run([sys.executable, "-c", code + "; import os; "
                          "print(os.environ['OPENBLAS_THREAD_TIMEOUT'], edgepanel._BLAS_QUIET)"],
                         env={**base, **env}, capture_output=True, text=True, check=True).stdout
    assert out.split() == want.split()


@pytest.mark.parametrize("quiet", [True, False])
def test_calibration_says_when_blas_threads_spin(quiet, tmp_path, monkeypatch):
    import edgepanel
    monkeypatch.setattr(edgepanel, "_BLAS_QUIET", quiet)
    build("llama", tmp_path / "hf")
    add_tokenizer(tmp_path / "hf")
    logs = []
    convert(tmp_path / "hf", tmp_path / "m.ep", Recipe(planes=2, calib_tokens=128, seq_len=64, tune_steps=0),
            log=logs.append)
    said = [ln for ln in logs if "OPENBLAS_THREAD_TIMEOUT" in ln]
    assert len(said) == (0 if quiet else 1)
    if not quiet:
        assert said[0].startswith("note: NumPy was imported before edgepanel")
