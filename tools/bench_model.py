"""End-to-end numbers for the README: SmolLM2-135M-Instruct as edgepanel models (pass-through and
binarized recipes) beside transformers (and llama.cpp, when llama-cpp-python is installed) on the
same machine in the same run.  Each engine runs in its own process so peak RSS is its own.

    python tools/bench_model.py pass k2g64 k4g64 --threads 1 2 --json bench_model.json

Per engine and thread count: load time, prefill tokens/s (a 128-token prompt), decode tokens/s
(64 new tokens, greedy), peak RSS (VmHWM); medians of --repeat runs.  Recipes as in
tools/quality.py (models are shared with it through $EDGEPANEL_HOME/quality/).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

PROMPT = ("Once upon a time, in a small village between two hills, there lived an old clockmaker who "
          "repaired every clock in the valley. ") * 8
CHILD = r'''
import json, os, sys, time
from edgepanel.bench import greedy_speeds, peak_rss_mib
kind, path, threads, repeat = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
t = time.time()
if kind == "edgepanel":
    import numpy as np, edgepanel
    m = edgepanel.load(path, threads=threads)
    ids = np.array(m.tokenizer.encode(PROMPT)[:128], np.int32)
    state = {}
    def start():
        state["cache"] = m.engine.new_cache(len(ids) + 64)
        return int(np.argmax(m.engine.forward(ids, state["cache"])))
    def step(tok):
        return int(np.argmax(m.engine.forward(np.array([tok], np.int32), state["cache"])))
elif kind == "transformers":
    import torch
    torch.set_num_threads(threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d, f = os.path.split(path)
    m = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    ids = torch.tensor([AutoTokenizer.from_pretrained(d, gguf_file=f)(PROMPT)["input_ids"][:128]])
    state = {}
    def run(x, past=None):
        with torch.no_grad():
            out = m(x, past_key_values=past, use_cache=True)
        state["past"] = out.past_key_values
        return out.logits[:, -1:].argmax(-1)
    def start():
        return run(ids)
    def step(tok):
        return run(tok, state["past"])
elif kind == "llama.cpp":
    from llama_cpp import Llama
    m = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=512, n_batch=512, verbose=False)
    ids = m.tokenize(PROMPT.encode())[:128]
    def start():
        m.reset(); m.eval(ids)
        return m.sample(temp=0.0)
    def step(tok):
        m.eval([tok])
        return m.sample(temp=0.0)
load = time.time() - t
res = greedy_speeds(start, step, len(ids[0]) if kind == "transformers" else len(ids), 64, repeat)
res.update(load=load, rss_mib=peak_rss_mib())
print("RESULT " + json.dumps(res))
'''


def run_child(kind, path, threads, repeat):
    code = f"PROMPT = {PROMPT!r}\n" + CHILD
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code, kind, str(path), str(threads), str(repeat)],
                         capture_output=True, text=True, env=env, timeout=3600)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{kind} failed: {out.stderr[-2000:]}")


def main():
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from edgepanel.bench import cpu_name
    from quality import parse
    from edgepanel import hub
    from edgepanel.convert import convert

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipes", nargs="+")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    gguf = hub.fetch("smollm2")
    rows = []
    engines = []
    for spec in args.recipes:
        path = hub.cache_dir() / "quality" / f"{spec.replace(':', '_').replace(',', '_')}.ep"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            convert(gguf, path, parse(spec))
        engines.append(("edgepanel", spec, path))
    if not args.no_transformers:
        engines.append(("transformers", "float32 (from GGUF)", gguf))
    try:
        import llama_cpp  # noqa: F401
        engines.append(("llama.cpp", "Q4_1 GGUF", gguf))
    except ImportError:
        pass
    print(f"CPU: {cpu_name()}; medians of {args.repeat} runs; 128-token prompt, 64 new tokens\n")
    print("| engine | model | file MiB | threads | load s | prefill tok/s | decode tok/s | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for kind, label, path in engines:
        for th in args.threads:
            r = run_child(kind, path, th, args.repeat)
            row = {"engine": kind, "model": label, "file_mib": Path(path).stat().st_size / 2**20, "threads": th,
                   "load_s": r["load"], "prefill": statistics.median(r["prefill"]),
                   "decode": statistics.median(r["decode"]), "rss_mib": r["rss_mib"]}
            rows.append(row)
            print(f"| {kind} | {label} | {row['file_mib']:.1f} | {th} | {row['load_s']:.2f} | {row['prefill']:.0f} | "
                  f"{row['decode']:.0f} | {row['rss_mib']:.0f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
