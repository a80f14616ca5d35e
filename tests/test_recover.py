"""Scale tuning after binarization (convert/recover.py): its torch forward is the reference
forward, it lowers the KL to the float model on text it did not see, only scales change, and
without torch the conversion tunes by zeroth-order steps instead."""
import dataclasses

import numpy as np
import pytest

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


def float_model(path, rotate=True):
    hf_arch, hf_cfg, src, _, _ = open_hf(path)
    a = architecture_for(hf_arch)
    fm = cal.FloatModel(a.config(hf_cfg), list(a.tensors(src, a.config(hf_cfg), hf_cfg)))
    if rotate:
        cal.rotate(fm, seed=1)
    return fm


@pytest.mark.parametrize("arch", ["llama", "llama3", "qwen2", "gpt2"])
def test_torch_forward_matches_the_reference(arch, tmp_path):
    build(arch, tmp_path / "hf", seed=4)
    fm = float_model(tmp_path / "hf", rotate=cal.can_rotate(float_model(tmp_path / "hf", False).cfg))
    ids = np.array([5, 77, 3, 140, 9, 9, 250, 31, 2, 60], np.int32)
    w = cal.to_weights(fm)
    want = ref.forward(w, ids, ref.KVCache(w.cfg, len(ids)), all_logits=True)
    with torch.no_grad():
        got = recover._TorchModel(torch, fm.cfg, fm, None).logits(torch.from_numpy(ids.astype(np.int64))).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


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


def test_tuning_lowers_the_kl_on_unseen_text_and_changes_only_scales(tmp_path):
    build("llama", tmp_path / "hf", seed=5, std=0.15)   # sharp enough distributions to matter
    add_tokenizer(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "fp.ep", Recipe(passthrough=True))
    base = dict(planes=1, group=32, calib_tokens=2048, seq_len=64)
    convert(tmp_path / "hf", tmp_path / "plain.ep", Recipe(**base, tune_steps=0))
    rep = convert(tmp_path / "hf", tmp_path / "tuned.ep", Recipe(**base, tune_steps=40, tune_lr=1e-2))
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
    assert ModelFile(tmp_path / "tuned.ep").meta.recipe["tune_steps"] == 40


def test_without_torch_conversion_tunes_by_zeroth_order_steps(tmp_path, monkeypatch):
    """No torch: --tune auto tunes the scales by zeroth-order kd on the C engine (edgepanel.tune);
    --tune fo is a clear error."""
    build("llama", tmp_path / "hf", seed=5, std=0.15)     # peaked outputs: a KL worth lowering
    add_tokenizer(tmp_path / "hf")
    monkeypatch.setattr(recover, "available", lambda: False)
    logs = []
    recipe = Recipe(planes=2, group=32, calib_tokens=1024, seq_len=64, tune_steps=30)
    assert recipe.tune_method() == "zo" and recipe.tag().endswith("-tune30zo")
    rep = convert(tmp_path / "hf", tmp_path / "t.ep", recipe, log=logs.append)
    assert rep.tuning["method"] == "zo" and rep.tuning["steps"] == 30
    assert rep.tuning["kl_after"] < rep.tuning["kl_before"], rep.tuning
    assert any("zeroth-order tuning" in m for m in logs)
    f = ModelFile(tmp_path / "t.ep")
    assert f.meta.recipe["tune"] == "zo" and f.meta.history[-1]["zo_tune"]["steps"] == 30
    plain = convert(tmp_path / "hf", tmp_path / "p.ep", Recipe(planes=2, group=32, calib_tokens=1024, seq_len=64,
                                                                  tune_steps=0))
    assert plain.tuning is None
    a, b = load_weights(ModelFile(tmp_path / "p.ep")), load_weights(f)
    for la, lb in zip(a.linears(), b.linears()):
        np.testing.assert_array_equal(la.planes.planes, lb.planes.planes)   # signs kept
    assert any(not np.array_equal(la.planes.scales, lb.planes.scales) for la, lb in zip(a.linears(), b.linears()))
    with pytest.raises(FormatError, match="needs torch"):
        convert(tmp_path / "hf", tmp_path / "x.ep", dataclasses.replace(recipe, tune="fo"))


@pytest.mark.parametrize("bad", [dict(tune_steps=-1), dict(tune_steps=2.5), dict(tune_lr=0.0)])
def test_bad_tuning_options(bad):
    with pytest.raises(ValueError, match="tune_"):
        Recipe(**bad)
