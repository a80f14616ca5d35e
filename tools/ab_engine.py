"""Two builds of the C engine taking turns, call by call: the A/B measurement of docs/bench.md.

On a shared or noisy machine two separate benchmark runs can differ by 2x for the same code, so a
kernel change is judged by pairs: the old and the new build run as two processes pinned to the same
cores, alternating one call each (old first on even rounds, new first on odd ones), and the figure
to trust is the median over rounds of old time / new time (above 1: the new build is faster).

    python tools/ab_engine.py MODEL.ep --old HEAD~1 [--new WORKTREE] [--rounds 60] [--threads 1]
                              [--cores 0] [--json OUT.json]

--old is a git revision of this repository: its tree is exported to
~/.cache/edgepanel/ab/<commit>/ and its extension built there in place (once, then reused).
--new is a source tree, built in place if its extension is missing or older than csrc/ (an in-place
build, edgepanel/kernels/_ep.cpython-*.so, takes precedence over an installed _ep.abi3.so until it
is deleted).  Without --new, this checkout's tracked files as they are now (uncommitted changes
included, untracked files not: `git add` new sources) are exported to ~/.cache/edgepanel/ab/<tree>/
and built there, so that the checkout never gets an in-place build that would shadow the next
`pip install -e`. Each round times, in each process: one decode step at position 32, the output layer,
the decode step's products, and a prefill of 128 tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics as st
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("EDGEPANEL_HOME", Path.home() / ".cache" / "edgepanel")) / "ab"
MEASURES = ("decode step", "output layer", "products", "prefill 128")

CHILD = r'''
import json, sys, time
import numpy as np
import edgepanel
from edgepanel.bench import _head_timer, _products_timer
from edgepanel.model.model import load
m = load(sys.argv[1], threads=int(sys.argv[2]))
eng = m.engine
tok = np.array([1234], np.int32)
cache = eng.new_cache(160)
toks = (np.arange(128, dtype=np.int32) * 7919) % min(40000, m.cfg.vocab_size)
head = _head_timer(eng, tok)
prod = _products_timer(eng, m.weights)[0]
def step():
    cache.length = 32
    t = time.perf_counter(); eng.forward(tok, cache); return time.perf_counter() - t
def prefill():
    cache.length = 0
    t = time.perf_counter(); eng.forward(toks, cache); return time.perf_counter() - t
for _ in range(3):
    step(); head(); prod(); prefill()
print(json.dumps({"package": edgepanel.__file__, "kernels": eng.ffi.string(eng.lib.ep_kernels_name(eng.kt)).decode()}),
      flush=True)
for line in sys.stdin:
    print(json.dumps([step(), head(), prod(), prefill()]), flush=True)
'''


def run(cmd, **kw):
    print("+ " + " ".join(map(str, cmd)), file=sys.stderr)
    subprocess.run(cmd, check=True, **kw)


def extension(tree: Path) -> list[Path]:
    return sorted((tree / "edgepanel" / "kernels").glob("_ep*.so"))


def build(tree: Path):
    """Build the extension in place unless one is there and newer than every C source."""
    sos = extension(tree)
    newest_src = max(p.stat().st_mtime for p in (tree / "csrc").rglob("*.[ch]"))
    if sos and min(p.stat().st_mtime for p in sos) > newest_src:
        return
    run([sys.executable, "-m", "edgepanel.kernels._build"], cwd=tree, env=dict(os.environ, PYTHONPATH=str(tree)))
    if not extension(tree):
        raise SystemExit(f"{tree}: the build wrote no extension")


def export(rev: str, by_tree: bool = False) -> Path:
    """The tree of revision `rev` under the cache (named by the commit, or by its tree's hash), with
    its extension built."""
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{rev}^{{{'tree' if by_tree else 'commit'}}}"],
                            capture_output=True, text=True)
    if commit.returncode:
        raise SystemExit(f"--old {rev!r}: not a revision of {ROOT} ({commit.stderr.strip()})")
    tree = CACHE / commit.stdout.strip()
    if not (tree / "edgepanel").is_dir():
        tmp = tree.with_name(tree.name + f".{os.getpid()}.tmp")
        tmp.mkdir(parents=True)
        archive = subprocess.Popen(["git", "-C", str(ROOT), "archive", commit.stdout.strip()], stdout=subprocess.PIPE)
        run(["tar", "-x", "-C", str(tmp)], stdin=archive.stdout)
        if archive.wait():
            raise SystemExit(f"git archive {rev} failed")
        os.replace(tmp, tree)
    build(tree)
    return tree


def working_state() -> Path:
    """This checkout's tracked files as they are now, exported and built under the cache."""
    stash = subprocess.run(["git", "-C", str(ROOT), "stash", "create"], capture_output=True, text=True, check=True)
    return export(stash.stdout.strip() or "HEAD", by_tree=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--old", required=True, help="git revision of the old build")
    ap.add_argument("--new", type=Path, help="source tree of the new build (default: this checkout's tracked files, "
                                              "exported to the cache)")
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cores", default="0", help="taskset's CPU list for both processes, e.g. 0 or 0,1")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    if not a.model.is_file():
        raise SystemExit(f"{a.model}: no such model file")
    if a.rounds < 2:
        raise SystemExit("--rounds must be at least 2")
    trees = {"old": export(a.old), "new": a.new.resolve() if a.new else working_state()}
    build(trees["new"])
    procs, info = {}, {}
    for side, tree in trees.items():
        env = dict(os.environ, PYTHONPATH=str(tree))
        procs[side] = subprocess.Popen(["taskset", "-c", a.cores, sys.executable, "-c", CHILD, str(a.model.resolve()),
                                        str(a.threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                       env=env, cwd="/")
        line = procs[side].stdout.readline()
        if not line:
            raise SystemExit(f"the {side} build's process ended before its first call")
        info[side] = json.loads(line)
        if not info[side]["package"].startswith(str(tree)):
            raise SystemExit(f"the {side} build imported {info[side]['package']}, not the tree {tree}")
        print(f"{side}: {info[side]['package']} ({info[side]['kernels']})", file=sys.stderr)
    times = {"old": [], "new": []}
    for r in range(a.rounds):
        for side in (("old", "new") if r % 2 == 0 else ("new", "old")):
            p = procs[side]
            p.stdin.write("go\n")
            p.stdin.flush()
            times[side].append(json.loads(p.stdout.readline()))
    for p in procs.values():
        p.stdin.close()
        p.wait()
    rows = {}
    for i, name in enumerate(MEASURES):
        old = [x[i] for x in times["old"]]
        new = [x[i] for x in times["new"]]
        ratio = [o / n for o, n in zip(old, new)]
        q = st.quantiles(ratio, n=4)
        rows[name] = {"old_ms": st.median(old) * 1e3, "new_ms": st.median(new) * 1e3, "old_over_new": st.median(ratio),
                      "quartiles": [q[0], q[2]]}
        print(f"{name:13} old {rows[name]['old_ms']:8.3f} ms  new {rows[name]['new_ms']:8.3f} ms  old/new per round: "
              f"median {rows[name]['old_over_new']:.3f} (quartiles {q[0]:.3f}-{q[2]:.3f})")
    if a.json:
        from edgepanel.bench import cpu_name
        tmp = a.json.with_name(a.json.name + ".tmp")
        tmp.write_text(json.dumps({"model": str(a.model), "old": a.old, "new": str(trees["new"]), "rounds": a.rounds,
                                   "threads": a.threads, "cores": a.cores, "cpu": cpu_name(), "builds": info,
                                   "results": rows}, indent=1) + "\n")
        os.replace(tmp, a.json)


if __name__ == "__main__":
    main()
