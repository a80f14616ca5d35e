"""Reading GGUF files (llama.cpp's format) with the `gguf` package: quantized tensors are
dequantized, tensor names mapped to the Hugging Face names of the same architecture (so the
architecture tables in this package apply unchanged), q/k un-permuted back to the Hugging Face
RoPE layout, and the tokenizer rebuilt as a `tokenizers` BPE tokenizer."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from ..errors import FormatError
from .base import SourceTensors

# GGUF architecture -> (Hugging Face architecture, permuted q/k)
ARCHS = {"llama": ("LlamaForCausalLM", True), "qwen2": ("Qwen2ForCausalLM", False)}

NAME_MAP = [  # GGUF name pattern -> Hugging Face name
    (r"token_embd\.weight", "model.embed_tokens.weight"),
    (r"output_norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"blk\.(\d+)\.attn_q\.(weight|bias)", r"model.layers.\1.self_attn.q_proj.\2"),
    (r"blk\.(\d+)\.attn_k\.(weight|bias)", r"model.layers.\1.self_attn.k_proj.\2"),
    (r"blk\.(\d+)\.attn_v\.(weight|bias)", r"model.layers.\1.self_attn.v_proj.\2"),
    (r"blk\.(\d+)\.attn_output\.(weight|bias)", r"model.layers.\1.self_attn.o_proj.\2"),
    (r"blk\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_gate\.weight", r"model.layers.\1.mlp.gate_proj.weight"),
    (r"blk\.(\d+)\.ffn_up\.weight", r"model.layers.\1.mlp.up_proj.weight"),
    (r"blk\.(\d+)\.ffn_down\.weight", r"model.layers.\1.mlp.down_proj.weight"),
]

# llama.cpp pre-tokenizer names -> `tokenizers` pre-tokenizer JSON
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
BYTE_LEVEL_NO_REGEX = dict(BYTE_LEVEL, use_regex=False)


def _split(regex):
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


PRE_TOKENIZERS = {
    "default": BYTE_LEVEL,
    "gpt-2": BYTE_LEVEL,
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, BYTE_LEVEL]},
    "llama-bpe": {"type": "Sequence", "pretokenizers": [_split(LLAMA3_REGEX), BYTE_LEVEL_NO_REGEX]},
    "qwen2": {"type": "Sequence", "pretokenizers": [_split(QWEN2_REGEX), BYTE_LEVEL_NO_REGEX]},
}


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except Exception:  # noqa: BLE001 - a field of a type the gguf package cannot decode
        return default


def _typed(reader, key: str, where: str, kind: str, default=None):
    """Field `key` checked as `kind`: "count" (a positive integer), "number" (finite), "id" (an
    integer >= 0), "str", "strs" (a list of strings), "ints" (a list of integers), "bool"; FormatError
    naming the key otherwise.  Absent: `default`."""
    v = _field(reader, key)
    if v is None:
        return default
    is_int = lambda x: isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))  # noqa: E731
    ok = {"count": lambda: is_int(v) and v > 0,
          "id": lambda: is_int(v) and v >= 0,
          "number": lambda: (is_int(v) or isinstance(v, (float, np.floating))) and abs(v) < 1e300,
          "str": lambda: isinstance(v, str),
          "bool": lambda: isinstance(v, (bool, np.bool_)),
          "strs": lambda: isinstance(v, list) and all(isinstance(x, str) for x in v),
          "ints": lambda: isinstance(v, list) and all(is_int(x) for x in v)}[kind]
    if not ok():
        what = {"count": "a positive integer", "id": "a token id", "number": "a finite number", "str": "a string",
                "bool": "true or false", "strs": "a list of strings", "ints": "a list of integers"}[kind]
        raise FormatError(f"{where}: GGUF field {key} must be {what}, got {v!r:.80}")
    if kind in ("count", "id"):
        return int(v)
    if kind == "number":
        return float(v)
    if kind == "ints":
        return [int(x) for x in v]
    return bool(v) if kind == "bool" else v


def hf_name(gguf_name: str) -> str | None:
    for pat, rep in NAME_MAP:
        if re.fullmatch(pat, gguf_name):
            return re.sub(pat, rep, gguf_name)
    return None


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation (interleaved rotary pairs -> Hugging Face halves)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def build_tokenizer(reader, where: str) -> tuple[str | None, dict]:
    field = lambda key, kind, default=None: _typed(reader, "tokenizer." + key, where, kind, default)  # noqa: E731
    model = field("ggml.model", "str")
    tokens = field("ggml.tokens", "strs")
    eos = field("ggml.eos_token_id", "id")
    info = {
        "bos_id": field("ggml.bos_token_id", "id"),
        "eos_ids": [] if eos is None else [eos],
        "add_bos": field("ggml.add_bos_token", "bool", False),
        "chat_template": field("chat_template", "str"),
        "generation": {},
    }
    if model is None or tokens is None:
        return None, info
    if model != "gpt2":
        raise FormatError(f"{where}: GGUF tokenizer model {model!r} is not supported yet (supported: gpt2 BPE)")
    pre = field("ggml.pre", "str", "default")
    if pre not in PRE_TOKENIZERS:
        raise FormatError(f"{where}: GGUF pre-tokenizer {pre!r} is not supported ({', '.join(sorted(PRE_TOKENIZERS))})")
    merges = field("ggml.merges", "strs", [])
    if not all(" " in m for m in merges):
        raise FormatError(f"{where}: GGUF field tokenizer.ggml.merges must hold pairs 'a b', got {next(m for m in merges if ' ' not in m)!r:.80}")
    types = field("ggml.token_type", "ints", [1] * len(tokens))
    if len(types) != len(tokens):
        raise FormatError(f"{where}: GGUF field tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": ty == 3}
             for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (3, 4)]
    tj = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None, "pre_tokenizer": PRE_TOKENIZERS[pre], "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": [m.split(" ", 1) for m in merges]},
    }
    if info["bos_id"] is not None and info["bos_id"] < len(tokens):
        info["bos_token"] = tokens[info["bos_id"]]
    if info["eos_ids"] and info["eos_ids"][0] < len(tokens):
        info["eos_token"] = tokens[info["eos_ids"][0]]
    return json.dumps(tj, ensure_ascii=False), info


def open_gguf(path: Path):
    """(HF architecture name, HF-style config dict, SourceTensors, tokenizer json, tokenizer info)."""
    try:
        from gguf import GGMLQuantizationType, GGUFReader
        from gguf.quants import dequantize
    except ImportError as exc:
        raise FormatError(f"{path}: reading GGUF needs the `gguf` package ({exc})") from None
    where = str(path)
    integer_types = {GGMLQuantizationType[n] for n in ("I8", "I16", "I32", "I64") if n in GGMLQuantizationType.__members__}
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001 - the gguf package raises assorted errors on bad files
        raise FormatError(f"{where}: not a readable GGUF file ({exc})") from None
    arch = _field(reader, "general.architecture")
    if not isinstance(arch, str) or arch not in ARCHS:
        raise FormatError(f"{where}: GGUF architecture {arch!r:.80} is not supported ({', '.join(sorted(ARCHS))})")
    hf_arch, permuted = ARCHS[arch]
    g = lambda k, kind, d=None: _typed(reader, f"{arch}.{k}", where, kind, d)  # noqa: E731
    n_heads = g("attention.head_count", "count")
    n_kv = g("attention.head_count_kv", "count", n_heads)
    dim = g("embedding_length", "count")
    tensors = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in tensors:
        raise FormatError(f"{where}: GGUF rope frequency factors (rope_freqs.weight) are not supported yet")
    for need, value in (("attention.head_count", n_heads), ("embedding_length", dim)):
        if value is None:
            raise FormatError(f"{where}: GGUF metadata lacks {arch}.{need}")
    tokens = _typed(reader, "tokenizer.ggml.tokens", where, "strs")
    vocab = g("vocab_size", "count") or (len(tokens) if tokens else None)
    if vocab is None and "token_embd.weight" in tensors:
        vocab = int(tensors["token_embd.weight"].shape[-1])
    cfg = {
        "architectures": [hf_arch], "hidden_size": dim, "intermediate_size": g("feed_forward_length", "count"),
        "num_hidden_layers": g("block_count", "count"), "num_attention_heads": n_heads, "num_key_value_heads": n_kv,
        "head_dim": g("rope.dimension_count", "count") or dim // n_heads,
        "max_position_embeddings": g("context_length", "count", 2048),
        "rms_norm_eps": g("attention.layer_norm_rms_epsilon", "number", 1e-6), "rope_theta": g("rope.freq_base", "number", 10000.0),
        "vocab_size": vocab, "tie_word_embeddings": "output.weight" not in tensors, "hidden_act": "silu",
    }
    scaling = g("rope.scaling.type", "str")
    if scaling == "linear":
        cfg["rope_scaling"] = {"type": "linear", "factor": g("rope.scaling.factor", "number")}
    elif scaling not in (None, "none"):
        raise FormatError(f"{where}: GGUF rope scaling {scaling!r} is not supported")
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
               if cfg[k] is None]
    if missing:
        raise FormatError(f"{where}: GGUF metadata lacks {', '.join(missing)}")
    names = {}
    for gname in tensors:
        h = hf_name(gname)
        if h is None:
            raise FormatError(f"{where}: GGUF tensor '{gname}' has no mapping (unsupported variant?)")
        names[h] = gname

    def load(name):
        t = tensors[names[name]]
        shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists the innermost dimension first
        what = f"{where}: GGUF tensor '{t.name}'"
        if not shape or min(shape) <= 0:
            raise FormatError(f"{what} has shape {shape}: every dimension must be positive")
        if t.tensor_type in integer_types:
            raise FormatError(f"{what} has integer type {t.tensor_type.name}; weights must be float or quantized")
        try:
            if t.tensor_type == GGMLQuantizationType.F64:
                w = np.asarray(t.data, np.float32)
            else:
                w = dequantize(t.data, t.tensor_type).astype(np.float32)
            w = w.reshape(shape)
        except (NotImplementedError, ValueError) as exc:
            raise FormatError(f"{what} of type {t.tensor_type.name} cannot be read ({exc})") from None
        for suffix, heads in (("q_proj.weight", n_heads), ("k_proj.weight", n_kv)):
            if permuted and name.endswith(suffix):
                if w.ndim != 2 or w.shape[0] % (2 * heads):
                    raise FormatError(f"{what} has shape {shape}: its rows must split into {heads} heads of rotary pairs")
                w = unpermute(w, heads)
        return w

    tok_json, info = build_tokenizer(reader, where)
    return hf_arch, cfg, SourceTensors(list(names), load, where), tok_json, info
