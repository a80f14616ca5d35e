"""Build glue: the cffi extension for the C kernels, optional so that a machine without a working
C compiler still installs edgepanel (the kernels then fall back to Numba).  Metadata lives in
pyproject.toml."""
import importlib.util
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """Build the C kernels when possible; on failure warn and carry on without them."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # no compiler, missing headers, ...
            self._skip(exc)

    def build_extension(self, ext):
        try:
            _build_script().parallel_compile(self.compiler)
            super().build_extension(ext)
        except Exception as exc:
            self._skip(exc)

    @staticmethod
    def _skip(exc):
        sys.stderr.write(
            "\nWARNING: edgepanel's C kernels could not be built (%s: %s).\n"
            "edgepanel will run on its Numba fallback kernels, which are slower.\n\n"
            % (type(exc).__name__, exc))


def _build_script():
    """edgepanel/kernels/_build.py (the cffi build script, which needs only cffi), loaded by path:
    the package itself does not import in the build environment."""
    spec = importlib.util.spec_from_file_location(
        "_edgepanel_build", Path(__file__).resolve().parent / "edgepanel" / "kernels" / "_build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


setup(
    cffi_modules=["edgepanel/kernels/_build.py:ffibuilder"],
    cmdclass={"build_ext": OptionalBuildExt},
)
