"""SmolLM2-135M exported to ONNX, checked and timed against edgepanel's C engine (docs/onnx.md).

    python tools/onnx_bench.py --models k4 k2 --formats standard ort --threads 1 2 --json onnx_bench.json

Models: k4 = the default model (edgepanel.hub.resolve_model(None)); k2 = SmolLM2 converted here
once with Recipe(planes=2, group=64, calib=None, tune_steps=0) (data-free, float16 scales, tied
int8 table), cached in --work.  For each model and export format:
  - sizes: the .ep file and the .onnx file; export time;
  - logits: a prefill of 32 tokens (a chat prompt) and 16 cached decode steps, per-position
    relative error max|a - b| / max|b| against the C engine; and, once per model, the NumPy
    reference engine against the C engine (the spread of edgepanel's own two implementations);
  - greedy: 64 tokens on each of 8 chat prompts, ONNX Runtime against the C engine; at the first
    difference, the C engine's margin between its token and ONNX Runtime's (a near-tie when that
    margin is below the largest logit difference of the two runtimes at that step);
  - speed (--threads): each (engine, threads) in a child process: load time, prefill tokens/s
    (one pass over a 128-token prompt), decode tokens/s (64 one-token passes), peak RSS (VmHWM);
    medians of --repeat rounds, each round running every runtime of a model once, in turn (the
    machine's load, shared cores, then falls on all alike).  ONNX Runtime's session sets session.disable_quant_qdq = 1 (weights
    dequantized once, at load) and intra_op_num_threads = threads.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PROMPTS = ["Write a short story about a robot who learns to paint.", "Name three rivers in Europe.",
           "Explain why the sky is blue.", "What is the capital of France?",
           "Give me a recipe for pancakes.", "Write a haiku about the sea.",
           "How do I sort a list in Python?", "Describe a cat to someone who has never seen one."]
PREFILL, DECODE, GREEDY = 32, 16, 64
SPEED_PROMPT = ("Once upon a time, in a small village between two hills, there lived an old clockmaker who "
                "repaired every clock in the valley. ") * 8

CHILD = r'''
import json, sys, time
import numpy as np
from edgepanel.bench import greedy_speeds, peak_rss_mib
kind, path, threads, repeat, prompt = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
t = time.time()
state = {}
if kind == "edgepanel":
    import edgepanel
    m = edgepanel.load(path, threads=threads)
    ids = np.array(m.tokenizer.encode(prompt)[:128], np.int32)
    def start():
        state["cache"] = m.engine.new_cache(len(ids) + 64)
        return int(np.argmax(m.engine.forward(ids, state["cache"])))
    def step(tok):
        return int(np.argmax(m.engine.forward(np.array([tok], np.int32), state["cache"])))
else:
    from tokenizers import Tokenizer
    from edgepanel.export.runtime import OnnxDecoder
    dec = OnnxDecoder(path, threads=threads)
    ids = Tokenizer.from_file(str(dec.path.with_suffix(".tokenizer.json"))).encode(prompt, add_special_tokens=False).ids[:128]
    def run(x, kv=None):
        lg, state["kv"] = dec.forward(x, kv)
        return int(np.argmax(lg[0, -1]))
    def start():
        return run([ids])
    def step(tok):
        return run([[tok]], state["kv"])
load = time.time() - t
res = greedy_speeds(start, step, len(ids), 64, repeat)
res.update(load=load, tokens=len(ids), rss_mb=peak_rss_mib())
print(json.dumps(res))
'''


def model_path(name: str, work: Path) -> Path:
    from edgepanel import hub
    if name == "k4":
        return hub.resolve_model(None, progress=False)
    if name != "k2":
        raise SystemExit(f"unknown model {name!r}: k4 or k2")
    out = work / "smollm2-k2g64-nocalib.ep"
    if not out.exists():
        from edgepanel.convert import Recipe, convert
        t = time.time()
        convert(hub.fetch("smollm2"), out, Recipe(planes=2, group=64, calib=None, tune_steps=0), progress=False,
                log=lambda m: None)
        print(f"converted {out.name} in {time.time() - t:.0f} s", file=sys.stderr)
    return out


def rel(a, b):
    return np.abs(a - b).max(axis=1) / np.abs(b).max(axis=1)


def check_logits(m, ref, dec) -> dict:
    ids = np.array(m.prompt_ids(PROMPTS[0], chat=True)[:PREFILL])
    cache = m.engine.new_cache(PREFILL + DECODE)
    want = [m.engine.forward(ids, cache, all_logits=True)]
    toks = []
    for _ in range(DECODE):
        toks.append(int(np.argmax(want[-1][-1])))
        want.append(m.engine.forward(np.array(toks[-1:]), cache, all_logits=True))
    want = np.concatenate(want)
    lg, kv = dec.forward(ids[None])
    got = [lg[0]]
    for t in toks:
        lg, kv = dec.forward([[t]], kv)
        got.append(lg[0])
    got = np.concatenate(got)
    out = {"onnx_vs_c": summary(rel(got, want)), "argmax_agree": float((got.argmax(1) == want.argmax(1)).mean())}
    if ref is not None:
        rc = ref.engine.new_cache(PREFILL + DECODE)
        r = np.concatenate([ref.engine.forward(ids, rc, all_logits=True)] +
                           [ref.engine.forward(np.array([t]), rc, all_logits=True) for t in toks])
        out["reference_vs_c"] = summary(rel(r, want))
        out["onnx_vs_reference"] = summary(rel(got, r))
    return out


def summary(e):
    return {"median": float(np.median(e)), "max": float(e.max())}


def check_greedy(m, dec) -> list[dict]:
    rows = []
    for p in PROMPTS:
        prompt = m.prompt_ids(p, chat=True)
        cache = m.engine.new_cache(len(prompt) + GREEDY)
        lg = m.engine.forward(np.array(prompt), cache)
        ours, steps = [], []
        for _ in range(GREEDY):
            ours.append(int(np.argmax(lg)))
            steps.append(lg)
            lg = m.engine.forward(np.array(ours[-1:]), cache)
        lo, kv = dec.forward([prompt])
        theirs, theirs_logits = [], []
        for i in range(GREEDY):
            theirs_logits.append(lo[0, -1])
            theirs.append(int(np.argmax(lo[0, -1])))
            if theirs[-1] != ours[i]:
                break
            lo, kv = dec.forward([[theirs[-1]]], kv)
        row = {"prompt": p, "identical": theirs == ours}
        if theirs != ours:
            i = len(theirs) - 1
            c = steps[i]
            margin = float(c[ours[i]] - c[theirs[i]])
            diff = float(np.abs(theirs_logits[i] - c).max())
            row.update(first_difference=i, c_token=ours[i], onnx_token=theirs[i], c_margin=margin,
                       max_logit_difference=diff, near_tie=margin < diff)
        rows.append(row)
    return rows


def speed(kind: str, path: Path, threads: int, repeat: int) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, kind, str(path), str(threads), str(repeat), SPEED_PROMPT],
                       capture_output=True, text=True, check=True)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    return {"load_s": res["load"], "prefill_tps": statistics.median(res["prefill"]),
            "decode_tps": statistics.median(res["decode"]), "rss_mb": res["rss_mb"], "prompt_tokens": res["tokens"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["k4", "k2"])
    ap.add_argument("--formats", nargs="+", default=["standard", "ort"])
    ap.add_argument("--threads", nargs="*", type=int, default=[1, 2])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgepanel-onnx-bench"))
    ap.add_argument("--no-reference", action="store_true", help="skip the NumPy reference engine's spread")
    ap.add_argument("--no-check", action="store_true", help="speed and sizes only")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    import edgepanel
    from edgepanel.export.onnx import ExportOptions, export_onnx
    from edgepanel.export.runtime import OnnxDecoder

    a.work.mkdir(parents=True, exist_ok=True)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    results = {"cpu": cpu, "models": {}}
    for name in a.models:
        ep = model_path(name, a.work)
        entry = results["models"][name] = {"ep": str(ep), "ep_mib": ep.stat().st_size / 2**20, "formats": {}}
        m = edgepanel.load(ep, threads=2)
        ref = None if a.no_reference or a.no_check else edgepanel.load(ep, engine="reference")
        for fmt in a.formats:
            out = a.work / f"smollm2-{name}-{fmt}.onnx"
            t = time.time()
            export_onnx(ep, out, ExportOptions(format=fmt))
            f = entry["formats"][fmt] = {"onnx_mib": out.stat().st_size / 2**20, "export_s": time.time() - t}
            print(f"{name} {fmt}: {f['onnx_mib']:.1f} MiB (.ep {entry['ep_mib']:.1f}), export {f['export_s']:.1f} s",
                  file=sys.stderr)
            if not a.no_check:
                dec = OnnxDecoder(out, threads=2)
                f["logits"] = check_logits(m, ref if fmt == a.formats[0] else None, dec)
                f["greedy"] = check_greedy(m, dec)
                same = sum(r["identical"] for r in f["greedy"])
                print(f"  logits {json.dumps(f['logits'])}\n  greedy: {same}/{len(PROMPTS)} identical; "
                      + "; ".join(f"#{i} differs at {r['first_difference']} (C margin {r['c_margin']:.3f}, "
                                  f"max |diff| {r['max_logit_difference']:.3f})" for i, r in enumerate(f["greedy"])
                                  if not r["identical"]), file=sys.stderr)
                del dec
        # speed: the runtimes of this model in turn, `repeat` rounds, so a change of the machine's load
        # (shared cores) falls on all of them alike; a child process per run
        runs = [("edgepanel", ep, entry.setdefault("edgepanel_speed", {}))]
        runs += [("onnx", a.work / f"smollm2-{name}-{fmt}.onnx", entry["formats"][fmt].setdefault("speed", {}))
                 for fmt in a.formats]
        for th in a.threads:
            got = {i: [] for i in range(len(runs))}
            for _ in range(a.repeat):
                for i, (kind, path, _) in enumerate(runs):
                    got[i].append(speed(kind, path, th, 1))
            for i, (kind, path, dest) in enumerate(runs):
                dest[th] = {k: statistics.median(r[k] for r in got[i]) for k in got[i][0]}
                print(f"{name} {path.name} {th}t: {dest[th]}", file=sys.stderr)
    print(table(results))
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))


def table(results) -> str:
    lines = ["| model | runtime | file | prefill tok/s (1t / 2t) | decode tok/s (1t / 2t) | peak RSS (2t) |",
             "|---|---|---|---|---|---|"]
    for name, e in results["models"].items():
        rows = [("edgepanel C engine", e["ep_mib"], e.get("edgepanel_speed", {}))]
        rows += [(f"ONNX Runtime, {fmt}", f["onnx_mib"], f.get("speed", {})) for fmt, f in e["formats"].items()]
        for label, mib, sp in rows:
            ths = sorted(sp)
            pre = " / ".join(f"{sp[t]['prefill_tps']:.0f}" for t in ths)
            dec = " / ".join(f"{sp[t]['decode_tps']:.1f}" for t in ths)
            rss = f"{sp[ths[-1]]['rss_mb']:.0f} MB" if ths else ""
            lines.append(f"| {name} | {label} | {mib:.1f} MiB | {pre} | {dec} | {rss} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
