"""edgepanel: binarized language models on CPU-only edge devices.

    import edgepanel
    m = edgepanel.load("model.ep")
    print(m.generate("Once upon a time", max_tokens=64))
"""
import os as _os
import sys as _sys

# NumPy's OpenBLAS keeps its idle threads spinning for about 0.1 s after every product (2^28
# cycles), on the very cores edgepanel's C kernels take next.  Calibration alternates the two
# every few milliseconds: on 2 cores the spinning thread took a core from the fitting loop (its
# column loop ran at half speed; the calibration, 6-16 s more of 68-76 s).  OpenBLAS reads this
# once, when NumPy loads it: from here when edgepanel is imported first (the command line always
# is); a value the user set wins.
_BLAS_QUIET = "numpy" not in _sys.modules or "OPENBLAS_THREAD_TIMEOUT" in _os.environ
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")   # 2^4 cycles: sleep as soon as idle

from .errors import BackendUnavailable, EdgepanelError, EdgepanelWarning, FormatError  # noqa: E402

__version__ = "0.1.0"

__all__ = ["BackendUnavailable", "EdgepanelError", "EdgepanelWarning", "FormatError", "load", "Model",
           "best_of", "reward", "__version__"]


def __getattr__(name):  # keep `import edgepanel` light: the model code loads on first use
    if name in ("load", "Model"):
        from .model import model
        return getattr(model, name)
    if name in ("reward", "best_of"):   # the implicit reward of preference tuning: edgepanel/tune/reward.py
        from .tune import reward
        return getattr(reward, name)
    raise AttributeError(f"module 'edgepanel' has no attribute {name!r}")
