"""Qwen2ForCausalLM: the llama table with biases on q, k and v."""
from .base import register
from .llama import LlamaLike


@register("Qwen2ForCausalLM")
class Qwen2(LlamaLike):
    arch = "qwen2"
    qkv_bias_default = True
