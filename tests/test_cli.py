"""The command line, run as a user would (subprocesses)."""
import subprocess
import sys

import pytest

from edgepanel.convert import Recipe, convert

from hf_models import add_tokenizer, build


def run(*args, input=None):
    return subprocess.run([sys.executable, "-m", "edgepanel", *args], capture_output=True, text=True,
                          input=input, timeout=600)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    build("llama", d / "hf")
    add_tokenizer(d / "hf")
    return d


def test_convert_generate_perplexity_info(tiny):
    out = tiny / "m.ep"
    (tiny / "t.txt").write_text("the cat sat on the mat. hello world, how are you? once upon a time there was a dog.")
    r = run("convert", str(tiny / "hf"), str(out), "--planes", "2", "--group", "32", "--keep", "layers.0.wo",
            "--calib-tokens", "1024", "--seq-len", "64", "--tune-steps", "5", "--eval", str(tiny / "t.txt"))
    assert r.returncode == 0, r.stderr
    assert "bits/weight" in r.stdout and "layers.0.wo" in r.stdout and "dense" in r.stdout
    assert "scale tuning: 5 steps" in r.stdout
    assert "perplexity on" in r.stdout and "source" in r.stdout and "converted" in r.stdout
    r = run("generate", str(out), "-p", "the cat", "-n", "8", "--seed", "1")
    assert r.returncode == 0, r.stderr
    again = run("generate", str(out), "-p", "the cat", "-n", "8", "--seed", "1")
    assert r.stdout == again.stdout and r.stdout.strip()
    r = run("generate", str(out), "-n", "4", "--temperature", "0", input="once upon")  # prompt on stdin
    assert r.returncode == 0, r.stderr
    r = run("perplexity", str(out), str(tiny / "t.txt"))
    assert r.returncode == 0 and r.stdout.startswith("perplexity "), r.stderr
    r = run("info", str(out))
    assert r.returncode == 0 and "llama: 2 layers" in r.stdout and "planes k=2 g=32" in r.stdout
    r = run("chat", str(out), "-n", "4", "--seed", "2", input="hello\n\n")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("args,msg", [
    (["generate", "nope.ep", "-p", "x"], "no such model file"),
    (["generate", "--temperature", "-1", "-p", "x", "MODEL"], "temperature must be"),
    (["convert", "/nonexistent", "o.ep"], "no such file or directory"),
    (["perplexity", "MODEL", "/nonexistent.txt"], "cannot read"),
    (["convert", "HF", "o.ep", "--planes", "9"], "planes must be in 1..4"),
    (["convert", "HF", "o.ep", "--tune-steps", "-3"], "tune_steps must be"),
    (["convert", "HF", "o.ep", "--tune", "numpy", "--tune-granularity", "column"], "numpy trains group, row or tensor"),
])
def test_errors_are_one_clear_line(tiny, args, msg):
    if not (tiny / "m.ep").exists():
        convert(tiny / "hf", tiny / "m.ep", Recipe(planes=2, group=32, calib=None))
    args = [str(tiny / "m.ep") if a == "MODEL" else str(tiny / "hf") if a == "HF" else a for a in args]
    r = run(*args)
    assert r.returncode == 1
    assert msg in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_convert_tunes_in_numpy_when_asked(tiny, tmp_path):
    from edgepanel.format import ModelFile
    out = tmp_path / "np.ep"
    r = run("convert", str(tiny / "hf"), str(out), "--planes", "2", "--group", "32", "--calib-tokens", "512",
            "--seq-len", "64", "--tune", "numpy", "--tune-steps", "3")
    assert r.returncode == 0, r.stderr
    assert "scale tuning (first-order, NumPy): 3 steps" in r.stdout, r.stdout
    assert ModelFile(out).meta.recipe["tune"] == "numpy"


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["FalconForCausalLM"]}')
    r = run("convert", str(tmp_path), str(tmp_path / "o.ep"))
    assert r.returncode == 1 and "not supported; supported: BitNetForCausalLM" in r.stderr


def test_pickles_are_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    r = run("convert", str(tmp_path), str(tmp_path / "o.ep"))
    assert r.returncode == 1 and "never loads pickled checkpoints" in r.stderr
