"""Running an exported decoder in ONNX Runtime: a session with the options the export assumes,
and prefill / decode through the KV-cache inputs and outputs (used by the tests and the tools).

    dec = OnnxDecoder("smol.onnx", threads=1)
    logits, cache = dec.forward([[1, 2, 3]])            # prefill: logits (1, 3, vocab)
    logits, cache = dec.forward([[4]], cache)           # one cached decode step
    dec.greedy([1, 2, 3], 64)                           # 64 greedy token ids
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def session_options(threads: int | None = None, fold_weights: bool = True):
    """ORT options: `threads` intra-op threads (None: ORT's default); `fold_weights`: dequantize
    the packed weights once at load (`session.disable_quant_qdq`; else every call)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.add_session_config_entry("session.disable_quant_qdq", "1" if fold_weights else "0")
    return so


class OnnxDecoder:
    def __init__(self, path, threads: int | None = None, fold_weights: bool = True):
        import onnxruntime as ort
        self.path = Path(path)
        self.info = json.loads(self.path.with_suffix(".json").read_text(encoding="utf-8"))
        self.session = ort.InferenceSession(str(self.path), session_options(threads, fold_weights),
                                            providers=["CPUExecutionProvider"])
        self.n_layers, self.n_kv, self.head_dim = self.info["num_layers"], self.info["num_kv_heads"], self.info["head_dim"]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def empty_cache(self, batch: int = 1) -> list[np.ndarray]:
        """Keys and values of no past tokens: [k0, v0, k1, v1, ...], each (batch, kv_heads, 0, hd)."""
        z = np.zeros((batch, self.n_kv, 0, self.head_dim), np.float32)
        return [z] * (2 * self.n_layers)

    def forward(self, ids, cache=None, attention_mask=None, position_ids=None):
        """ids (batch, seq) after the cached tokens -> (logits (batch, seq, vocab), new cache).
        Default mask: all ones; default positions: past .. past + seq - 1."""
        ids = np.asarray(ids, np.int64)
        cache = cache if cache is not None else self.empty_cache(ids.shape[0])
        past = cache[0].shape[2]
        if attention_mask is None:
            attention_mask = np.ones((ids.shape[0], past + ids.shape[1]), np.int64)
        if position_ids is None:
            position_ids = np.broadcast_to(np.arange(past, past + ids.shape[1], dtype=np.int64), ids.shape)
        feed = {"input_ids": ids, "attention_mask": np.asarray(attention_mask, np.int64),
                "position_ids": np.ascontiguousarray(position_ids, np.int64)}
        for i in range(self.n_layers):
            feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = cache[2 * i], cache[2 * i + 1]
        out = self.session.run(self.output_names, feed)
        return out[0], out[1:]

    def greedy(self, prompt, n: int) -> list[int]:
        """n greedy tokens after `prompt` (ids), one cached step each (no stop at EOS)."""
        logits, cache = self.forward([list(prompt)])
        out = []
        for _ in range(n):
            out.append(int(np.argmax(logits[0, -1])))
            if len(out) == n:
                break
            logits, cache = self.forward([[out[-1]]], cache)
        return out
