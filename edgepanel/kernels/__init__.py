"""Kernel backends: compiled C with run-time ISA dispatch, then Numba, then the NumPy reference.

`get()` returns the backend to use: the one named by its argument, else by EDGEPANEL_BACKEND
(c | numba | numpy), else the fastest that works here.  EDGEPANEL_ISA (scalar, avx2, avx512bw,
avx512vnni, neon, neon_dotprod) forces a variant of the C backend and of the C engine.  `info()` names what runs, e.g. "c/avx2".
"""
from __future__ import annotations

import os
import warnings

import importlib.util

from ..errors import BackendUnavailable, EdgepanelWarning
from ._backend import Backend, NumpyBackend
from . import native  # numba (slow to import) loads only when its backend is asked for

BACKENDS = ("c", "numba", "numpy")


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask (taskset, a container's cpuset), as the
    C thread pool counts them, not every CPU of the machine; at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):      # no affinity call on this system
        return max(1, os.cpu_count() or 1)


def cpu_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this x86 CPU has bfloat16 dot-product instructions (AVX512-BF16 or AMX-BF16), read
    from the kernel's CPU flags (Linux); False when they cannot be read.  torch's matrix products
    in bfloat16 are then several times its float32 ones (3-7x measured on a Xeon with AMX);
    elsewhere they are emulated, slower."""
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[-1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


_instances: dict[tuple[str, str | None], Backend] = {}
_warned = False


def _make(name: str, isa: str | None) -> Backend:
    key = (name, isa or None)
    if key not in _instances:
        if name == "c":
            _instances[key] = native.CBackend(isa)
        elif name == "numba":
            from . import _numba
            _instances[key] = _numba.NumbaBackend()
        elif name == "numpy":
            _instances[key] = NumpyBackend()
        else:
            raise ValueError(f"unknown kernel backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return _instances[key]


def get(name: str | None = None, isa: str | None = None) -> Backend:
    """The backend `name` (and C variant `isa`), or the default one."""
    name = name or os.environ.get("EDGEPANEL_BACKEND") or None
    isa = isa or os.environ.get("EDGEPANEL_ISA") or None
    if name:
        if isa and name != "c":
            raise ValueError(f"an ISA variant ({isa}) only applies to the c backend, not {name!r}")
        return _make(name, isa)
    if native.lib is not None:
        return _make("c", isa)
    global _warned
    for fallback in ("numba", "numpy"):
        try:
            backend = _make(fallback, None)
        except BackendUnavailable:
            continue
        if not _warned:
            _warned = True
            warnings.warn(
                f"edgepanel: the C kernels are not built ({native.IMPORT_ERROR}); using the "
                f"{fallback} kernels, which are slower. Reinstall with a C compiler to build them.",
                EdgepanelWarning, stacklevel=2)
        return backend
    raise BackendUnavailable("no kernel backend is available")  # unreachable: numpy always is


def info() -> str:
    """Which backend and ISA variant the default kernels use, e.g. 'c/avx2'."""
    return get().label


def available() -> list[tuple[str, str | None]]:
    """Every (backend, isa) this machine can run."""
    out: list[tuple[str, str | None]] = [("c", isa) for isa in native.runnable_isas()]
    if importlib.util.find_spec("numba") is not None:
        out.append(("numba", None))
    out.append(("numpy", None))
    return out


def quantize_i8(x):
    return get().quantize_i8(x)


def binarize(x):
    return get().binarize(x)


def pack_planes(w):
    return get().pack_planes(w)


def gemm_planes_i8(q, qscale, w, threads=None):
    return get().gemm_planes_i8(q, qscale, w, threads)


def gemm_xnor(act_bits, ascale, w, threads=None):
    return get().gemm_xnor(act_bits, ascale, w, threads)


__all__ = ["Backend", "BACKENDS", "get", "info", "available", "quantize_i8", "binarize",
           "pack_planes", "gemm_planes_i8", "gemm_xnor"]
