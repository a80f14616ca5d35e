"""Tiny inputs for the hostile-input tests and the fuzzers' seed corpora, made with NumPy alone
(no torch): a Hugging Face checkpoint directory, a GGUF file, edgepanel model files of several
recipes, chat templates.

    python tests/fuzz/seeds.py      # rewrites tests/fuzz/corpus/<harness>/ (deterministic)
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(ROOT) not in sys.path:   # run as a script or from a fuzz harness
    sys.path.insert(0, str(ROOT))

# the tiny shapes: vocab 64, width 32, 4 heads of 8 (2 for keys and values), MLP 48, one layer
VOCAB, DIM, HEADS, KV_HEADS, HIDDEN, LAYERS, CONTEXT = 64, 32, 4, 2, 48, 1, 64
HEAD_DIM = DIM // HEADS


def llama_config(**changes) -> dict:
    cfg = {"architectures": ["LlamaForCausalLM"], "vocab_size": VOCAB, "hidden_size": DIM,
           "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "intermediate_size": HIDDEN,
           "num_hidden_layers": LAYERS, "max_position_embeddings": CONTEXT, "rms_norm_eps": 1e-5,
           "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False}
    cfg.update(changes)
    return cfg


def llama_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights in Hugging Face names, shapes as llama_config() gives them."""
    rng = np.random.default_rng(seed)
    kv = KV_HEADS * HEAD_DIM
    shapes = {"model.embed_tokens.weight": (VOCAB, DIM), "model.norm.weight": (DIM,), "lm_head.weight": (VOCAB, DIM)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (DIM,), p + "post_attention_layernorm.weight": (DIM,),
                       p + "self_attn.q_proj.weight": (DIM, DIM), p + "self_attn.k_proj.weight": (kv, DIM),
                       p + "self_attn.v_proj.weight": (kv, DIM), p + "self_attn.o_proj.weight": (DIM, DIM),
                       p + "mlp.gate_proj.weight": (HIDDEN, DIM), p + "mlp.up_proj.weight": (HIDDEN, DIM),
                       p + "mlp.down_proj.weight": (DIM, HIDDEN)})
    return {name: (1.0 + 0.1 * rng.standard_normal(s) if len(s) == 1 else 0.2 * rng.standard_normal(s)).astype(np.float32)
            for name, s in shapes.items()}


def tokenizer_json() -> str:
    """A word-level tokenizer over the tiny vocabulary (small enough for a seed file)."""
    words = ["<unk>", "<|end|>", "<|user|>", "<|assistant|>"] + [chr(ord("a") + i % 26) * (1 + i // 26) for i in range(VOCAB - 4)]
    return json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "normalizer": None, "post_processor": None,
        "added_tokens": [{"id": i, "content": w, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, w in enumerate(words[1:4], 1)],
        "pre_tokenizer": {"type": "Whitespace"}, "decoder": None,
        "model": {"type": "WordLevel", "vocab": {w: i for i, w in enumerate(words)}, "unk_token": "<unk>"}})


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def hf_checkpoint(d, config: dict | None = None, tensors: dict | None = None, tokenizer: bool = True) -> Path:
    """A Hugging Face checkpoint directory: config.json, model.safetensors, and a tokenizer."""
    from edgepanel.format import write_tensors
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(llama_config() if config is None else config))
    write_tensors(d / "model.safetensors", llama_tensors() if tensors is None else tensors, {"format": "pt"})
    if tokenizer:
        (d / "tokenizer.json").write_text(tokenizer_json())
        (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE, "eos_token": "<|end|>"}))
    return d


def gguf_file(path, fields: dict | None = None, tensors: dict | None = None, seed: int = 0, f16: bool = False) -> Path:
    """A llama GGUF of the tiny shapes.  `fields` adds or replaces metadata (None drops a key);
    `tensors` (GGUF names, NumPy shapes (out, in)) adds or replaces tensors (None drops one);
    f16: matrices stored as F16."""
    import gguf

    f = {"llama.block_count": LAYERS, "llama.context_length": CONTEXT, "llama.embedding_length": DIM,
         "llama.feed_forward_length": HIDDEN, "llama.attention.head_count": HEADS,
         "llama.attention.head_count_kv": KV_HEADS, "llama.rope.freq_base": 10000.0,
         "llama.attention.layer_norm_rms_epsilon": 1e-5}
    f.update(fields or {})
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    hf = llama_tensors(seed)
    t = {}
    for name, a in hf.items():
        g = names.get(name)
        if g is None:
            i, part = name.split(".")[2], ".".join(name.split(".")[3:])
            g = f"blk.{i}." + {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
                               "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
                               "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
                               "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
                               "mlp.down_proj.weight": "ffn_down.weight"}[part]
        t[g] = a.astype(np.float16) if f16 and a.ndim == 2 else a
    t.update(tensors or {})
    w = gguf.GGUFWriter(str(path), "llama")
    for k, v in f.items():
        if v is None:
            continue
        if isinstance(v, bool):
            w.add_bool(k, v)
        elif isinstance(v, int):
            (w.add_uint32 if 0 <= v < 2**32 else w.add_int64)(k, v)
        elif isinstance(v, float):
            w.add_float32(k, v)
        elif isinstance(v, str):
            w.add_string(k, v)
        else:
            w.add_array(k, v)
    for k, a in t.items():
        if a is not None:
            w.add_tensor(k, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def gguf_tokenizer_fields() -> dict:
    tokens = [chr(ord("A") + i) for i in range(VOCAB - 3)] + ["AB", "<s>", "</s>"]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": ["A B"],
            "tokenizer.ggml.bos_token_id": VOCAB - 2, "tokenizer.ggml.eos_token_id": VOCAB - 1,
            "tokenizer.chat_template": CHAT_TEMPLATE}


# recipes of the model-file seeds: every kind of tensor the reader knows
MODEL_RECIPES = {
    "planes_f16": dict(planes=2, group=32, calib=None),
    "planes_u8": dict(planes=1, group=0, calib=None, scales="u8", embed="k2", head="k1g32"),
    "dense": dict(passthrough=True),
}


def model_file(path, recipe: str = "planes_f16", tokenizer: bool = False) -> Path:
    """An edgepanel model file converted from the tiny checkpoint with one of MODEL_RECIPES."""
    import tempfile

    from edgepanel.convert import Recipe, convert
    with tempfile.TemporaryDirectory() as tmp:
        src = hf_checkpoint(Path(tmp) / "hf", tokenizer=tokenizer)
        convert(src, path, Recipe(**MODEL_RECIPES[recipe]))
    return Path(path)


# chat templates written for the seed corpus: loops, conditions, macros, namespaces, filters
TEMPLATES = [
    CHAT_TEMPLATE,
    "{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}[SYS] {{ m.content | trim }}\n"
    "{% else %}<|{{ m.role }}|>\n{{ m.content }}{{ eos_token }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}",
    "{% set ns = namespace(system='') %}{% for m in messages %}{% if m['role'] == 'system' %}"
    "{% set ns.system = m['content'] %}{% endif %}{% endfor %}{% if ns.system %}{{ ns.system }}\n\n{% endif %}"
    "{% for m in messages if m['role'] != 'system' %}{{ loop.index }}. {{ m['role'] | upper }}: "
    "{{ m['content'] | replace('\\n', ' ') }}\n{% endfor %}",
    "{% macro turn(role, text) %}<{{ role }}>{{ text }}</{{ role }}>{% endmacro %}"
    "{% for m in messages %}{{ turn(m.role, m.content) }}{% if not loop.last %}\n{% endif %}{% endfor %}"
    "{% if messages | length > 3 %}{{ raise_exception('too many turns') }}{% endif %}",
    "{{ messages | tojson }}{% for m in messages | reverse %}{{ m.content[:10] ~ '|' }}{% endfor %}"
    "{{ strftime_now('%Y') | length }}{% for i in range(3) %}{{ i * 2 }}{% endfor %}",
]

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a river."}]


def write_corpora(root: Path = HERE / "corpus"):
    """The fuzzers' seed corpora, one directory per harness."""
    import tempfile
    for sub in ("model_file", "gguf", "hf_config", "chat_template", "panels"):
        shutil.rmtree(root / sub, ignore_errors=True)
        (root / sub).mkdir(parents=True)
    for name in MODEL_RECIPES:
        model_file(root / "model_file" / f"{name}.ep", name, tokenizer=name == "planes_f16")
    gguf_file(root / "gguf" / "llama.gguf", f16=True)
    gguf_file(root / "gguf" / "llama_tokenizer.gguf", gguf_tokenizer_fields(), f16=True)
    with tempfile.TemporaryDirectory() as tmp:   # a GGUF without the output matrix (tied)
        gguf_file(Path(tmp) / "t.gguf", {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0},
                  {"output.weight": None}, f16=True)
        shutil.copy(Path(tmp) / "t.gguf", root / "gguf" / "tied_scaled.gguf")
    configs = [llama_config(), llama_config(tie_word_embeddings=True, rope_scaling={"type": "linear", "factor": 2.0}),
               llama_config(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
               llama_config(architectures=["Qwen2ForCausalLM"], tie_word_embeddings=True, sliding_window=32)]
    for i, c in enumerate(configs):
        (root / "hf_config" / f"config{i}.json").write_text(json.dumps(c, indent=1))
    for i, t in enumerate(TEMPLATES):
        (root / "chat_template" / f"template{i}.jinja").write_text(t)
    lines = (ROOT / "tests" / "data" / "panels-small.jsonl").read_text(encoding="utf-8").splitlines()
    for i in range(3):   # the panels' own test data, one and two lines a file
        (root / "panels" / f"panels{i}.jsonl").write_text("\n".join(lines[i:i + 1 + i % 2]) + "\n", encoding="utf-8")


if __name__ == "__main__":
    write_corpora()
    for d in sorted((HERE / "corpus").iterdir()):
        print(d.name, sorted((p.name, p.stat().st_size) for p in d.iterdir()))
