"""The C kernels outside Python: the standalone checker (tests/c/kernel_check.c) compares every
compiled ISA variant with the scalar specification bit for bit and with the NumPy known answers,
built natively, with the AVX-512 file emulated through SIMDe, and for aarch64 under qemu-user
(Raspberry Pi 4: cortex-a72, Pi 5: cortex-a76).  Needs gcc; CI installs libsimde-dev,
gcc-aarch64-linux-gnu and qemu-user.  Outside CI a missing tool skips its test; in CI it fails."""
import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KAT = ROOT / "tests" / "data" / "kernels_kat.bin"
COMMON = ["csrc/ref.c", "csrc/dispatch.c", "csrc/threads.c", "tests/c/kernel_check.c"]
FLAGS = ["-O2", "-std=c11", "-D_GNU_SOURCE", "-ffp-contract=off", "-Wall", "-Werror", "-Icsrc/include"]


def need(tool: str, what: str):
    if shutil.which(tool) or Path(tool).exists():
        return
    msg = f"{tool} not found: {what}"
    if os.environ.get("CI"):
        pytest.fail(msg + " (CI must install it: see .ci/run)")
    pytest.skip(msg)


def build_and_run(tmp_path, cc, extra_flags, sources, runner=()):
    exe = tmp_path / "kernel_check"
    cmd = [cc, *FLAGS, *extra_flags, *sources, *COMMON, "-o", str(exe), "-lm", "-pthread"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    res = subprocess.run([*runner, str(exe), str(KAT)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "known answers: 7 cases" in res.stdout and res.stdout.rstrip().endswith("ok"), res.stdout
    return res.stdout


def test_kat_file_is_current():
    spec = importlib.util.spec_from_file_location("make_kat", ROOT / "tools" / "make_kat.py")
    make_kat = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_kat)
    assert KAT.read_bytes() == make_kat.build(), "tests/data/kernels_kat.bin is stale: run python tools/make_kat.py"


@pytest.mark.skipif(os.uname().machine not in ("x86_64", "AMD64"), reason="x86-64 host")
def test_native_x86(tmp_path):
    need("gcc", "the C compiler")
    out = build_and_run(tmp_path, "gcc", [], ["csrc/x86_avx2.c", "csrc/x86_avx512.c"])
    assert "compiled variants: avx512vnni,avx512bw,avx2,scalar" in out


def test_avx512_emulated_with_simde(tmp_path):
    """The AVX-512 file, run through SIMDe's portable intrinsics, on any host."""
    need("/usr/include/simde/x86/avx512.h", "SIMDe headers (Debian: libsimde-dev)")
    out = build_and_run(tmp_path, "gcc", ["-DEP_SIMDE", "-O1", "-Wno-error"],
                        ["csrc/x86_avx2.c", "csrc/x86_avx512.c"])
    assert "best here: avx512vnni" in out


@pytest.mark.parametrize("cpu", ["cortex-a72", "cortex-a76"])
def test_aarch64_neon_under_qemu(tmp_path, cpu):
    need("aarch64-linux-gnu-gcc", "the aarch64 cross compiler (Debian: gcc-aarch64-linux-gnu)")
    need("qemu-aarch64", "qemu user-mode emulation (Debian: qemu-user)")
    out = build_and_run(tmp_path, "aarch64-linux-gnu-gcc", ["-march=armv8-a"], ["csrc/arm_neon.c"],
                        runner=("qemu-aarch64", "-L", "/usr/aarch64-linux-gnu", "-cpu", cpu))
    assert "compiled variants: neon,scalar; best here: neon" in out


def test_isa_file_refuses_the_wrong_target(tmp_path):
    need("gcc", "the C compiler")
    machine = os.uname().machine
    wrong = "csrc/arm_neon.c" if machine == "x86_64" else "csrc/x86_avx2.c"
    res = subprocess.run(["gcc", *FLAGS, "-c", wrong, "-o", str(tmp_path / "x.o")], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode != 0 and "only" in res.stderr
