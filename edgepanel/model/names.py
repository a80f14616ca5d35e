"""edgepanel's tensor names: the one table every converter writes to and the engine reads.

Per model:  embed, pos_embed (learned positions), final_norm, head (absent when tied), rope.inv_freq
Per layer i (prefix "layers.{i}."):
    attn_norm, wq, wk, wv, wo, attn_sub_norm, mlp_norm, w_gate, w_up, w_down, mlp_sub_norm
A linear layer NAME is stored as NAME.planes + NAME.scales (binarized) or NAME.weight (dense),
with NAME.bias when it has one; a norm as NAME.weight (+ NAME.bias for layer norm); embeddings
and head as NAME.q + NAME.row_scale (int8 rows) or NAME.weight (dense).
"""
ATTN_LINEARS = ("wq", "wk", "wv", "wo")
MLP_LINEARS = ("w_gate", "w_up", "w_down")
LINEARS = ATTN_LINEARS + MLP_LINEARS
NORMS = ("attn_norm", "attn_sub_norm", "mlp_norm", "mlp_sub_norm")


def layer(i: int, part: str) -> str:
    return f"layers.{i}.{part}"
