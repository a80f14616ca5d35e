"""cffi build script (API mode) for edgepanel's C kernels: edgepanel.kernels._ep.

setup.py hands `ffibuilder` to setuptools; `python -m edgepanel.kernels._build` builds in place.
cdef reads csrc/include/edgepanel.h with its preprocessor lines removed: that header is the whole
ABI.  Sources are chosen by target machine: each ISA file #errors on the wrong one.
"""
from __future__ import annotations

import contextlib
import os
import platform
import re
import shlex
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
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
# Python's own CFLAGS, which setuptools passes first, hold -g, and gcc's tracking of where each
# variable lives through the inlined AVX-512 kernels was most of the build: x86_avx512.c compiled
# in 91 s with it and 31 s without (gcc 12; the same machine code, byte for byte, and the debug
# information keeps types, lines and variables).  Only where the compiler accepts the flag.
FAST_DEBUG_CFLAGS = ["-fno-var-tracking-assignments"]


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


def compiler_command() -> list[str]:
    """The C compiler setuptools runs: $CC, else the one Python was built with."""
    return shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")


def accepted(flags: list[str], cc: list[str] | None = None) -> list[str]:
    """flags, if the compiler compiles an empty file with them (gcc does; clang refuses
    -fno-var-tracking-assignments), else none of them."""
    try:
        r = subprocess.run([*(cc or compiler_command()), *flags, "-x", "c", "-c", "-o", os.devnull, "-"],
                           input="int edgepanel_probe;\n", capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return []
    return flags if r.returncode == 0 else []


def parallel_compile(compiler):
    """Compile the extension's sources on every usable core, largest first (distutils compiles
    them one after another: the AVX-512 file alone takes most of the build).  Through distutils'
    own steps (_setup_compile, _get_cc_args, _compile), so flags and outputs are unchanged; a
    compiler class without them, or one core, keeps the serial compile."""
    jobs = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if jobs < 2 or not all(hasattr(compiler, m) for m in ("_setup_compile", "_get_cc_args", "_compile")):
        return

    def compile(sources, output_dir=None, macros=None, include_dirs=None, debug=False,
                extra_preargs=None, extra_postargs=None, depends=None):
        macros, objects, extra_postargs, pp_opts, build = compiler._setup_compile(
            output_dir, macros, include_dirs, sources, depends, extra_postargs)
        cc_args = compiler._get_cc_args(pp_opts, debug, extra_preargs)
        todo = sorted((o for o in objects if o in build), key=lambda o: -os.path.getsize(build[o][0]))

        def one(obj):
            src, ext = build[obj]
            compiler._compile(obj, src, ext, cc_args, extra_postargs, pp_opts)

        with ThreadPoolExecutor(min(jobs, max(1, len(todo)))) as pool:
            for _ in pool.map(one, todo):   # the first failure raises here, as the serial loop's would
                pass
        return objects

    compiler.compile = compile


def make_builder() -> FFI:
    ffi = FFI()
    ffi.cdef(cdef_text())
    ffi.set_source(
        "edgepanel.kernels._ep",
        '#include "edgepanel.h"\n',
        sources=sources(),
        include_dirs=["csrc/include"],
        extra_compile_args=compile_args() + accepted(FAST_DEBUG_CFLAGS),
        extra_link_args=["-pthread"],
        libraries=["m"],
    )
    return ffi


ffibuilder = make_builder()

@contextlib.contextmanager
def parallel_builds():
    """Within the block, cffi's compile (setuptools' build_ext, which it runs) compiles the sources
    in parallel, as setup.py's install does."""
    from setuptools.command.build_ext import build_ext

    serial = build_ext.build_extension

    def build_extension(self, ext):
        parallel_compile(self.compiler)
        return serial(self, ext)

    build_ext.build_extension = build_extension
    try:
        yield
    finally:
        build_ext.build_extension = serial


def in_place():
    """Build the extension into the checkout (what tools/ab_engine.py and worktree builds use)."""
    os.chdir(ROOT)
    with parallel_builds():
        ffibuilder.compile(tmpdir=str(ROOT), verbose=True)


if __name__ == "__main__":
    in_place()
