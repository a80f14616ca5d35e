"""Held-out perplexity of a model with a float32 and a float16 key/value cache (tools/eval_texts.py's
three texts, each in windows of the model's context), and how far the float16 cache moves it:

    python tools/kv_quality.py                      # the default model
    python tools/kv_quality.py model.ep --json docs/data/kv_quality.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import eval_texts  # noqa: E402

from edgepanel import bench, hub  # noqa: E402
from edgepanel.model import load  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="smollm2", help="model file or known name (default: smollm2)")
    ap.add_argument("--window", type=int, default=None, help="tokens per window (default: the context, at most 1024)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", metavar="OUT", help="write the results as JSON")
    a = ap.parse_args()
    path = hub.resolve_model(a.model)
    texts = {"verse": eval_texts.verse(), "prose": eval_texts.prose(), "technical": eval_texts.technical()}
    rows = []
    for kv in ("float32", "float16"):
        m = load(path, threads=a.threads, kv_dtype=kv)
        t = time.perf_counter()
        row = {"kv_dtype": kv, **{name: m.perplexity(text, window=a.window) for name, text in texts.items()}}
        row["seconds"] = time.perf_counter() - t
        rows.append(row)
        print(f"{kv}: " + ", ".join(f"{n} {row[n]:.4f}" for n in texts) + f" ({row['seconds']:.0f} s)", flush=True)
    change = {n: rows[1][n] / rows[0][n] - 1 for n in texts}
    print("float16 against float32: " + ", ".join(f"{n} {100 * c:+.3f}%" for n, c in change.items()))
    if a.json:
        out = {"model": Path(path).name, "cpu": bench.cpu_name(), "git": bench.git_revision(),
               "command": "python tools/kv_quality.py " + " ".join(sys.argv[1:]), "rows": rows, "relative_change": change}
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
