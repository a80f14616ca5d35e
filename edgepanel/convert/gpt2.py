"""GPT2LMHeadModel: layer norm, learned positions, gelu (tanh) MLP, biases, Conv1D weights
(stored input-major, so transposed here), q/k/v fused in c_attn."""
from __future__ import annotations

import numpy as np

from ..model import names as N
from ..model.config import ModelConfig
from .base import Architecture, Emitted, SourceTensors, get, register
from .llama import act_name


@register("GPT2LMHeadModel")
class GPT2(Architecture):
    def config(self, hf: dict) -> ModelConfig:
        dim = get(hf, "n_embd", required=True)
        n_heads = get(hf, "n_head", required=True)
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
            from ..errors import FormatError
            raise FormatError("config.json: GPT-2 variants with scale_attn_by_inverse_layer_idx or "
                              "reorder_and_upcast_attn are not supported")
        return ModelConfig(
            arch="gpt2", vocab_size=get(hf, "vocab_size", required=True), dim=dim,
            n_layers=get(hf, "n_layer", required=True), n_heads=n_heads, n_kv_heads=n_heads,
            head_dim=dim // n_heads, hidden_dim=hf.get("n_inner") or 4 * dim,
            max_seq_len=get(hf, "n_positions", 1024), norm="layer",
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
            act=act_name(hf.get("activation_function", "gelu_new")), gated_mlp=False, pos="learned",
            qkv_bias=True, o_bias=True, mlp_bias=True, tie_embeddings=True)

    def tensors(self, src: SourceTensors, cfg: ModelConfig, hf: dict):
        pre = "transformer." if "transformer.wte.weight" in src else ""
        src.ignore(pre + "h.*.attn.bias")         # causal-mask buffers in older checkpoints
        src.ignore(pre + "h.*.attn.masked_bias")
        src.ignore("lm_head.weight")              # tied to wte
        t = lambda n: src.take(pre + n)            # noqa: E731
        yield Emitted("embed", "embed", t("wte.weight"))
        yield Emitted("pos_embed", "pos_embed", t("wpe.weight"))
        d = cfg.dim
        for i in range(cfg.n_layers):
            h = f"h.{i}."
            yield Emitted(N.layer(i, "attn_norm"), "norm", t(h + "ln_1.weight"), t(h + "ln_1.bias"))
            w = t(h + "attn.c_attn.weight").T     # Conv1D: (in, 3d) -> (3d, in)
            b = t(h + "attn.c_attn.bias")
            for j, ours in enumerate(("wq", "wk", "wv")):
                yield Emitted(N.layer(i, ours), "linear", np.ascontiguousarray(w[j * d:(j + 1) * d]), b[j * d:(j + 1) * d].copy())
            yield Emitted(N.layer(i, "wo"), "linear", np.ascontiguousarray(t(h + "attn.c_proj.weight").T), t(h + "attn.c_proj.bias"))
            yield Emitted(N.layer(i, "mlp_norm"), "norm", t(h + "ln_2.weight"), t(h + "ln_2.bias"))
            yield Emitted(N.layer(i, "w_up"), "linear", np.ascontiguousarray(t(h + "mlp.c_fc.weight").T), t(h + "mlp.c_fc.bias"))
            yield Emitted(N.layer(i, "w_down"), "linear", np.ascontiguousarray(t(h + "mlp.c_proj.weight").T), t(h + "mlp.c_proj.bias"))
        yield Emitted("final_norm", "norm", t("ln_f.weight"), t("ln_f.bias"))
