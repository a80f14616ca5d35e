"""`bench`: prompt and generation speed, latency and memory of model files (edgepanel.bench);
options and their defaults are BenchConfig's."""
from __future__ import annotations

from ..bench import BenchConfig
from .options import err, field_default, given, log, option


def cmd_bench(a) -> int:
    from .. import bench
    try:
        config = BenchConfig(**given(a, BenchConfig))
    except ValueError as exc:     # a bad -p / -n / -t / -r: a usage error
        err(str(exc))
        return 2
    if a.plot:
        bench.require_matplotlib()
    results = bench.run(a.models, config, progress=not a.quiet, log=log)
    print(bench.render(results, markdown=a.markdown))
    for path, write in ((a.json, bench.write_json), (a.csv, bench.write_csv), (a.plot, bench.plot)):
        if path:
            write(results, path)
            if not a.quiet:
                log(f"wrote {path}")
    return 0


def register(sub):
    s = sub.add_parser("bench", help="speed, latency and memory of model files (in the spirit of llama-bench)")
    s.add_argument("models", nargs="*", metavar="MODEL",
                   help="model files (.ep) or known model names (default: smollm2)")
    option(s, BenchConfig, "prompt_tokens", "-p", "--prompt-tokens", type=int)
    option(s, BenchConfig, "gen_tokens", "-n", "--gen-tokens", type=int)
    threads = ",".join(map(str, field_default(BenchConfig, "threads")))
    option(s, BenchConfig, "threads", "-t", "--threads", metavar="N[,N...]", show_default=False,
           help=BenchConfig.__dataclass_fields__["threads"].metadata["help"] + f" (default: {threads})")
    option(s, BenchConfig, "repetitions", "-r", "--repetitions", type=int)
    option(s, BenchConfig, "breakdown_rounds", "--breakdown-rounds", type=int)
    option(s, BenchConfig, "kv_dtype", "--kv-dtype", choices=("float16", "float32"))
    s.add_argument("--json", metavar="OUT", help="write every result (with per-run values) as JSON")
    s.add_argument("--csv", metavar="OUT", help="write one CSV row per model and thread count")
    s.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    s.add_argument("--plot", metavar="OUT.png", help="tokens/s and peak memory by model and threads "
                                                      "(needs matplotlib: pip install 'edgepanel[plot]')")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    s.set_defaults(func=cmd_bench)
