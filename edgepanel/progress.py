"""Progress bars on stderr (tqdm), quiet when stderr is not a terminal unless forced."""
from __future__ import annotations

import sys


def bar(iterable=None, total=None, desc=None, unit="it", force=False, disable=False, **kw):
    """A tqdm bar on stderr; shown on a terminal or when `force`, never when `disable`."""
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dependency; stay silent without it
        return iterable
    disable = disable or not (force or sys.stderr.isatty())
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, file=sys.stderr,
                dynamic_ncols=True, leave=False, **kw)
