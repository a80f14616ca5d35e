"""A short, deterministic run of every fuzz harness (tests/fuzz/): libFuzzer through atheris, fixed
seed and input count, from the seed corpora.  A harness fails on any exception that is not
edgepanel's own, a signal, a run past -timeout or memory past -rss_limit_mb.  CI runs them longer
(python tests/fuzz/run.py --seconds 30); docs/hostile.md has a long run's counts."""
import subprocess
import sys

import atheris  # noqa: F401  (a dev dependency: missing means failing, not skipping)
import pytest

from fuzz import run as fuzz_run

RUNS = {"model_file": 400, "gguf": 200, "hf_config": 300, "chat_template": 1500, "panels": 300}


@pytest.mark.parametrize("name", fuzz_run.HARNESSES)
def test_harness_short_run(tmp_path, name):
    r, execs, _ = fuzz_run.run(name, tmp_path, [f"-runs={RUNS[name]}"])
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]   # atheris prints the exception on stdout
    assert f"Done {RUNS[name]} runs" in r.stderr
    assert execs >= RUNS[name]


def test_a_harness_reports_what_escapes(tmp_path):
    """The harness machinery fails on an exception that is not edgepanel's (here an input replayed
    through the chat-template harness with a test function made to raise one)."""
    crash = tmp_path / "input"
    crash.write_bytes(b"{{ 1 }}")
    code = ("import sys; sys.argv[0] = 'h'; sys.path.insert(0, %r)\n"
            "import fuzz_chat_template as h\n"
            "def bad(data):\n    h.test_one_input(data); raise KeyError('escaped')\n"
            "h.main(bad)\n") % str(fuzz_run.HERE)
    r = subprocess.run([sys.executable, "-c", code, str(crash)], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path, env=fuzz_run.os.environ | {"PYTHONPATH": str(fuzz_run.ROOT), "EDGEPANEL_FUZZ_SCRATCH": str(tmp_path / "files")})
    assert r.returncode != 0 and "KeyError: 'escaped'" in r.stdout + r.stderr
