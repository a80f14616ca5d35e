"""The real model: SmolLM2-135M-Instruct's GGUF (fetched once into the edgepanel cache) converts,
its tokenizer matches transformers' reading of the same file, and in pass-through mode its logits
match transformers loading the same GGUF."""
import numpy as np
import pytest

import torch  # noqa: E402  (a dev dependency: a missing torch fails the tests, never skips them)

from edgepanel import hub
from edgepanel.convert import Recipe, convert
from edgepanel.model.model import Model

TEXTS = ["Hello world! 12345 apples cost $3.50.", "<|im_start|>user\nWhat is 2+2?<|im_end|>\n",
         "  spaces\tand\nnewlines -- ünïcode 日本語", "The capital of France is"]


@pytest.fixture(scope="module")
def gguf():
    return hub.fetch("smollm2")


@pytest.fixture(scope="module")
def hf(gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


@pytest.fixture(scope="module")
def passthrough(gguf, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "smol.ep"
    convert(gguf, out, Recipe(passthrough=True))
    return Model(out, kv_dtype="float32")     # against transformers' float32 attention


def test_tokenizer_matches_transformers(passthrough, hf):
    _, tok = hf
    for text in TEXTS:
        assert passthrough.tokenizer.encode(text) == tok(text)["input_ids"], text
        ids = tok(text)["input_ids"]
        assert passthrough.tokenizer.decode(ids) == tok.decode(ids, skip_special_tokens=True)


def test_passthrough_logits_match_transformers(passthrough, hf):
    model, tok = hf
    ids = tok("The capital of France is")["input_ids"]
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    got = passthrough.logits(ids)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    assert passthrough.tokenizer.decode([int(np.argmax(got[-1]))]).strip() == "Paris"


def test_chat_template_renders(passthrough):
    text = passthrough.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert "<|im_start|>user\nHi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
