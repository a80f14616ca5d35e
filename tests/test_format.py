"""The model file: round trip, compatibility with the safetensors library, and every bad input
(truncated, unknown or newer version, missing tensor, wrong shape or dtype, broken metadata)."""
import json
import os
import struct

import numpy as np
import pytest

from edgepanel.errors import FormatError
from edgepanel.format import FORMAT_VERSION, Metadata, ModelFile, ModelWriter, huge_pages


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


def _anon_huge_kib(address: int) -> int:
    """AnonHugePages of the mapping holding `address` (/proc/self/smaps), in KiB."""
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1])
    return 0


def test_read_into_memory_holds_the_same_tensors_on_huge_pages(tmp_path):
    rng = np.random.default_rng(1)
    t = {"big": rng.integers(-127, 128, (3 * 2**20 + 5,), dtype=np.int8),   # several huge pages
         "f32": rng.standard_normal((7, 3)).astype(np.float32), "u8": rng.integers(0, 255, 11, dtype=np.uint8),
         "stays": rng.integers(0, 255, 2**20, dtype=np.uint8), "empty": np.zeros((0, 4), np.float32)}
    write(tmp_path / "m.ep", t, tok='{"model": 1}')
    mapped, f = ModelFile(tmp_path / "m.ep"), ModelFile(tmp_path / "m.ep")
    nbytes = f.read_into_memory(["big", "u8", "f32", "empty"])
    assert f.copied == {"big", "u8", "f32"} and nbytes >= t["big"].nbytes + 64 + 128
    assert f.read_into_memory(["big"]) == 0, "read once"
    assert f.meta == mapped.meta and f.tokenizer_json == mapped.tokenizer_json
    for k, v in t.items():
        np.testing.assert_array_equal(f.tensors[k], v)
        assert not f.tensors[k].flags.writeable, "read-only, as the mapping's views"
        if k in f.copied:
            assert f.tensors[k].ctypes.data % 64 == 0
    assert f.tensors["stays"].ctypes.data == f.tensors["stays"].ctypes.data  # still the mapping's view
    assert _anon_huge_kib(f.tensors["stays"].ctypes.data) == 0
    if huge_pages():   # the kernel offers them: the copy is in 2 MiB pages (the reason for it)
        assert _anon_huge_kib(f.tensors["big"].ctypes.data) >= 2048, "the copy did not get huge pages"
    assert _anon_huge_kib(mapped.tensors["big"].ctypes.data) == 0


def test_read_into_memory_stops_at_a_file_truncated_since_it_was_opened(tmp_path):
    write(tmp_path / "m.ep", {"a": np.arange(10, dtype=np.float32), "b": np.arange(1000, dtype=np.float32)})
    f = ModelFile(tmp_path / "m.ep")
    os.truncate(tmp_path / "m.ep", f._span["b"][0] + 100)   # the mapping's pages of "b" are gone
    with pytest.raises(FormatError, match=r"m.ep: the file ended inside tensor 'b' while it was read \(truncated since it was opened\)"):
        f.read_into_memory()


def test_huge_pages_follows_the_kernel_setting(tmp_path, monkeypatch):
    import edgepanel.format as fmt
    for text, want in (("always [madvise] never\n", True), ("[always] madvise never\n", True),
                       ("always madvise [never]\n", False)):
        (tmp_path / "thp").write_text(text)
        monkeypatch.setattr(fmt, "THP_SETTING", str(tmp_path / "thp"))
        assert fmt.huge_pages() is want
    monkeypatch.setattr(fmt, "THP_SETTING", str(tmp_path / "absent"))   # no such setting: not Linux's THP
    assert fmt.huge_pages() is False


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
