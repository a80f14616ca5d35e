"""One home per default (the CLI and the API sample and convert alike), and the model's continuous
parameters: selected by kind and layer without side effects, read in place by every engine, and
saved back into a complete model file (bit for bit where nothing changed)."""
import dataclasses

import numpy as np
import pytest

import edgepanel
from edgepanel import cli
from edgepanel.convert import Recipe, convert
from edgepanel.kernels import native
from edgepanel.sample import Sampling

from hf_models import checkpoint_with_tokenizer

IDS = np.array([3, 17, 99, 150, 7, 42, 200, 5, 61, 88, 13, 2], np.int32)
needs_c = pytest.mark.skipif(native.lib is None, reason="C kernels not built")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("params")
    convert(checkpoint_with_tokenizer(d / "hf"), d / "f16.ep", Recipe(planes=2, group=32, calib_tokens=1024, seq_len=64, tune_steps=0))
    convert(d / "hf", d / "u8.ep", Recipe(planes=2, group=32, calib_tokens=1024, seq_len=64, tune_steps=0,
                                          scales="u8", embed="k2", head="k2"))
    return d


# -- defaults ---------------------------------------------------------------------------------

def test_generate_without_options_samples_as_the_api_does(files, capsys, monkeypatch):
    """`edgepanel generate MODEL -p P --seed S` prints exactly Model.generate(P, seed=S)."""
    model = edgepanel.load(files / "f16.ep")
    want = model.generate("the cat", seed=5)
    assert cli.main(["generate", str(files / "f16.ep"), "-p", "the cat", "--seed", "5", "-q"]) == 0
    assert capsys.readouterr().out == want + "\n"
    # and the options it passes, unset, are Sampling's defaults: nothing restated
    seen = {}
    monkeypatch.setattr(edgepanel.Model, "generate", lambda self, prompt, **kw: seen.update(kw) or iter(()))
    assert cli.main(["generate", str(files / "f16.ep"), "-p", "x", "-q"]) == 0
    sampling = {k: v for k, v in seen.items() if k in Sampling.__dataclass_fields__}
    assert Sampling(**sampling) == Sampling()


def test_every_sampling_field_is_a_generate_option():
    parser = cli.build_parser()
    gen = parser._subparsers._group_actions[0].choices["generate"]
    dests = {a.dest for a in gen._actions}
    assert {f.name for f in dataclasses.fields(Sampling)} <= dests
    assert all(a.default is None for a in gen._actions if a.dest in Sampling.__dataclass_fields__)


def test_convert_without_options_uses_the_recipe_defaults(files, monkeypatch):
    import edgepanel.convert as conv
    seen = []

    class Stop(Exception):
        pass

    def fake(src, out, recipe, **kw):
        seen.append(recipe)
        raise Stop

    monkeypatch.setattr(conv, "convert", fake)
    with pytest.raises(Stop):
        cli.main(["convert", str(files / "hf"), str(files / "x.ep")])
    assert seen[0] == Recipe()
    with pytest.raises(Stop):
        cli.main(["convert", str(files / "hf"), str(files / "x.ep"), "--planes", "3", "--no-rotate", "--bits", "3"])
    assert (seen[1].planes, seen[1].rotate, seen[1].bits, seen[1].bits_planes, seen[1].embed) == (3, False, 3.0, (3,), "auto")


def test_convert_planes_zero_is_an_error_not_a_default(files, capsys):
    assert cli.main(["convert", str(files / "hf"), str(files / "x.ep"), "--planes", "0"]) == 1
    assert "planes must be in 1..4" in capsys.readouterr().err


# -- parameters -------------------------------------------------------------------------------

@needs_c
@pytest.mark.parametrize("name", ["f16.ep", "u8.ep"])
def test_parameters_have_no_side_effects_and_no_stale_engine(files, name):
    m = edgepanel.load(files / name, engine="c")
    engine = m.engine                  # held elsewhere, as a trainer or server would
    before = m.logits(IDS)
    p = m.parameters()
    assert m.engine is engine
    assert all(a.dtype == np.float32 and a.flags.writeable for a in p.values())
    if name == "u8.ep":   # 8-bit codes become their float32 values: each plane rounds (Model.parameters)
        widened = m.logits(IDS)
        assert not np.array_equal(widened, before)
        np.testing.assert_allclose(widened, before, rtol=0, atol=1e-5 * np.abs(before).max())
        before = widened
    np.testing.assert_array_equal(m.logits(IDS), before)     # float16 scales widened exactly; then no change
    cache = engine.new_cache(len(IDS))
    np.testing.assert_array_equal(engine.forward(IDS, cache, all_logits=True), before)
    p["layers.1.wq.scales"] *= 1.5     # in place, as a zeroth-order perturbation does
    cache = engine.new_cache(len(IDS))
    assert not np.array_equal(engine.forward(IDS, cache, all_logits=True), before)


def test_parameter_groups_by_kind_and_layer(files):
    m = edgepanel.load(files / "u8.ep")
    every = m.parameters()
    assert set(every) == set(m.parameters(["scales", "norms", "biases", "embeddings", "head"]))
    scales = m.parameters("scales")
    assert scales and all(k.endswith(".scales") and k.startswith("layers.") for k in scales)
    norms = m.parameters("norms")
    assert "final_norm.weight" in norms and all("norm." in k for k in norms)
    assert set(m.parameters("embeddings")) == {"embed.scales"} and set(m.parameters("head")) == {"head.scales"}
    one = m.parameters(["scales", "norms"], layers=range(1, 2))
    assert one and all(k.startswith("layers.1.") for k in one)
    assert all(one[k] is every[k] for k in one)      # the same arrays, not copies
    with pytest.raises(ValueError, match="unknown parameter kinds"):
        m.parameters("signs")
    with pytest.raises(ValueError, match="layers must be in 0..1"):
        m.parameters(layers=[5])


# -- save ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["f16.ep", "u8.ep"])
def test_save_unchanged_is_bit_for_bit(files, tmp_path, name):
    m = edgepanel.load(files / name)
    m.parameters()                     # widened, not changed
    out = m.save(tmp_path / name)
    assert out.read_bytes() == (files / name).read_bytes()


@pytest.mark.parametrize("name", ["f16.ep", "u8.ep"])
def test_save_changed_parameters_requantizes_as_the_converter(files, tmp_path, name):
    m = edgepanel.load(files / name)
    p = m.parameters()
    rng = np.random.default_rng(0)
    for key in ("layers.0.w_up.scales", "layers.1.wo.scales", "embed.scales" if "embed.scales" in p else "final_norm.weight"):
        p[key] *= (1 + 0.05 * rng.standard_normal(p[key].shape)).astype(np.float32)
    p["layers.1.mlp_norm.weight"] += np.float32(0.25)
    m.save(tmp_path / name, history={"what": "test"})
    back = edgepanel.load(tmp_path / name)
    assert back.meta.history == [{"what": "test"}]
    q = back.parameters()
    for key, arr in p.items():
        if key.endswith(".scales"):   # stored as the converter stores them, from the changed values
            owner = [o for n, _, _, o, _ in m.weights.named_parameters() if n == key][0]
            want = owner.planes.stored("u8" if name == "u8.ep" else "f16").float_scales()
            np.testing.assert_array_equal(q[key], want, err_msg=key)
        else:
            np.testing.assert_array_equal(q[key], arr, err_msg=key)
    np.testing.assert_array_equal(back.parameters()["layers.1.mlp_norm.weight"],
                                  edgepanel.load(files / name).parameters()["layers.1.mlp_norm.weight"] + np.float32(0.25))


def test_save_over_its_own_file_is_atomic_and_keeps_the_model_usable(files, tmp_path):
    path = tmp_path / "own.ep"
    path.write_bytes((files / "f16.ep").read_bytes())
    m = edgepanel.load(path)
    before = m.logits(IDS)
    m.parameters("norms")["final_norm.weight"] *= np.float32(2)
    changed = m.logits(IDS)
    m.save(path)
    np.testing.assert_array_equal(m.logits(IDS), changed)      # still mapped, still right
    np.testing.assert_array_equal(edgepanel.load(path).logits(IDS), changed)
    assert not np.array_equal(changed, before)
    assert [p.name for p in tmp_path.iterdir()] == ["own.ep"]  # no temporary left behind


def test_naming_the_default_model_does_not_import_torch(tmp_path):
    """Resolving the default model asks whether torch is installed (its recipe's tuning method is in
    the file name); importing torch to learn that cost ~190 MB of peak memory and a second on every
    `edgepanel generate` without a MODEL.  In a fresh interpreter, with the converted file present."""
    import subprocess
    import sys
    code = ("import sys, edgepanel\n"
            "from edgepanel import hub\n"
            "out = hub.converted_path(hub.DEFAULT_MODEL, hub.default_recipe().tag())\n"
            "out.parent.mkdir(parents=True, exist_ok=True); out.touch()\n"
            "assert hub.resolve_model(None) == out\n"
            "print('torch' in sys.modules)\n")
    env = {**__import__("os").environ, "EDGEPANEL_HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"
