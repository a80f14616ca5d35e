"""End-to-end speed of the default model (the README's first command makes it) beside transformers
on the same weights, in one run (pytest-benchmark; extra_info holds tokens per call).

    python -m pytest benchmarks/test_model_bench.py --benchmark-json=model.json

Thread counts: EDGEPANEL_BENCH_THREADS (default "1,2").  The fuller table (several recipes, load
time, peak RSS, llama.cpp) comes from tools/bench_model.py.
"""
import os

import numpy as np
import pytest

from edgepanel.kernels import native

pytestmark = pytest.mark.skipif(native.lib is None, reason="C kernels not built")
THREADS = [int(t) for t in os.environ.get("EDGEPANEL_BENCH_THREADS", "1,2").split(",")]
PROMPT = "Once upon a time, in a small village between two hills, there lived an old clockmaker. " * 12


@pytest.fixture(scope="module")
def default_model():
    from edgepanel.hub import resolve_model
    return resolve_model(None, progress=False)


@pytest.fixture(scope="module")
def hf_model():
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from edgepanel import hub
    gguf = hub.fetch("smollm2")
    m = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return m, tok


@pytest.mark.parametrize("threads", THREADS)
def test_edgepanel_prefill_128(benchmark, default_model, threads):
    import edgepanel
    m = edgepanel.load(default_model, threads=threads)
    ids = np.array(m.tokenizer.encode(PROMPT)[:128], np.int32)
    benchmark.group = f"prefill 128 tokens, {threads} thread(s)"
    benchmark.extra_info.update(tokens=128, engine="edgepanel", threads=threads, model=default_model.name)
    benchmark(lambda: m.engine.forward(ids, m.engine.new_cache(128)))


@pytest.mark.parametrize("threads", THREADS)
def test_edgepanel_decode_64(benchmark, default_model, threads):
    import edgepanel
    m = edgepanel.load(default_model, threads=threads)
    ids = np.array(m.tokenizer.encode(PROMPT)[:128], np.int32)

    def run():
        cache = m.engine.new_cache(192)
        lg = m.engine.forward(ids, cache)
        for _ in range(64):
            lg = m.engine.forward(np.array([int(np.argmax(lg))], np.int32), cache)

    benchmark.group = f"prefill 128 + decode 64, {threads} thread(s)"
    benchmark.extra_info.update(tokens=64, engine="edgepanel", threads=threads, model=default_model.name)
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("threads", THREADS)
def test_transformers_prefill_128(benchmark, hf_model, threads):
    import torch
    torch.set_num_threads(threads)
    m, tok = hf_model
    ids = torch.tensor([tok(PROMPT)["input_ids"][:128]])
    benchmark.group = f"prefill 128 tokens, {threads} thread(s)"
    benchmark.extra_info.update(tokens=128, engine="transformers", threads=threads)
    with torch.no_grad():
        benchmark.pedantic(lambda: m(ids, use_cache=True), rounds=3, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("threads", THREADS)
def test_transformers_decode_64(benchmark, hf_model, threads):
    import torch
    torch.set_num_threads(threads)
    m, tok = hf_model
    ids = torch.tensor([tok(PROMPT)["input_ids"][:128]])

    def run():
        with torch.no_grad():
            out = m(ids, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            for _ in range(64):
                out = m(nxt, past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)

    benchmark.group = f"prefill 128 + decode 64, {threads} thread(s)"
    benchmark.extra_info.update(tokens=64, engine="transformers", threads=threads)
    benchmark.pedantic(run, rounds=2, iterations=1, warmup_rounds=0)


SCORE_SEQS = [(PROMPT * 2)[i * 37:i * 37 + 400] for i in range(8)]   # 8 texts of ~80-100 tokens


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "one-per-pass"])
def test_edgepanel_score_8_sequences(benchmark, default_model, batched):
    """Model.score: the fine-tuner's forward (log-probabilities of several sequences), as one
    batched pass over all of them or one pass per sequence, 1 thread."""
    import edgepanel
    m = edgepanel.load(default_model, threads=1)
    seqs = [np.array(m.tokenizer.encode(s), np.int32) for s in SCORE_SEQS]
    benchmark.group = "score 8 sequences, 1 thread"
    benchmark.extra_info.update(tokens=int(sum(map(len, seqs))), engine="edgepanel", threads=1, batched=batched)
    run = (lambda: m.score(seqs)) if batched else (lambda: [m.score([s]) for s in seqs])
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
