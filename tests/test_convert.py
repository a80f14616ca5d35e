"""Converter + engine against transformers on tiny random models of every architecture."""
import numpy as np
import pytest

import torch  # noqa: E402  (a dev dependency: a missing torch fails the tests, never skips them)

from edgepanel import bits
from edgepanel.convert import Recipe, convert
from edgepanel.errors import FormatError
from edgepanel.model.model import Model

from hf_models import ARCHS, build, hf_logits

IDS = [3, 17, 99, 150, 7, 42, 200, 5, 61, 88, 13, 2]


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    model = build(request.param, d / "hf")
    return request.param, d, model


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


ENGINES = ["reference"] + (["c"] if __import__("edgepanel.kernels.native", fromlist=["lib"]).lib is not None else [])


@pytest.mark.parametrize("engine", ENGINES)
def test_passthrough_matches_transformers(tiny, engine):
    arch, d, model = tiny
    convert(d / "hf", d / "pass.ep", Recipe(passthrough=True))
    m = Model(d / "pass.ep", engine=engine, kv_dtype="float32")    # transformers' attention is float32
    want = hf_logits(model, IDS)
    assert rel(m.logits(IDS), want) < 1e-4            # prefill
    cache = m.engine.new_cache(len(IDS) + 20)          # prefill 4, then cached decode steps
    got = [m.engine.forward(np.array(IDS[:4], np.int32), cache)]
    ids = list(IDS[:4])
    for step in range(20):
        nxt = int(np.argmax(got[-1]))
        ids.append(nxt)
        got.append(m.engine.forward(np.array([nxt], np.int32), cache))
    want_all = hf_logits(model, ids)
    assert rel(np.stack(got), want_all[3:]) < 1e-4
    # greedy generation is token-identical
    hf_ids = model.generate(torch.tensor([IDS[:5]]), max_new_tokens=15, do_sample=False,
                            eos_token_id=None, pad_token_id=0)[0, 5:].tolist()
    ours = m.generate_ids(IDS[:5], max_tokens=15, temperature=0, repetition_penalty=1.0)  # plain greedy, as HF
    assert ours == hf_ids[:len(ours)]
    assert len(ours) == 15 or hf_ids[len(ours)] in m.tokenizer.eos_ids  # stopped at EOS only


def test_binarized_matches_reference_over_dequantized_planes(tiny):
    arch, d, model = tiny
    convert(d / "hf", d / "k2.ep", Recipe(planes=2, group=32, calib=None))
    m = Model(d / "k2.ep", engine="reference")
    for lin in m.weights.linears():
        assert lin.kind == "planes"
    got = m.logits(IDS)
    # the same graph in float over W_hat (no activation quantization): close, not equal
    from edgepanel.model import reference as ref
    for lin in m.weights.linears():
        lin.weight, lin.planes = lin.planes.dequantize(), None
    flo = ref.forward(m.weights, np.array(IDS), ref.KVCache(m.cfg, len(IDS)), all_logits=True)
    assert rel(got, flo) < 0.05


def test_every_source_tensor_is_consumed(tiny, tmp_path):
    arch, d, model = tiny
    from safetensors.numpy import load_file, save_file
    import shutil
    src = tmp_path / "hf"
    shutil.copytree(d / "hf", src)
    tensors = load_file(str(src / "model.safetensors"))
    tensors["model.extra.weight"] = np.zeros((2, 2), np.float32)
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(FormatError, match="1 source tensors were not used.*model.extra.weight"):
        convert(src, tmp_path / "x.ep", Recipe(passthrough=True))
    assert not (tmp_path / "x.ep").exists()
