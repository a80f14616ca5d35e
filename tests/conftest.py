import os

import numpy as np
import pytest

from edgepanel import kernels


def backends_under_test():
    """Every (backend, isa) this machine runs; EDGEPANEL_BACKEND narrows it to one backend
    (CI runs the kernel tests a second time with EDGEPANEL_BACKEND=numba)."""
    forced = os.environ.get("EDGEPANEL_BACKEND")
    combos = kernels.available()
    if forced:
        combos = [(b, i) for b, i in combos if b == forced]
        assert combos, f"EDGEPANEL_BACKEND={forced} is not available here"
    return combos


def backend_id(combo):
    b, i = combo
    return f"{b}-{i}" if i else b


@pytest.fixture(params=backends_under_test(), ids=backend_id)
def backend(request):
    name, isa = request.param
    return kernels.get(name, isa)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
