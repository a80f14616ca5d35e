"""The model file: round trip, compatibility with the safetensors library, and every bad input
(truncated, unknown or newer version, missing tensor, wrong shape or dtype, broken metadata)."""
import json
import struct

import numpy as np
import pytest

from edgepanel.errors import FormatError
from edgepanel.format import FORMAT_VERSION, Metadata, ModelFile, ModelWriter


def meta(**kw):
    d = dict(architecture="llama", config={"a": 1}, tensors={"x": {"kind": "dense"}})
    d.update(kw)
    return Metadata(**d)


def write(path, tensors, m=None, tok=None):
    with ModelWriter(path) as w:
        for k, v in tensors.items():
            w.add(k, v)
        w.close(m or meta(), tok)


def test_round_trip_views_and_alignment(tmp_path):
    rng = np.random.default_rng(0)
    t = {"u8": rng.integers(0, 255, 7, dtype=np.uint8), "f32": rng.standard_normal((3, 5)).astype(np.float32),
         "f16": rng.standard_normal(9).astype(np.float16), "i8": rng.integers(-5, 5, (2, 3), dtype=np.int8)}
    write(tmp_path / "m.ep", t, tok='{"model": 1}')
    f = ModelFile(tmp_path / "m.ep")
    for k, v in t.items():
        np.testing.assert_array_equal(f.tensors[k], v)
        assert not f.tensors[k].flags.writeable, "mapped read-only, not copied"
        assert f.tensors[k].ctypes.data % v.dtype.itemsize == 0
    assert f.meta.architecture == "llama" and f.tokenizer_json == '{"model": 1}'
    from safetensors.numpy import load_file  # the reference implementation reads it too
    other = load_file(str(tmp_path / "m.ep"))
    for k, v in t.items():
        np.testing.assert_array_equal(other[k], v)


def test_truncated(tmp_path):
    write(tmp_path / "m.ep", {"x": np.zeros(1000, np.float32)})
    data = (tmp_path / "m.ep").read_bytes()
    (tmp_path / "t.ep").write_bytes(data[:-10])
    with pytest.raises(FormatError, match="truncated"):
        ModelFile(tmp_path / "t.ep")
    (tmp_path / "h.ep").write_bytes(data[:20])
    with pytest.raises(FormatError, match="header length"):
        ModelFile(tmp_path / "h.ep")
    (tmp_path / "e.ep").write_bytes(b"")
    with pytest.raises(FormatError, match="too short"):
        ModelFile(tmp_path / "e.ep")


def raw_file(path, header: dict, data: bytes = b""):
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def test_newer_and_unknown_versions(tmp_path):
    for version, msg in ((FORMAT_VERSION + 1, "newer than this edgepanel reads"), (0, "unknown format version")):
        m = json.loads(meta().to_json())
        m["format_version"] = version
        raw_file(tmp_path / "v.ep", {"__metadata__": {"edgepanel": json.dumps(m)}})
        with pytest.raises(FormatError, match=msg):
            ModelFile(tmp_path / "v.ep")


@pytest.mark.parametrize("header,msg", [
    ({"__metadata__": {"edgepanel": "{not json"}}, "not valid JSON"),
    ({"__metadata__": {"other": "1"}}, "no edgepanel metadata"),
    ({"__metadata__": {"edgepanel": json.dumps({"format": "other"})}}, "not an edgepanel model"),
    ({"__metadata__": {"edgepanel": json.dumps({"format": "edgepanel", "format_version": 1})}}, "'architecture' is missing"),
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, "offsets .* do not match"),
    ({"x": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 2]}}, "unsupported dtype"),
    ({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, "invalid shape"),
    ({"x": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}, "y": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]}}, "overlap"),
    ([1, 2], "not a JSON object"),
])
def test_malformed_headers(tmp_path, header, msg):
    raw_file(tmp_path / "b.ep", header, bytes(8))
    with pytest.raises(FormatError, match=msg):
        ModelFile(tmp_path / "b.ep")


def test_missing_tensor_wrong_shape_dtype(tmp_path):
    write(tmp_path / "m.ep", {"x": np.zeros((2, 3), np.float32)})
    f = ModelFile(tmp_path / "m.ep")
    with pytest.raises(FormatError, match="'y' is missing"):
        f.get("y")
    with pytest.raises(FormatError, match=r"shape \(2, 3\), expected \(3, 2\)"):
        f.get("x", np.float32, (3, 2))
    with pytest.raises(FormatError, match="dtype float32, expected int8"):
        f.get("x", np.int8)


def test_not_a_file(tmp_path):
    with pytest.raises(FormatError, match="cannot open"):
        ModelFile(tmp_path / "nope.ep")


def test_writer_is_atomic(tmp_path):
    write(tmp_path / "m.ep", {"x": np.ones(3, np.float32)})
    before = (tmp_path / "m.ep").read_bytes()
    with pytest.raises(RuntimeError):
        with ModelWriter(tmp_path / "m.ep") as w:
            w.add("y", np.zeros(10, np.float32))
            raise RuntimeError("interrupted mid-write")
    assert (tmp_path / "m.ep").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.ep"]
