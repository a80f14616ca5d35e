"""The C kernels and the C forward pass under AddressSanitizer and UndefinedBehaviorSanitizer.

    python tools/sanitize.py [BUILD_DIR]     # CI runs it; BUILD_DIR keeps the build for another run

Builds the cffi extension from csrc/ with -fsanitize=address,undefined (errors fatal: any report
ends the process with a non-zero status) into a temporary copy of the package, then, with the ASan
runtime preloaded into Python, runs the kernel tests on every ISA variant this CPU runs, the
sampler's tests (every path of csrc/sample.c), and a forward pass, generation, batched scoring
and four threads on tiny models of every kind of tensor (tests/fuzz/seeds.py).  Exit status 0
means zero reports.  Needs gcc; about 2-4 minutes on two cores.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]
KERNEL_TESTS = [str(ROOT / "tests" / t) for t in ("test_kernels.py", "test_kernel_errors.py", "test_c_binding.py",
                                                  "test_sample.py")]

FORWARD = r'''
import sys, tempfile, threading
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import numpy as np
import edgepanel
from edgepanel.kernels import native
import seeds

assert native.lib is not None and "-fsanitize" in open(native.__file__.replace("native.py", "") + "SANITIZED").read()
with tempfile.TemporaryDirectory() as tmp:
    for recipe in seeds.MODEL_RECIPES:
        path = seeds.model_file(Path(tmp) / f"{recipe}.ep", recipe, tokenizer=True)
        for isa in native.runnable_isas():
            m = edgepanel.load(path, threads=2)
            m.engine.kt = native.CBackend(isa).table
            ids = m.generate_ids([1, 2, 3], max_tokens=20, temperature=0.8, seed=1)
            lp = m.score([[1, 2, 3, 4, 5], [6, 7] * 9], masks=None)
            top = m.score_at([[1, 2, 3, 4]], [np.array([[1, 2], [3, 4], [5, 6]])])
            assert np.isfinite(m.logits(list(range(40)))).all() and all(np.isfinite(x).all() for x in lp + top)
            m.generate([{"role": "user", "content": "a b c"}], max_tokens=5)
            errors = []
            def work(k):
                try:
                    for _ in range(3):
                        m.generate_ids([k, 2, 3], max_tokens=8, temperature=0.5, seed=k)
                        m.token_logprobs([k, 5, 6, 7])
                except Exception as exc:
                    errors.append(exc)
            threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
            [t.start() for t in threads]
            [t.join() for t in threads]
            assert not errors, errors
            print(f"forward ok: {recipe} on {isa}: {ids[:5]}...", flush=True)
'''


def build(dest: Path) -> Path:
    """A copy of the edgepanel package in `dest` whose C extension is the sanitized build."""
    sys.path.insert(0, str(ROOT))
    from cffi import FFI

    from edgepanel.kernels import _build

    pkg = dest / "edgepanel"
    shutil.copytree(ROOT / "edgepanel", pkg, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    ffi = FFI()
    ffi.cdef(_build.cdef_text())
    flags = [f for f in _build.compile_args() if not f.startswith("-O")] + ["-O1"] + SANITIZE + _build.accepted(
        _build.FAST_DEBUG_CFLAGS)
    ffi.set_source("edgepanel.kernels._ep", '#include "edgepanel.h"\n',
                   sources=[str(ROOT / s) for s in _build.sources()], include_dirs=[str(ROOT / "csrc" / "include")],
                   extra_compile_args=flags, extra_link_args=["-pthread", *SANITIZE], libraries=["m"])
    with _build.parallel_builds():
        so = Path(ffi.compile(tmpdir=str(dest / "build"), verbose=False))
    shutil.copy(so, pkg / "kernels" / so.name)
    (pkg / "kernels" / "SANITIZED").write_text(" ".join(flags) + "\n")
    return dest


def runtime_env(dest: Path) -> dict:
    asan = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True, check=True).stdout.strip()
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(dest), str(ROOT / "tests"), str(ROOT / "tests" / "fuzz")]),
        LD_PRELOAD=asan,   # the ASan runtime must come first; Python itself is not instrumented
        # Python's allocator keeps memory for the process's life: leaks are not what is checked here
        ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:exitcode=86:halt_on_error=1",
        UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:exitcode=87",
        EDGEPANEL_BACKEND="c", PYTHONDONTWRITEBYTECODE="1")
    env.pop("EDGEPANEL_ISA", None)
    return env


def main(argv: list[str]) -> int:
    """argv: [BUILD_DIR] to keep (and reuse) the sanitized build there; else a temporary one."""
    with tempfile.TemporaryDirectory(prefix="edgepanel-asan-") as tmp:
        dest = Path(argv[0]) if argv else Path(tmp)
        if not (dest / "edgepanel" / "kernels" / "SANITIZED").exists():
            print(f"+ building the extension with {' '.join(SANITIZE)}", flush=True)
            build(dest)
        env = runtime_env(dest)
        steps = [[sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *KERNEL_TESTS],
                 [sys.executable, "-c", FORWARD, str(ROOT / "tests" / "fuzz")]]
        for cmd in steps:
            print("+", "forward passes on tiny models" if "-c" in cmd else " ".join(cmd), flush=True)
            # run from the copy, so `import edgepanel` finds the sanitized package first
            rc = subprocess.run(cmd, cwd=dest, env=env).returncode
            if rc != 0:
                print(f"sanitize: failed with status {rc} (86: an AddressSanitizer report, 87: UndefinedBehaviorSanitizer)")
                return 1
    print("sanitize: kernels and forward passes ran with zero sanitizer reports")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
