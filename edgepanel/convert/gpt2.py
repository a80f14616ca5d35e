"""GPT2LMHeadModel: layer norm, learned positions, gelu (tanh) MLP, biases, Conv1D weights
(stored input-major, so transposed here), q/k/v fused in c_attn."""
from __future__ import annotations

import numpy as np

from ..errors import FormatError
from ..model import names as N
from ..model.config import ModelConfig
from .base import Architecture, Emitted, SourceTensors, boolean, integer, number, register
from .llama import act_name


@register("GPT2LMHeadModel")
class GPT2(Architecture):
    def config(self, hf: dict) -> ModelConfig:
        dim = integer(hf, "n_embd", required=True)
        n_heads = integer(hf, "n_head", required=True)
        if boolean(hf, "scale_attn_by_inverse_layer_idx") or boolean(hf, "reorder_and_upcast_attn"):
            raise FormatError("config.json: GPT-2 variants with scale_attn_by_inverse_layer_idx or "
                              "reorder_and_upcast_attn are not supported")
        return ModelConfig(
            arch="gpt2", vocab_size=integer(hf, "vocab_size", required=True), dim=dim,
            n_layers=integer(hf, "n_layer", required=True), n_heads=n_heads, n_kv_heads=n_heads,
            head_dim=dim // n_heads, hidden_dim=integer(hf, "n_inner") or 4 * dim,
            max_seq_len=integer(hf, "n_positions", 1024), norm="layer",
            norm_eps=number(hf, "layer_norm_epsilon", 1e-5),
            act=act_name(hf.get("activation_function", "gelu_new")), gated_mlp=False, pos="learned",
            qkv_bias=True, o_bias=True, mlp_bias=True, tie_embeddings=True)

    def tensors(self, src: SourceTensors, cfg: ModelConfig, hf: dict):
        pre = "transformer." if "transformer.wte.weight" in src else ""
        src.ignore(pre + "h.*.attn.bias")         # causal-mask buffers in older checkpoints
        src.ignore(pre + "h.*.attn.masked_bias")
        src.ignore("lm_head.weight")              # tied to wte
        t = lambda n: src.take(pre + n)            # noqa: E731

        def emit(name, role, hf_name, bias_name=None, transpose=False):
            w = t(hf_name)
            w = np.ascontiguousarray(w.T) if transpose else w   # Conv1D: (in, out) -> (out, in)
            return Emitted(name, role, w, t(bias_name) if bias_name else None, source=pre + hf_name)

        yield emit("embed", "embed", "wte.weight")
        yield emit("pos_embed", "pos_embed", "wpe.weight")
        d = cfg.dim
        for i in range(cfg.n_layers):
            h = f"h.{i}."
            yield emit(N.layer(i, "attn_norm"), "norm", h + "ln_1.weight", h + "ln_1.bias")
            w = t(h + "attn.c_attn.weight")       # Conv1D: (in, 3d)
            b = t(h + "attn.c_attn.bias")
            if w.shape != (d, 3 * d) or b.shape != (3 * d,):
                raise FormatError(f"{src.where}: tensor '{pre}{h}attn.c_attn.weight' has shape {w.shape} (bias {b.shape}); "
                                  f"the config (n_embd {d}) makes it {(d, 3 * d)} (bias {(3 * d,)})")
            for j, ours in enumerate(("wq", "wk", "wv")):
                yield Emitted(N.layer(i, ours), "linear", np.ascontiguousarray(w.T[j * d:(j + 1) * d]),
                              b[j * d:(j + 1) * d].copy(), source=f"{pre}{h}attn.c_attn.weight")
            yield emit(N.layer(i, "wo"), "linear", h + "attn.c_proj.weight", h + "attn.c_proj.bias", transpose=True)
            yield emit(N.layer(i, "mlp_norm"), "norm", h + "ln_2.weight", h + "ln_2.bias")
            yield emit(N.layer(i, "w_up"), "linear", h + "mlp.c_fc.weight", h + "mlp.c_fc.bias", transpose=True)
            yield emit(N.layer(i, "w_down"), "linear", h + "mlp.c_proj.weight", h + "mlp.c_proj.bias", transpose=True)
        yield emit("final_norm", "norm", "ln_f.weight", "ln_f.bias")
