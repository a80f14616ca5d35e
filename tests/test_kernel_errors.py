"""Bad arguments get a TypeError / ValueError naming the argument, on every backend; never a crash."""
import numpy as np
import pytest

from edgepanel import BackendUnavailable, bits, kernels
from edgepanel.bits import PlaneMatrix


@pytest.fixture
def w(rng):
    signs = rng.choice(np.array([-1, 1], np.int8), (2, 20, 100))
    return PlaneMatrix.from_signs(signs, rng.random((2, 20, 4)).astype(np.float32), 32)


def test_wrong_dtypes(backend, w):
    q = np.zeros((2, 100), np.int8)
    s = np.ones(2, np.float32)
    with pytest.raises(TypeError, match="q must have dtype int8"):
        backend.gemm_planes_i8(q.astype(np.float32), s, w)
    with pytest.raises(TypeError, match="qscale must have dtype float32"):
        backend.gemm_planes_i8(q, s.astype(np.float64), w)
    with pytest.raises(TypeError, match="x must have dtype float32"):
        backend.quantize_i8(np.zeros((2, 3)))
    with pytest.raises(TypeError, match="x must be a numpy array"):
        backend.binarize([1.0, 2.0])
    with pytest.raises(TypeError, match="act_bits must have dtype uint8"):
        backend.gemm_xnor(np.zeros((2, 16), np.int8), s, w)
    with pytest.raises(TypeError, match="w must be an edgepanel.bits.PlaneMatrix"):
        backend.gemm_planes_i8(q, s, w.planes)
    with pytest.raises(TypeError, match="w must have dtype float32"):
        backend.pack_planes(np.zeros((1, 2, 3), np.float64))


def test_wrong_shapes(backend, w):
    s = np.ones(2, np.float32)
    with pytest.raises(ValueError, match="q has 99 columns"):
        backend.gemm_planes_i8(np.zeros((2, 99), np.int8), s, w)
    with pytest.raises(ValueError, match="qscale has 3 entries for 2 tokens"):
        backend.gemm_planes_i8(np.zeros((2, 100), np.int8), np.ones(3, np.float32), w)
    with pytest.raises(ValueError, match="q must have 1 or 2 dimensions"):
        backend.gemm_planes_i8(np.zeros((1, 2, 100), np.int8), s, w)
    with pytest.raises(ValueError, match="act_bits has 13 columns"):
        backend.gemm_xnor(np.zeros((2, 13), np.uint8), s, w)
    with pytest.raises(ValueError, match="x must have at least one input"):
        backend.quantize_i8(np.zeros((2, 0), np.float32))
    with pytest.raises(ValueError, match="w holds 5 planes"):
        backend.pack_planes(np.zeros((5, 2, 3), np.float32))
    with pytest.raises(ValueError, match="threads"):
        backend.gemm_planes_i8(np.zeros((2, 100), np.int8), s, w, threads=-1)


def test_non_contiguous_and_misaligned(backend, w):
    q = np.zeros((2, 200), np.int8)[:, ::2]
    with pytest.raises(ValueError, match="q must be C-contiguous"):
        backend.gemm_planes_i8(q, np.ones(2, np.float32), w)
    raw = np.zeros(4 * 200 + 1, np.uint8)
    x = np.frombuffer(raw.data, dtype=np.float32, count=200, offset=1).reshape(2, 100)
    assert not x.flags.aligned
    with pytest.raises(ValueError, match="x is not aligned"):
        backend.quantize_i8(x)
    s = np.frombuffer(raw.data, dtype=np.float32, count=2, offset=3)
    with pytest.raises(ValueError, match="qscale is not aligned"):
        backend.gemm_planes_i8(np.zeros((2, 100), np.int8), s, w)


def test_plane_matrix_checks(rng):
    p = bits.pack_planes(np.ones((2, 20, 100), np.float32))
    s = bits.tile_scales(np.ones((2, 20, 4), np.float32))
    PlaneMatrix(p, s, 20, 100, 32)
    with pytest.raises(ValueError, match="group must be one of"):
        PlaneMatrix(p, s, 20, 100, 48)
    with pytest.raises(ValueError, match="planes must have shape"):
        PlaneMatrix(p[:, :, :-1], s, 20, 100, 32)
    with pytest.raises(ValueError, match="planes must have shape"):
        PlaneMatrix(np.zeros((5,) + p.shape[1:], np.uint8), s, 20, 100, 32)
    with pytest.raises(ValueError, match="scales must have shape"):
        PlaneMatrix(p, s[:, :, :3], 20, 100, 32)
    with pytest.raises(TypeError, match="scales must be a float32, float16 or uint8"):
        PlaneMatrix(p, s.astype(np.float64), 20, 100, 32)
    with pytest.raises(TypeError, match="planes must be a uint8"):
        PlaneMatrix(p.view(np.int8), s, 20, 100, 32)
    with pytest.raises(ValueError, match="planes must be C-contiguous"):
        PlaneMatrix(np.asfortranarray(p), s, 20, 100, 32)
    raw = np.zeros(s.nbytes + 1, np.uint8)
    mis = np.frombuffer(raw.data, np.float32, s.size, 1).reshape(s.shape)
    with pytest.raises(ValueError, match="scales is not aligned"):
        PlaneMatrix(p, mis, 20, 100, 32)
    with pytest.raises(ValueError, match="in_features must be a positive int"):
        PlaneMatrix(p, s, 20, 0, 32)


def test_unknown_backend_and_isa():
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'"):
        kernels.get("cuda")
    with pytest.raises((BackendUnavailable, ValueError), match="not available|only applies"):
        kernels.get("c", "sve2048")
    with pytest.raises(ValueError, match="only applies to the c backend"):
        kernels.get("numpy", "avx2")
