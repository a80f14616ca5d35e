"""Tiny random Hugging Face checkpoints of every supported architecture, built with transformers
(no network): the reference the converter and the engine are tested against."""
from __future__ import annotations

import numpy as np

ARCHS = ["llama", "llama3", "mistral", "qwen2", "gpt2", "bitnet"]


def build(arch: str, path, seed: int = 0, ternary: bool = False, std: float = 0.02, context: int = 96):
    """Save a tiny random model of `arch` in `path` (safetensors); return the torch model.
    `std`: the weights' initial spread (larger: sharper next-token distributions); `context`: the
    longest sequence."""
    import torch
    import transformers as T

    torch.manual_seed(seed)
    common = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                  initializer_range=std)
    if arch == "llama":
        cfg = T.LlamaConfig(**common, tie_word_embeddings=False, attention_bias=True)
        model = T.LlamaForCausalLM(cfg)
    elif arch == "llama3":
        cfg = T.LlamaConfig(**common, tie_word_embeddings=True, rope_parameters={
            "rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
        model = T.LlamaForCausalLM(cfg)
    elif arch == "mistral":
        cfg = T.MistralConfig(**common, head_dim=24, sliding_window=None)
        model = T.MistralForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = T.Qwen2Config(**common, tie_word_embeddings=True)
        model = T.Qwen2ForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = T.GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=context,
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=std)
        model = T.GPT2LMHeadModel(cfg)
    elif arch == "bitnet":
        cfg = T.BitNetConfig(**common)
        model = T.BitNetForCausalLM(cfg)
    else:
        raise ValueError(arch)
    model.eval()
    with torch.no_grad():  # norms are ones at init: make them matter
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
            if ternary and p.ndim == 2 and "embed" not in name and "lm_head" not in name:
                a = p.abs().mean()
                p.copy_(torch.clamp(torch.round(p / a), -1, 1) * a)
    model.save_pretrained(str(path))
    return model


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def add_tokenizer(path, vocab_size: int = 300):
    """A small byte-level BPE tokenizer (tokenizers library, trained on a few sentences) with a
    chat template, written next to a tiny checkpoint so text in and out works end to end."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["the cat sat on the mat", "once upon a time there was a dog", "hello world, how are you?",
              "edge devices run binarized models", "0123456789 .,!?"] * 20
    special = ["<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": CHAT_TEMPLATE, "eos_token": "<|end|>", "add_bos_token": False}))
    gen = path / "generation_config.json"
    g = json.loads(gen.read_text()) if gen.exists() else {}
    g["eos_token_id"] = tok.token_to_id("<|end|>")
    gen.write_text(json.dumps(g))
    return tok


def hf_logits(model, ids) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0].float().numpy()


def checkpoint_with_tokenizer(dest, arch: str = "llama", **build_kw):
    """A tiny random checkpoint of `arch` with a tokenizer, in the directory `dest` (returned)."""
    build(arch, dest, **build_kw)
    add_tokenizer(dest)
    return dest
