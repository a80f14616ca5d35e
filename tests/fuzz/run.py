"""Run the fuzz harnesses from their seed corpora (tests/fuzz/corpus/), one process each.

    python tests/fuzz/run.py --seconds 30            # CI: every harness for 30 s
    python tests/fuzz/run.py --runs 500 gguf         # a fixed number of inputs (deterministic)

New inputs that reach new code go to a scratch directory, never into the tree.  Prints, per
harness, the inputs executed and the time taken; exits non-zero when a harness reports a crash
(an exception other than edgepanel's own, a signal, a hang past -timeout, memory past
-rss_limit_mb), leaving the input that did it in the scratch directory it names.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
HARNESSES = ("model_file", "gguf", "hf_config", "chat_template", "panels")
OPTIONS = ["-timeout=30", "-rss_limit_mb=2048", "-print_final_stats=1"]


def run(name: str, scratch: Path, limit: list[str], seed: int = 1) -> tuple[subprocess.CompletedProcess, int, float]:
    """(process, inputs executed, seconds) of one harness."""
    out = scratch / name
    out.mkdir(parents=True, exist_ok=True)
    extra = [f"-dict={HERE / 'jinja.dict'}"] if name == "chat_template" else []
    cmd = [sys.executable, str(HERE / f"fuzz_{name}.py"), *OPTIONS, *limit, f"-seed={seed}", *extra,
           f"-artifact_prefix={out}/", str(out), str(HERE / "corpus" / name)]
    env = dict(os.environ, PYTHONHASHSEED="0", EDGEPANEL_FUZZ_SCRATCH=str(scratch / f"{name}-files"),
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=scratch)
    m = re.search(r"stat::number_of_executed_units:\s*(\d+)", r.stderr)
    return r, int(m[1]) if m else 0, time.monotonic() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", default=list(HARNESSES), help=f"harnesses ({', '.join(HARNESSES)})")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--seconds", type=int, help="run each harness this long")
    g.add_argument("--runs", type=int, help="run each harness on this many inputs")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    limit = [f"-max_total_time={args.seconds}"] if args.seconds else [f"-runs={args.runs}"]
    failed = 0
    scratch = Path(tempfile.mkdtemp(prefix="edgepanel-fuzz-run-"))
    for name in args.names:
        r, execs, secs = run(name, scratch, limit, args.seed)
        print(f"{name:14} {execs:8d} inputs in {secs:6.1f} s: {'ok' if r.returncode == 0 else 'FAILED'}", flush=True)
        if r.returncode != 0:
            failed += 1
            print((r.stdout + r.stderr)[-4000:], file=sys.stderr)   # atheris prints the exception on stdout
            print(f"the input that did it is in {scratch / name}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
