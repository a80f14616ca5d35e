"""Without the C extension edgepanel still imports and computes: Numba first, with one warning."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BLOCK_C = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "edgepanel.kernels._ep":
            raise ImportError("simulated: C extension not built")
sys.meta_path.insert(0, Block())
"""


def run_py(code: str, env_extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPANEL_")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-W", "always", "-c", BLOCK_C + code], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)


def test_import_without_c_falls_back_to_numba_with_one_warning():
    res = run_py(
        "import numpy as np, edgepanel\n"
        "from edgepanel import kernels, bits\n"
        "print('INFO', kernels.info())\n"
        "x = np.random.default_rng(0).standard_normal((3, 70)).astype(np.float32)\n"
        "q, s = kernels.quantize_i8(x)\n"
        "w = bits.PlaneMatrix.from_signs(np.ones((1, 5, 70), np.int8), np.ones((1, 5, 1), np.float32), 70)\n"
        "y = kernels.gemm_planes_i8(q, s, w)\n"
        "assert np.allclose(y, bits.gemm_planes_i8(q, s, w), rtol=1e-6)\n"
        "print('OK')\n")
    assert res.returncode == 0, res.stderr
    assert "INFO numba" in res.stdout and "OK" in res.stdout
    assert res.stderr.count("EdgepanelWarning") == 1, res.stderr
    assert "C kernels are not built" in res.stderr


def test_forcing_c_without_it_is_a_clear_error():
    res = run_py("from edgepanel import kernels\nkernels.get()\n", {"EDGEPANEL_BACKEND": "c"})
    assert res.returncode != 0
    assert "BackendUnavailable: the C kernels are not built" in res.stderr


def test_env_forces_backend_and_isa():
    res = run_py("from edgepanel import kernels\nprint(kernels.info())", {"EDGEPANEL_BACKEND": "numpy"})
    assert res.stdout.strip() == "numpy"
    code = "from edgepanel import kernels\nprint(kernels.info())"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPANEL_")}
    env["EDGEPANEL_ISA"] = "scalar"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.stdout.strip() == "c/scalar", res.stderr


def test_install_without_a_compiler_still_succeeds(tmp_path):
    """A wheel built with a compiler that always fails installs without the extension."""
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    env = dict(os.environ, CC="false", CXX="false", LDSHARED="false")
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                          str(tmp_path / "dist"), str(src)], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    wheels = list((tmp_path / "dist").glob("edgepanel-*.whl"))
    assert len(wheels) == 1
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "edgepanel/kernels/_numba.py" in names
    assert not any(n.endswith(".so") for n in names)
