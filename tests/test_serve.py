"""`edgepanel serve`, used as a client would: the official `openai` package against servers this
file starts (`python -m edgepanel serve`, loopback, a free port) on a tiny converted model with a
tokenizer and a chat template.  What the server returns is checked against the model run in
process (Model.generate with the same seed), and log-probabilities against a NumPy log-softmax
of Model.logits; panel requests against Model.generate of the rendered panel, best_of against
edgepanel.best_of (on a file that carries a reference unlike it).  Also here: the batched forward
the server decodes with (generate.py's SlotCache / forward_slots), against one engine.forward per
sequence."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

import edgepanel
from edgepanel.convert import Recipe, convert
from edgepanel.kernels import native
from edgepanel.model.generate import SlotCache, forward_slots
from edgepanel.serve import InsecureBind, ServeOptions
from edgepanel.serve.options import parse_size

from hf_models import add_tokenizer

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key-0123456789"
CONTEXT = 16384             # the tiny model's: long enough for a stream that is still running when cut
MAIN_CTX = 2048             # the main server's --ctx

pytestmark = pytest.mark.skipif(native.lib is None, reason="C kernels not built")


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    """A tiny random Llama checkpoint written with NumPy (no torch import: this file stays fast),
    with hf_models' tokenizer and chat template, converted."""
    from safetensors.numpy import save_file
    d = tmp_path_factory.mktemp("serve")
    (d / "hf").mkdir()
    vocab, dim, hidden, layers, heads, kv_heads = 300, 64, 96, 2, 4, 2
    hd = dim // heads
    rng = np.random.default_rng(0)
    w = lambda *shape: (rng.standard_normal(shape) * 0.02).astype(np.float32)  # noqa: E731
    norm = lambda: (1 + rng.standard_normal(dim) * 0.1).astype(np.float32)  # noqa: E731
    t = {"model.embed_tokens.weight": w(vocab, dim), "model.norm.weight": norm(), "lm_head.weight": w(vocab, dim)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t.update({p + "self_attn.q_proj.weight": w(heads * hd, dim), p + "self_attn.k_proj.weight": w(kv_heads * hd, dim),
                  p + "self_attn.v_proj.weight": w(kv_heads * hd, dim), p + "self_attn.o_proj.weight": w(dim, heads * hd),
                  p + "mlp.gate_proj.weight": w(hidden, dim), p + "mlp.up_proj.weight": w(hidden, dim),
                  p + "mlp.down_proj.weight": w(dim, hidden),
                  p + "input_layernorm.weight": norm(), p + "post_attention_layernorm.weight": norm()})
    save_file(t, str(d / "hf" / "model.safetensors"))
    (d / "hf" / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": dim,
        "intermediate_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "max_position_embeddings": CONTEXT, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False}))
    add_tokenizer(d / "hf")
    convert(d / "hf", d / "m.ep", Recipe(planes=2, group=32, calib=None, scales="u8"))
    return d / "m.ep"


@pytest.fixture(scope="module")
def model(path):
    return edgepanel.load(path, threads=1)


class Served:
    """`python -m edgepanel serve PATH --port 0 ...` in a subprocess; its address read from its log."""

    def __init__(self, path, log: Path, *args):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        self.log = log
        with open(log, "w") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", "edgepanel", "serve", str(path), "--port", "0",
                                          "--threads", "1", "--shutdown-timeout", "5", *args],
                                         stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        deadline = time.monotonic() + 60
        while not (m := re.search(r"http://127\.0\.0\.1:(\d+)/v1", log.read_text())):
            assert self.proc.poll() is None, f"the server exited ({self.proc.returncode}):\n{log.read_text()}"
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        self.base = f"http://127.0.0.1:{m.group(1)}"

    def client(self, key=KEY, timeout=60.0) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key=key, max_retries=0, timeout=timeout)

    def metrics(self, key=KEY) -> dict:
        text = httpx.get(self.base + "/metrics", headers={"Authorization": f"Bearer {key}"}).text
        return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and line[0] != "#"}

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


@pytest.fixture(scope="module")
def server(path, tmp_path_factory):
    s = Served(path, tmp_path_factory.mktemp("log") / "main.log", "--api-key", KEY, "--metrics",
               "--parallel", "4", "--ctx", str(MAIN_CTX))
    yield s
    assert s.stop() == 0, s.log.read_text()
    assert "Traceback" not in s.log.read_text(), s.log.read_text()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def chat(text):
    return [{"role": "user", "content": text}]


def eos_off(model):
    """logit_bias that keeps the model from ending (a stream long enough to cut)."""
    return {str(e): -100 for e in model.tokenizer.eos_ids}


# -- the batched forward and the options, in process ---------------------------------------------
@pytest.mark.parametrize("engine", ["c", "reference"])
def test_forward_slots_gives_each_sequence_its_own_forward(path, engine):
    """Three sequences decoded together, one leaving mid-way (its slot refilled by a move): each
    gets bit for bit the logits of engine.forward on its own cache."""
    m = edgepanel.load(path, threads=1, engine=engine)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 300, n).astype(np.int32) for n in (7, 1, 19)]
    steps = [[int(t) for t in rng.integers(0, 300, 6)] for _ in prompts]
    want = []
    for p, st in zip(prompts, steps):
        c = m.engine.new_cache(40)
        want.append([m.engine.forward(p, c)] + [m.engine.forward(np.array([t], np.int32), c) for t in st])
    cache = SlotCache(m.cfg, 3, 64)
    assert cache.capacity == 0
    cache.reserve(20)
    live = [0, 1, 2]                          # live[s]: which sequence sits in slot s
    out = forward_slots(m.engine, cache, prompts)
    got = {i: [out[i]] for i in range(3)}
    for k in range(6):
        if k == 1:                            # room for longer sequences: the filled positions move over
            cache.reserve(41)
            assert cache.capacity == 41
        if k == 3:                            # sequence 0 leaves; the last slot's moves into slot 0
            cache.move(2, 0)
            live = [live[2], live[1]]
        out = forward_slots(m.engine, cache, [np.array([steps[i][k]], np.int32) for i in live])
        for s, i in enumerate(live):
            got[i].append(out[s])
    for i in range(3):
        n = len(got[i])
        for a, b in zip(got[i], want[i][:n]):
            np.testing.assert_array_equal(a, b)
    assert [len(got[i]) for i in range(3)] == [4, 7, 7]
    assert list(cache.lengths) == [19 + 6, 1 + 6, 0]
    with pytest.raises(ValueError, match="do not fit"):
        forward_slots(m.engine, cache, [np.zeros(30, np.int32)])
    cache.reserve(50)
    assert cache.capacity == 64               # doubling, up to the limit
    with pytest.raises(ValueError, match="limit of 64"):
        cache.reserve(65)


def test_options_defaults_live_in_one_place(capsys):
    from edgepanel.cli import build_parser
    from edgepanel.cli.options import given
    args = build_parser().parse_args(["serve"])
    assert given(args, ServeOptions) == {}          # nothing given: every default is ServeOptions'
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    helptext = " ".join(capsys.readouterr().out.split())
    defaults = ServeOptions()
    assert f"(default: {defaults.host})" in helptext and f"(default: {defaults.parallel})" in helptext
    args = build_parser().parse_args(["serve", "--max-body", "2MiB", "--parallel", "2", "--insecure-no-key"])
    assert given(args, ServeOptions) == {"max_body": 2 << 20, "parallel": 2, "insecure_no_key": True}


def test_binding_beyond_loopback_needs_a_key():
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert ServeOptions(host=host).warning() is None
    with pytest.raises(InsecureBind, match="--api-key"):
        ServeOptions(host="0.0.0.0")
    with pytest.raises(InsecureBind):
        ServeOptions(host="example.org")
    assert ServeOptions(host="0.0.0.0", api_key="k").warning() is None
    assert "without an API key" in ServeOptions(host="0.0.0.0", insecure_no_key=True).warning()
    for kw, msg in [({"parallel": 0}, "parallel"), ({"port": 70000}, "port"), ({"max_body": 10}, "max_body"),
                    ({"api_key": "two words"}, "api_key"), ({"shutdown_timeout": -1}, "shutdown_timeout")]:
        with pytest.raises(ValueError, match=msg):
            ServeOptions(**kw)
    assert parse_size("1MiB") == 1 << 20 and parse_size("512K") == 512 << 10 and parse_size("1000") == 1000
    with pytest.raises(ValueError, match="not a size"):
        parse_size("12x")


def test_cli_refuses_an_open_bind_and_bad_options(path, capsys):
    from edgepanel.cli import main
    assert main(["serve", str(path), "--host", "0.0.0.0"]) == 2
    assert "--insecure-no-key" in capsys.readouterr().err
    assert main(["serve", str(path), "--parallel", "0"]) == 1
    assert "parallel must be" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["serve", str(path), "--max-body", "lots"])
    assert e.value.code == 2
    assert main(["serve", str(path), "--api-key-file", str(path.parent / "nope")]) == 1
    assert "cannot read the API key" in capsys.readouterr().err


def test_chat_templates_render_in_the_sandbox(path):
    """A model file's template that reaches for Python objects is refused (400), not run."""
    from edgepanel.serve.app import Server
    from edgepanel.serve.schemas import ApiError, parse_chat
    m = edgepanel.load(path, threads=1)
    m.tokenizer.chat_template = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    srv = Server(m, ServeOptions(parallel=1, ctx=64))
    with pytest.raises(ApiError) as e:
        srv.prompt(parse_chat({"messages": chat("hi")}, 300, 64))
    assert e.value.status == 400 and "unsafe" in e.value.message


def test_a_failing_model_is_a_500_and_the_server_lives_on(path):
    """Non-finite logits (broken parameters) end that request with a 500 in OpenAI's shape; the
    decoding thread survives and serves the next request once the parameters are sound again."""
    from starlette.testclient import TestClient

    from edgepanel.serve import create_app
    m = edgepanel.load(path, threads=1)
    head = m.parameters(kinds=["head"])["head.row_scale"]     # the head's scales: every logit
    saved = head.copy()
    with TestClient(create_app(m, ServeOptions(parallel=2, ctx=256))) as c:
        head[:] = np.nan
        r = c.post("/v1/completions", json={"prompt": "the cat", "max_tokens": 4})
        assert r.status_code == 500 and "non-finite" in r.json()["error"]["message"]
        head[:] = saved
        r = c.post("/v1/completions", json={"prompt": "the cat", "max_tokens": 4, "seed": 1})
        assert r.status_code == 200
        assert r.json()["choices"][0]["text"] == m.generate("the cat", max_tokens=4, seed=1)


# -- the wire, through the openai client ----------------------------------------------------------
def test_chat_and_completion_give_what_generate_gives(client, model):
    msgs = chat("hello world, how are you?")
    r = client.chat.completions.create(model="m", messages=msgs, max_tokens=24, seed=5)
    ids = model.generate_ids(msgs, max_tokens=24, seed=5)
    assert r.choices[0].message.content == model.generate(msgs, max_tokens=24, seed=5)
    assert r.choices[0].message.role == "assistant" and r.object == "chat.completion" and r.model == "m"
    assert r.usage.prompt_tokens == len(model.prompt_ids(msgs)) and r.usage.completion_tokens == len(ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason == ("length" if len(ids) == 24 else "stop")
    r = client.completions.create(model="m", prompt="once upon a time", max_tokens=16, seed=9, temperature=0)
    assert r.choices[0].text == model.generate("once upon a time", max_tokens=16, seed=9, temperature=0)
    assert r.usage.prompt_tokens == len(model.prompt_ids("once upon a time"))
    r = client.completions.create(model="m", prompt=[5, 17, 40], max_tokens=8, seed=2, echo=True)
    want = model.tokenizer.decode(model.generate_ids([5, 17, 40], max_tokens=8, seed=2))
    assert r.choices[0].text == model.tokenizer.decode([5, 17, 40]) + want
    r = client.completions.create(model="m", prompt="the cat", max_tokens=0)
    assert r.choices[0].text == "" and r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 0


def test_streams_equal_whole_responses_and_end_with_usage(server, client, model):
    msgs = chat("the cat sat on the mat")
    whole = client.chat.completions.create(model="m", messages=msgs, max_tokens=30, seed=11)
    chunks = list(client.chat.completions.create(model="m", messages=msgs, max_tokens=30, seed=11, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])
    pieces = list(client.completions.create(model="m", prompt="edge devices", max_tokens=20, seed=3, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == model.generate("edge devices", max_tokens=20, seed=3)
    assert pieces[-1].choices[0].finish_reason in ("stop", "length") and pieces[-1].usage is None
    with httpx.stream("POST", server.base + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"prompt": "hi", "max_tokens": 3, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_stop_strings_cut_the_text(client, model):
    msgs = chat("once upon a time")
    free = model.generate(msgs, max_tokens=60, seed=4)
    stop = next(free[i:i + 2] for i in range(10, len(free) - 2) if free[i:i + 2].strip())
    want = model.generate(msgs, max_tokens=60, seed=4, stop=[stop])
    assert want == free[:free.index(stop)]
    r = client.chat.completions.create(model="m", messages=msgs, max_tokens=60, seed=4, stop=[stop, "\x00never"])
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"
    s = client.chat.completions.create(model="m", messages=msgs, max_tokens=60, seed=4, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in s) == want


def test_seeds_reproduce_and_n_choices_take_consecutive_seeds(client, model):
    msgs = chat("hello")
    a, b, c = (client.chat.completions.create(model="m", messages=msgs, max_tokens=30, seed=s).choices[0].message.content
               for s in (21, 21, 22))
    assert a == b != c
    r = client.chat.completions.create(model="m", messages=msgs, max_tokens=12, seed=30, n=3)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert [ch.message.content for ch in r.choices] == [model.generate(msgs, max_tokens=12, seed=30 + i) for i in range(3)]
    assert r.usage.completion_tokens == sum(len(model.generate_ids(msgs, max_tokens=12, seed=30 + i)) for i in range(3))


def test_logprobs_are_the_models(client, model):
    msgs = chat("how are you")
    r = client.chat.completions.create(model="m", messages=msgs, max_tokens=8, temperature=0, logprobs=True,
                                       top_logprobs=3)
    gen = model.generate_ids(msgs, max_tokens=8, temperature=0)
    ids = model.prompt_ids(msgs)
    x = model.logits(ids + gen).astype(np.float64)                  # (n, vocab), an independent log-softmax
    lsm = x - x.max(1, keepdims=True)
    lsm -= np.log(np.exp(lsm).sum(1, keepdims=True))
    content = r.choices[0].logprobs.content
    assert len(content) == len(gen)
    for t, entry in enumerate(content):
        row = lsm[len(ids) - 1 + t]
        assert entry.logprob == pytest.approx(row[gen[t]], abs=1e-4)
        assert [a.logprob for a in entry.top_logprobs] == pytest.approx(np.sort(row)[::-1][:3], abs=1e-4)
    r = client.completions.create(model="m", prompt="the cat", max_tokens=5, temperature=0, logprobs=2)
    assert len(r.choices[0].logprobs.token_logprobs) == len(model.generate_ids("the cat", max_tokens=5, temperature=0))


def test_the_key_is_required(server, model):
    with pytest.raises(openai.AuthenticationError) as e:
        server.client(key="wrong").chat.completions.create(model="m", messages=chat("hi"), max_tokens=2)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        server.client(key=KEY + "x").models.list()
    assert httpx.post(server.base + "/v1/completions", json={"prompt": "hi"}).status_code == 401
    assert httpx.get(server.base + "/metrics").status_code == 401
    assert httpx.get(server.base + "/health").json() == {"status": "ok"}       # no key needed, nothing told
    models = server.client().models.list().data
    assert [m.id for m in models] == ["m"]
    r = httpx.get(server.base + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and "error" in r.json()


def test_oversized_bodies_get_413(server, client):
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model="m", prompt="x" * (2 << 20), max_tokens=1)
    assert e.value.status_code == 413 and e.value.body["code"] == "request_too_large"

    def chunked():                     # no Content-Length: the cap holds while the body streams in
        for _ in range(40):
            yield b"x" * 65536
    r = httpx.post(server.base + "/v1/completions", content=chunked(), headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 413


@pytest.mark.parametrize("kw,param", [
    ({"temperature": 5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"n": 0}, "n"),
    ({"n": 99}, "n"),
    ({"seed": -1}, "seed"),
    ({"stop": [""]}, "stop"),
    ({"logit_bias": {"99999": 1}}, "logit_bias"),
    ({"logit_bias": {"3": 500}}, "logit_bias"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"messages": [], "extra_body": {"panel": {"title": "x"}}}, "panel.title"),
    ({"extra_body": {"panel": {"latest": "x"}}}, "panel"),              # both a panel and messages
    ({"extra_body": {"best_of": 0}}, "best_of"),
    ({"extra_body": {"temprature": 0.5}}, "temprature"),
    ({"extra_body": {"min_p": 1.5}}, "min_p"),
    ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
    ({"extra_body": {"top_k": -2}}, "top_k"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content"),
])
def test_bad_options_are_400s_naming_the_field(client, kw, param):
    args = {"model": "m", "messages": chat("hi"), "max_tokens": 4, **kw}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**args)
    assert e.value.body["param"] == param and e.value.body["type"] == "invalid_request_error"
    assert e.value.body["message"].startswith(param)


def test_bad_json_and_bad_prompts_are_400s(server, client):
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for body in (b"{not json", b"[1, 2]", b'{"prompt": "x", "temperature": NaN}'):
        r = httpx.post(server.base + "/v1/completions", content=body, headers=h)
        assert r.status_code == 400 and r.json()["error"]["message"], body
    for prompt in ("", [], [1, 2, 99999], ["a", "b"]):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="m", prompt=prompt, max_tokens=2)
        assert e.value.body["param"] == "prompt"


def test_context_overflow_is_a_400_that_says_so(client, model):
    long = "0 1 2 3 4 5 6 7 8 9 " * 300
    n = len(model.prompt_ids(long))
    assert n > MAIN_CTX
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="m", prompt=long, max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "prompt"
    assert f"the prompt is {n} tokens; the context holds {MAIN_CTX}" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=chat("hi"), max_tokens=MAIN_CTX)
    assert e.value.body["param"] == "max_tokens" and "does not fit" in e.value.body["message"]
    words = long.split()
    text = " ".join(words[:len(words) * (MAIN_CTX - 60) // n])
    p = len(model.prompt_ids(chat(text)))
    assert MAIN_CTX - 256 < p < MAIN_CTX                  # less room than the default max_tokens
    r = client.chat.completions.create(model="m", messages=chat(text), seed=1, logit_bias=eos_off(model))
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == MAIN_CTX - p  # up to the context


def test_eight_concurrent_streams_each_get_their_single_client_tokens(client, model):
    """8 clients at once on 4 slots (the rest queued), prompts and lengths all different: each
    stream is exactly what the same request gives alone, and what generate gives in process."""
    reqs = [(chat(f"{'hello world' if i % 2 else 'the cat sat'} {i}"), 10 + 7 * i, 100 + i) for i in range(8)]

    def ask(req):
        msgs, n, seed = req
        s = client.chat.completions.create(model="m", messages=msgs, max_tokens=n, seed=seed, stream=True,
                                           stream_options={"include_usage": True})
        chunks = list(s)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks[-1].usage.completion_tokens

    alone = [ask(r) for r in reqs]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, reqs))
    assert together == alone
    assert [t for t, _ in alone] == [model.generate(m, max_tokens=n, seed=s) for m, n, s in reqs]
    assert len({t for t, _ in alone}) == 8


def test_metrics(server, client):
    before = server.metrics()
    client.completions.create(model="m", prompt="the cat", max_tokens=5, seed=1, logit_bias={"0": -100})
    after = server.metrics()
    assert after['edgepanel_requests_total{endpoint="completion",status="200"}'] == \
        before.get('edgepanel_requests_total{endpoint="completion",status="200"}', 0) + 1
    assert after["edgepanel_completion_tokens_total"] == before["edgepanel_completion_tokens_total"] + 5
    assert after["edgepanel_time_per_output_token_seconds_count"] == before["edgepanel_time_per_output_token_seconds_count"] + 1
    assert after["edgepanel_slots"] == 4 and after["edgepanel_queue_length"] == 0 and after["edgepanel_running"] == 0
    assert after['edgepanel_requests_total{endpoint="chat",status="400"}'] >= 1


# -- panels and best_of ---------------------------------------------------------------------------
PANEL = {"latest": "The cat sat on the mat.", "characters": [{"name": "Tom", "description": "a grey cat"}],
         "plan": "Tom wakes up and goes out.", "x-note": "kept, never rendered"}
WIDE = dict(temperature=1.0, top_p=1.0, min_p=0.0)      # candidates that differ


def test_panel_requests_give_what_generate_gives_with_the_panel(server, client, model):
    """A panel is the whole prompt, rendered by edgepanel.panels.render (as edgepanel.best_of and
    the story loop render it): chat in the model's chat template, completions as plain text."""
    from edgepanel.panels import Panel, render
    panel = Panel.from_dict(PANEL)
    ids = render(panel, model.tokenizer, MAIN_CTX - 1 - 24).ids
    want = model.generate(ids, max_tokens=24, seed=5)
    r = client.chat.completions.create(model="m", messages=[], max_tokens=24, seed=5, extra_body={"panel": PANEL})
    assert r.choices[0].message.content == want and r.usage.prompt_tokens == len(ids)
    r = httpx.post(server.base + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"panel": PANEL, "max_tokens": 24, "seed": 5})      # messages left out
    assert r.json()["choices"][0]["message"]["content"] == want
    plain = render(panel, model.tokenizer, MAIN_CTX - 1 - 24, chat=False)
    assert plain.ids != ids and plain.text.endswith("Next paragraph:\n")
    r = client.completions.create(model="m", prompt="", max_tokens=24, seed=5, echo=True, extra_body={"panel": PANEL})
    assert r.choices[0].text == model.tokenizer.decode(plain.ids) + model.generate(plain.ids, max_tokens=24, seed=5,
                                                                                 stop=["\n\n"])
    s = client.chat.completions.create(model="m", messages=[], max_tokens=24, seed=5, stream=True,
                                       extra_body={"panel": PANEL})
    assert "".join(c.choices[0].delta.content or "" for c in s) == want


def test_a_panel_is_shortened_to_leave_room_for_the_completion(model):
    """As edgepanel.best_of: rendered within the context less max_tokens (fields dropped by the
    panels' priority); as plain text, a paragraph ends at a blank line unless stop is given."""
    from edgepanel.panels import Panel, render
    from edgepanel.serve.app import Server
    from edgepanel.serve.schemas import ApiError, parse_chat, parse_completion
    srv = Server(model, ServeOptions(parallel=1, ctx=160))
    big = dict(PANEL, memory={"short": "Tom slept.",
                              "long": [f"On day {i} Tom chased a mouse round the barn." for i in range(40)]})
    req = parse_chat({"messages": [], "panel": big, "max_tokens": 40}, 300, 160)
    want = render(Panel.from_dict(big), model.tokenizer, 160 - 1 - 40)
    assert srv.prompt(req)[0] == want.ids and want.dropped and "stop" not in req.sampling
    req = parse_completion({"panel": big, "max_tokens": 40}, 300, 160)
    assert srv.prompt(req)[0] == render(Panel.from_dict(big), model.tokenizer, 119, chat=False).ids
    assert req.sampling["stop"] == ["\n\n"]
    req = parse_completion({"panel": big, "stop": "."}, 300, 160)         # max_tokens left out: half the context
    assert srv.prompt(req)[0] == render(Panel.from_dict(big), model.tokenizer, 160 - 1 - 80, chat=False).ids
    assert req.sampling["stop"] == ["."]
    with pytest.raises(ApiError) as e:                  # not even the bare instruction fits
        srv.prompt(parse_chat({"panel": PANEL, "max_tokens": 150}, 300, 160))
    assert (e.value.status, e.value.param, e.value.code) == (400, "panel", "context_length_exceeded")
    assert "max_tokens 150" in e.value.message


@pytest.mark.parametrize("panel,param,says", [
    ({"title": "x"}, "panel.title", "unknown field 'title'"),
    ({"characters": [{"name": 3, "description": "x"}]}, "panel.characters[0].name", "must be a string"),
    ({"memory": {"short": "x", "later": ["y"]}}, "panel.memory.later", "unknown field 'later'"),
    ({"goals": "be brave"}, "panel.goals", "must be a list"),
    ({}, "panel", "empty"),
    ("a story", "panel", "must be an object"),
])
def test_bad_panels_are_400s_naming_the_field(client, panel, param, says):
    for create, empty in ((client.chat.completions.create, {"messages": []}),
                          (client.completions.create, {"prompt": ""})):
        with pytest.raises(openai.BadRequestError) as e:
            create(model="m", max_tokens=4, extra_body={"panel": panel}, **empty)
        assert e.value.body["param"] == param and e.value.body["type"] == "invalid_request_error"
        assert e.value.body["message"].startswith(param) and says in e.value.body["message"]


def test_a_panel_is_the_whole_prompt(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="m", prompt="the cat", max_tokens=4, extra_body={"panel": PANEL})
    assert e.value.body["param"] == "panel" and "cannot be combined with prompt" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=chat("hi"), max_tokens=4, extra_body={"panel": PANEL})
    assert e.value.body["param"] == "panel" and "cannot be combined with messages" in e.value.body["message"]


@pytest.mark.parametrize("kw", [{"best_of": 0}, {"best_of": 9}, {"best_of": "2"}, {"best_of": 1.5},
                                {"best_of": True}, {"best_of": 2, "stream": True}, {"best_of": 2, "n": 2}])
def test_bad_best_of_values_are_400s(client, kw):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="m", prompt="the cat", max_tokens=4, extra_body=kw)
    assert e.value.body["param"] == "best_of" and e.value.body["message"].startswith("best_of")
    if "stream" in kw:
        assert "stream" in e.value.body["message"]


def test_best_of_one_is_plain_generation(client, model):
    r = client.completions.create(model="m", prompt="the cat", max_tokens=10, seed=3, extra_body={"best_of": 1})
    assert r.choices[0].text == model.generate("the cat", max_tokens=10, seed=3) and "best_of" not in r.model_extra
    s = client.completions.create(model="m", prompt="the cat", max_tokens=10, seed=3, stream=True,
                                  extra_body={"best_of": 1})
    assert "".join(p.choices[0].text for p in s) == r.choices[0].text


@pytest.fixture(scope="module")
def tuned(path, tmp_path_factory):
    """A file unlike its reference, as a preference run writes one (here the norms scaled, the
    file's own values carried as reference/...), served; and the same file loaded in process."""
    from edgepanel.tune import reward
    d = tmp_path_factory.mktemp("tuned")
    m = edgepanel.load(path, threads=1)
    for a in m.parameters(["norms"]).values():
        a *= np.float32(1.2)
    reward.save_with_reference(m, d / "tuned.ep")
    s = Served(d / "tuned.ep", d / "tuned.log", "--parallel", "4", "--metrics")
    yield s, edgepanel.load(d / "tuned.ep", threads=1)
    assert s.stop() == 0, s.log.read_text()
    assert "Traceback" not in s.log.read_text(), s.log.read_text()


def same_as_best_of(got: dict, text: str, want):
    """A response's best_of field and text against edgepanel.best_of's result (JSON's null for
    the -inf of an empty continuation)."""
    inf = lambda x: -np.inf if x is None else x  # noqa: E731
    assert text == want.text and got["chosen"] == want.index
    assert [{k: inf(c[k]) if k in ("logp", "ref_logp", "reward") else c[k] for k in ("text", "tokens", "logp",
             "ref_logp", "reward", "seed")} for c in got["candidates"]] == [c.__dict__ for c in want.candidates]
    assert [inf(c["mean_logp"]) for c in got["candidates"]] == [c.mean_logp for c in want.candidates]


def test_best_of_returns_what_edgepanel_best_of_returns(tuned):
    from edgepanel.tune import reward
    s, m = tuned
    c = s.client(key="none")
    r = c.chat.completions.create(model="m", messages=[], max_tokens=12, seed=7,
                                  extra_body={"panel": PANEL, "best_of": 4, **WIDE})
    want = edgepanel.best_of(m, PANEL, 4, seed=7, max_tokens=12, **WIDE)
    got = r.model_extra["best_of"]
    same_as_best_of(got, r.choices[0].message.content, want)
    assert got["beta"] == reward.default_beta(m) and len({c["text"] for c in got["candidates"]}) > 1
    assert any(c.reward not in (0, -np.inf) for c in want.candidates)       # rewards against the reference
    assert len(r.choices) == 1 and r.choices[0].index == 0
    r = c.completions.create(model="m", prompt="the cat sat on", max_tokens=12, seed=8, logprobs=1,
                             extra_body={"best_of": 3, **WIDE})
    want = edgepanel.best_of(m, "the cat sat on", 3, seed=8, max_tokens=12, **WIDE)
    same_as_best_of(r.model_extra["best_of"], r.choices[0].text, want)
    gen = [m.generate_ids("the cat sat on", max_tokens=12, seed=cand.seed, **WIDE) for cand in want.candidates]
    assert r.usage.completion_tokens == sum(map(len, gen))                  # every candidate was written
    assert len(r.choices[0].logprobs.tokens) == len(gen[want.index])       # the chosen one's log-probs
    again = c.completions.create(model="m", prompt="the cat sat on", max_tokens=12, seed=8, logprobs=1,
                                 extra_body={"best_of": 3, **WIDE})
    assert again.model_extra["best_of"] == r.model_extra["best_of"]


def test_best_of_scoring_leaves_concurrent_requests_alone(tuned):
    """best_of's scoring swaps the reference's parameters into the model and back: it runs on the
    decoding thread between two steps, so a stream decoded meanwhile is exactly what it is alone."""
    s, m = tuned
    c = s.client(key="none")
    long = dict(model="m", messages=chat("hi"), max_tokens=1000, seed=1, stream=True, logit_bias=eos_off(m))

    def text(stream):
        return "".join(ch.choices[0].delta.content or "" for ch in stream)
    alone = text(c.chat.completions.create(**long))
    stream = c.chat.completions.create(**long)
    head = [next(stream), next(stream)]
    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(lambda seed: c.completions.create(model="m", prompt="the cat sat on", max_tokens=12,
                                                              seed=seed, extra_body={"best_of": 3, **WIDE}),
                            range(3)))
        assert s.metrics(key="none")["edgepanel_running"] == 1    # the stream was decoding all along
    assert text(head) + text(stream) == alone
    for seed, r in enumerate(got):
        same_as_best_of(r.model_extra["best_of"], r.choices[0].text,
                        edgepanel.best_of(m, "the cat sat on", 3, seed=seed, max_tokens=12, **WIDE))


# -- the slot of a client that leaves, and shutdown -----------------------------------------------
def wait_for(cond, what: str, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_a_client_that_leaves_frees_its_slot(path, model, tmp_path):
    """One slot: a long stream runs, a second request waits; the waiting client leaves (dropped
    from the queue), the running one leaves (its slot freed long before its 16000 tokens), and a
    third request is served at once."""
    s = Served(path, tmp_path / "one.log", "--parallel", "1", "--metrics")
    try:
        c = s.client(key="none")
        long = dict(model="m", messages=chat("hi"), max_tokens=CONTEXT - 100, seed=1, stream=True,
                    logit_bias=eos_off(model))
        running = c.chat.completions.create(**long)
        next(running), next(running)
        waiting = c.chat.completions.create(**long)       # headers come at once; tokens wait for the slot
        wait_for(lambda: s.metrics()["edgepanel_queue_length"] == 1, "the second request is queued")
        waiting.close()
        wait_for(lambda: s.metrics()["edgepanel_queue_length"] == 0, "the queue lets go of a client that left")
        assert s.metrics()["edgepanel_running"] == 1
        running.close()
        wait_for(lambda: s.metrics()["edgepanel_running"] == 0, "the slot is freed")
        m = s.metrics()
        assert m["edgepanel_cancelled_total"] == 2 and m["edgepanel_completion_tokens_total"] < CONTEXT - 100
        whole = dict(long, stream=False)                    # a client that gives up on a whole response
        with pytest.raises(openai.APITimeoutError):
            s.client(key="none", timeout=0.5).chat.completions.create(**whole)
        wait_for(lambda: s.metrics()["edgepanel_cancelled_total"] == 3, "a whole response's client left")
        assert s.metrics()["edgepanel_running"] == 0
        r = c.chat.completions.create(model="m", messages=chat("hi"), max_tokens=5, seed=2)
        assert r.choices[0].message.content == model.generate(chat("hi"), max_tokens=5, seed=2)
    finally:
        assert s.stop() == 0
    assert "Traceback" not in s.log.read_text(), s.log.read_text()


def test_sigterm_lets_requests_in_flight_finish(path, model, tmp_path):
    s = Served(path, tmp_path / "term.log", "--parallel", "1")
    c = s.client(key="none")
    n = 1500
    stream = c.chat.completions.create(model="m", messages=chat("hi"), max_tokens=n, seed=1, stream=True,
                                       stream_options={"include_usage": True}, logit_bias=eos_off(model))
    first = next(stream)
    queued = {}
    t = threading.Thread(target=lambda: queued.update(r=c.completions.create(
        model="m", prompt="the cat", max_tokens=50, seed=3, logit_bias=eos_off(model))))
    t.start()
    time.sleep(0.2)
    s.proc.send_signal(signal.SIGTERM)
    rest = list(stream)
    t.join(30)
    assert first.choices[0].delta.role == "assistant"
    assert rest[-1].usage.completion_tokens == n and rest[-2].choices[0].finish_reason == "length"
    assert queued["r"].usage.completion_tokens == 50
    assert s.proc.wait(30) == 0
    assert "stopped" in s.log.read_text() and "Traceback" not in s.log.read_text(), s.log.read_text()


def test_sigterm_past_the_grace_period_cuts_streams_cleanly(path, model, tmp_path):
    s = Served(path, tmp_path / "cut.log", "--parallel", "1", "--shutdown-timeout", "0.3")
    c = s.client(key="none")
    stream = c.chat.completions.create(model="m", messages=chat("hi"), max_tokens=CONTEXT - 100, seed=1,
                                       stream=True, logit_bias=eos_off(model))
    next(stream)
    t0 = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    with pytest.raises(openai.APIError, match="shutting down"):    # an error event ends the stream
        for chunk in stream:
            assert not (chunk.choices and chunk.choices[0].finish_reason)
    assert s.proc.wait(30) == 0 and time.monotonic() - t0 < 20
    assert "Traceback" not in s.log.read_text(), s.log.read_text()
