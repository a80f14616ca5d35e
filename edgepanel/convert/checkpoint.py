"""Resumable conversion: what a conversion has finished, kept beside its output until it is done.

    OUT.ep.work/calib.safetensors   the layers fitted so far (planes, scales, errors) and the
                                    calibration stream after the last of them, or every fitted
                                    tensor once calibration is done
    OUT.ep.work/tune.safetensors    the scale multipliers, Adam's moments and the step reached

Each file is written atomically and names the conversion it belongs to (the source's path, size
and modification time, and the recipe): an interrupted conversion (Ctrl-C, a killed process) run
again with the same source and recipe resumes from its last checkpoint and gives the same file
as an uninterrupted run; anything else finds no checkpoint and starts over.  The directory goes
once the output is written.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from .. import bits
from ..errors import FormatError

FORMAT = "edgepanel-conversion-checkpoint"
VERSION = 1
EVERY = 20.0   # seconds at most between two checkpoints of a stage


def identity(src: Path, recipe_dict: dict) -> str:
    """What a checkpoint must match: the source (path, size, modification time) and the recipe."""
    st = Path(src).stat()
    files = sorted(Path(src).glob("*")) if Path(src).is_dir() else [Path(src)]
    return json.dumps({"version": VERSION, "source": str(Path(src).resolve()), "size": st.st_size,
                       "files": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()],
                       "recipe": recipe_dict}, sort_keys=True)


class WorkDir:
    """Checkpoints of one conversion (see the module docstring); `every` seconds at most between
    two writes of the same stage (the last write of a stage is always made)."""

    def __init__(self, out: Path, ident: str, log=None, every: float | None = None):
        self.dir = Path(out).with_name(Path(out).name + ".work")
        self.ident, self.log = ident, log or (lambda m: None)
        self.every = EVERY if every is None else every
        self._last: dict[str, float] = {}

    def load(self, stage: str) -> tuple[dict, dict] | None:
        """(tensors copied into memory, metadata) of `stage`'s checkpoint, or None when there is
        none for this conversion (a checkpoint of another source or recipe is removed)."""
        path = self.dir / f"{stage}.safetensors"
        if not path.exists():
            return None
        from ..format import SafetensorsFile
        try:
            f = SafetensorsFile(path)
            meta = f.metadata
            if meta.get("format") != FORMAT or meta.get("identity") != self.ident:
                self.log(f"{path}: a checkpoint of another conversion; starting over")
                path.unlink()
                return None
            return {k: np.array(v) for k, v in f.tensors.items()}, json.loads(meta["state"])
        except (FormatError, KeyError, ValueError) as exc:
            self.log(f"{path}: unreadable checkpoint ({exc}); starting over")
            path.unlink(missing_ok=True)
            return None

    def due(self, stage: str) -> bool:
        return time.monotonic() - self._last.get(stage, 0.0) >= self.every

    def save(self, stage: str, tensors: dict[str, np.ndarray], state: dict):
        from ..format import write_tensors
        self.dir.mkdir(parents=True, exist_ok=True)
        write_tensors(self.dir / f"{stage}.safetensors", tensors,
                      {"format": FORMAT, "identity": self.ident, "state": json.dumps(state)})
        self._last[stage] = time.monotonic()

    def clear(self):
        shutil.rmtree(self.dir, ignore_errors=True)


# ---- fitted tensors <-> checkpoint arrays ----------------------------------------------------

def pack_fitted(fitted: dict) -> tuple[dict[str, np.ndarray], dict]:
    """Calibration's results (name -> (PlaneMatrix or None, error[, how, calibrated])) as arrays
    and a JSON-able description."""
    arrays, desc = {}, {}
    for name, res in fitted.items():
        pm, rest = res[0], list(res[1:])
        d = {"rest": [float(rest[0])] + rest[1:]}
        if pm is not None:
            if pm.scale_rows is not None or pm.scales.dtype != np.float32:
                raise AssertionError(f"{name}: calibration's scales are float32 until written")
            arrays[name + ".planes"] = pm.planes
            arrays[name + ".scales"] = pm.scales
            d.update(out=pm.out_features, inp=pm.in_features, group=pm.group)
        desc[name] = d
    return arrays, desc


def unpack_fitted(arrays: dict, desc: dict) -> dict:
    fitted = {}
    for name, d in desc.items():
        pm = None
        if "out" in d:
            pm = bits.PlaneMatrix(arrays[name + ".planes"], arrays[name + ".scales"], d["out"], d["inp"], d["group"])
        fitted[name] = (pm, *d["rest"])
    return fitted
