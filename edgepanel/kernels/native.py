"""The binding to the compiled C kernels, edgepanel.kernels._ep (built by _build.py from
csrc/include/edgepanel.h, the whole ABI).

`lib` and `ffi` are the extension's (None when it is not built; IMPORT_ERROR says why).  Every
constant of the ABI is read from lib (lib.EP_TILE, lib.EP_ACT_SILU, ...), never restated;
edgepanel.bits keeps the pure-Python copy of the layout's, which tests/test_c_binding.py checks
against lib.  ERRORS names the return codes.  CBackend is the C kernels behind the Backend
interface: pointers and workspace only, arguments arrive already checked by _backend.Backend.
gptq_block is csrc/fit.c's GPTQ column loop, for edgepanel.quantize.gptq_planes, rotate_rows
csrc/forward.c's rotation, for edgepanel.convert.calibrate, plane_weights and plane_grads the scale
tuner's plane layers (edgepanel.convert.recover); each checks its own arguments.
"""
from __future__ import annotations

import threading

import numpy as np

from ..errors import BackendUnavailable
from ._backend import Backend, check_array, check_threads

try:
    from ._ep import ffi, lib
except ImportError as exc:  # not built: no compiler at install time, or a failed build
    ffi = lib = None
    IMPORT_ERROR = exc
else:
    IMPORT_ERROR = None

# return code -> its name in edgepanel.h (0: "EP_OK", -1: "EP_EINVAL", ...); empty when not built
ERRORS: dict[int, str] = {} if ffi is None else dict(ffi.typeof("ep_status").elements)


def error_name(rc: int) -> str:
    """The name of a C return code, e.g. "EP_EINVAL" (edgepanel.h says what each means)."""
    return ERRORS.get(rc, f"unknown return code {rc}")


def compiled_isas() -> list[str]:
    if lib is None:
        return []
    return ffi.string(lib.ep_kernels_compiled()).decode().split(",")


def runnable_isas() -> list[str]:
    return [name for name in compiled_isas() if lib.ep_kernels_get(name.encode()) != ffi.NULL]


def _ptr(ctype: str, a: np.ndarray):
    return ffi.cast(ctype, a.ctypes.data)


def gptq_block(w: np.ndarray, hinv: np.ndarray, i1: int, i2: int, group: int, als_iters: int,
               signs: np.ndarray, alpha: np.ndarray, threads: int | None = None) -> np.ndarray:
    """GPTQ's column loop over columns [i1, i2) of w (out, in) float64, in place, in C (csrc/fit.c):
    each group's k scales fitted on the rows as they stand, each column rounded to its row's nearest
    level, its error fed to the later block columns through hinv (in, in) float64, the upper
    Cholesky factor of H^-1.  Writes signs (k, out, in) int8 and alpha (k, out, n_groups) float32
    for these columns and groups; returns the errors E (out, i2 - i1) float64 (the caller applies
    them to the columns after i2: w[:, i2:] -= E @ hinv[i1:i2, i2:]).  Groups are `group`
    consecutive columns; [i1, i2) holds whole groups (the last group of a row may be shorter)."""
    if lib is None:
        raise BackendUnavailable(f"the C kernels are not built ({IMPORT_ERROR})")
    w = check_array("w", w, np.float64, (2,))
    hinv = check_array("hinv", hinv, np.float64, (2,))
    signs = check_array("signs", signs, np.int8, (3,))
    alpha = check_array("alpha", alpha, np.float32, (3,))
    out, n_in = w.shape
    if out == 0 or n_in == 0:
        raise ValueError(f"w must have at least one row and one column, got shape {w.shape}")
    if hinv.shape != (n_in, n_in):
        raise ValueError(f"hinv must have shape {(n_in, n_in)} for w of shape {w.shape}, got {hinv.shape}")
    k = signs.shape[0]
    if not 1 <= k <= lib.EP_MAX_PLANES or signs.shape[1:] != (out, n_in):
        raise ValueError(f"signs must have shape (k, {out}, {n_in}) with k in 1..{lib.EP_MAX_PLANES}, "
                         f"got {signs.shape}")
    for name, v in (("i1", i1), ("i2", i2), ("group", group), ("als_iters", als_iters)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if group < 1:
        raise ValueError(f"group must be positive, got {group}")
    ng = -(-n_in // group)
    if alpha.shape != (k, out, ng):
        raise ValueError(f"alpha must have shape {(k, out, ng)}, got {alpha.shape}")
    if not (0 <= i1 < i2 <= n_in) or i1 % group or (i2 % group and i2 != n_in):
        raise ValueError(f"columns [{i1}, {i2}) must be whole groups of {group} within 0..{n_in}")
    if als_iters < 0:
        raise ValueError(f"als_iters must be >= 0, got {als_iters}")
    if not np.isfinite(w[:, i1:i2]).all():
        raise ValueError(f"w holds a NaN or an infinity in columns [{i1}, {i2})")
    if not np.isfinite(hinv[i1:i2, i1:i2]).all():
        raise ValueError(f"hinv holds a NaN or an infinity in rows and columns [{i1}, {i2})")
    nb = i2 - i1
    err = np.empty((out, nb), np.float64)
    item = w.itemsize
    rc = lib.ep_gptq_block(ffi.cast("double *", w.ctypes.data + i1 * item), out, nb, n_in,
                           ffi.cast("double *", hinv.ctypes.data + (i1 * n_in + i1) * item), n_in,
                           k, group, als_iters, _ptr("double *", err),
                           ffi.cast("int8_t *", signs.ctypes.data + i1), n_in,
                           ffi.cast("float *", alpha.ctypes.data + (i1 // group) * alpha.itemsize), ng,
                           check_threads(threads))
    if rc != 0:
        raise RuntimeError(f"gptq_block failed in C: {error_name(rc)}")
    return err


def rotate_rows(signs: np.ndarray, mix: np.ndarray, x: np.ndarray, threads: int | None = None) -> np.ndarray:
    """x (rows, n) float32 <- T(x) in place, T the rotation of edgepanel/rotation.py with these
    signs (n,) and mix (m, m), n = p * m with p the largest power of two dividing n, in C
    (csrc/forward.c, the C engine's own arithmetic); returns x."""
    if lib is None:
        raise BackendUnavailable(f"the C kernels are not built ({IMPORT_ERROR})")
    signs = check_array("signs", signs, np.float32, (1,))
    mix = check_array("mix", mix, np.float32, (2,))
    x = check_array("x", x, np.float32, (2,))
    if not x.flags.writeable:
        raise ValueError("x must be writeable (it is rotated in place)")
    n = signs.shape[0]
    if n == 0:
        raise ValueError("signs must not be empty")
    m = n // (n & -n)
    if mix.shape != (m, m):
        raise ValueError(f"mix must have shape {(m, m)} for n = {n}, got {mix.shape}")
    if x.shape[1] != n:
        raise ValueError(f"x has {x.shape[1]} columns; this rotation needs {n}")
    rc = lib.ep_rotate_rows(_ptr("float *", signs), _ptr("float *", mix), n, _ptr("float *", x), x.shape[0],
                            check_threads(threads))
    if rc != 0:
        raise RuntimeError(f"rotate_rows failed in C: {error_name(rc)}")
    return x



def _plane_args(codes: np.ndarray, n_in: int, k: int):
    codes = check_array("codes", codes, np.uint8, (3,))
    out, ng, gs = codes.shape
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= 8:
        raise ValueError(f"k must be an int in 1..8, got {k!r}")
    if not 0 < n_in <= ng * gs or (ng > 1 and n_in <= (ng - 1) * gs):
        raise ValueError(f"n_in {n_in} does not fit codes of shape {codes.shape} (groups of {gs})")
    return codes, out, ng, gs


def plane_weights(levels: np.ndarray, codes: np.ndarray, n_in: int, threads: int | None = None) -> np.ndarray:
    """The scale tuner's weight matrix (out, n_in): weight (o, c) is level codes[o, g, c - g*gs] of
    levels[o, g] (levels (out, ng, 2^k), codes (out, ng, gs) uint8), in C (csrc/fit.c), in the
    levels' dtype: float32, or int16 holding any 16-bit values' bits (bfloat16 levels viewed as
    int16).  One pass, no int64 copy of the codes (torch.gather's index must be int64)."""
    if lib is None:
        raise BackendUnavailable(f"the C kernels are not built ({IMPORT_ERROR})")
    if not isinstance(levels, np.ndarray) or levels.dtype not in (np.float32, np.int16):
        raise TypeError("levels must be a float32 or int16 numpy array, got "
                        f"{getattr(levels, 'dtype', type(levels).__name__)}")
    levels = check_array("levels", levels, levels.dtype, (3,))
    k = int(levels.shape[2]).bit_length() - 1
    codes, rows, ng, gs = _plane_args(codes, n_in, k)
    if levels.shape != (rows, ng, 1 << k):
        raise ValueError(f"levels must have shape {(rows, ng, 1 << k)} for codes of shape {codes.shape}, "
                         f"got {levels.shape}")
    w = np.empty((rows, n_in), levels.dtype)
    fn, ctype = (lib.ep_plane_weights, "float *") if levels.dtype == np.float32 else \
        (lib.ep_plane_weights16, "uint16_t *")
    rc = fn(_ptr(ctype, levels), _ptr("uint8_t *", codes), rows, ng, gs, n_in, k, _ptr(ctype, w), n_in,
            check_threads(threads))
    if rc != 0:
        raise ValueError(f"plane_weights: a level code is >= 2^{k} ({error_name(rc)})")
    return w


def plane_grads(gw: np.ndarray, codes: np.ndarray, k: int, threads: int | None = None,
                isa: str | None = None) -> np.ndarray:
    """plane_weights' adjoint as the scales see it: galpha (k, out, ng) float32, galpha[i, o, g] the
    sum of gw[o, c] (gw (out, n_in) float32) over group g's columns, each times its plane-i sign
    (bits.level_signs(k)[code, i]), in C: the sums' order is csrc/ref.c's ep_ref_plane_sums', the
    same bits on every ISA (isa: one of runnable_isas(); None: the best)."""
    if lib is None:
        raise BackendUnavailable(f"the C kernels are not built ({IMPORT_ERROR})")
    gw = check_array("gw", gw, np.float32, (2,))
    codes, rows, ng, gs = _plane_args(codes, gw.shape[1], k)
    if gw.shape[0] != rows:
        raise ValueError(f"gw has {gw.shape[0]} rows; codes have {rows}")
    kt = ffi.NULL
    if isa is not None:
        kt = lib.ep_kernels_get(isa.encode())
        if kt == ffi.NULL:
            raise ValueError(f"isa {isa!r} is not one this CPU runs ({', '.join(runnable_isas())})")
    galpha = np.empty((k, rows, ng), np.float32)
    rc = lib.ep_plane_grads(_ptr("float *", gw), gw.shape[1], _ptr("uint8_t *", codes), rows, ng, gs,
                            gw.shape[1], k, _ptr("float *", galpha), check_threads(threads), kt)
    if rc != 0:
        raise ValueError(f"plane_grads: a level code is >= 2^{k} ({error_name(rc)})")
    return galpha


class SampleWork:
    """ep_sample's workspace for one vocabulary size, kept between calls (a fresh 1 MB buffer
    page-faults every token)."""

    def __init__(self, n: int):
        if lib is None:
            raise BackendUnavailable(f"the C kernels are not built ({IMPORT_ERROR})")
        self.n = n
        self.buf = np.empty(lib.ep_sample_work_bytes(n), np.uint8)
        self.bad = ffi.new("int64_t *")


def sample(logits: np.ndarray, history: np.ndarray, temperature: float, top_k: int, top_p: float,
           min_p: float, penalty: float, u: float, work: SampleWork) -> int:
    """csrc/sample.c's ep_sample: the token edgepanel.sample.Sampler would draw from logits (n,)
    float32 with history (int64 token ids) and the uniform number u.  Returns the token id, or -1
    - (the count of non-finite logits) when there are any.  The caller checks the parameters."""
    n = logits.shape[0]
    if logits.dtype != np.float32 or logits.ndim != 1 or not logits.flags.c_contiguous:
        raise ValueError(f"sample: logits must be one contiguous float32 row, got {logits.dtype} {logits.shape}")
    if history.dtype != np.int64 or history.ndim != 1 or not history.flags.c_contiguous:
        raise ValueError("sample: history must be a contiguous int64 vector")
    if work.n != n:
        raise ValueError(f"sample: the workspace is for {work.n} logits, got {n}")
    work.bad[0] = 0                 # set by the call only once its arguments pass
    rc = lib.ep_sample(_ptr("float *", logits), n, _ptr("int64_t *", history), history.shape[0],
                       temperature, top_k, top_p, min_p, penalty, u, _ptr("void *", work.buf),
                       work.buf.nbytes, work.bad)
    if rc < 0:
        if work.bad[0]:
            return -1 - int(work.bad[0])
        raise ValueError(f"sample: an argument is out of range ({error_name(int(rc))})")
    return int(rc)


class CBackend(Backend):
    """The C kernels of one ISA variant; `table` is its kernel table (const ep_kernels *), the
    first argument of every C entry point."""

    name = "c"

    def __init__(self, isa: str | None = None):
        if lib is None:
            raise BackendUnavailable(f"the C kernels are not built ({IMPORT_ERROR})")
        kt = lib.ep_kernels_get(isa.encode() if isa else ffi.NULL)
        if kt == ffi.NULL:
            raise BackendUnavailable(
                f"ISA variant {isa!r} is not available: compiled {compiled_isas()}, "
                f"runnable on this CPU {runnable_isas()}")
        self.table = kt
        self.isa = ffi.string(lib.ep_kernels_name(kt)).decode()
        self._local = threading.local()

    def _workspace(self, nbytes: int):
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.nbytes < nbytes + lib.EP_WORK_ALIGN:
            buf = np.empty(max(nbytes, 1 << 16) + lib.EP_WORK_ALIGN, np.uint8)
            self._local.buf = buf
        off = -buf.ctypes.data % lib.EP_WORK_ALIGN
        return ffi.cast("void *", buf.ctypes.data + off), buf.nbytes - off

    @staticmethod
    def _check(rc: int, what: str):
        if rc != 0:
            raise RuntimeError(f"{what} failed in C: {error_name(rc)}")

    def _quantize_i8(self, x):
        n, k = x.shape
        q = np.empty((n, k), np.int8)
        s = np.empty(n, np.float32)
        self._check(lib.ep_quantize_i8(self.table, _ptr("float *", x), n, k, _ptr("int8_t *", q),
                                       _ptr("float *", s)), "quantize_i8")
        return q, s

    def _binarize(self, x):
        n, k = x.shape
        b = np.empty((n, lib.ep_padded_in(k) // 8), np.uint8)
        s = np.empty(n, np.float32)
        self._check(lib.ep_binarize(self.table, _ptr("float *", x), n, k, _ptr("uint8_t *", b),
                                    _ptr("float *", s)), "binarize")
        return b, s

    def _pack_planes(self, w):
        k, o, i = w.shape
        p = np.empty((k, lib.ep_padded_out(o) // lib.EP_TILE, lib.ep_padded_in(i) // 8, lib.EP_TILE), np.uint8)
        self._check(lib.ep_pack_planes(_ptr("float *", w), k, o, i, _ptr("uint8_t *", p)), "pack_planes")
        return p

    def _gemm(self, fn, what, act, act_ctype, scale, w, threads):
        n = act.shape[0]
        y = np.empty((n, w.out_features), np.float32)
        need = lib.ep_workspace_bytes(n, w.out_features, w.in_features, w.group)
        work, nbytes = self._workspace(need)
        rc = fn(self.table, _ptr(act_ctype, act), _ptr("float *", scale), n,
                _ptr("uint8_t *", w.planes), _ptr("void *", w.scales), w.scales_kind,
                ffi.NULL if w.scale_rows is None else _ptr("float *", w.scale_rows), w.k, w.out_features, w.in_features, w.group, _ptr("float *", y), work, nbytes, threads)
        self._check(rc, what)
        return y

    def _gemm_planes_i8(self, q, qscale, w, threads):
        return self._gemm(lib.ep_gemm_planes_i8, "gemm_planes_i8", q, "int8_t *", qscale, w, threads)

    def _gemm_xnor(self, act_bits, ascale, w, threads):
        return self._gemm(lib.ep_gemm_xnor, "gemm_xnor", act_bits, "uint8_t *", ascale, w, threads)
