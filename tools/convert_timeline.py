"""The default model's conversion with a timeline: every log line stamped with the time since the
start and the resident memory then, a thread sampling VmRSS every 0.25 s, and the report's peak
(VmHWM) at the end.

    python tools/convert_timeline.py OUT.ep [--json OUT.rss.json] [--recipe b3.75g64:rows]

--recipe: another recipe, spelled as tools/quality.py spells them (default: the default model's).
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

from edgepanel import hub
from edgepanel.convert import convert


def rss_gib() -> float:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:")) / 2**20


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--json", type=Path, help="write the (seconds, GiB) samples here")
    ap.add_argument("--recipe", help="a recipe as tools/quality.py spells it (default: the default model's)")
    args = ap.parse_args()
    if args.recipe:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from quality import parse
        recipe = parse(args.recipe)
    else:
        recipe = hub.default_recipe()
    t0, samples, done = time.time(), [], threading.Event()

    def sample():
        while not done.is_set():
            samples.append((time.time() - t0, rss_gib()))
            time.sleep(0.25)

    threading.Thread(target=sample, daemon=True).start()
    report = convert(hub.fetch(), args.out, recipe,
                     log=lambda m: print(f"[{time.time() - t0:7.1f} s, {rss_gib():.2f} GiB] {m}", flush=True))
    done.set()
    lines = report.table().splitlines()
    print("\n".join(lines[next(i for i, ln in enumerate(lines) if ln.startswith("linear layers")):]))
    t, peak = max(samples, key=lambda s: s[1])
    print(f"highest sample {peak:.2f} GiB at {t:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(samples))


if __name__ == "__main__":
    main()
