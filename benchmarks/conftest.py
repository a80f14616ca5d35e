"""Benchmarks run on one thread unless a test says otherwise; NumPy's BLAS must be told before it
loads, so this sets the thread variables at import time."""
import os
import sys

for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")
if "numpy" in sys.modules:  # pragma: no cover - only when a plugin imported numpy first
    import warnings

    warnings.warn("numpy was imported before benchmarks/conftest.py: its BLAS may use several threads")
