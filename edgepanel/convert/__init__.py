"""Convert a Hugging Face checkpoint directory or a GGUF file into an edgepanel model file.

    from edgepanel.convert import convert, Recipe
    report = convert("SmolLM2-dir", "smol.ep", Recipe(planes=2, group=64))

One module per source architecture, registered by its Hugging Face name, each with an explicit
table from source tensor names to edgepanel's (model/names.py); every source tensor is consumed
or the conversion fails.  Needs no compiled kernels.
"""
from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import bits, quantize
from ..errors import EdgepanelWarning, FormatError
from ..format import Metadata, ModelWriter
from ..tokenizer import Tokenizer, check_tokenizer_info
from . import bitnet, checkpoint, gpt2, llama, memory, qwen2  # noqa: F401  (register the architectures)
from .base import ARCHITECTURES, Emitted, Recipe, architecture_for, checked, row_planes

__all__ = ["convert", "Recipe", "ConversionReport", "supported_architectures"]


def supported_architectures() -> list[str]:
    return sorted(ARCHITECTURES)


@dataclass
class TensorReport:
    name: str
    shape: tuple
    kind: str
    planes: int = 0
    group: int = 0
    bits: float = 0.0            # bits per weight, scales included
    error: float = 0.0           # relative reconstruction error (Frobenius, or on the calibration inputs)
    calibrated: bool = False


@dataclass
class ConversionReport:
    path: Path
    rows: list[TensorReport] = field(default_factory=list)
    file_bytes: int = 0
    seconds: float = 0.0
    perplexity: dict | None = None   # {"before": ..., "after": ...} when an eval text was given
    tuning: dict | None = None       # {"kl_before": ..., "kl_after": ...} when the scales were tuned
    peak_rss: int | None = None      # the process's peak resident memory (VmHWM) at the end, bytes (Linux)

    @property
    def linear_bits(self) -> float:
        """Average bits per weight over the linear layers."""
        return self._bits(lambda r: r.name not in ("embed", "head"))

    @property
    def all_bits(self) -> float:
        """Average bits per weight over every matrix: linear layers, embeddings and head."""
        return self._bits(lambda r: True)

    def _bits(self, keep) -> float:
        rows = [r for r in self.rows if r.kind in ("planes", "dense", "int8_rows") and keep(r)]
        n = sum(int(np.prod(r.shape)) for r in rows)
        return sum(r.bits * int(np.prod(r.shape)) for r in rows) / max(n, 1)

    def table(self) -> str:
        lines = [f"{'tensor':28} {'shape':>13} {'kind':>7} {'k':>2} {'group':>5} {'bits/w':>7} {'rel.err':>8}"
                 "   (rel.err: ||W-W'||/||W||, or tr(E H E^T)/tr(W H W^T) on the calibration inputs when marked *)"]
        for r in self.rows:
            shape = "x".join(map(str, r.shape))
            k = str(r.planes) if r.planes else "-"
            g = str(r.group) if r.group else "-"
            err = (f"{r.error:.4f}" + ("*" if r.calibrated else " ")) if r.kind == "planes" else "-"
            lines.append(f"{r.name:28} {shape:>13} {r.kind:>7} {k:>2} {g:>5} {r.bits:7.3f} {err:>9}")
        peak = f"; peak memory {self.peak_rss / 2**30:.2f} GiB" if self.peak_rss else ""
        lines.append(f"linear layers: {self.linear_bits:.3f} bits/weight; with embeddings and head: "
                     f"{self.all_bits:.3f}; file {self.file_bytes / 2**20:.1f} MiB; {self.seconds:.1f} s{peak}")
        if self.tuning:
            t = self.tuning
            how = {"zo": " (zeroth-order)", "numpy": " (first-order, NumPy)"}.get(t.get("method"), "")
            lines.append(f"scale tuning{how}: {t['steps']} steps in {t['seconds']:.0f} s; KL to the float model on "
                         f"{t['eval_tokens']} calibration tokens {t['kl_before']:.4f} -> {t['kl_after']:.4f}")
        if self.perplexity:
            p = self.perplexity
            lines.append(f"perplexity on {p['file']} ({p['tokens']} tokens): source {p['before']:.3f}, "
                         f"converted {p['after']:.3f} ({p['after'] / p['before']:.3f}x)")
        return "\n".join(lines)


def open_source(src: Path):
    if src.is_dir():
        from .hf import open_hf
        return open_hf(src)
    if src.is_file() and src.suffix.lower() == ".gguf":
        from .gguf import open_gguf
        return open_gguf(src)
    if not src.exists():
        raise FormatError(f"{src}: no such file or directory")
    raise FormatError(f"{src}: not a Hugging Face checkpoint directory or a .gguf file")


def open_checked(src: Path):
    """The source's architecture, config and tensors: (hf_arch, cfg, tensors, emitted, tok_json,
    tok_info).  The config is checked field by field (FormatError naming the file and field), and
    `emitted` checks every tensor against the shape the config gives it as it is read, so a
    mismatch stops the conversion before anything is written."""
    hf_arch, hf_cfg, tensors, tok_json, tok_info = open_source(src)
    arch = architecture_for(hf_arch)
    try:
        cfg = arch.config(hf_cfg)
        tok_info = _special_ids_in(check_tokenizer_info(tok_info, "tokenizer"), cfg.vocab_size, src)
        Tokenizer(tok_json, tok_info, "tokenizer")   # loads, as it will from the model file
    except FormatError as exc:
        raise FormatError(str(exc) if str(exc).startswith(str(src)) else f"{src}: {exc}") from None
    return hf_arch, cfg, tensors, checked(arch.tensors(tensors, cfg, hf_cfg), cfg, str(src)), tok_json, tok_info


def _special_ids_in(info: dict, vocab_size: int, src) -> dict:
    """`info` without special token ids outside the vocabulary (configs copied from a larger
    model carry them; transformers only warns), with a warning naming what was dropped."""
    bos, eos = info.get("bos_id"), info.get("eos_ids") or []
    dropped = [i for i in [bos, *eos] if i is not None and i >= vocab_size]
    if not dropped:
        return info
    warnings.warn(f"{src}: special token ids {dropped} are outside the vocabulary of {vocab_size}; dropped",
                  EdgepanelWarning, stacklevel=4)   # at the caller of convert()
    return {**info, "bos_id": None if bos is not None and bos >= vocab_size else bos,
            "eos_ids": [i for i in eos if i < vocab_size]}


class _Store:
    """Turns emitted tensors into file tensors according to the recipe."""

    def __init__(self, writer: ModelWriter, recipe: Recipe, report: ConversionReport):
        self.w, self.r, self.report = writer, recipe, report
        self.recipes: dict[str, dict] = {}

    def dense_dtype(self, e: Emitted):
        return np.float16 if e.source_dtype == "float16" else np.float32

    def _planes(self, e: Emitted, pm: bits.PlaneMatrix, fit: str, err: float, calibrated: bool):
        """Write one binarized tensor (planes, scales as the recipe says) with its recipe and
        report row."""
        if not np.all(np.isfinite(pm.float_scales())):
            raise FormatError(f"{e.name}: a plane scale is not finite")
        try:
            pm = pm.stored(self.r.scales)
        except ValueError as exc:
            raise FormatError(f"{e.name}: {exc}") from None
        scales = pm.scales
        if pm.scale_rows is not None:
            self.w.add(e.name + ".scale_rows", pm.scale_rows)
        self.w.add(e.name + ".planes", pm.planes)
        self.w.add(e.name + ".scales", scales)
        self.recipes[e.name] = {"kind": "planes", "k": pm.k, "group": pm.group, "fit": fit}
        extra = 0 if pm.scale_rows is None else pm.scale_rows.nbytes
        nbits = 8.0 * (pm.planes.nbytes + scales.nbytes + extra) / (pm.out_features * pm.in_features)
        self.report.rows.append(TensorReport(e.name, pm.shape, "planes", pm.k, pm.group, nbits, err, calibrated))

    def linear(self, e: Emitted, fitted=None):
        """Store a linear layer: dense, or binarized (by `fitted` = (PlaneMatrix, calibrated
        error) when calibration fitted it, else data-free here)."""
        out, inp = e.weight.shape
        if fitted is not None and fitted[0] is not None and not (e.ternary or e.absmean):
            pm, err = fitted[:2]
            self._planes(e, pm, "gptq+refit" if self.r.refit else "gptq", err, True)
        elif self.r.passthrough or self.r.keeps(e.name):
            dt = self.dense_dtype(e)
            self.w.add(e.name + ".weight", e.weight.astype(dt))
            self.recipes[e.name] = {"kind": "dense", "dtype": np.dtype(dt).name}
            self.report.rows.append(TensorReport(e.name, (out, inp), "dense", bits=8.0 * np.dtype(dt).itemsize))
        elif e.ternary or e.absmean:
            w = e.weight if e.ternary else quantize.absmean_ternary(e.weight)[0]
            pm = quantize.ternary_planes(w)
            self._planes(e, pm, "ternary (exact)" if e.ternary else "bitnet absmean ternary",
                         quantize.reconstruction_error(w, pm), False)
        else:
            pm = quantize.fit_planes(e.weight, self.r.planes, self.r.group_for(inp), als_iters=self.r.als_iters)
            self._planes(e, pm, f"greedy+als{self.r.als_iters}", quantize.reconstruction_error(e.weight, pm), False)
        if e.bias is not None:
            self.w.add(e.name + ".bias", e.bias.astype(np.float32))

    def rows(self, e: Emitted, fmt: str, fitted=None):
        """Embeddings and head: int8 rows, k planes (as calibration fitted them, or data-free
        here), or dense."""
        if self.r.passthrough:
            fmt = "f16" if e.source_dtype == "float16" else "f32"
        rows, cols = e.weight.shape
        fmt = row_planes(fmt, self.r.group_for(cols))
        if not isinstance(fmt, str):
            if fitted is not None and fitted[0] is not None:
                how, calibrated = fitted[2:] if len(fitted) > 2 else ("gptq+refit", True)
                self._planes(e, fitted[0], how, fitted[1], calibrated)
            else:
                pm = quantize.fit_planes(e.weight, fmt[0], fmt[1], als_iters=self.r.als_iters)
                self._planes(e, pm, f"greedy+als{self.r.als_iters}", quantize.reconstruction_error(e.weight, pm), False)
            return
        if fmt == "int8":
            q, s = e.int8_rows()
            self.w.add(e.name + ".q", q)
            self.w.add(e.name + ".row_scale", s)
            self.recipes[e.name] = {"kind": "int8_rows"}
            nbits = 8.0 + 32.0 / cols
        else:
            dt = np.float16 if fmt == "f16" else np.float32
            self.w.add(e.name + ".weight", e.weight.astype(dt))
            self.recipes[e.name] = {"kind": "dense", "dtype": np.dtype(dt).name}
            nbits = 8.0 * np.dtype(dt).itemsize
        self.report.rows.append(TensorReport(e.name, (rows, cols), self.recipes[e.name]["kind"], bits=nbits))

    def vector(self, e: Emitted):
        self.w.add(e.name + ".weight", e.weight.astype(np.float32))
        if e.bias is not None:
            self.w.add(e.name + ".bias", e.bias.astype(np.float32))
        self.recipes[e.name] = {"kind": "dense", "dtype": "float32"}

    def __call__(self, e: Emitted, fitted=None):
        if e.role == "linear":
            self.linear(e, fitted)
        elif e.role == "embed":
            self.rows(e, self.r.embed, fitted)
        elif e.role == "head":
            self.rows(e, self.r.head, fitted)
        elif e.role in ("norm", "pos_embed", "vector"):
            self.vector(e)
        else:
            raise AssertionError(f"unknown role {e.role}")


def convert(src, out, recipe: Recipe | None = None, progress: bool = False, log=None) -> ConversionReport:
    """Convert `src` (HF checkpoint directory or .gguf file) to the model file `out`."""
    t0 = time.time()
    src, out = Path(src), Path(out)
    recipe = recipe or Recipe()
    log = log or (lambda msg: None)
    _check_destination(src, out)
    hf_arch, cfg, tensors, emitted, tok_json, tok_info = open_checked(src)
    report = ConversionReport(out)
    extra: dict[str, np.ndarray] = {}
    fitted: dict = {}
    if recipe.calibrated:
        from . import calibrate as cal
        fm = cal.FloatModel(cfg, emitted)
        tensors.check_all_consumed()
        tensors = emitted = None   # the source file's mapping: its pages count as resident while held
        if recipe.rotate and cal.can_rotate(cfg):
            cal.rotate(fm, recipe.seed)
            extra["mlp_rotation.signs"] = fm.rotation.signs
            extra["mlp_rotation.mix"] = fm.rotation.mix
        cfg = fm.cfg
        path = cal.DEFAULT_CALIB if recipe.calib == "default" else Path(recipe.calib)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise FormatError(f"{path}: cannot read the calibration text ({exc})") from None
        if recipe.calib == "default" and text.startswith("# edgepanel calibration text"):
            text = text.split("\n", 1)[-1]   # the recipe line that made it
        toks = cal.calibration_tokens(tok_json, text, recipe.calib_tokens, min(recipe.seq_len, cfg.max_seq_len), str(src))
        work = checkpoint.WorkDir(out, checkpoint.identity(src, recipe.to_dict()), log)
        run = cal._Run(fm, recipe, log)
        if recipe.bits:
            from .budget import plan_bits
            run.format_of, chosen = plan_bits(run, toks, recipe.bits, log)
            # the file records what the budget chose
            recipe = dataclasses.replace(recipe, **{role: ("int8" if fmt == "int8" else "k%dg%d" % fmt)
                                                    for role, fmt in chosen.items()},
                                         **{role: "int8" for role in ("embed", "head")
                                            if getattr(recipe, role) == "auto" and role not in chosen})
        fitted = _calibrate(fm, recipe, run, toks, work, progress, log)
        memory.give_back()   # calibration's arrays, freed
        if recipe.tuned and recipe.tune_method() == "fo":
            from . import recover
            if not recover.available():
                raise FormatError("first-order scale tuning (--tune fo) needs torch: pip install 'edgepanel[tune]' "
                                  "(or --tune numpy, torch-free)")
            with memory.large_blocks_mapped():
                report.tuning = recover.tune(fm, fitted, toks, recipe.tune_steps, lr=recipe.learning_rate(),
                                             seed=recipe.seed, rows=(recipe.embed, recipe.head), log=log,
                                             work=work, progress=progress, granularity=recipe.tune_granularity,
                                             dtype=recipe.matmul_dtype())
        elif recipe.tuned:   # zo or numpy: on the written file, against the float model's top-k
            teacher_targets = _file_teacher(fm, toks, log)   # before the float weights are replaced below
        emitted = list(fm.t.values())
    with ModelWriter(out) as writer:
        store = _Store(writer, recipe, report)
        if progress:
            from ..progress import bar
            emitted = bar(emitted, total=_count(cfg), desc="writing" if recipe.calibrated else "converting", unit="tensor")
        for e in emitted:
            store(e, fitted.get(e.name))
        if not recipe.calibrated:
            tensors.check_all_consumed()
        if cfg.pos == "rope":
            writer.add("rope.inv_freq", cfg.rope_inv_freq())
        for name, arr in extra.items():
            writer.add(name, arr)
        meta = Metadata(architecture=cfg.arch, config=cfg.to_dict(), tensors=store.recipes,
                        tokenizer={k: v for k, v in tok_info.items()},
                        source={"path": str(src), "architecture": hf_arch},
                        recipe=recipe.to_dict())
        writer.close(meta, tok_json)
    if recipe.calibrated and recipe.tuned and recipe.tune_method() in ("zo", "numpy"):
        fm = run = fitted = emitted = store = None   # the float model: the tuning reads the written file
        memory.give_back()
        report.tuning = _tune_file(out, teacher_targets, recipe, progress, log)
    if recipe.calibrated:
        work.clear()
    report.file_bytes = out.stat().st_size
    report.seconds = time.time() - t0
    report.peak_rss = _peak_rss()
    return report


def _peak_rss() -> int | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        return None


def _calibrate(fm, recipe: Recipe, run, toks: np.ndarray, work, progress: bool, log) -> dict:
    """Every linear layer fitted on its calibration inputs, then head and embeddings (as planes
    when the recipe asks); resumed from `work`'s checkpoint when an earlier run was interrupted.
    Returns name -> (PlaneMatrix or None, error[, how, calibrated])."""
    cfg, start, x = fm.cfg, 0, None
    from .. import _BLAS_QUIET
    if not _BLAS_QUIET:
        log("note: NumPy was imported before edgepanel, so its BLAS threads spin between products on the "
            "cores the fitting uses (calibration about 10-20% slower on 2 cores); import edgepanel first, "
            "or set OPENBLAS_THREAD_TIMEOUT=4 before NumPy loads")
    saved = work.load("calib")
    if saved is not None:
        arrays, state = saved
        run.results = checkpoint.unpack_fitted(arrays, state["fitted"])
        if state["done"]:
            log("calibration: resumed (done)")
            return run.results
        start, x = state["layers"], arrays["x"]
        run.fit_seconds = state["fit_seconds"]
        log(f"calibration: resumed after layer {start}/{cfg.n_layers}")

    def after_layer(i, x):
        if i + 1 < cfg.n_layers and work.due("calib"):
            arrays, desc = checkpoint.pack_fitted(run.results)
            work.save("calib", {**arrays, "x": x}, {"fitted": desc, "layers": i + 1, "done": False,
                                                    "fit_seconds": run.fit_seconds})

    final = run.run(toks, start=start, x=x, after_layer=after_layer, progress=progress)
    fitted = run.results
    for role in ("head", "embed"):
        if role not in fm.t:
            continue
        fmt = row_planes(getattr(recipe, role), recipe.group_for(fm.t[role].weight.shape[1]))
        if isinstance(fmt, str):
            continue
        if role == "head":   # on the final hidden states, as every linear layer on its inputs
            run.fit("head", final, fmt=fmt)
        else:                # read by rows: nothing to weigh the inputs by
            w = fm.t[role].weight
            pm = quantize.fit_planes(w, fmt[0], fmt[1], als_iters=recipe.als_iters)
            fitted[role] = (pm, quantize.reconstruction_error(w, pm), f"greedy+als{recipe.als_iters}", False)
    run._h_of = run._h = None   # the last inputs and their H (~160 MB): not needed by the tuning
    if recipe.tuned:   # the tuning takes as long again: keep what calibration found
        arrays, desc = checkpoint.pack_fitted(fitted)
        work.save("calib", arrays, {"fitted": desc, "done": True})
    return fitted


def _check_destination(src: Path, out: Path):
    """Refuse an output that would destroy the source (the same file, or a file of the source
    directory) or replace something that is not a regular file (a device, a FIFO, a directory)."""
    if not out.exists():
        return
    if not out.is_file():
        raise FormatError(f"{out}: the output exists and is not a regular file; choose another path")
    if src.exists() and (out.samefile(src) or (src.is_dir() and out.resolve().parent == src.resolve())):
        raise FormatError(f"{out}: the output would overwrite the source {src}; choose another path")


ZO_TEACHER_WINDOWS, ZO_TEACHER_K = 32, 64


def _file_teacher(fm, toks: np.ndarray, log):
    """The float model's top-k next-token log-probabilities on calibration windows, run in the C
    engine over the float weights in memory (the student's rotation leaves its logits as they are)."""
    from ..model import engine
    from ..tune import teacher
    from .calibrate import to_weights
    eng = engine.make(to_weights(fm))
    ids = toks[np.linspace(0, len(toks) - 1, min(ZO_TEACHER_WINDOWS, len(toks))).round().astype(int)]
    log(f"scale tuning: the float model's top-{ZO_TEACHER_K} on {len(ids)} calibration windows")
    return teacher.examples(ids, *teacher.teacher_targets(
        lambda w: eng.forward(w, eng.new_cache(len(w)), all_logits=True), ids, ZO_TEACHER_K))


def _tune_file(out: Path, train, recipe: Recipe, progress: bool, log) -> dict:
    """Tune the written model's plane scales by kd steps (edgepanel.tune), zeroth-order or with
    exact gradients in NumPy (recipe.tune_method()), and write it again; torch-free."""
    from ..model import load
    from ..tune import TuneConfig, ZOTrainer
    method = recipe.tune_method()
    if method == "numpy":   # the first-order recipe: every scale, Adam, one window a step
        cfg = TuneConfig.for_objective(objective="kd", gradient="exact", steps=recipe.tune_steps, seed=recipe.seed,
                                       eval_every=0, seq_len=train[0].ids.shape[0], lr=recipe.learning_rate(),
                                       granularity=recipe.tune_granularity)
    else:
        cfg = TuneConfig(objective="kd", steps=recipe.tune_steps, seed=recipe.seed, eval_every=0,
                         seq_len=train[0].ids.shape[0], **({"lr": recipe.tune_lr} if recipe.tune_lr else {}))
    t0 = time.time()
    m = load(out)
    trainer = ZOTrainer(m, train, cfg)
    held = train[:2]
    before = trainer.loss(held)
    trainer.run(progress=progress)
    after = trainer.loss(held)
    log(f"scale tuning ({method}): {cfg.steps} steps, KL {before:.4f} -> {after:.4f} ({time.time() - t0:.0f} s)")
    m.save(out, history={"zo_tune": {"steps": cfg.steps, "lr": cfg.lr, "granularity": cfg.granularity,
                                     "gradient": cfg.gradient}})
    return {"steps": cfg.steps, "seconds": time.time() - t0, "kl_before": before, "kl_after": after,
            "eval_tokens": int(sum(e.targets for e in held)), "method": method}


def evaluate(src, out, eval_file, tokens: int = 2048, window: int = 512) -> dict:
    """Perplexity of the converted model and of its source (converted pass-through to a
    temporary file) on the first `tokens` tokens of `eval_file`."""
    import tempfile

    from ..model.model import load
    try:
        text = Path(eval_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise FormatError(f"{eval_file}: cannot read the evaluation text ({exc})") from None
    after = load(out)
    ids = after.tokenizer.encode(text)[:tokens]
    text = after.tokenizer.decode(ids)
    with tempfile.TemporaryDirectory(dir=Path(out).parent) as tmp:
        ref = Path(tmp) / "source.ep"
        convert(src, ref, Recipe(passthrough=True))
        before = load(ref).perplexity(text, window=window)
    return {"file": str(eval_file), "tokens": len(ids), "before": before,
            "after": after.perplexity(text, window=window)}


def _count(cfg) -> int:
    per_layer = 4 + 2 + (3 if cfg.gated_mlp else 2) + (2 if cfg.sub_norms else 0)
    return 2 + cfg.n_layers * per_layer + (0 if cfg.tie_embeddings else 1) + (1 if cfg.pos == "learned" else 0)
