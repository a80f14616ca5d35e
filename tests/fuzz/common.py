"""What the fuzz harnesses share: the scratch directory, structure-aware mutators (JSON values,
integers in a binary header), and the entry point.

Every harness takes libFuzzer's options and corpus directories, e.g.
    python tests/fuzz/fuzz_gguf.py -runs=2000 -seed=1 /tmp/new tests/fuzz/corpus/gguf
and fails (a crash report, exit code 1) when anything but edgepanel's own errors escapes, when a
run takes over -timeout seconds, or when the process grows past -rss_limit_mb.
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import struct
import sys
import tempfile
from pathlib import Path

import atheris

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

# where a harness writes its inputs as files (run.py gives a directory it owns)
SCRATCH = Path(os.environ.get("EDGEPANEL_FUZZ_SCRATCH") or tempfile.mkdtemp(prefix="edgepanel-fuzz-"))
SCRATCH.mkdir(parents=True, exist_ok=True)

# values a careless or hostile writer puts where a well-formed one has something sensible
INTERESTING = [0, -1, 1, 2, 3, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64, 65, 255, 256, 4096, 2**24, 2**31 - 1, 2**31,
               2**32, 2**53, 2**63 - 1, 2**63, 2**64, -2**63, 10**30, 0.0, -0.0, 1e-45, 1e-300, 0.5, 1e308,
               math.inf, -math.inf, math.nan, "", "x", "F32", "F16", "U8", "I8", "BF16", "F64", "planes", "dense",
               "int8_rows", "llama", "gpt2", "rms", "layer", "linear", "llama3", [], {}, None, True, False, [1, 2],
               [0], [2**63], {"kind": "planes"}, "{}", "[]", "{% for i in range(9) %}x{% endfor %}",
               {"strategy": {"Fixed": 2**20}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
                "pad_type_id": 0, "pad_token": "a"},   # a tokenizer.json's padding (it used to abort encode)
               {"max_length": 1, "strategy": "LongestFirst", "stride": 0, "direction": "Right"}]


def interesting(rng: random.Random, old=None):
    if isinstance(old, (int, float)) and not isinstance(old, bool) and rng.random() < 0.3:
        return old + rng.choice([-1, 1, 2, -2]) if isinstance(old, int) else old * rng.choice([-1, 0.5, 2, 1e30])
    if rng.random() < 0.05:   # deep nesting
        v = []
        for _ in range(rng.choice([10, 200])):
            v = [v]
        return v
    return copy.deepcopy(rng.choice(INTERESTING))   # a copy: later mutations must not grow the table


def _slots(obj, out, depth=0):
    """Every (container, key) under obj, to pick one to change."""
    if depth > 40:
        return out
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        out.append((obj, k))
        _slots(v, out, depth + 1)
    return out


def mutate_json_value(obj, rng: random.Random):
    """Change obj in place: one value replaced by an interesting one, a key dropped, or an entry
    duplicated or emptied."""
    slots = _slots(obj, [])
    if not slots:
        return obj
    container, key = rng.choice(slots)
    r = rng.random()
    if r < 0.1 and isinstance(container, dict):
        del container[key]
    elif r < 0.15 and isinstance(container, list):
        container.append(container[key])
    elif r < 0.25 and isinstance(container[key], str):
        text = container[key]   # JSON inside a string (the edgepanel metadata, tokenizer.json)
        try:
            inner = json.loads(text)
        except (ValueError, RecursionError):
            container[key] = text[:rng.randrange(len(text) + 1)]
        else:
            container[key] = json.dumps(mutate_json_value(inner, rng))
    else:
        container[key] = interesting(rng, container[key])
    return obj


def dumps(obj) -> bytes | None:
    try:
        return json.dumps(obj).encode()
    except (ValueError, RecursionError, TypeError):
        return None


def mutate_json_bytes(data: bytes, max_size: int, seed: int) -> bytes:
    """A JSON document with one value changed (else libFuzzer's own mutation)."""
    rng = random.Random(seed)
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        obj = None
    if obj is None or rng.random() < 0.3:
        return atheris.Mutate(data, max_size)
    for _ in range(rng.choice([1, 1, 2, 3])):
        obj = mutate_json_value(obj, rng)
    out = dumps(obj)
    return atheris.Mutate(data, max_size) if out is None else out[:max_size]


def mutate_safetensors(data: bytes, max_size: int, seed: int) -> bytes:
    """A safetensors file with a value of its JSON header (or of the JSON inside its metadata)
    changed, its data kept (else libFuzzer's own mutation)."""
    rng = random.Random(seed)
    if len(data) >= 8 and rng.random() < 0.7:
        (n,) = struct.unpack("<Q", data[:8])
        if 8 + n <= len(data):
            try:
                header = json.loads(data[8:8 + n])
            except (ValueError, RecursionError):
                header = None
            if isinstance(header, dict):
                for _ in range(rng.choice([1, 1, 2])):
                    header = mutate_json_value(header, rng)
                text = dumps(header)
                if text is not None:
                    text += b" " * (-(8 + len(text)) % 8)
                    return (struct.pack("<Q", len(text)) + text + data[8 + n:])[:max_size]
    return atheris.Mutate(data, max_size)


def mutate_header_ints(data: bytes, max_size: int, seed: int, header_bytes: int = 4096) -> bytes:
    """An interesting little-endian integer written over 4 or 8 bytes of the first
    `header_bytes` (a GGUF file's counts, lengths, types and dimensions live there), else
    libFuzzer's own mutation."""
    rng = random.Random(seed)
    if not data or rng.random() < 0.4:
        return atheris.Mutate(data, max_size)
    out = bytearray(data)
    width = rng.choice([4, 8])
    at = rng.randrange(max(1, min(len(out), header_bytes) - width))
    v = rng.choice([0, 1, 2, 3, 7, 8, 16, 31, 32, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**40, 2**63, 2**64 - 1])
    out[at:at + width] = (v % 2**(8 * width)).to_bytes(width, "little")
    return bytes(out[:max_size])


def scratch(name: str) -> Path:
    return SCRATCH / name


MAX_GROWTH_MB = 200   # what one input may add to the process's peak memory (inputs are at most ~50 KB)


def peak_rss_mb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) >> 10 for line in f if line.startswith("VmHWM"))


def bounded(test_one_input):
    """`test_one_input` failing when one input raises the peak memory by over MAX_GROWTH_MB:
    libFuzzer's own -rss_limit_mb notices too late to say which input it was."""
    def run(data: bytes):
        before = peak_rss_mb()
        test_one_input(data)
        grew = peak_rss_mb() - before
        if grew > MAX_GROWTH_MB:
            raise MemoryError(f"one input of {len(data)} bytes raised the peak memory by {grew} MB")
    return run


def main(test_one_input, custom_mutator=None):
    """Run libFuzzer on `test_one_input` with this process's command line."""
    atheris.Setup(sys.argv, bounded(test_one_input), custom_mutator=custom_mutator)
    atheris.Fuzz()
