"""Generation as two streams: token ids sampled from an engine until EOS, a token budget or a full
context, and the text of those tokens cut at stop strings (never giving out text that may still
turn into one)."""
from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

from ..sample import Sampler, Sampling
from ..tokenizer import StreamDecoder


def token_stream(engine, cfg, ids: list[int], params: Sampling, eos_ids: Iterable[int]) -> Iterator[int]:
    """Sampled token ids after the prompt `ids`, until EOS, max_tokens or a full context."""
    if params.max_tokens == 0:
        return
    eos = set(eos_ids)
    sampler = Sampler(params)
    capacity = min(cfg.max_seq_len, len(ids) + params.max_tokens)
    cache = engine.new_cache(capacity)
    history = list(ids)
    logits = engine.forward(np.asarray(ids, np.int32), cache)
    for step in range(params.max_tokens):
        tok = sampler(logits, history)
        if tok in eos:
            return
        history.append(tok)
        yield tok
        if step + 1 == params.max_tokens or len(history) >= capacity:
            return
        logits = engine.forward(np.asarray([tok], np.int32), cache)


def text_stream(tokens: Iterable[int], tokenizer, stop: list[str]) -> Iterator[str]:
    """The text of `tokens` in pieces, ending before the first stop string."""
    decoder = StreamDecoder(tokenizer)
    held = ""  # generated text not yet given out: it may still turn into a stop string
    for tok in tokens:
        held += decoder.push(tok)
        if not stop:
            if held:
                yield held
                held = ""
            continue
        cuts = [held.find(s) for s in stop if s in held]
        if cuts:
            if held[:min(cuts)]:
                yield held[:min(cuts)]
            return
        safe = len(held)  # keep back the longest tail that begins some stop string
        for s in stop:
            for j in range(min(len(s) - 1, len(held)), 0, -1):
                if held.endswith(s[:j]):
                    safe = min(safe, len(held) - j)
                    break
        if safe:
            yield held[:safe]
            held = held[safe:]
    if held:
        yield held
