"""Careless and hostile inputs (issue 23): each a clear error or harmless, never a crash, a hang,
an outsized allocation or silent corruption.  docs/hostile.md says what is checked where."""
import json
import os
import struct
import subprocess
import sys
import threading
import time
import tracemalloc

import numpy as np
import pytest

import edgepanel
from edgepanel import FormatError
from edgepanel.cli import main as cli
from edgepanel.convert import Recipe, convert
from edgepanel.format import ModelFile, ModelWriter, write_tensors
from edgepanel.model.config import ModelConfig
from edgepanel.tokenizer import ChatTemplateError, TemplateBudget, Tokenizer, TokenizerMissing

from fuzz import seeds
from hf_models import checkpoint_with_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    checkpoint_with_tokenizer(d / "hf")
    convert(d / "hf", d / "m.ep", Recipe(planes=2, group=32, calib=None))
    return d


def test_load_refuses_a_fifo_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.ep"
    os.mkfifo(fifo)
    done = []
    t = threading.Thread(target=lambda: done.append(pytest.raises(FormatError, edgepanel.load, fifo)), daemon=True)
    t.start()
    t.join(10)
    assert done, "load() blocked on a FIFO"
    assert "not a regular file" in str(done[0].value)


def test_convert_never_overwrites_its_source(tiny, tmp_path):
    gguf_like = tmp_path / "src.ep"
    gguf_like.write_bytes((tiny / "m.ep").read_bytes())
    before = (tiny / "hf" / "config.json").read_bytes()
    with pytest.raises(FormatError, match="overwrite the source"):
        convert(tiny / "hf", tiny / "hf" / "config.json", Recipe(planes=2, group=32, calib=None))
    assert (tiny / "hf" / "config.json").read_bytes() == before
    with pytest.raises(FormatError, match="not a regular file"):
        convert(tiny / "hf", tmp_path, Recipe(planes=2, group=32, calib=None))


def test_a_killed_writers_temporary_is_cleaned_and_two_writers_never_mix(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"out.st.{dead.stdout.strip()}.abc.tmp"
    stale.write_bytes(b"half a file")
    a = ModelWriter(tmp_path / "out.st")
    b = ModelWriter(tmp_path / "out.st")
    a.add("x", np.zeros(3, np.float32))
    b.add("y", np.ones(5, np.float32))
    a.close_with({"who": "a"})
    assert not stale.exists()
    b.close_with({"who": "b"})
    from edgepanel.format import SafetensorsFile
    f = SafetensorsFile(tmp_path / "out.st")
    assert f.metadata == {"who": "b"} and set(f.tensors) == {"y"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.st"]
    write_tensors(tmp_path / "w.st", {"z": np.arange(4, dtype=np.int32)}, {})
    assert oct((tmp_path / "w.st").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


@pytest.mark.parametrize("call,msg", [
    (lambda m: m.generate("", max_tokens=2), "prompt is empty"),
    (lambda m: m.generate("hi", max_tokens=2, stop=5), "stop must be"),
    (lambda m: edgepanel.load(m.path, threads=2**31), "threads must be"),
    (lambda m: edgepanel.load(m.path, threads=-1), "threads must be"),
])
def test_bad_arguments_are_named(tiny, call, msg):
    m = edgepanel.load(tiny / "m.ep")
    with pytest.raises(ValueError, match=msg):
        call(m)


@pytest.mark.parametrize("field,value", [("norm_eps", -1.0), ("norm_eps", float("nan")), ("norm_eps", "abc"),
                                         ("rope_theta", 0.0), ("max_seq_len", 2**40)])
def test_config_values_out_of_range_are_refused(field, value):
    good = dict(arch="llama", vocab_size=10, dim=8, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=4,
                hidden_dim=16, max_seq_len=32)
    with pytest.raises(FormatError, match=field):
        ModelConfig(**{**good, field: value})


def test_nan_parameters_give_an_error_not_a_token(tiny):
    m = edgepanel.load(tiny / "m.ep")
    m.parameters("norms")["final_norm.weight"][0] = np.inf     # (a NaN is zeroed by int8 quantization)
    with pytest.raises(FloatingPointError, match="non-finite"):
        m.generate_ids([1, 2, 3], max_tokens=2)


@pytest.mark.parametrize("opt", [dict(planes=0), dict(als_iters=10**9), dict(seq_len=0), dict(seq_len=-5),
                                 dict(calib_tokens=0)])
def test_recipe_counts_are_bounded(opt):
    with pytest.raises(ValueError, match=list(opt)[0]):
        Recipe(**opt)


# -- sources ---------------------------------------------------------------------------------------------
# Tiny sources made with NumPy alone (tests/fuzz/seeds.py): vocab 64, width 32, 4 heads of 8 (2 for
# keys and values), MLP 48, one layer.

DATA_FREE = Recipe(planes=1, group=32, calib=None)
T = seeds.llama_tensors()


def _replaced(name, array):
    return {**T, name: array}


@pytest.mark.parametrize("config,tensors,msg", [
    (dict(hidden_size=65), None, "model.embed_tokens.weight' has shape (64, 32); the config"),
    (dict(vocab_size=10**9), None, "makes it (1000000000, 32)"),
    (None, _replaced("model.layers.0.mlp.up_proj.weight", np.ascontiguousarray(T["model.layers.0.mlp.up_proj.weight"].T)),
     "up_proj.weight' has shape (32, 48)"),
    (None, _replaced("model.embed_tokens.weight", T["model.embed_tokens.weight"][:40]), "has shape (40, 32)"),
    (None, _replaced("model.layers.0.self_attn.q_proj.weight", T["model.layers.0.self_attn.q_proj.weight"][:, :16]),
     "q_proj.weight' has shape (32, 16)"),   # converted, loaded and generated before: padding hid it
    (None, _replaced("model.norm.weight", np.full(32, np.nan, np.float32)), "model.norm.weight' holds non-finite"),
    (None, _replaced("model.norm.weight", np.ones(32, np.int32)), "has dtype int32"),
    (dict(max_position_embeddings=2**40), None, "max_seq_len 1099511627776 does not fit"),
    (dict(max_position_embeddings=2**25), None, "max_seq_len 33554432 is beyond what the engine supports"),
    (dict(head_dim=10**12), None, "head_dim 1000000000000 does not fit"),
    (dict(rms_norm_eps="abc"), None, "'rms_norm_eps' must be a finite number, got 'abc'"),
    (dict(rms_norm_eps=1e-50), None, "norm_eps 1e-50 is not a positive float32"),
    (dict(rms_norm_eps=10**400), None, "'rms_norm_eps' must be a finite number"),   # found by fuzzing (TypeError)
    (dict(rope_scaling={"type": "linear", "factor": 1e-45}), None, "give non-finite RoPE frequencies"),  # converted, did not load
    (dict(num_attention_heads="4"), None, "'num_attention_heads' must be a positive integer"),
    (dict(rope_scaling="linear"), None, "rope_scaling must be an object or null, got str"),
    (dict(rope_scaling={"type": "llama3", "factor": 8.0}), None, "rope_scaling (llama3) needs 'low_freq_factor'"),
    (dict(rope_scaling={"rope_type": "linear"}), None, "rope_scaling (linear) needs 'factor'"),
    (dict(rope_scaling={"type": {}, "factor": 2.0}), None, "rope scaling {} is not supported"),   # found by fuzzing
    (dict(rope_parameters=[1]), None, "'rope_parameters' must be an object"),
    (dict(tie_word_embeddings="no"), None, "'tie_word_embeddings' must be true or false"),
    (dict(architectures="LlamaForCausalLM"), None, "'architectures' must be a non-empty list"),
])
def test_conversion_checks_the_source_against_its_config(tmp_path, config, tensors, msg):
    src = seeds.hf_checkpoint(tmp_path / "hf", seeds.llama_config(**(config or {})), tensors, tokenizer=False)
    with pytest.raises(FormatError) as e:
        convert(src, tmp_path / "out.ep", DATA_FREE)
    assert msg in str(e.value) and str(src) in str(e.value)
    assert not (tmp_path / "out.ep").exists()


def test_deep_json_in_a_source_config_is_a_format_error(tmp_path):
    src = seeds.hf_checkpoint(tmp_path / "hf", tokenizer=False)
    (src / "config.json").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(FormatError, match="config.json is not valid JSON .nested too deeply"):
        convert(src, tmp_path / "out.ep", DATA_FREE)


def test_special_token_ids_outside_the_vocabulary_are_dropped_with_a_warning(tmp_path):
    src = seeds.hf_checkpoint(tmp_path / "hf", seeds.llama_config(bos_token_id=50256, eos_token_id=[1, 50256]))
    with pytest.warns(edgepanel.EdgepanelWarning, match=r"\[50256, 50256\] are outside the vocabulary of 64"):
        convert(src, tmp_path / "out.ep", DATA_FREE)
    tok = edgepanel.load(tmp_path / "out.ep").tokenizer
    assert tok.bos_id is None and tok.eos_ids == [1]


@pytest.mark.parametrize("fields,tensors,msg", [
    ({"llama.attention.head_count": 0}, None, "llama.attention.head_count must be a positive integer, got 0"),
    ({"llama.attention.head_count_kv": 0}, None, "head_count_kv must be a positive integer"),
    ({"llama.embedding_length": "abc"}, None, "llama.embedding_length must be a positive integer, got 'abc'"),
    ({"llama.rope.freq_base": "abc"}, None, "llama.rope.freq_base must be a finite number"),
    ({"llama.rope.scaling.type": "linear"}, None, "rope_scaling (linear) needs 'factor'"),
    ({"tokenizer.ggml.eos_token_id": "x"}, None, "tokenizer.ggml.eos_token_id must be a token id"),
    ({"tokenizer.chat_template": 5}, None, "tokenizer.chat_template must be a string, got 5"),
    (None, {"blk.0.ffn_up.weight": np.ones((48, 32), np.int32)}, "'blk.0.ffn_up.weight' has integer type I32"),
    (None, {"blk.0.ffn_up.weight": np.ones((0, 32), np.float32)}, "has shape (0, 32): every dimension must be positive"),
    (None, {"blk.0.attn_q.weight": np.ones((31, 32), np.float32)}, "rows must split into 4 heads"),
    (None, {"blk.0.attn_q.weight": np.ones((32, 16), np.float32)}, "q_proj.weight' has shape (32, 16); the config"),
])
def test_gguf_sources_name_what_is_wrong(tmp_path, fields, tensors, msg):
    src = seeds.gguf_file(tmp_path / "s.gguf", fields, tensors)
    with pytest.raises(FormatError) as e:
        convert(src, tmp_path / "out.ep", DATA_FREE)
    assert msg in str(e.value) and str(src) in str(e.value)


def test_gguf_f64_tensors_convert(tmp_path):
    t = {n: a.astype(np.float64) for n, a in [("blk.0.ffn_up.weight", seeds.llama_tensors()["model.layers.0.mlp.up_proj.weight"])]}
    convert(seeds.gguf_file(tmp_path / "a.gguf"), tmp_path / "a.ep", DATA_FREE)
    convert(seeds.gguf_file(tmp_path / "b.gguf", tensors=t), tmp_path / "b.ep", DATA_FREE)
    a, b = edgepanel.load(tmp_path / "a.ep"), edgepanel.load(tmp_path / "b.ep")
    np.testing.assert_array_equal(a.logits([1, 2, 3]), b.logits([1, 2, 3]))


# -- model files --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return seeds.model_file(tmp_path_factory.mktemp("small") / "m.ep", "planes_f16", tokenizer=True)


def _header(path):
    b = path.read_bytes()
    (n,) = struct.unpack("<Q", b[:8])
    return json.loads(b[8:8 + n]), b[8 + n:]


def _write(path, header, data, raw=None):
    text = raw if raw is not None else json.dumps(header).encode()
    text += b" " * (-(8 + len(text)) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def _edit_meta(src, dst, edit):
    h, d = _header(src)
    meta = json.loads(h["__metadata__"]["edgepanel"])
    edit(meta)
    h["__metadata__"]["edgepanel"] = json.dumps(meta)
    return _write(dst, h, d)


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("make,msg", [
    (lambda h, d, p: _write(p, None, d, raw=b'{"a": ' + DEEP.encode() + b"}"), "header is not valid JSON (nested too deeply)"),
    (lambda h, d, p: _write(p, {**h, "__metadata__": {**h["__metadata__"], "edgepanel": DEEP}}, d),
     "the edgepanel metadata is not valid JSON (nested too deeply)"),
    (lambda h, d, p: _write(p, {**h, "__metadata__": {**h["__metadata__"], "edgepanel": 5}}, d),
     "__metadata__.edgepanel must be a string of JSON, got int"),
    (lambda h, d, p: _write(p, {**h, "__metadata__": {**h["__metadata__"], "tokenizer.json": {}}}, d),
     "__metadata__.tokenizer.json must be a string of JSON, got dict"),
    (lambda h, d, p: _write(p, {**h, "embed.row_scale": {**h["embed.row_scale"], "shape": [2**64]}}, d),
     "tensor 'embed.row_scale' has an invalid shape [18446744073709551616]"),
    (lambda h, d, p: _write(p, {**h, "embed.row_scale": {**h["embed.row_scale"], "shape": [True]}}, d),
     "invalid shape [True]"),
])
def test_malformed_model_files_are_format_errors(small, tmp_path, make, msg):
    h, d = _header(small)
    with pytest.raises(FormatError) as e:
        edgepanel.load(make(h, d, tmp_path / "bad.ep"))
    assert msg in str(e.value)


@pytest.mark.parametrize("edit,msg", [
    (lambda m: m.__setitem__("tokenizer", "abc"), "metadata field 'tokenizer' must be a JSON object, got str"),
    (lambda m: m["tokenizer"].__setitem__("eos_ids", "abc"), "tokenizer info 'eos_ids' must be a list of token ids"),
    (lambda m: m["tokenizer"].__setitem__("eos_ids", [None]), "tokenizer info 'eos_ids' must be a list of token ids"),
    (lambda m: m["tokenizer"].__setitem__("bos_id", "x"), "tokenizer info 'bos_id' must be a token id or null"),
    (lambda m: m["tokenizer"].__setitem__("chat_template", 5), "tokenizer info 'chat_template' must be a string"),
    (lambda m: m["tokenizer"].__setitem__("add_bos", "yes"), "tokenizer info 'add_bos' must be true or false"),
    (lambda m: m.__setitem__("history", "abc"), "metadata field 'history' must be a JSON array"),
    (lambda m: m["config"].__setitem__("norm_eps", "abc"), "m.ep: config: norm_eps must be a finite positive number"),
    (lambda m: m["config"].__setitem__("rope_scaling", "abc"), "config: rope_scaling must be an object or null"),
    (lambda m: m["config"].__setitem__("vocab_size", 2**31), "config: vocab_size 2147483648 does not fit"),
    (lambda m: m["config"].__setitem__("norm_eps", 10**400), "config: norm_eps must be a finite positive number"),
    (lambda m: m["config"].__setitem__("tie_embeddings", "no"), "config: tie_embeddings must be true or false"),
    (lambda m: m["config"].pop("dim"), "config: fields ['dim'] are missing"),
])
def test_model_file_metadata_of_the_wrong_type_is_named(small, tmp_path, edit, msg):
    with pytest.raises(FormatError) as e:
        edgepanel.load(_edit_meta(small, tmp_path / "m.ep", edit))
    assert msg in str(e.value)


@pytest.mark.parametrize("name,value", [("layers.0.wq.scales", np.nan), ("final_norm.weight", np.inf),
                                        ("layers.0.attn_norm.weight", np.nan), ("embed.row_scale", np.nan),
                                        ("rope.inv_freq", -np.inf)])
def test_non_finite_parameters_are_refused_at_load(small, tmp_path, name, value):
    f = ModelFile(small)
    tensors = {n: np.array(a) for n, a in f.tensors.items()}
    tensors[name].flat[0] = value   # before: loaded, and generated tokens from NaN (a NaN in scales is quantized away)
    write_tensors(tmp_path / "m.ep", tensors, f.metadata)
    with pytest.raises(FormatError, match=f"tensor '{name}' holds non-finite values"):
        edgepanel.load(tmp_path / "m.ep")


@pytest.mark.parametrize("name", ["embed.q", "head.q"])
def test_int8_rows_holding_minus_128_are_refused_at_load(small, tmp_path, name):
    f = ModelFile(small)
    tensors = {n: np.array(a) for n, a in f.tensors.items()}
    if name not in tensors:
        pytest.fail(f"the small model has no {name}: {sorted(tensors)[:8]}")
    tensors[name].flat[7] = -128   # the kernels take the sign of the weights: -128 has no positive twin
    write_tensors(tmp_path / "m.ep", tensors, f.metadata)
    with pytest.raises(FormatError, match=f"'{name}' holds -128; int8 rows are stored in -127..127"):
        edgepanel.load(tmp_path / "m.ep")
    tensors[name].flat[7] = -127
    write_tensors(tmp_path / "ok.ep", tensors, f.metadata)
    edgepanel.load(tmp_path / "ok.ep")


def test_token_ids_to_a_model_without_a_tokenizer(tmp_path):
    m = edgepanel.load(seeds.model_file(tmp_path / "m.ep", "planes_u8", tokenizer=False))
    assert len(m.generate_ids([1, 2, 3], max_tokens=3, temperature=0)) == 3
    with pytest.raises(TokenizerMissing, match=r"cannot turn token ids into text; use generate_ids\(\)"):
        m.generate([1, 2, 3], max_tokens=3)


@pytest.mark.parametrize("mapped", [True, False])   # read into memory, the embedding table stays mapped
def test_a_file_changed_while_loaded_is_detected(small, tmp_path, mapped):
    path = tmp_path / "m.ep"
    path.write_bytes(small.read_bytes())
    m = edgepanel.load(path, mmap=mapped)
    want = m.generate_ids([1, 2, 3], max_tokens=4, temperature=0)
    m.save(path)   # replaced by rename: the mapping keeps the old file, nothing changed under it
    assert m.generate_ids([1, 2, 3], max_tokens=4, temperature=0) == want
    m = edgepanel.load(path, mmap=mapped)
    st = path.stat()
    with open(path, "r+b") as f:   # rewritten in place: other weights under the mapping
        f.seek(-8, 2)
        f.write(b"\x7f" * 8)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    for call in (lambda: m.generate_ids([1, 2], max_tokens=2), lambda: m.score([[1, 2, 3]]), lambda: m.logits([1]),
                 lambda: m.generate("aa b", max_tokens=2)):
        with pytest.raises(FormatError, match="changed while loaded .it was modified.; load it again"):
            call()
    m = edgepanel.load(path, mmap=mapped)
    os.truncate(path, 1000)   # truncated: touching the lost pages would be SIGBUS
    with pytest.raises(FormatError, match=r"its size went from \d+ to 1000 bytes"):
        m.token_logprobs([1, 2, 3])


# -- chat templates -----------------------------------------------------------------------------------

NESTED_LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


def test_a_chat_template_with_nested_long_loops_stops_with_an_error(small, tmp_path):
    m = edgepanel.load(_edit_meta(small, tmp_path / "m.ep", lambda meta: meta["tokenizer"].__setitem__("chat_template", NESTED_LOOPS)))
    done = []

    def run():   # before: generate() hung (10^10 loop steps)
        with pytest.raises(ChatTemplateError, match="ran over its budget: more than 2000000 steps") as e:
            m.generate([{"role": "user", "content": "hi"}], max_tokens=2)
        done.append(e)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(60)
    assert done, "generate() hung on the chat template"


@pytest.mark.parametrize("template,msg", [
    (NESTED_LOOPS, "more than 5000 steps"),
    ("{% for i in range(100000) %}{% set x = range(20000) | join %}{% endfor %}", "more than 5000 steps"),
    ("{{ 'x' * 10**10 }}", "a product of 10000000000"),
    ("{{ 'x' | center(10**10) }}", "an argument of 10000000000"),
    ("{{ 'x'.ljust(10**10) }}", "an argument of 10000000000"),
    ("{{ '{:>9999999999}'.format(1) }}", "a format with a width of 10^7 or more"),
    ("{{ '%0999999999d' % 1 }}", "a format with a width of 10^7 or more"),
    ("{{ 7 ** 1000000000 }}", "7 ** 1000000000"),
    ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
     "a concatenation over 1048576 characters"),
    ("{% set ns = namespace(l=[1]) %}{% for i in range(64) %}{% set ns.l = ns.l + ns.l %}{% endfor %}",
     "a concatenation of 2097152"),
    ("{% for i in range(100000) %}{{ range(100000) | join }}{% endfor %}", "an output over 1048576 characters"),
    ("{{ 1 / 0 }}", "ZeroDivisionError"),
    ("{% for %}", "does not parse"),
    ("{{ raise_exception('no system role') }}", "no system role"),
])
def test_chat_templates_run_within_a_budget(template, msg):
    tok = Tokenizer(None, {"chat_template": template})
    t0 = time.monotonic()
    with pytest.raises(ChatTemplateError) as e:
        tok.apply_chat_template(seeds.MESSAGES, budget=TemplateBudget(steps=5000, seconds=30, chars=1 << 20))
    assert msg in str(e.value)
    assert time.monotonic() - t0 < 20


def test_the_budget_leaves_real_templates_alone():
    for template in seeds.TEMPLATES[:3]:
        tok = Tokenizer(None, {"chat_template": template, "bos_token": "<s>", "eos_token": "</s>"})
        from jinja2.sandbox import ImmutableSandboxedEnvironment   # the renderer before the budget
        want = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template).render(
            messages=seeds.MESSAGES, add_generation_prompt=True, bos_token="<s>", eos_token="</s>", raise_exception=None)
        assert tok.apply_chat_template(seeds.MESSAGES) == want
    with pytest.raises(ChatTemplateError, match="RecursionError"):
        Tokenizer(None, {"chat_template": "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}"}).apply_chat_template(seeds.MESSAGES)
    # the wall-time bound catches work done inside C between two lines
    tok = Tokenizer(None, {"chat_template": "{% for i in range(100000) %}{% set x = range(100000) | join %}{% endfor %}"})
    with pytest.raises(ChatTemplateError, match="more than 0.5 s"):
        tok.apply_chat_template(seeds.MESSAGES, budget=TemplateBudget(seconds=0.5))


# -- declared sizes -----------------------------------------------------------------------------------


def _peak_bytes(call) -> int:
    tracemalloc.start()
    try:
        call()
    except edgepanel.EdgepanelError:
        pass
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_declared_sizes_are_checked_before_allocating(small, tmp_path):
    """Headers declaring huge tensors or sizes make edgepanel allocate no more than a small multiple
    of the input's size (NumPy reports its buffers to tracemalloc)."""
    h, d = _header(small)
    size = small.stat().st_size
    # first-use imports and buffers are not what is measured
    edgepanel.load(small).generate_ids([1], max_tokens=1)
    convert(seeds.gguf_file(tmp_path / "warm.gguf"), tmp_path / "warm.ep", DATA_FREE)
    cases = {
        "tensor of 2^40 floats": _write(tmp_path / "a.ep", {**h, "embed.row_scale": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 2**42]}}, d),
        "tensor of 2^62 x 0": _write(tmp_path / "b.ep", {**h, "x": {"dtype": "F32", "shape": [0, 2**61], "data_offsets": [0, 0]}}, d),
        "config of 2^31-1 layers": _edit_meta(small, tmp_path / "c.ep", lambda m: m["config"].__setitem__("n_layers", 2**31 - 1)),
        "context of 2^24": _edit_meta(small, tmp_path / "d.ep", lambda m: m["config"].__setitem__("max_seq_len", 2**24)),
        "vocab of 2^31-1": _edit_meta(small, tmp_path / "e.ep", lambda m: m["config"].__setitem__("vocab_size", 2**31 - 1)),
    }
    for what, path in cases.items():
        assert _peak_bytes(lambda: edgepanel.load(path).generate_ids([1], max_tokens=1)) < 20 * size, what
    g = seeds.gguf_file(tmp_path / "g.gguf", {"llama.block_count": 2**31 - 1, "llama.context_length": 2**24,
                                             "llama.vocab_size": 2**31 - 1})
    assert _peak_bytes(lambda: convert(g, tmp_path / "g.ep", DATA_FREE)) < 20 * g.stat().st_size
    # a head_dim of 2^31 / 7 read from the config alone (found by fuzzing: the RoPE check allocated 1.2 GB)
    hf = seeds.hf_checkpoint(tmp_path / "hf", seeds.llama_config(hidden_size=2**31 - 1, num_attention_heads=7), tokenizer=False)
    assert _peak_bytes(lambda: convert(hf, tmp_path / "h.ep", DATA_FREE)) < 20 * (hf / "model.safetensors").stat().st_size


# -- the command line ---------------------------------------------------------------------------------


@pytest.mark.parametrize("argv,code,msg", [
    (["generate", "BAD", "-p", "hi"], 1, "header is not valid JSON (nested too deeply)"),
    (["convert", "GGUF", "OUT"], 1, "llama.attention.head_count must be a positive integer, got 0"),
    (["generate", "GOOD", "-p", "hi", "--bogus"], 2, "unrecognized arguments: --bogus"),
    (["generate", "GOOD", "-p", "hi", "--temperature", "abc"], 2, "invalid float value: 'abc'"),
    (["convert", "HF", "OUT", "--seq-len", "0"], 1, "seq_len must be an integer in 1..65536, got 0"),
    (["convert", "HF", "OUT", "--seq-len", "-5"], 1, "seq_len must be an integer in 1..65536, got -5"),
])
def test_command_line_errors_are_one_line(small, tmp_path, capsys, argv, code, msg):
    paths = {"BAD": _write(tmp_path / "bad.ep", None, b"", raw=b"[" * 100_000), "GOOD": small, "OUT": tmp_path / "o.ep",
             "GGUF": seeds.gguf_file(tmp_path / "g.gguf", {"llama.attention.head_count": 0}),
             "HF": seeds.hf_checkpoint(tmp_path / "hf", tokenizer=False)}
    try:
        rc = cli([str(paths.get(a, a)) for a in argv])
    except SystemExit as exc:   # argparse exits
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == code and msg in err and len(err.strip().splitlines()) == 1, err


def test_an_embedded_tokenizer_neither_pads_nor_truncates(small, tmp_path):
    """A tokenizer.json padding to 2^40 tokens made `tokenizers` abort the process on encode
    (found while chasing an out-of-memory report of the model-file fuzzer); truncation silently cut
    prompts.  Both are turned off."""
    f = ModelFile(small)
    tj = json.loads(f.tokenizer_json)
    tj["padding"] = {"strategy": {"Fixed": 2**40}, "direction": "Right", "pad_to_multiple_of": None,
                     "pad_id": 0, "pad_type_id": 0, "pad_token": "<unk>"}
    tj["truncation"] = {"max_length": 1, "strategy": "LongestFirst", "stride": 0, "direction": "Right"}
    write_tensors(tmp_path / "m.ep", dict(f.tensors), {**f.metadata, "tokenizer.json": json.dumps(tj)})
    code = ("import edgepanel, sys; m = edgepanel.load(sys.argv[1]); "
            "print(m.tokenizer.encode('aa b c aa'), m.prompt_ids([{'role': 'user', 'content': 'b'}]))")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.ep")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    plain = edgepanel.load(small)
    want = f"{plain.tokenizer.encode('aa b c aa')} {plain.prompt_ids([{'role': 'user', 'content': 'b'}])}"
    assert r.stdout.strip() == want and len(plain.tokenizer.encode("aa b c aa")) == 4
