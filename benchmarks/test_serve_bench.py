"""What the server costs: time to first token and decode tokens/s of one chat request through
`edgepanel serve` (HTTP, SSE, the scheduler's batched forward) against Model.generate in process,
on the default model, greedy, the same tokens; and four clients at once with --parallel 4 (one
batched forward per step) against --parallel 1 (one at a time).

    python -m pytest benchmarks/test_serve_bench.py -s --benchmark-json=serve.json

extra_info holds the medians; the overhead test prints them (ms and %).  Threads:
EDGEPANEL_BENCH_THREADS (default 1), for the server and the in-process model alike."""
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from edgepanel.kernels import native

pytestmark = pytest.mark.skipif(native.lib is None, reason="C kernels not built")
ROOT = Path(__file__).resolve().parents[1]
THREADS = int(os.environ.get("EDGEPANEL_BENCH_THREADS", "1"))
MESSAGES = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
TOKENS = 64


@pytest.fixture(scope="module")
def default_model():
    from edgepanel.hub import resolve_model
    return resolve_model(None, progress=False)


@pytest.fixture(scope="module")
def model(default_model):
    import edgepanel
    return edgepanel.load(default_model, threads=THREADS)


def start(path, log: Path, *args):
    """`edgepanel serve` in a subprocess on a free loopback port: (process, base URL)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "edgepanel", "serve", str(path), "--port", "0",
                                 "--threads", str(THREADS), *args], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    deadline = time.monotonic() + 120
    while not (m := re.search(r"http://127\.0\.0\.1:(\d+)/v1", log.read_text())):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    return proc, f"http://127.0.0.1:{m.group(1)}/v1"


@pytest.fixture(scope="module")
def servers(default_model, tmp_path_factory):
    """{parallel: (base URL, pid)} for --parallel 1 and 4."""
    d = tmp_path_factory.mktemp("serve-bench")
    procs = {n: start(default_model, d / f"p{n}.log", "--parallel", str(n)) for n in (1, 4)}
    yield {n: (url, proc.pid) for n, (proc, url) in procs.items()}
    for proc, _ in procs.values():
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far (Linux /proc): less disturbed than wall
    time by the other jobs of a shared machine."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def in_process(model):
    """(seconds to the first text, decode tokens/s after it, tokens) of Model.generate, streamed."""
    n = greedy_tokens(model)
    t0 = time.perf_counter()
    first = None
    for piece in model.generate(MESSAGES, max_tokens=TOKENS, stream=True, temperature=0):
        first = first or time.perf_counter()
    end = time.perf_counter()
    return first - t0, (n - 1) / (end - first), n


def greedy_tokens(model, _known={}):
    """How many tokens the greedy completion has (counted once, outside the timings)."""
    if model not in _known:
        _known[model] = len(model.generate_ids(MESSAGES, max_tokens=TOKENS, temperature=0))
    return _known[model]


def through_server(url, _clients={}):
    """The same through the server with the official client (one per server, kept, as a program
    talking to a server keeps its client and connection): (ttft, tokens/s, tokens)."""
    import openai
    client = _clients.get(url) or _clients.setdefault(url, openai.OpenAI(base_url=url, api_key="none", max_retries=0))
    t0 = time.perf_counter()
    first = None
    stream = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=TOKENS, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
        if chunk.usage:
            n = chunk.usage.completion_tokens
    end = time.perf_counter()
    return first - t0, (n - 1) / (end - first), n


def test_generate_in_process(benchmark, model):
    runs = []
    benchmark.group = f"one chat request, {TOKENS} tokens, {THREADS} thread(s)"
    benchmark.pedantic(lambda: runs.append(in_process(model)), rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(ttft_ms=1e3 * statistics.median(r[0] for r in runs),
                                tokens_per_s=statistics.median(r[1] for r in runs), tokens=runs[-1][2])


def test_generate_through_server(benchmark, servers):
    runs = []
    benchmark.group = f"one chat request, {TOKENS} tokens, {THREADS} thread(s)"
    benchmark.pedantic(lambda: runs.append(through_server(servers[1][0])), rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(ttft_ms=1e3 * statistics.median(r[0] for r in runs),
                                tokens_per_s=statistics.median(r[1] for r in runs), tokens=runs[-1][2])


def test_server_overhead(benchmark, model, servers):
    """In process and through the server, alternating in one run: the server's overhead in time
    to first token (ms, %) and decode tokens/s (%), and in CPU time per token (server process,
    and the client's: the openai package parsing every chunk) against generate's."""
    url, pid = servers[1]
    pairs = []

    def pair():
        c0 = time.process_time()
        a = in_process(model)
        c1 = time.process_time()
        s0 = cpu_seconds(pid)
        b = through_server(url)
        pairs.append((a, b, c1 - c0, cpu_seconds(pid) - s0, time.process_time() - c1))

    benchmark.group = "server overhead"
    benchmark.pedantic(pair, rounds=7, iterations=1, warmup_rounds=1)
    assert all(p[0][2] == p[1][2] for p in pairs), "the server and generate made different numbers of tokens"
    med = lambda f: statistics.median(f(p) for p in pairs)  # noqa: E731
    ttft_in, ttft_srv = med(lambda p: p[0][0]), med(lambda p: p[1][0])
    tps_in, tps_srv = med(lambda p: p[0][1]), med(lambda p: p[1][1])
    n = pairs[0][0][2]
    info = dict(ttft_in_process_ms=1e3 * ttft_in, ttft_server_ms=1e3 * ttft_srv,
                ttft_overhead_ms=1e3 * (ttft_srv - ttft_in), ttft_overhead_pct=100 * (ttft_srv / ttft_in - 1),
                tps_in_process=tps_in, tps_server=tps_srv, tps_overhead_pct=100 * (1 - tps_srv / tps_in),
                ms_per_token_overhead=1e3 * (1 / tps_srv - 1 / tps_in),
                cpu_ms_per_token_in_process=1e3 * sum(p[2] for p in pairs) / (n * len(pairs)),
                cpu_ms_per_token_server=1e3 * sum(p[3] for p in pairs) / (n * len(pairs)),
                cpu_ms_per_token_client=1e3 * sum(p[4] for p in pairs) / (n * len(pairs)))
    benchmark.extra_info.update(info)
    print("\n" + "\n".join(f"  {k}: {v:.2f}" for k, v in info.items()))


@pytest.mark.parametrize("parallel", [1, 4])
def test_four_clients_at_once(benchmark, servers, parallel):
    """Four streams at once: --parallel 4 decodes them in one batched forward per step, --parallel
    1 one after another.  extra_info: all tokens / wall time, and the slowest first token."""
    results = []

    def four():
        t0 = time.perf_counter()
        with ThreadPoolExecutor(4) as pool:
            runs = list(pool.map(lambda _: through_server(servers[parallel][0]), range(4)))
        results.append((sum(r[2] for r in runs) / (time.perf_counter() - t0), max(r[0] for r in runs)))

    benchmark.group = f"four clients at once, {TOKENS} tokens each, {THREADS} thread(s)"
    benchmark.pedantic(four, rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(parallel=parallel, tokens_per_s=statistics.median(r[0] for r in results),
                                slowest_ttft_ms=1e3 * statistics.median(r[1] for r in results))
    print(f"\n  --parallel {parallel}: {benchmark.extra_info['tokens_per_s']:.1f} tokens/s over four clients, "
          f"slowest first token {benchmark.extra_info['slowest_ttft_ms']:.0f} ms")
