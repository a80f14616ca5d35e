"""`edgepanel bench`: the speed, latency and memory of model files on this machine, in the spirit of
llama-bench: what one engine does with `-p` prompt tokens and `-n` generated tokens, with what is
needed to reproduce a number (machine, CPU, ISA variant, threads, version, git revision) in every
result.

    results = run(["model.ep"], BenchConfig(prompt_tokens=128, gen_tokens=64, threads=(1, 2)))
    print(render(results, markdown=True))

Each (model, thread count) is measured in a child process of its own, so its load time, its peak
RSS (VmHWM) and the pages it maps are its own.  What a child measures, after one untimed warm-up
run, over `repetitions` runs on a fixed prompt of random token ids:
  - prompt processing: one forward pass over the prompt (tokens/s, engine only);
  - generation: `gen_tokens` one-token forward passes after it (tokens/s, engine only: the token
    fed back is chosen by the sampler, whose time is not counted here);
  - time to first token: the prompt's pass plus sampling its first token (default Sampling);
  - time per output token: each decode pass plus its sampling, p50 and p95 over all tokens;
  - peak RSS and its parts: the process before loading (interpreter, libraries), the model file's
    resident pages (/proc/self/smaps) and those of the tensors read into memory (`edgepanel.load`'s
    mmap), the KV cache, the forward pass's workspace, the rest;
    checked against file + KV cache + MEMORY_ALLOWANCE;
  - bits per weight stored (scales included), of the linear layers and of every matrix;
  - a decode step taken apart (C engine only; see `breakdown`).
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import EdgepanelError

MEMORY_ALLOWANCE = 100 * 10**6   # bytes: peak RSS <= model file + KV cache + this (issue 20)
PROMPT_SEED = 0                  # the prompt's random token ids, and the sampler's seed


class BenchError(EdgepanelError):
    """A benchmark cannot run as asked: a bad option, a model that does not fit, a failed child."""


def _opt(default, help: str, **kw):
    if isinstance(default, (list, tuple)):
        kw["default_factory"] = lambda: default
        return field(metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class BenchConfig:
    """What `edgepanel bench` measures (the one home of its defaults)."""
    prompt_tokens: int = _opt(128, "prompt tokens, processed in one forward pass")
    gen_tokens: int = _opt(64, "tokens generated one at a time after the prompt")
    threads: tuple = _opt((1, 2), "thread counts to measure, comma-separated")
    repetitions: int = _opt(5, "timed runs after one warm-up run (mean and standard deviation)")
    breakdown_rounds: int = _opt(15, "rounds of the decode-step breakdown (medians)")
    kv_dtype: str = _opt("float16", "what the key/value cache holds: float16 or float32")

    def __post_init__(self):
        for name, flag, lo, hi in (("prompt_tokens", "-p", 1, 1 << 20), ("gen_tokens", "-n", 1, 1 << 20),
                                   ("repetitions", "-r", 1, 10_000), ("breakdown_rounds", "--breakdown-rounds", 0, 10_000)):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or not lo <= v <= hi:
                raise ValueError(f"{name} ({flag}) must be an integer in {lo}..{hi}, got {v!r}")
        self.threads = parse_threads(self.threads)
        if self.kv_dtype not in ("float16", "float32"):
            raise ValueError(f"kv_dtype (--kv-dtype) must be float16 or float32, got {self.kv_dtype!r}")


def parse_threads(spec) -> tuple[int, ...]:
    """Thread counts from "1,2", 4 or (1, 2): each in 1..MAX_THREADS, duplicates dropped."""
    from .model.model import MAX_THREADS
    items = spec.split(",") if isinstance(spec, str) else [spec] if isinstance(spec, (int, np.integer)) else spec
    out: list[int] = []
    try:
        for item in items:
            t = int(item.strip()) if isinstance(item, str) else item
            if not isinstance(t, (int, np.integer)) or isinstance(t, bool) or not 1 <= t <= MAX_THREADS:
                raise ValueError
            if t not in out:
                out.append(int(t))
    except (TypeError, ValueError):
        out = []
    if not out:
        raise ValueError(f"threads (-t) must be comma-separated integers in 1..{MAX_THREADS} (e.g. 1,2), got {spec!r}")
    return tuple(out)


# -- the machine -------------------------------------------------------------------------------
ARM_PARTS = {0xd03: "Cortex-A53", 0xd04: "Cortex-A35", 0xd05: "Cortex-A55", 0xd07: "Cortex-A57",
             0xd08: "Cortex-A72", 0xd09: "Cortex-A73", 0xd0a: "Cortex-A75", 0xd0b: "Cortex-A76",
             0xd0c: "Neoverse-N1", 0xd0d: "Cortex-A77", 0xd40: "Neoverse-V1", 0xd41: "Cortex-A78",
             0xd44: "Cortex-X1", 0xd46: "Cortex-A510", 0xd47: "Cortex-A710", 0xd49: "Neoverse-N2",
             0xd4f: "Neoverse-V2"}


def cpu_fields() -> dict[str, list[str]] | None:
    """/proc/cpuinfo as {field: its values, one a CPU}, or None when it cannot be read."""
    try:
        info = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return None
    fields: dict[str, list[str]] = {}
    for line in info.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), []).append(value.strip())
    return fields


def cpu_name() -> str:
    """The CPU model: /proc/cpuinfo's "model name" with its family and model numbers (x86: a
    virtual machine's name can be as bare as "AMD EPYC", shared by a Zen 1 and a Zen 4), else the
    board and ARM core names."""
    fields = cpu_fields()
    if fields is None:
        return platform.processor() or platform.machine()
    if "model name" in fields:
        name = fields["model name"][0]
        family, model = (fields.get(k, [""])[0] for k in ("cpu family", "model"))
        return f"{name} (family {family}, model {model})" if family.isdigit() and model.isdigit() else name
    cores = []
    for part in fields.get("CPU part", []):
        name = ARM_PARTS.get(int(part, 16), f"part {part}") if part.startswith("0x") else part
        if name not in cores:
            cores.append(name)
    board = (fields.get("Model") or fields.get("Hardware") or [""])[0]
    return ", ".join(x for x in (board, " + ".join(cores)) if x) or platform.machine()


def git_revision() -> str:
    """The git revision of the edgepanel source in use ("+dirty" when tracked files differ), or
    "unknown" outside a git checkout.  Reads only (no index refresh)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return "unknown"
    git = ["git", "--no-optional-locks", "-C", str(root)]
    try:
        rev = subprocess.run(git + ["rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return "unknown"
        dirty = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def environment() -> dict:
    """What every result carries so that it can be reproduced (the ISA is the child's own)."""
    from . import __version__
    from .kernels import usable_cpus
    return {"machine": platform.machine(), "system": platform.platform(terse=True), "cpu": cpu_name(),
            "cpus": usable_cpus(), "python": platform.python_version(), "numpy": np.__version__,
            "version": __version__, "git": git_revision()}


# -- measuring one model in this process ---------------------------------------------------------
def greedy_speeds(start, step, prompt_tokens: int, new_tokens: int = 64, repeat: int = 3) -> dict:
    """Prefill and greedy-decode speeds of any runtime, for the side-by-side tools (tools/bench_model.py,
    tools/onnx_bench.py): `start()` runs the prompt from an empty cache and returns the next token,
    `step(tok)` runs one token and returns the next.  One untimed warm-up round, then `repeat` timed
    ones: {"prefill": [tokens/s], "decode": [tokens/s]}, one entry per timed round."""
    res = {"prefill": [], "decode": []}
    for r in range(repeat + 1):
        t = time.perf_counter()
        tok = start()
        tp = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(new_tokens):
            tok = step(tok)
        td = time.perf_counter() - t
        if r:
            res["prefill"].append(prompt_tokens / tp)
            res["decode"].append(new_tokens / td)
    return res


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM), MiB."""
    return _status_bytes("VmHWM") / 2**20


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise BenchError(f"/proc/self/status has no {key} (Linux only)")


def _smaps_rss(select) -> int:
    """Resident bytes of this process's mappings for which select(start, end, path) holds
    (/proc/self/smaps; path "" for anonymous memory)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 5)
            if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):
                lo, hi = (int(v, 16) for v in head[0].split("-"))
                inside = select(lo, hi, head[5].strip() if len(head) == 6 else "")
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1]) * 1024
    return total


def mapped_bytes(path: Path) -> int:
    """Resident bytes of this process's mappings of `path`."""
    target = str(Path(path).resolve())
    return _smaps_rss(lambda lo, hi, name: name == target)


def read_bytes(f) -> int:
    """Resident bytes of the memory holding a model file's tensors read into memory
    (SafetensorsFile.read_into_memory): the mappings holding them."""
    starts = {int(np.frombuffer(buf, np.uint8, count=1).ctypes.data) for buf in f._copies}
    return _smaps_rss(lambda lo, hi, name: any(lo <= a < hi for a in starts))


def bits_per_weight(weights, tensors: dict) -> dict:
    """Stored bits per weight, scales and row multipliers included (biases not): over the linear
    layers, and over every matrix (embeddings and head too)."""
    def stored(name, rows, cols):
        nbytes = sum(tensors[f"{name}.{s}"].nbytes for s in ("planes", "scales", "scale_rows", "weight", "q", "row_scale")
                     if f"{name}.{s}" in tensors)
        return nbytes * 8, rows * cols

    linear = [stored(lin.name, lin.out_features, lin.in_features) for layer in weights.layers for lin in layer.linears()]
    tables = [stored(t.name, t.rows, t.cols) if hasattr(t, "rows") else stored(t.name, t.out_features, t.in_features)
              for t in (weights.embed, weights.head) if t is not None]
    ratio = lambda parts: sum(b for b, _ in parts) / max(sum(n for _, n in parts), 1)  # noqa: E731
    return {"linear": ratio(linear), "all": ratio(linear + tables)}


def _stats(values) -> dict:
    v = np.asarray(values, np.float64)
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else 0.0, "runs": [float(x) for x in v]}


def measure(path, threads: int, config: BenchConfig, tick=lambda stage: None) -> dict:
    """Measure the model file `path` with `threads` threads in this process; `tick(stage)` is
    called after each stage (progress).  Peak RSS is this process's: call it in a fresh one."""
    from . import kernels
    from .model.model import load
    from .sample import Sampler, Sampling

    path = Path(path)
    p, n = config.prompt_tokens, config.gen_tokens
    load_avg = os.getloadavg()[0]     # other work on the machine when this started
    rss_before = _status_bytes("VmRSS")
    t0 = time.perf_counter()
    m = load(path, threads=threads, kv_dtype=config.kv_dtype)
    load_s = time.perf_counter() - t0
    tick("load")
    cfg, eng = m.cfg, m.engine
    if p + n > cfg.max_seq_len:
        raise BenchError(f"{path}: -p {p} + -n {n} = {p + n} tokens do not fit its context of {cfg.max_seq_len}")
    prompt = np.random.default_rng(PROMPT_SEED).integers(0, cfg.vocab_size, p).astype(np.int32)

    def one_run():
        """(prompt seconds, first-token seconds, decode seconds per token, sampling seconds per token)"""
        sampler = Sampler(Sampling(seed=PROMPT_SEED))
        history = [int(t) for t in prompt]
        cache = eng.new_cache(p + n)
        t = time.perf_counter()
        logits = eng.forward(prompt, cache)
        t_prompt = time.perf_counter()
        tok = sampler(logits, history)
        t_first = time.perf_counter()
        steps, samples = [], []
        for _ in range(n):
            history.append(tok)
            a = time.perf_counter()
            logits = eng.forward(np.array([tok], np.int32), cache)
            b = time.perf_counter()
            tok = sampler(logits, history)
            steps.append(b - a)
            samples.append(time.perf_counter() - b)
        return t_prompt - t, t_first - t, np.array(steps), np.array(samples)

    one_run()          # warm-up: pages of the mapped file, workspaces, thread pool
    tick("warm-up")
    runs = []
    for _ in range(config.repetitions):
        runs.append(one_run())
        tick("run")
    peak = _status_bytes("VmHWM")     # generation's peak, before the breakdown's own buffers
    tpot = np.concatenate([s + c for _, _, s, c in runs]) * 1e3
    one = eng.new_cache(1)
    kv_per_token = one.k.nbytes + one.v.nbytes
    workspace = int(eng.lib.ep_forward_workspace(eng.model, p, eng.threads)) if eng.name == "c" else 0
    file_bytes = path.stat().st_size
    mapped, read = mapped_bytes(path), read_bytes(m.file)
    kv = kv_per_token * (p + n)
    bound = file_bytes + kv + MEMORY_ALLOWANCE
    result = {
        "model": str(path), "model_name": path.name, "arch": cfg.arch, "file_bytes": file_bytes,
        "bits_per_weight": bits_per_weight(m.weights, m.file.tensors),
        "threads": threads, "load_avg_1m": load_avg, "engine": eng.name,
        "isa": eng.ffi.string(eng.lib.ep_kernels_name(eng.kt)).decode() if eng.name == "c" else kernels.info(),
        "prompt_tokens": p, "gen_tokens": n, "repetitions": config.repetitions,
        "load_s": load_s,
        "pp_tps": _stats([p / r[0] for r in runs]),
        "tg_tps": _stats([n / r[2].sum() for r in runs]),
        "ttft_ms": _stats([r[1] * 1e3 for r in runs]),
        "tpot_ms": {"p50": float(np.percentile(tpot, 50)), "p95": float(np.percentile(tpot, 95)),
                    "mean": float(tpot.mean())},
        "memory": {"peak_rss": peak, "before_load": rss_before, "model_mapped": mapped, "model_read": read,
                   "kv_dtype": config.kv_dtype, "kv_bytes_per_token": kv_per_token, "kv_cache": kv, "workspace": workspace,
                   "other": peak - rss_before - mapped - read - kv - workspace,
                   "bound": bound, "within_bound": peak <= bound},
    }
    result["breakdown"] = breakdown(m, prompt, config) if eng.name == "c" and config.breakdown_rounds else None
    tick("breakdown")
    return result


def breakdown(m, prompt: np.ndarray, config: BenchConfig) -> dict:
    """A decode step of the C engine at position P = prompt + gen/2 (the mean decode position),
    taken apart.  The engine has no timers inside, so each piece is timed from outside:
      step        one ep_forward of one token with P positions in the cache;
      attention   its growth with the context: (step at P - step at 0) * (P + 1) / P (at position 0
                  attention reads one position; nothing else depends on the position);
      head        the same call on the model with no layers (embedding row, final norm, output layer);
      products    every binarized product of the layers through the same C kernels (the engine's ISA
                  table and threads) called from Python: one activation quantization per input, as
                  the engine shares it (q/k/v, gate/up), then one GEMV per matrix; the engine runs a
                  shared input's GEMVs in one parallel pass, so the cost of the extra passes (one call
                  on a 16 x 64 matrix: dispatch and wake-up) is taken off;
      norms and the rest  step - attention - head - products (norms, RoPE, residuals, the MLP's
                  activation and rotation, KV writes, dense products of kept layers);
      sampling    the default Sampling on the step's logits with a P-token history.
    Rounds interleave the pieces (drift hits all alike); each is a median."""
    from .sample import Sampler, Sampling

    eng, cfg = m.engine, m.cfg
    pos = min(config.prompt_tokens + config.gen_tokens // 2, cfg.max_seq_len - 1)
    cache = eng.new_cache(pos + 1)           # zeros: the time does not depend on the values
    tok = prompt[:1].copy()

    def step(at: int):
        cache.length = at
        t = time.perf_counter()
        logits = eng.forward(tok, cache)
        return time.perf_counter() - t, logits

    head = _head_timer(eng, tok)
    products, extra_passes, dense = _products_timer(eng, m.weights)
    dispatch = _products_timer(eng, None)[0]
    sampler = Sampler(Sampling(seed=PROMPT_SEED))
    history = list(np.resize(prompt, pos))

    def sampling(logits):
        t = time.perf_counter()
        sampler(logits, history)
        return time.perf_counter() - t

    rows = []
    for _ in range(config.breakdown_rounds):
        t_full, logits = step(pos)
        t_zero, _ = step(0)
        rows.append((t_full, t_zero, head(), products(), dispatch() / DISPATCH_CALLS, sampling(logits)))
    t_full, t_zero, t_head, t_prod, t_call, t_samp = np.median(np.array(rows), axis=0)
    t_prod = max(t_prod - extra_passes * t_call, 0.0)
    t_attn = max(t_full - t_zero, 0.0) * (pos + 1) / pos
    parts = {"products": t_prod, "attention": t_attn, "head": t_head,
             "norms_and_rest": t_full - t_prod - t_attn - t_head, "sampling": t_samp}
    return {"position": pos, "step_ms": t_full * 1e3, "step_at_0_ms": t_zero * 1e3,
            "parts_ms": {k: float(v * 1e3) for k, v in parts.items()}, "dense_matrices_in_rest": dense,
            "pass_overhead_us": float(t_call * 1e6), "extra_passes": extra_passes, "rounds": config.breakdown_rounds}


DISPATCH_CALLS = 20     # calls on a 16 x 64 matrix per round: the cost of one more product pass


def _aligned(nbytes: int, keep: list, ffi):
    buf = np.empty(nbytes + 64, np.uint8)
    keep.append(buf)
    return ffi.cast("void *", buf.ctypes.data + (-buf.ctypes.data % 64)), nbytes


def _head_timer(eng, tok: np.ndarray):
    """A timer of one ep_forward on a copy of the engine's model with no layers."""
    ffi, lib = eng.ffi, eng.lib
    headless = ffi.new("ep_model *", eng.model[0])   # the same pointers: valid while no parameter changes
    headless.n_layers = 0
    keep: list = []
    work, nbytes = _aligned(int(lib.ep_forward_workspace(headless, 1, eng.threads)), keep, ffi)
    kv, out = np.zeros(1, np.float32), np.empty(eng.w.cfg.vocab_size, np.float32)
    keep += [kv, out, tok]
    f32 = lambda a: ffi.cast("float *", a.ctypes.data)  # noqa: E731
    args = (eng.kt, headless, f32(kv), f32(kv), lib.EP_KV_F32, 1, ffi.cast("int32_t *", tok.ctypes.data), 1, 0, 0, f32(out),
            work, nbytes, eng.threads)

    def head():
        t = time.perf_counter()
        rc = lib.ep_forward(*args)
        t = time.perf_counter() - t
        if rc != 0:
            raise BenchError(f"timing the head failed in C ({rc})")
        return t
    head.keep = keep          # the buffers the pointers point into
    return head


def _products_timer(eng, weights):
    """(timer of every binarized product of a decode step, extra parallel passes against the
    engine's, dense matrices left out); with weights None, DISPATCH_CALLS products of a 16 x 64
    one-plane matrix."""
    from .bits import PlaneMatrix
    from .model.weights import Linear

    ffi, lib = eng.ffi, eng.lib
    if weights is None:
        one = PlaneMatrix(np.zeros((1, 1, 8, 16), np.uint8), np.ones((1, 1, 1, 16), np.float32), 16, 64, 64)
        groups, dense = [[one] * DISPATCH_CALLS], 0
    else:   # per layer: the inputs the engine quantizes once, each with the binarized matrices reading it
        groups, dense = [], 0
        for layer in weights.layers:
            for mats in ((layer.wq, layer.wk, layer.wv), (layer.wo,), (layer.w_gate, layer.w_up), (layer.w_down,)):
                mats = [x for x in mats if isinstance(x, Linear)]
                dense += sum(x.planes is None for x in mats)
                if any(x.planes is not None for x in mats):
                    groups.append([x.planes for x in mats if x.planes is not None])
    keep: list = []
    f32 = lambda a: ffi.cast("float *", a.ctypes.data)  # noqa: E731
    ptr = lambda ctype, a: ffi.cast(ctype, a.ctypes.data)  # noqa: E731
    kinds = {np.dtype(np.float32): lib.EP_SCALES_F32, np.dtype(np.float16): lib.EP_SCALES_F16,
             np.dtype(np.uint8): lib.EP_SCALES_U8}
    work, nbytes = _aligned(max([int(lib.ep_workspace_bytes(1, w.out_features, w.in_features, w.group))
                                 for g in groups for w in g] + [64]), keep, ffi)
    rng = np.random.default_rng(PROMPT_SEED)
    calls = []
    for mats in groups:
        d = mats[0].in_features
        x, q, s = rng.standard_normal(d).astype(np.float32), np.empty(d, np.int8), np.empty(1, np.float32)
        keep += [x, q, s]
        if weights is not None:
            calls.append((lib.ep_quantize_i8, (eng.kt, f32(x), 1, d, ptr("int8_t *", q), f32(s))))
        for w in mats:
            y = np.empty(w.out_features, np.float32)
            keep.append(y)
            calls.append((lib.ep_gemm_planes_i8, (
                eng.kt, ptr("int8_t *", q), f32(s), 1, ptr("uint8_t *", w.planes), ptr("void *", w.scales),
                kinds[w.scales.dtype], ffi.NULL if w.scale_rows is None else f32(w.scale_rows), w.k,
                w.out_features, w.in_features, w.group, f32(y), work, nbytes, eng.threads)))

    def products():
        t = time.perf_counter()
        for fn, args in calls:
            if fn(*args) != 0:
                raise BenchError("timing the products failed in C")
        return time.perf_counter() - t
    products.keep = keep      # the buffers the pointers point into
    return products, sum(len(g) - 1 for g in groups), dense


# -- children and the whole run --------------------------------------------------------------------
CHILD = "import sys, edgepanel.bench as b; b.child_main(sys.argv[1])"


def child_main(request: str):
    """A child's entry: measure one (model, threads) given as JSON; write progress lines and one
    result (or error) line, as JSON, to stdout."""
    def say(obj):
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    req = json.loads(request)
    try:
        res = measure(req["path"], req["threads"], BenchConfig(**req["config"]), tick=lambda s: say({"tick": s}))
    except (EdgepanelError, ValueError, OSError, MemoryError, FloatingPointError) as exc:
        say({"error": str(exc)})
        return
    say({"result": res})


def _child_env() -> dict:
    """The child imports this same edgepanel, wherever it was loaded from."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def measure_in_child(path: Path, threads: int, config: BenchConfig, tick=lambda stage: None) -> dict:
    request = json.dumps({"path": str(path), "threads": threads, "config": asdict(config)})
    with tempfile.TemporaryFile("w+") as errors:     # a file, not a pipe: a chatty child cannot block
        proc = subprocess.Popen([sys.executable, "-c", CHILD, request], stdout=subprocess.PIPE, stderr=errors,
                                text=True, env=_child_env())
        reply = None
        for line in proc.stdout:
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "tick" in msg:
                tick(msg["tick"])
            else:
                reply = msg
        rc = proc.wait()
        errors.seek(0)
        stderr = errors.read()
    where = f"{path.name} with {threads} thread{'s' * (threads > 1)}"
    if reply and "error" in reply:
        raise BenchError(reply["error"])
    if rc != 0 or not reply:
        how = f"killed by signal {-rc}" if rc < 0 else f"exit status {rc}"
        tail = stderr.strip().splitlines()[-1:] or ["no message"]
        raise BenchError(f"measuring {where}: the child process failed ({how}): {tail[0]}")
    return reply["result"]


def check_model(path: Path, config: BenchConfig) -> None:
    """A clear error now for a file that is not a model or whose context cannot hold the run."""
    from .format import ModelFile
    f = ModelFile(path)
    ctx = f.meta.config.get("max_seq_len")
    need = config.prompt_tokens + config.gen_tokens
    if isinstance(ctx, int) and need > ctx:
        raise BenchError(f"{path}: its context holds {ctx} tokens; -p {config.prompt_tokens} + -n "
                         f"{config.gen_tokens} = {need} do not fit (lower -p or -n)")


def run(models, config: BenchConfig | None = None, progress: bool = True, log=None) -> list[dict]:
    """Measure every model (a .ep path, a known name, or None for the default model) at every
    thread count of `config`; one result dict per (model, threads), in that order."""
    from . import hub
    from .progress import bar

    config = config or BenchConfig()
    log = log or (lambda msg: None)
    paths = [hub.resolve_model(spec, log=log, progress=progress) for spec in (list(models) or [None])]
    for path in paths:
        check_model(path, config)
    env = environment()
    per_child = config.repetitions + 3          # load, warm-up, runs, breakdown
    pbar = bar(total=len(paths) * len(config.threads) * per_child, desc="bench", unit="stage") if progress else None
    results = []
    try:
        for path in paths:
            for threads in config.threads:
                if progress:
                    log(f"bench: {path.name}, {threads} thread{'s' * (threads > 1)}")
                res = measure_in_child(path, threads, config, tick=lambda s: pbar.update(1) if pbar else None)
                res.update(env)
                results.append(res)
    finally:
        if pbar:
            pbar.close()
    return results


# -- reporting -------------------------------------------------------------------------------------
MiB = 2**20


def _pm(s: dict, fmt: str) -> str:
    return f"{s['mean']:{fmt}} ± {s['sd']:{fmt}}"


def header(results: list[dict]) -> str:
    r = results[0]
    isas = sorted({x["isa"] for x in results})
    loads = [x["load_avg_1m"] for x in results]
    return (f"edgepanel {r['version']} (git {r['git']}) on {r['machine']}, {r['cpu']} ({r['cpus']} cpus, load "
            f"{min(loads):.1f}-{max(loads):.1f} before the runs), kernels {'/'.join(isas)}; -p {r['prompt_tokens']} "
            f"-n {r['gen_tokens']}, mean ± sd of {r['repetitions']} runs after a warm-up")


def _table(head: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    fmt = lambda r: "  ".join(x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(head)] + [fmt(r) for r in rows])


def render(results: list[dict], markdown: bool = False) -> str:
    """The results as three tables (speed, memory, decode-step breakdown), plain or markdown."""
    if not results:
        return "no results"
    p, n = results[0]["prompt_tokens"], results[0]["gen_tokens"]
    speed = [[r["model_name"], f"{r['file_bytes'] / MiB:.1f}", f"{r['bits_per_weight']['linear']:.2f} / "
              f"{r['bits_per_weight']['all']:.2f}", str(r["threads"]), f"{r['load_s']:.2f}", _pm(r["pp_tps"], ".1f"),
              _pm(r["tg_tps"], ".1f"), _pm(r["ttft_ms"], ".1f"),
              f"{r['tpot_ms']['p50']:.2f} / {r['tpot_ms']['p95']:.2f}"] for r in results]
    mem = []
    for r in results:
        m = r["memory"]
        mem.append([r["model_name"], str(r["threads"])] + [f"{m.get(k, 0) / MiB:.1f}" for k in (   # results of before model_read: 0
            "peak_rss", "before_load", "model_mapped", "model_read")] + [f"{m['kv_cache'] / MiB:.2f} ({m['kv_bytes_per_token'] / 1024:.1f} KiB/token, {m.get('kv_dtype', 'float32')})",
            f"{m['workspace'] / MiB:.2f}", f"{m['other'] / MiB:.1f}", f"{m['bound'] / MiB:.1f}",
            "yes" if m["within_bound"] else "NO"])
    parts = ("products", "attention", "head", "norms_and_rest", "sampling")
    brk = []
    for r in results:
        b = r.get("breakdown")
        if not b:
            continue
        total = b["step_ms"] + b["parts_ms"]["sampling"]
        cells = [f"{b['parts_ms'][k]:.2f} ({100 * b['parts_ms'][k] / total:.0f}%)" for k in parts]
        if b["dense_matrices_in_rest"]:
            cells[3] += f", with {b['dense_matrices_in_rest']} dense products"
        brk.append([r["model_name"], str(r["threads"]), str(b["position"]), f"{total:.2f}"] + cells)
    out = [header(results), "",
           _table(["model", "MiB", "bits/w lin / all", "threads", "load s", f"pp{p} tok/s", f"tg{n} tok/s",
                   "TTFT ms", "TPOT p50 / p95 ms"], speed, markdown), "",
           f"memory, MiB (bound: file + KV cache for {p + n} tokens + {MEMORY_ALLOWANCE // 10**6} MB):",
           _table(["model", "threads", "peak RSS", "before load", "model mapped", "model read", "KV cache", "workspace", "other",
                   "bound", "within"], mem, markdown)]
    if brk:
        out += ["", "one decode step (+ sampling), ms (share), at the mean decode position:",
                _table(["model", "threads", "position", "total", "products", "attention", "head",
                        "norms and rest", "sampling"], brk, markdown)]
    return "\n".join(out)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif not isinstance(v, list):
            out[prefix + k] = v
    return out


def _write_atomic(path, write) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(results: list[dict], path) -> Path:
    return _write_atomic(path, lambda t: t.write_text(json.dumps(results, indent=1) + "\n"))


def write_csv(results: list[dict], path) -> Path:
    """One row per result; nested fields as dotted columns, per-run lists left to the JSON."""
    import csv
    rows = [_flat(r) for r in results]
    cols = list(dict.fromkeys(k for r in rows for k in r))

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)
    return _write_atomic(path, write)


def require_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise BenchError("--plot needs matplotlib: pip install 'edgepanel[plot]'") from None


def plot(results: list[dict], path) -> Path:
    """Prompt and generation tokens/s (± sd) and peak RSS (by part, with its bound) per model and
    thread count, as a PNG."""
    require_matplotlib()
    from matplotlib.figure import Figure

    names = list(dict.fromkeys(r["model_name"] for r in results))
    threads = list(dict.fromkeys(r["threads"] for r in results))
    by = {(r["model_name"], r["threads"]): r for r in results}
    x = np.arange(len(names))
    width = 0.8 / len(threads)
    fig = Figure(figsize=(5 + 2.5 * len(names), 4.2), layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, key, title in ((axes[0], "pp_tps", f"prompt ({results[0]['prompt_tokens']} tokens)"),
                           (axes[1], "tg_tps", f"generation ({results[0]['gen_tokens']} tokens)")):
        for i, t in enumerate(threads):
            rs = [by.get((nm, t)) for nm in names]
            ax.bar(x + i * width, [r[key]["mean"] if r else 0 for r in rs], width,
                   yerr=[r[key]["sd"] if r else 0 for r in rs], capsize=3, label=f"{t} thread{'s' * (t > 1)}")
        ax.set_title(title)
        ax.set_ylabel("tokens/s")
    ax = axes[2]
    parts = (("before_load", "runtime"), ("model_mapped", "model mapped"), ("model_read", "model read"), ("kv_cache", "KV cache"),
             ("workspace", "workspace"), ("other", "other"))
    t0 = threads[0]
    rs = [by.get((nm, t0)) or next(r for r in results if r["model_name"] == nm) for nm in names]
    bottom = np.zeros(len(names))
    for key, label in parts:
        v = np.array([max(r["memory"].get(key, 0), 0) / MiB for r in rs])
        ax.bar(x, v, 0.6, bottom=bottom, label=label)
        bottom += v
    ax.scatter(x, [r["memory"]["bound"] / MiB for r in rs], marker="_", s=600, color="black", label="bound", zorder=3)
    ax.set_title(f"peak RSS ({t0} thread{'s' * (t0 > 1)})")
    ax.set_ylabel("MiB")
    for a, offset in ((axes[0], width * (len(threads) - 1) / 2), (axes[1], width * (len(threads) - 1) / 2), (axes[2], 0)):
        a.set_xticks(x + offset, [textwrap.fill(nm.removesuffix(".ep"), 18) for nm in names], fontsize=7)
    axes[0].legend(fontsize=8)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(f"edgepanel bench: {results[0]['cpu']}, kernels {results[0]['isa']}", fontsize=9)
    return _write_atomic(path, lambda t: fig.savefig(t, format="png", dpi=110))


__all__ = ["BenchConfig", "BenchError", "MEMORY_ALLOWANCE", "run", "measure", "render", "write_json", "write_csv",
           "plot", "environment", "cpu_name", "cpu_fields", "parse_threads"]
