"""LlamaForCausalLM (SmolLM2, TinyLlama, Llama 2/3 with rope scaling) and MistralForCausalLM."""
from __future__ import annotations

from ..errors import FormatError
from ..model import names as N
from ..model.config import ModelConfig
from .base import Architecture, Emitted, SourceTensors, boolean, integer, number, register

ACTS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
        "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "relu2": "relu2", "relu": "relu"}


def act_name(hf_act: str) -> str:
    if not isinstance(hf_act, str) or hf_act not in ACTS:
        raise FormatError(f"config.json: activation {hf_act!r} is not supported ({', '.join(sorted(ACTS))})")
    return ACTS[hf_act]


def rope_params(hf: dict) -> tuple[float, dict | None]:
    """(theta, scaling) from either the transformers-5 `rope_parameters` or the older keys."""
    rp = hf.get("rope_parameters")
    theta = number(hf, "rope_theta", 10000.0)
    if rp is not None:
        if not isinstance(rp, dict):
            raise FormatError(f"config.json: 'rope_parameters' must be an object, got {type(rp).__name__}")
        kind = rp.get("rope_type", rp.get("type", "default"))
        return number(rp, "rope_theta", theta, where="config.json: rope_parameters"), (None if kind in (None, "default") else dict(rp))
    return theta, hf.get("rope_scaling") or None   # ModelConfig checks the scaling


class LlamaLike(Architecture):
    """The llama family's table; subclasses switch biases and extra norms on."""

    arch = "llama"
    qkv_bias_default = False
    sub_norms = False

    def config(self, hf: dict) -> ModelConfig:
        dim = integer(hf, "hidden_size", required=True)
        n_heads = integer(hf, "num_attention_heads", required=True)
        n_kv = integer(hf, "num_key_value_heads", n_heads)
        max_seq = integer(hf, "max_position_embeddings", 2048)
        window = integer(hf, "sliding_window")
        if window and boolean(hf, "use_sliding_window", True) and window < max_seq:
            max_seq = window  # within the window, sliding-window attention is plain attention
        theta, scaling = rope_params(hf)
        attn_bias = boolean(hf, "attention_bias")
        return ModelConfig(
            arch=self.arch, vocab_size=integer(hf, "vocab_size", required=True), dim=dim,
            n_layers=integer(hf, "num_hidden_layers", required=True), n_heads=n_heads, n_kv_heads=n_kv,
            head_dim=integer(hf, "head_dim") or dim // n_heads,
            hidden_dim=integer(hf, "intermediate_size", required=True), max_seq_len=max_seq,
            norm="rms", norm_eps=number(hf, "rms_norm_eps", 1e-6),
            act=act_name(hf.get("hidden_act", "silu")), gated_mlp=True, pos="rope",
            rope_theta=theta, rope_scaling=scaling,
            qkv_bias=attn_bias or self.qkv_bias_default, o_bias=attn_bias,
            mlp_bias=boolean(hf, "mlp_bias"), sub_norms=self.sub_norms,
            tie_embeddings=boolean(hf, "tie_word_embeddings"))

    def linear(self, src: SourceTensors, hf_name: str, name: str, bias: bool) -> Emitted:
        w = src.take(hf_name + ".weight")
        b = src.take(hf_name + ".bias") if bias else None
        return Emitted(name, "linear", w, b, source=hf_name + ".weight")

    def tensors(self, src: SourceTensors, cfg: ModelConfig, hf: dict):
        src.ignore("model.layers.*.self_attn.rotary_emb.inv_freq")  # a cached buffer in old checkpoints

        def emit(name, role, hf_name):
            return Emitted(name, role, src.take(hf_name), source=hf_name)

        yield emit("embed", "embed", "model.embed_tokens.weight")
        for i in range(cfg.n_layers):
            p = f"model.layers.{i}."
            yield emit(N.layer(i, "attn_norm"), "norm", p + "input_layernorm.weight")
            for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj")):
                yield self.linear(src, p + "self_attn." + theirs, N.layer(i, ours), cfg.qkv_bias)
            if cfg.sub_norms:
                yield emit(N.layer(i, "attn_sub_norm"), "norm", p + "self_attn.attn_sub_norm.weight")
            yield self.linear(src, p + "self_attn.o_proj", N.layer(i, "wo"), cfg.o_bias)
            yield emit(N.layer(i, "mlp_norm"), "norm", p + "post_attention_layernorm.weight")
            yield self.linear(src, p + "mlp.gate_proj", N.layer(i, "w_gate"), cfg.mlp_bias)
            yield self.linear(src, p + "mlp.up_proj", N.layer(i, "w_up"), cfg.mlp_bias)
            if cfg.sub_norms:
                yield emit(N.layer(i, "mlp_sub_norm"), "norm", p + "mlp.ffn_sub_norm.weight")
            yield self.linear(src, p + "mlp.down_proj", N.layer(i, "w_down"), cfg.mlp_bias)
        yield emit("final_norm", "norm", "model.norm.weight")
        if cfg.tie_embeddings:
            src.ignore("lm_head.weight")  # tied: a copy of the embeddings, when saved at all
        else:
            yield emit("head", "head", "lm_head.weight")


@register("LlamaForCausalLM", "MistralForCausalLM")
class Llama(LlamaLike):
    arch = "llama"
