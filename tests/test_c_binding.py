"""The C binding against the Python side: each constant is defined once in
csrc/include/edgepanel.h and read from `lib`; where Python keeps its own copy (edgepanel.bits,
for the kernels that run without the C extension; model/config.py's names), every value must be
the C one.  Each check names what differs."""
import re
from pathlib import Path

import numpy as np
import pytest

from edgepanel import bits, kernels
from edgepanel.kernels import native
from edgepanel.model import config

pytestmark = pytest.mark.skipif(native.lib is None, reason="C kernels not built")
lib, ffi = native.lib, native.ffi
ROOT = Path(__file__).resolve().parents[1]


def lib_constants(prefix: str) -> dict[str, int]:
    """{suffix: value} of lib's EP_<prefix>* constants."""
    return {name[len(prefix):]: getattr(lib, name) for name in dir(lib) if name.startswith(prefix)}


@pytest.mark.parametrize("py, c", [("TILE", "EP_TILE"), ("IN_ALIGN", "EP_IN_ALIGN"),
                                   ("MAX_PLANES", "EP_MAX_PLANES")])
def test_layout_constants(py, c):
    assert getattr(bits, py) == getattr(lib, c), f"bits.{py} = {getattr(bits, py)}, edgepanel.h {c} = {getattr(lib, c)}"


def test_scale_kinds():
    c = lib_constants("EP_SCALES_")
    py = {name[len("SCALES_"):]: getattr(bits, name) for name in dir(bits) if name.startswith("SCALES_")}
    assert py == c, f"bits.SCALES_* {py} != edgepanel.h EP_SCALES_* {c}"
    # and PlaneMatrix numbers its dtypes with them
    pm = bits.PlaneMatrix(bits.pack_planes(np.ones((1, 3, 40), np.float32)),
                          bits.tile_scales(np.ones((1, 3, 1), np.float32)), 3, 40, 40)
    assert pm.scales_kind == lib.EP_SCALES_F32
    assert bits.PlaneMatrix(pm.planes, pm.scales.astype(np.float16), 3, 40, 40).scales_kind == lib.EP_SCALES_F16
    assert pm.with_u8_scales().scales_kind == lib.EP_SCALES_U8


@pytest.mark.parametrize("names, prefix", [(config.ACTS, "EP_ACT_"), (config.NORMS, "EP_NORM_")])
def test_config_names_are_the_c_kinds_in_order(names, prefix):
    want = {name.upper(): i for i, name in enumerate(names)}
    assert lib_constants(prefix) == want, f"{prefix}*: edgepanel.h {lib_constants(prefix)}, model/config.py {want}"


def test_matrix_and_output_kinds():
    mats = lib_constants("EP_MAT_")
    assert set(mats) == {"PLANES", "F32", "F16", "I8ROWS"}, mats
    assert 0 not in mats.values() and len(set(mats.values())) == len(mats), mats  # 0: no matrix
    outs = lib_constants("EP_OUT_")
    assert set(outs) == {"LAST", "ALL", "LOGPROB"} and len(set(outs.values())) == len(outs), outs


def test_every_constant_python_reads_exists():
    """lib.EP_* names in the Python sources (a typo would only fail when its line runs)."""
    used = set()
    for path in (ROOT / "edgepanel").rglob("*.py"):
        used |= set(re.findall(r"\blib\.(EP_[A-Z0-9_]+)", path.read_text()))
    assert used, "no lib.EP_* use found: did the binding move?"
    missing = sorted(name for name in used if not hasattr(lib, name))
    assert not missing, f"read from lib but not in edgepanel.h: {missing}"


def test_error_codes():
    assert native.ERRORS[0] == "EP_OK"
    for code, name in native.ERRORS.items():
        assert getattr(lib, name) == code, (code, name)
        assert native.error_name(code) == name
        assert code <= 0
    named = {n for n in dir(lib) if re.fullmatch(r"EP_E[A-Z]+", n)}
    assert named <= set(native.ERRORS.values()), named - set(native.ERRORS.values())
    assert {lib.EP_EINVAL, lib.EP_ENOMEM, lib.EP_EUNSUPPORTED} <= set(native.ERRORS)
    assert "unknown" in native.error_name(12345)


def test_shapes_agree():
    for n in list(range(1, 300)) + [4097, 5120]:
        assert lib.ep_padded_in(n) == bits.padded_in(n), n
        assert lib.ep_padded_out(n) == bits.padded_out(n), n
        for g in bits.GROUP_SIZES + (n,):
            assert lib.ep_n_groups(n, g) == bits.n_groups(n, g), (n, g)


def test_backend_table_is_public():
    for isa in native.runnable_isas():
        be = kernels.get("c", isa)
        assert be.table != ffi.NULL
        assert ffi.string(lib.ep_kernels_name(be.table)).decode() == be.isa == isa


def test_c_accepts_exactly_1_to_max_planes():
    """The C checks its plane count against the same constant the Python checks use."""
    out, n_in, n = 16, 64, 1
    q = np.zeros((n, n_in), np.int8)
    qs = np.ones(n, np.float32)
    k_max = lib.EP_MAX_PLANES + 1
    planes = np.zeros((k_max, 1, n_in // 8, 16), np.uint8)
    scales = np.zeros((k_max, 1, 1, 16), np.float32)
    y = np.empty((n, out), np.float32)
    work = np.zeros(lib.ep_workspace_bytes(n, out, n_in, n_in) + 64, np.uint8)
    off = -work.ctypes.data % lib.EP_WORK_ALIGN
    p = lambda t, a: ffi.cast(t, a.ctypes.data)  # noqa: E731
    for k in range(0, k_max + 1):
        rc = lib.ep_gemm_planes_i8(ffi.NULL, p("int8_t *", q), p("float *", qs), n, p("uint8_t *", planes),
                                   p("void *", scales), lib.EP_SCALES_F32, ffi.NULL, k, out, n_in, n_in,
                                   p("float *", y), ffi.cast("void *", work.ctypes.data + off), work.nbytes - off, 1)
        want = lib.EP_OK if 1 <= k <= lib.EP_MAX_PLANES else lib.EP_EINVAL
        assert rc == want, (k, native.error_name(rc))
    with pytest.raises(ValueError):
        bits.PlaneMatrix(planes, scales, out, n_in, n_in)  # MAX_PLANES + 1 planes
