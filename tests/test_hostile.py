"""Careless and hostile inputs (issue 23, the parts done so far): each a clear error or harmless,
never a crash, a hang or silent corruption."""
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import edgepanel
from edgepanel import FormatError
from edgepanel.convert import Recipe, convert
from edgepanel.format import ModelWriter, write_tensors
from edgepanel.model.config import ModelConfig

from hf_models import checkpoint_with_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    checkpoint_with_tokenizer(d / "hf")
    convert(d / "hf", d / "m.ep", Recipe(planes=2, group=32, calib=None))
    return d


def test_load_refuses_a_fifo_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.ep"
    os.mkfifo(fifo)
    done = []
    t = threading.Thread(target=lambda: done.append(pytest.raises(FormatError, edgepanel.load, fifo)), daemon=True)
    t.start()
    t.join(10)
    assert done, "load() blocked on a FIFO"
    assert "not a regular file" in str(done[0].value)


def test_convert_never_overwrites_its_source(tiny, tmp_path):
    gguf_like = tmp_path / "src.ep"
    gguf_like.write_bytes((tiny / "m.ep").read_bytes())
    before = (tiny / "hf" / "config.json").read_bytes()
    with pytest.raises(FormatError, match="overwrite the source"):
        convert(tiny / "hf", tiny / "hf" / "config.json", Recipe(planes=2, group=32, calib=None))
    assert (tiny / "hf" / "config.json").read_bytes() == before
    with pytest.raises(FormatError, match="not a regular file"):
        convert(tiny / "hf", tmp_path, Recipe(planes=2, group=32, calib=None))


def test_a_killed_writers_temporary_is_cleaned_and_two_writers_never_mix(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"out.st.{dead.stdout.strip()}.abc.tmp"
    stale.write_bytes(b"half a file")
    a = ModelWriter(tmp_path / "out.st")
    b = ModelWriter(tmp_path / "out.st")
    a.add("x", np.zeros(3, np.float32))
    b.add("y", np.ones(5, np.float32))
    a.close_with({"who": "a"})
    assert not stale.exists()
    b.close_with({"who": "b"})
    from edgepanel.format import SafetensorsFile
    f = SafetensorsFile(tmp_path / "out.st")
    assert f.metadata == {"who": "b"} and set(f.tensors) == {"y"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.st"]
    write_tensors(tmp_path / "w.st", {"z": np.arange(4, dtype=np.int32)}, {})
    assert oct((tmp_path / "w.st").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


@pytest.mark.parametrize("call,msg", [
    (lambda m: m.generate("", max_tokens=2), "prompt is empty"),
    (lambda m: m.generate("hi", max_tokens=2, stop=5), "stop must be"),
    (lambda m: edgepanel.load(m.path, threads=2**31), "threads must be"),
    (lambda m: edgepanel.load(m.path, threads=-1), "threads must be"),
])
def test_bad_arguments_are_named(tiny, call, msg):
    m = edgepanel.load(tiny / "m.ep")
    with pytest.raises(ValueError, match=msg):
        call(m)


@pytest.mark.parametrize("field,value", [("norm_eps", -1.0), ("norm_eps", float("nan")), ("norm_eps", "abc"),
                                         ("rope_theta", 0.0), ("max_seq_len", 2**40)])
def test_config_values_out_of_range_are_refused(field, value):
    good = dict(arch="llama", vocab_size=10, dim=8, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=4,
                hidden_dim=16, max_seq_len=32)
    with pytest.raises(FormatError, match=field):
        ModelConfig(**{**good, field: value})


def test_nan_parameters_give_an_error_not_a_token(tiny):
    m = edgepanel.load(tiny / "m.ep")
    m.parameters("norms")["final_norm.weight"][0] = np.inf     # (a NaN is zeroed by int8 quantization)
    with pytest.raises(FloatingPointError, match="non-finite"):
        m.generate_ids([1, 2, 3], max_tokens=2)


@pytest.mark.parametrize("opt", [dict(planes=0), dict(als_iters=10**9), dict(seq_len=0), dict(seq_len=-5),
                                 dict(calib_tokens=0)])
def test_recipe_counts_are_bounded(opt):
    with pytest.raises(ValueError, match=list(opt)[0]):
        Recipe(**opt)
