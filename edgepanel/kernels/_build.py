"""cffi build script (API mode) for edgepanel's C kernels: edgepanel.kernels._ep.

setup.py hands `ffibuilder` to setuptools; `python -m edgepanel.kernels._build` builds in place.
cdef reads csrc/include/edgepanel.h with its preprocessor lines removed: that header is the whole
ABI.  Sources are chosen by target machine: each ISA file #errors on the wrong one.
"""
from __future__ import annotations

import os
import platform
import re
from pathlib import Path

from cffi import FFI

ROOT = Path(__file__).resolve().parents[2]
HEADER = ROOT / "csrc" / "include" / "edgepanel.h"

COMMON_SOURCES = ["csrc/dispatch.c", "csrc/ref.c", "csrc/threads.c", "csrc/forward.c", "csrc/fit.c",
                  "csrc/sample.c"]
ISA_SOURCES = {
    "x86_64": ["csrc/x86_avx2.c", "csrc/x86_avx512.c"],
    "aarch64": ["csrc/arm_neon.c"],
}
MACHINE_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}
CFLAGS = ["-O3", "-std=c11", "-D_GNU_SOURCE", "-ffp-contract=off", "-fno-math-errno",
          "-fvisibility=hidden", "-Wall"]
# aarch64: one build for every board, baseline armv8-a (a Raspberry Pi 4's Cortex-A72 runs all of it
# but the functions arm_neon.c marks for the dot product, which it calls only on cores that have
# one).  Atomics inline as ldxr/stxr loops: gcc's default, outline atomics, calls libgcc helpers
# that choose LSE or ldxr/stxr at run time (safe on a Pi 4 too), but it links LSE instructions into
# the extension, where tests/test_c_variants.py's disassembly check would have to excuse them.
ISA_CFLAGS = {"aarch64": ["-march=armv8-a", "-mno-outline-atomics"]}


def cdef_text() -> str:
    text = HEADER.read_text()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r"#ifdef __cplusplus.*?#endif", "", text, flags=re.S)
    return "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))


def target_machine(machine: str | None = None) -> str:
    m = (machine or platform.machine()).lower()
    return MACHINE_ALIASES.get(m, m)


def sources(machine: str | None = None) -> list[str]:
    return COMMON_SOURCES + ISA_SOURCES.get(target_machine(machine), [])


def compile_args(machine: str | None = None) -> list[str]:
    return CFLAGS + ISA_CFLAGS.get(target_machine(machine), [])


def make_builder() -> FFI:
    ffi = FFI()
    ffi.cdef(cdef_text())
    ffi.set_source(
        "edgepanel.kernels._ep",
        '#include "edgepanel.h"\n',
        sources=sources(),
        include_dirs=["csrc/include"],
        extra_compile_args=compile_args(),
        extra_link_args=["-pthread"],
        libraries=["m"],
    )
    return ffi


ffibuilder = make_builder()

if __name__ == "__main__":
    os.chdir(ROOT)
    ffibuilder.compile(tmpdir=str(ROOT), verbose=True)
