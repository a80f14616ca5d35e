"""Generation as two streams: token ids sampled from an engine until EOS, a token budget or a full
context, and the text of those tokens cut at stop strings (never giving out text that may still
turn into one).

The state of one sequence between forward passes (`Decoding`, `StopCutter`) stands apart from the
loop that drives it, so a server can advance several sequences through one batched forward per
step (`SlotCache`, `forward_slots`) and give each exactly the tokens `token_stream` gives alone."""
from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

from ..sample import Sampler, Sampling
from ..tokenizer import StreamDecoder


class Decoding:
    """One sequence being sampled: its sampler, the tokens so far, and why it ended.

    step(logits) takes the logits of the last position and returns the next token, or None when
    the model chose an end-of-sequence token; finish_reason is then "stop", or "length" once
    max_tokens tokens were made or the context (`capacity` positions) is full."""

    def __init__(self, ids: list[int], params: Sampling, eos_ids: Iterable[int], max_seq_len: int,
                 logit_bias: dict[int, float] | None = None, vocab_size: int | None = None):
        self.sampler = Sampler(params)
        self.history = list(ids)
        self.eos = set(eos_ids)
        self.max_tokens = params.max_tokens
        self.capacity = min(max_seq_len, len(ids) + params.max_tokens)  # positions the cache needs
        self.generated = 0
        self.finish_reason: str | None = "length" if params.max_tokens == 0 else None
        self.bias = None    # (vocab,) float32 added to the logits before sampling
        if logit_bias:
            self.bias = np.zeros(vocab_size, np.float32)
            for tok, b in logit_bias.items():
                self.bias[tok] = b

    def step(self, logits: np.ndarray) -> int | None:
        if self.bias is not None:
            logits = logits + self.bias
        tok = self.sampler(logits, self.history)
        if tok in self.eos:
            self.finish_reason = "stop"
            return None
        self.history.append(tok)
        self.generated += 1
        if self.generated == self.max_tokens or len(self.history) >= self.capacity:
            self.finish_reason = "length"
        return tok


def token_stream(engine, cfg, ids: list[int], params: Sampling, eos_ids: Iterable[int]) -> Iterator[int]:
    """Sampled token ids after the prompt `ids`, until EOS, max_tokens or a full context."""
    seq = Decoding(ids, params, eos_ids, cfg.max_seq_len)
    if seq.finish_reason:
        return
    cache = engine.new_cache(seq.capacity)
    logits = engine.forward(np.asarray(ids, np.int32), cache)
    while True:
        tok = seq.step(logits)
        if tok is None:
            return
        yield tok
        if seq.finish_reason:
            return
        logits = engine.forward(np.asarray([tok], np.int32), cache)


class StopCutter:
    """The text of tokens pushed one at a time, ending before the first stop string.

    push(token) returns the text that is now certain (it cannot become part of a stop string);
    `stopped` turns True when a stop string appeared (the text before it was returned);
    flush() returns what was held back once no token follows."""

    def __init__(self, tokenizer, stop: list[str]):
        self.decoder = StreamDecoder(tokenizer)
        self.stop = list(stop)
        self.held = ""  # generated text not yet given out: it may still turn into a stop string
        self.stopped = False

    def push(self, tok: int) -> str:
        if self.stopped:
            return ""
        self.held += self.decoder.push(tok)
        if not self.stop:
            out, self.held = self.held, ""
            return out
        cuts = [self.held.find(s) for s in self.stop if s in self.held]
        if cuts:
            self.stopped = True
            out, self.held = self.held[:min(cuts)], ""
            return out
        safe = len(self.held)  # keep back the longest tail that begins some stop string
        for s in self.stop:
            for j in range(min(len(s) - 1, len(self.held)), 0, -1):
                if self.held.endswith(s[:j]):
                    safe = min(safe, len(self.held) - j)
                    break
        out, self.held = self.held[:safe], self.held[safe:]
        return out

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


def text_stream(tokens: Iterable[int], tokenizer, stop: list[str]) -> Iterator[str]:
    """The text of `tokens` in pieces, ending before the first stop string."""
    cutter = StopCutter(tokenizer, stop)
    for tok in tokens:
        piece = cutter.push(tok)
        if piece:
            yield piece
        if cutter.stopped:
            return
    tail = cutter.flush()
    if tail:
        yield tail


class SlotCache:
    """The KV caches of up to `slots` sequences in one array, as the C engine's batched forward
    reads them: k, v (slots, n_layers, capacity, n_kv_heads, head_dim) of `dtype` (the engine's
    kv_dtype: "float16" or "float32"; None: the engines' default), sequence s at
    offset s * n_layers * capacity * kv_dim.  A batched call runs sequences 0..m-1, so live
    sequences occupy the first slots (move() closes a gap).  The array starts empty and grows
    (reserve(), at least doubling, up to max_capacity) to the longest sequence admitted: memory
    follows the requests served, not the model's context."""

    def __init__(self, cfg, slots: int, max_capacity: int, dtype: str | None = None):
        from .reference import kv_dtype
        self.shape = (slots, cfg.n_layers, 0, cfg.n_kv_heads, cfg.head_dim)
        self.max_capacity = max_capacity
        self.dtype = kv_dtype(dtype)
        self.k = np.empty(self.shape, self.dtype)
        self.v = np.empty(self.shape, self.dtype)
        self.lengths = np.zeros(slots, np.int64)   # positions filled per slot

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def reserve(self, capacity: int):
        """Room for `capacity` positions in every slot (the filled ones copied over when it grows)."""
        if capacity > self.max_capacity:
            raise ValueError(f"{capacity} positions exceed the cache's limit of {self.max_capacity}")
        if capacity <= self.capacity:
            return
        new = min(max(capacity, 2 * self.capacity), self.max_capacity)
        shape = self.shape[:2] + (new,) + self.shape[3:]
        k, v = np.empty(shape, self.dtype), np.empty(shape, self.dtype)
        for s, n in enumerate(self.lengths):
            k[s, :, :n], v[s, :, :n] = self.k[s, :, :n], self.v[s, :, :n]
        self.k, self.v = k, v

    def move(self, src: int, dst: int):
        """Slot src's sequence now lives in slot dst (src becomes free)."""
        n = int(self.lengths[src])
        self.k[dst, :, :n] = self.k[src, :, :n]
        self.v[dst, :, :n] = self.v[src, :, :n]
        self.lengths[dst], self.lengths[src] = n, 0


class _SlotView:
    """Slot s of a SlotCache as the one-sequence cache engine.forward takes."""

    def __init__(self, cache: SlotCache, s: int):
        self.k, self.v, self.length, self.capacity = cache.k[s], cache.v[s], int(cache.lengths[s]), cache.capacity


def forward_slots(engine, cache: SlotCache, tokens: list[np.ndarray]) -> np.ndarray:
    """Logits (len(tokens), vocab) float32 of the last position of sequences 0..len(tokens)-1 of
    `cache`, sequence s continued by tokens[s] (a prompt, or the one token sampled last).  On the
    C engine one batched forward runs them all (each gets what engine.forward gives it alone);
    on other engines one forward each."""
    m = len(tokens)
    seqs = [np.ascontiguousarray(t, np.int32) for t in tokens]
    lens = np.array([len(t) for t in seqs], np.int64)
    pos = cache.lengths[:m].copy()
    if m > cache.lengths.size or lens.min() < 1 or (pos + lens).max() > cache.capacity:
        raise ValueError(f"{m} sequences of {lens.tolist()} tokens at positions {pos.tolist()} do not fit "
                         f"{cache.lengths.size} slots of {cache.capacity}")
    if getattr(engine, "name", None) != "c":
        out = []
        for s, t in enumerate(seqs):
            view = _SlotView(cache, s)
            out.append(engine.forward(t, view))
            cache.lengths[s] = view.length
        return np.stack(out)
    from ..kernels import native
    flat = np.concatenate(seqs)
    out = np.empty((m, engine.w.cfg.vocab_size), np.float32)
    built = engine._structs()          # held for the length of the call (see CEngine._structs)
    work, nbytes = engine._workspace(built[0], len(flat))
    p = lambda t, a: engine.ffi.cast(t, a.ctypes.data)  # noqa: E731
    rc = engine.lib.ep_forward_batch(engine.kt, built[0], p("void *", cache.k), p("void *", cache.v),
                                     engine._kv_type(cache.k, cache.v), cache.capacity, p("int32_t *", flat), len(flat), p("int64_t *", lens),
                                     p("int64_t *", pos), m, engine.lib.EP_OUT_LAST, engine.ffi.NULL, 0,
                                     p("float *", out), work, nbytes, engine.threads)
    if rc != 0:
        raise ValueError(f"batched forward pass failed in C ({native.error_name(rc)})")
    cache.lengths[:m] += lens
    return out
