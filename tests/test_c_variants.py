"""The C kernels outside Python: the standalone checker (tests/c/kernel_check.c) compares every
compiled ISA variant with the scalar specification bit for bit and with the NumPy known answers,
built natively, with the AVX-512 file emulated through SIMDe, and for aarch64 under qemu-user
(Raspberry Pi 4: cortex-a72, Pi 5: cortex-a76).  The aarch64 objects, compiled as the package build
compiles them, are disassembled: nothing beyond armv8-a outside the dot-product functions, so a
Pi 4 never meets an illegal instruction (tools/arm64_isa.py).  Needs gcc; CI installs libsimde-dev,
gcc-aarch64-linux-gnu, qemu-user and clang.  Outside CI a missing tool skips its test; in CI it fails."""
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import threading
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


def load_file(path: Path):
    """A script of tools/ (or the build script) as a module, without making its folder a package."""
    name = "_loaded_" + path.stem
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def test_kat_file_is_current():
    make_kat = load_file(ROOT / "tools" / "make_kat.py")
    assert KAT.read_bytes() == make_kat.build(), "tests/data/kernels_kat.bin is stale: run python tools/make_kat.py"


@pytest.mark.skipif(os.uname().machine not in ("x86_64", "AMD64"), reason="x86-64 host")
def test_native_x86(tmp_path):
    need("gcc", "the C compiler")
    out = build_and_run(tmp_path, "gcc", [], ["csrc/x86_avx2.c", "csrc/x86_avx512.c"])
    assert "compiled variants: avx512vnni,avx512bw,avx2,scalar" in out


@pytest.mark.skipif(os.uname().machine not in ("x86_64", "AMD64"), reason="x86-64 host")
def test_native_x86_clang(tmp_path):
    """Built by clang (CC=clang pip install), every variant gives the scalar specification's bits:
    clang's __builtin_cpu_supports does not know "f16c", which ep_simd_x86.h asks CPUID for."""
    need("clang", "clang (Debian: clang)")
    out = build_and_run(tmp_path, "clang", [], ["csrc/x86_avx2.c", "csrc/x86_avx512.c"])
    assert "compiled variants: avx512vnni,avx512bw,avx2,scalar" in out
    cpu = set(next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")).split(":", 1)[1].split())
    checked = re.search(r"checked against scalar here: (\S*)", out).group(1).split(",")
    assert ("avx2" in checked) == ({"avx2", "fma", "f16c"} <= cpu), out


def test_avx512_emulated_with_simde(tmp_path):
    """The AVX-512 file, run through SIMDe's portable intrinsics, on any host."""
    need("/usr/include/simde/x86/avx512.h", "SIMDe headers (Debian: libsimde-dev)")
    out = build_and_run(tmp_path, "gcc", ["-DEP_SIMDE", "-O1", "-Wno-error"],
                        ["csrc/x86_avx2.c", "csrc/x86_avx512.c"])
    assert "best here: avx512vnni" in out


# what each board's core runs: the Pi 4's A72 has no dot product, the Pi 5's A76 has it
AARCH64_RUNS = {"cortex-a72": "neon", "cortex-a76": "neon_dotprod,neon"}


@pytest.mark.parametrize("cpu", sorted(AARCH64_RUNS))
def test_aarch64_neon_under_qemu(tmp_path, cpu):
    need("aarch64-linux-gnu-gcc", "the aarch64 cross compiler (Debian: gcc-aarch64-linux-gnu)")
    need("qemu-aarch64", "qemu user-mode emulation (Debian: qemu-user)")
    out = build_and_run(tmp_path, "aarch64-linux-gnu-gcc", ["-march=armv8-a"], ["csrc/arm_neon.c"],
                        runner=("qemu-aarch64", "-L", "/usr/aarch64-linux-gnu", "-cpu", cpu))
    runs = AARCH64_RUNS[cpu]
    assert f"compiled variants: neon_dotprod,neon,scalar; best here: {runs.split(',')[0]}" in out
    assert f"checked against scalar here: {runs}\n" in out


# ---- the baseline aarch64 build, disassembled ----------------------------------------------------

arm64_isa = load_file(ROOT / "tools" / "arm64_isa.py")
package_build = load_file(ROOT / "edgepanel" / "kernels" / "_build.py")
AARCH64_CC, AARCH64_OBJDUMP = "aarch64-linux-gnu-gcc", "aarch64-linux-gnu-objdump"


def cross_compile(out_dir: Path, flags: list[str]) -> list[Path]:
    """csrc's aarch64 sources compiled one by one (-fPIC, as setuptools compiles an extension)."""
    objects = []
    for src in package_build.sources("aarch64"):
        obj = out_dir / (Path(src).stem + ".o")
        subprocess.run([AARCH64_CC, *flags, "-fPIC", "-Icsrc/include", "-c", src, "-o", str(obj)],
                       cwd=ROOT, check=True, capture_output=True, text=True)
        objects.append(obj)
    return objects


def link_shared(objects: list[Path], out: Path) -> Path:
    """Linked as the extension is (-shared -pthread -lm): static libgcc pieces come in here."""
    subprocess.run([AARCH64_CC, "-shared", "-pthread", *map(str, objects), "-lm", "-o", str(out)],
                   check=True, capture_output=True, text=True)
    return out


@pytest.fixture(scope="module")
def baseline_build(tmp_path_factory):
    """The package build's aarch64 objects and their shared library."""
    need(AARCH64_CC, "the aarch64 cross compiler (Debian: gcc-aarch64-linux-gnu)")
    need(AARCH64_OBJDUMP, "the aarch64 binutils (Debian: binutils-aarch64-linux-gnu)")
    d = tmp_path_factory.mktemp("arm64")
    objects = cross_compile(d, package_build.compile_args("aarch64"))
    return objects, link_shared(objects, d / "_ep.so")


def test_aarch64_build_is_baseline_armv8a():
    flags = package_build.compile_args("aarch64")
    marches = [f for f in flags if f.startswith(("-march=", "-mcpu="))]
    assert marches == ["-march=armv8-a"], marches
    assert "-mno-outline-atomics" in flags  # see _build.ISA_CFLAGS and test_outline_atomics_... below
    assert "csrc/arm_neon.c" in package_build.sources("aarch64")


def test_nothing_beyond_armv8a_outside_the_dotprod_functions(baseline_build):
    objects, shared = baseline_build
    dot_functions = {}
    for path in [*objects, shared]:
        bad, dot = arm64_isa.check(arm64_isa.disassemble(path, AARCH64_OBJDUMP))
        assert not bad, f"{path.name}: " + "; ".join(
            f"{i.function}: {i.mnemonic} {i.operands} [{fam}]" for i, fam in bad[:20])
        dot_functions[path.name] = dot
    # the dot-product path is there, in the marked function only: the check sees what it forbids
    assert dot_functions["arm_neon.o"].get("neon_dotprod_i8_rows", 0) >= 1, dot_functions
    assert dot_functions["_ep.so"].get("neon_dotprod_i8_rows", 0) >= 1, dot_functions


def test_dotprod_functions_are_marked_by_name():
    """Only EP_DOTPROD may raise the target, and what it marks says `dotprod` in its name (the
    disassembly check's rule for telling them apart)."""
    text = (ROOT / "csrc" / "arm_neon.c").read_text()
    assert text.count("target(") == 1, "arm_neon.c raises the target outside the EP_DOTPROD macro"
    assert '#define EP_DOTPROD __attribute__((target("arch=armv8.2-a+dotprod")))' in text
    marked = re.findall(r"^EP_DOTPROD\s+(?:static\s+)?[\w\s\*]*?\b(\w+)\s*\(", text, flags=re.M)
    assert marked and all(arm64_isa.marked_for_dotprod(name) for name in marked), marked
    assert "neon_dotprod_i8_rows" in marked
    assert len(re.findall(r"EP_DOTPROD", text)) == len(marked) + 2  # the #define and the header comment


def test_the_check_finds_what_a_pi4_cannot_run(tmp_path):
    """Built for armv8.1-a, the thread pool's atomics become LSE instructions: the check names them."""
    need(AARCH64_CC, "the aarch64 cross compiler (Debian: gcc-aarch64-linux-gnu)")
    need(AARCH64_OBJDUMP, "the aarch64 binutils (Debian: binutils-aarch64-linux-gnu)")
    obj = tmp_path / "threads.o"
    subprocess.run([AARCH64_CC, "-O2", "-march=armv8.1-a", "-Icsrc/include", "-c", "csrc/threads.c", "-o", str(obj)],
                   cwd=ROOT, check=True, capture_output=True, text=True)
    bad, _ = arm64_isa.check(arm64_isa.disassemble(obj, AARCH64_OBJDUMP))
    assert bad and {fam for _, fam in bad} == {"LSE atomics (Armv8.1)"}, bad
    pool = {"worker_main", "run_part", "run_job", "ep_parallel_for", "ep_parallel_claim", "ep_parallel_team"}
    assert {i.function.split(".")[0] for i, _ in bad} <= pool  # and gcc's clones (run_part.part.0)


def test_outline_atomics_bring_lse_helpers(tmp_path):
    """Why the build says -mno-outline-atomics: gcc's default calls libgcc's __aarch64_ldadd*
    helpers, which run LSE only where the kernel reports it (safe on a Pi 4), but link LSE
    instructions into the extension; with the flag the atomics are ldaxr/stlxr loops."""
    need(AARCH64_CC, "the aarch64 cross compiler (Debian: gcc-aarch64-linux-gnu)")
    need(AARCH64_OBJDUMP, "the aarch64 binutils (Debian: binutils-aarch64-linux-gnu)")
    flags = [f for f in package_build.compile_args("aarch64") if f != "-mno-outline-atomics"]
    shared = link_shared(cross_compile(tmp_path, flags), tmp_path / "outline.so")
    bad, _ = arm64_isa.check(arm64_isa.disassemble(shared, AARCH64_OBJDUMP))
    assert bad and all(i.function.startswith("__aarch64_") for i, _ in bad), bad


@pytest.mark.parametrize("mnemonic, operands, family", [
    ("ldaddal", "w0, w0, [x1]", "LSE atomics (Armv8.1)"),
    ("casal", "x0, x1, [x2]", "LSE atomics (Armv8.1)"),
    ("swpb", "w0, w1, [x2]", "LSE atomics (Armv8.1)"),
    ("stadd", "w0, [x1]", "LSE atomics (Armv8.1)"),
    ("sdot", "v0.4s, v1.16b, v2.16b", "dot product (Armv8.2)"),
    ("udot", "v0.2s, v1.8b, v2.4b[1]", "dot product (Armv8.2)"),
    ("fadd", "h0, h1, h2", "half-precision arithmetic (Armv8.2)"),
    ("fmla", "v0.8h, v1.8h, v2.8h", "half-precision arithmetic (Armv8.2)"),
    ("fcvtzs", "w0, h1", "half-precision arithmetic (Armv8.2)"),
    ("fmov", "h0, w1", "half-precision arithmetic (Armv8.2)"),
    ("aese", "v0.16b, v1.16b", "crypto"),
    ("sha256h", "q0, q1, v2.4s", "crypto"),
    ("pmull", "v0.1q, v1.1d, v2.1d", "crypto"),
    ("crc32cx", "w0, w0, x1", "CRC32 (optional in Armv8.0)"),
    ("sqrdmlah", "v0.4s, v1.4s, v2.4s", "rounding doubling multiply-accumulate (Armv8.1)"),
    ("fadd", "z0.s, z1.s, z2.s", "SVE"),
    (".inst", "0x12345678", "an encoding objdump does not know"),
    # armv8-a look-alikes
    ("ldaxr", "w2, [x0]", None), ("stlxr", "w1, w2, [x0]", None), ("shadd", "v0.8h, v1.8h, v2.8h", None),
    ("bfi", "w0, w1, #3, #4", None), ("fcvtl", "v0.4s, v1.4h", None), ("fcvt", "s0, h1", None),
    ("fcvtn", "v0.4h, v1.4s", None), ("pmull", "v0.8h, v1.8b, v2.8b", None), ("addv", "h0, v1.8h", None),
    ("ldr", "h0, [x1]", None), ("smlal2", "v0.8h, v1.16b, v2.16b", None), ("sadalp", "v3.4s, v0.8h", None),
    ("fmla", "v0.4s, v1.4s, v2.4s", None), ("paciasp", "", None),
])
def test_instruction_families(mnemonic, operands, family):
    assert arm64_isa.family(mnemonic, operands) == family


def test_isa_file_refuses_the_wrong_target(tmp_path):
    need("gcc", "the C compiler")
    machine = os.uname().machine
    wrong = "csrc/arm_neon.c" if machine == "x86_64" else "csrc/x86_avx2.c"
    res = subprocess.run(["gcc", *FLAGS, "-c", wrong, "-o", str(tmp_path / "x.o")], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode != 0 and "only" in res.stderr


def test_kernel_counts_isolate_one_product(tmp_path):
    """tools/kernel_counts.py counts a product's instructions under qemu as the difference of two
    runs: exact and repeatable (the same count twice), and linear in the repetitions (so set-up
    and exit are left out)."""
    need("aarch64-linux-gnu-gcc", "the aarch64 cross compiler (Debian: gcc-aarch64-linux-gnu)")
    need("qemu-aarch64", "qemu user-mode emulation (Debian: qemu-user)")
    kc = load_file(ROOT / "tools" / "kernel_counts.py")
    exe = kc.build(tmp_path, "aarch64")
    shape = [4, 2, 40, 130, 64]   # tokens, planes, rows (not whole tiles), inputs (a short group)
    runs = [kc.count(exe, "neon", "cortex-a72", shape, reps) for reps in (1, 2, 3)]
    assert kc.count(exe, "neon", "cortex-a72", shape, 2) == runs[1]
    assert runs[2] - runs[1] == runs[1] - runs[0] > 1000
    # the default model's 8-bit scales take the integer pass: another count, as exact
    u8 = [kc.count(exe, "neon", "cortex-a72", shape, reps, "u8") for reps in (1, 2, 2)]
    assert u8[1] == u8[2] and u8[1] - u8[0] > 1000 and u8[1] - u8[0] != runs[1] - runs[0]
    with pytest.raises(SystemExit, match="scales: f32, f16 or u8, not f64"):
        kc.count(exe, "neon", "cortex-a72", shape, 1, "f64")


@pytest.mark.skipif(os.uname().machine not in ("x86_64", "AMD64"), reason="x86-64 host")
def test_llama_bench_builds_an_avx2_only_llama_cpp_on_request():
    """tools/llama_bench.py --isa avx2 compares on an AVX-512 machine as on an AVX2-only one:
    llama.cpp's build turns AVX-512 and VNNI off (and AMX, always)."""
    lb = load_file(ROOT / "tools" / "llama_bench.py")
    flags = set(next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")).split(":", 1)[1].split())
    if "avx2" not in flags:
        pytest.skip("no AVX2 here")
    opts = lb.isa_options("avx2")
    assert "-DGGML_AVX2=ON" in opts and "-DGGML_NATIVE=OFF" in opts
    assert {"-DGGML_AVX512=OFF", "-DGGML_AVX512_VNNI=OFF", "-DGGML_AVX_VNNI=OFF", "-DGGML_AMX_INT8=OFF"} <= set(opts)
    assert ("-DGGML_AVX512=ON" in lb.isa_options()) == ("avx512f" in flags)


def test_llama_bench_rounds_take_ratios_within_each_round():
    """--rounds: each cell the median over rounds, each ratio to Q4_0 taken within its round (a
    round where another tenant slowed both sides gives the same ratio as a quiet one)."""
    lb = load_file(ROOT / "tools" / "llama_bench.py")

    def rnd(q4_tg, ep_tg, q4_pp=500.0, ep_pp=600.0):
        lc = [{"n_threads": 1, "model_filename": "/m/SmolLM2.Q4_0.gguf", "n_prompt": 0, "avg_ts": q4_tg, "stddev_ts": 1.0},
              {"n_threads": 1, "model_filename": "/m/SmolLM2.Q4_0.gguf", "n_prompt": 128, "avg_ts": q4_pp, "stddev_ts": 1.0},
              {"n_threads": 1, "model_filename": "/m/SmolLM2.Q8_0.gguf", "n_prompt": 0, "avg_ts": 80.0, "stddev_ts": 1.0}]
        ep = [{"threads": 1, "model_name": "k2g64.ep", "pp_tps": {"mean": ep_pp, "sd": 1.0}, "tg_tps": {"mean": ep_tg, "sd": 1.0}}]
        return ep, lc
    rounds = [rnd(100.0, 200.0), rnd(50.0, 100.0), rnd(120.0, 300.0)]   # ratios 2.0, 2.0, 2.5
    text = lb.ratios(rounds)
    assert "| k2g64 | decode | 2.00x (2.00-2.50) |" in text and "| k2g64 | prefill | 1.20x (1.20-1.20) |" in text
    ep, lc = lb._over_rounds(rounds)
    assert ep[0]["tg_tps"]["mean"] == 200.0 and lc[0]["avg_ts"] == 100.0 and lc[2]["avg_ts"] == 80.0
    assert lb._median([3.0, 1.0, 2.0, 10.0]) == 2.5


def test_build_flags_the_compiler_refuses_are_left_out(tmp_path):
    """FAST_DEBUG_CFLAGS go to gcc only: a compiler that refuses them (clang does) builds without."""
    need("gcc", "the C compiler")
    fast = package_build.FAST_DEBUG_CFLAGS
    assert fast and package_build.accepted(fast, ["gcc"]) == fast
    refuses = tmp_path / "cc"
    refuses.write_text("#!/bin/sh\necho \"error: unknown argument: '$1'\" >&2\nexit 1\n")
    refuses.chmod(0o755)
    assert package_build.accepted(fast, [str(refuses)]) == []
    assert package_build.accepted(fast, [str(tmp_path / "no-such-cc")]) == []


def test_fast_debug_flags_change_no_machine_code(tmp_path):
    """The flags that make the -g build three times faster leave every instruction as it was: the
    code sections of objects compiled with Python's -g, with and without them, are the same bytes."""
    need("gcc", "the C compiler")
    need("objcopy", "binutils")
    for src in ("csrc/forward.c", "csrc/sample.c"):
        texts = []
        for extra in ([], package_build.FAST_DEBUG_CFLAGS):
            obj, text = tmp_path / "x.o", tmp_path / f"x{len(texts)}.text"
            subprocess.run(["gcc", "-g", "-fPIC", *package_build.compile_args(), *extra, "-Icsrc/include", "-c", src,
                            "-o", str(obj)], cwd=ROOT, check=True, capture_output=True)
            subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(obj), str(text)], check=True)
            texts.append(text.read_bytes())
        assert len(texts[0]) > 1000 and texts[0] == texts[1], src


class _FakeCompiler:
    """distutils' compile steps, recorded: sources named 'bad' fail as a compiler error would."""

    def __init__(self):
        self.lock, self.calls, self.args = threading.Lock(), [], set()

    def _setup_compile(self, output_dir, macros, include_dirs, sources, depends, extra_postargs):
        objects = [str(s) + ".o" for s in sources]
        build = {o: (str(s), ".c") for o, s in zip(objects, sources)}
        del build[objects[0]]                    # up to date: distutils leaves it out of `build`
        return macros, objects, list(extra_postargs or []), ["-Iinc"], build

    def _get_cc_args(self, pp_opts, debug, before):
        return [*(before or []), "-g" if debug else "-O", *pp_opts]

    def _compile(self, obj, src, ext, cc_args, extra_postargs, pp_opts):
        with self.lock:
            self.calls.append(obj)
            self.args.add((tuple(cc_args), tuple(extra_postargs), tuple(pp_opts)))
        if "bad" in src:
            raise RuntimeError(f"error compiling {src}")

    def compile(self, *a, **k):
        raise AssertionError("the serial compile")


def test_parallel_compile_builds_each_stale_object_once(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    srcs = []
    for name, size in (("fresh", 10), ("small", 100), ("large", 5000), ("mid", 1000)):
        srcs.append(tmp_path / f"{name}.c")
        srcs[-1].write_text("x" * size)
    cc = _FakeCompiler()
    package_build.parallel_compile(cc)
    objects = cc.compile(srcs, extra_postargs=["-post"], debug=True)
    assert objects == [str(s) + ".o" for s in srcs]                       # all of them, in order
    assert sorted(cc.calls) == sorted(str(s) + ".o" for s in srcs[1:])    # the stale ones, once each
    assert str(srcs[2]) + ".o" in cc.calls[:2]                            # the largest among the first started
    assert cc.args == {(("-g", "-Iinc"), ("-post",), ("-Iinc",))}         # distutils' arguments, unchanged
    bad = tmp_path / "bad.c"
    bad.write_text("y" * 50)
    with pytest.raises(RuntimeError, match="error compiling .*bad.c"):
        cc.compile([srcs[0], srcs[1], bad])


def test_parallel_compile_keeps_the_serial_compile_on_one_core(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    cc = _FakeCompiler()
    serial = cc.compile
    package_build.parallel_compile(cc)
    assert cc.compile == serial
