"""The Python API: load a model file, generate, score.

    m = edgepanel.load("smol.ep")
    for piece in m.generate("Once upon a time", max_tokens=64, stream=True): print(piece, end="")
    m.logits([1, 2, 3]); m.perplexity(text); m.tokenizer.encode("hi")
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import EdgepanelError
from ..format import ModelFile
from ..sample import Sampler, Sampling
from ..tokenizer import StreamDecoder, Tokenizer
from .weights import load_weights


class ContextOverflow(EdgepanelError, ValueError):
    """The prompt does not fit the model's context."""


def _engine(weights, threads, name):
    from . import engine
    return engine.make(weights, threads, name)


class Model:
    def __init__(self, path, threads: int | None = None, engine: str | None = None):
        self.path = Path(path)
        self.file = ModelFile(self.path)
        self.weights = load_weights(self.file)
        self.cfg = self.weights.cfg
        self.meta = self.file.meta
        self.tokenizer = Tokenizer(self.file.tokenizer_json, self.meta.tokenizer, where=str(self.path))
        self.engine = _engine(self.weights, threads, engine)

    def __repr__(self):
        c = self.cfg
        return (f"<edgepanel.Model {self.path.name}: {c.arch}, {c.n_layers} layers, dim {c.dim}, "
                f"vocab {c.vocab_size}, engine {self.engine.name}>")

    @property
    def threads(self):
        return self.engine.threads

    def trainable_parameters(self) -> dict[str, np.ndarray]:
        """The continuous parameters (plane scales, norms, biases) as float32 arrays that the
        engine reads at every call: change them in place and the next forward pass sees it."""
        params = self.weights.continuous()
        self.engine = _engine(self.weights, self.engine.threads, self.engine.name)
        return params

    # -- scoring ----------------------------------------------------------------------------
    def _check_ids(self, ids, check_length: bool = True) -> np.ndarray:
        arr = np.asarray(ids)
        if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError("token ids must be a non-empty 1-D sequence of integers")
        if arr.min() < 0 or arr.max() >= self.cfg.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.cfg.vocab_size}), got {arr.min()}..{arr.max()}")
        if check_length and arr.size > self.cfg.max_seq_len:
            raise ContextOverflow(f"{arr.size} tokens do not fit the context of {self.cfg.max_seq_len}")
        return arr.astype(np.int32)

    def logits(self, token_ids) -> np.ndarray:
        """Logits (n, vocab) float32 for every position of `token_ids`, from an empty context."""
        ids = self._check_ids(token_ids)
        cache = self.engine.new_cache(len(ids))
        return self.engine.forward(ids, cache, all_logits=True)

    def token_logprobs(self, token_ids) -> np.ndarray:
        """log p(token_t | tokens before t) for t = 1..n-1, float64 (n-1,)."""
        return self.engine.logprobs([self._check_ids(token_ids)])[0]

    def score(self, sequences, masks=None, batch_tokens: int = 2048) -> list[np.ndarray]:
        """Per-token log-probabilities log p(seq[t] | seq[:t]), t = 1..len-1, of several
        sequences, each from an empty context; they run together in batched forward passes of
        about `batch_tokens` tokens.  With masks (one bool array per sequence, True where a
        token counts), the positions outside the mask are dropped."""
        seqs = [self._check_ids(s) for s in sequences]
        if masks is not None:
            if len(masks) != len(seqs):
                raise ValueError(f"masks must have one entry per sequence ({len(seqs)}), got {len(masks)}")
            masks = [np.asarray(m, bool) for m in masks]
            for i, (m, s) in enumerate(zip(masks, seqs)):
                if m.shape != (len(s),):
                    raise ValueError(f"masks[{i}] must have one entry per token ({len(s)}), got {m.shape}")
        if batch_tokens < 1:
            raise ValueError("batch_tokens must be at least 1")
        out: list[np.ndarray] = []
        batch: list[np.ndarray] = []
        for s in seqs + [None]:
            if batch and (s is None or sum(map(len, batch)) + len(s) > batch_tokens):
                out.extend(self.engine.logprobs(batch))
                batch = []
            if s is not None:
                batch.append(s)
        if masks is not None:
            out = [lp[m[1:]] for lp, m in zip(out, masks)]
        return out

    def perplexity(self, text: str, window: int | None = None) -> float:
        """exp(mean negative log-likelihood) of `text`, scored in consecutive windows of `window`
        tokens (default: the context, at most 1024); each window's first token is context only."""
        ids = self.tokenizer.encode(text)
        window = min(window or 1024, self.cfg.max_seq_len)
        if window < 2:
            raise ValueError("window must be at least 2 tokens")
        nll, count = 0.0, 0
        for s in range(0, max(len(ids) - 1, 1), window - 1):
            chunk = ids[s:s + window]
            if len(chunk) < 2:
                break
            lp = self.token_logprobs(chunk)
            nll -= float(lp.sum())
            count += len(lp)
        if not count:
            raise ValueError("text is too short to score (needs at least 2 tokens)")
        return math.exp(nll / count)

    # -- generation -------------------------------------------------------------------------
    def prompt_ids(self, prompt, chat: bool | None = None) -> list[int]:
        """Token ids for a prompt: text, chat messages, or ids."""
        if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict):
            text = self.tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True)
            return self._checked(self.tokenizer.encode(text, add_special_tokens=False))
        if isinstance(prompt, str):
            if chat:
                return self.prompt_ids([{"role": "user", "content": prompt}])
            return self._checked(self.tokenizer.encode(prompt))
        if isinstance(prompt, (list, tuple, np.ndarray)):
            return [int(t) for t in self._check_ids(prompt, check_length=False)]
        raise TypeError("prompt must be a string, a list of chat messages, or a list of token ids")

    def _checked(self, ids: list[int]) -> list[int]:
        bad = [i for i in ids if not 0 <= i < self.cfg.vocab_size]
        if bad:
            raise EdgepanelError(f"the tokenizer produced id {bad[0]}, outside the model's vocabulary of "
                                 f"{self.cfg.vocab_size}: tokenizer and weights do not belong together")
        return ids

    def generate(self, prompt, max_tokens: int = 256, stream: bool = False, *, chat: bool | None = None,
                 truncate: bool = False, **sampling):
        """Continue `prompt` (text, chat messages, or token ids).  Sampling options: temperature,
        top_k, top_p, min_p, repetition_penalty, seed, stop.  stream=True yields text pieces as
        they come; otherwise returns the whole text.  A prompt longer than the context raises
        ContextOverflow, unless truncate=True keeps its last tokens."""
        params = Sampling(max_tokens=max_tokens, **sampling)
        ids = self.prompt_ids(prompt, chat)
        limit = self.cfg.max_seq_len - 1
        if len(ids) > limit:
            if not truncate:
                raise ContextOverflow(f"the prompt is {len(ids)} tokens; the context holds {self.cfg.max_seq_len} "
                                      "(pass truncate=True to keep its last tokens)")
            ids = ids[-limit:]
        it = self._generate(ids, params)
        return it if stream else "".join(it)

    def generate_ids(self, prompt, max_tokens: int = 256, **sampling) -> list[int]:
        """Like generate, but returns the new token ids (no tokenizer needed for id prompts)."""
        params = Sampling(max_tokens=max_tokens, **sampling)
        if params.stop:
            raise ValueError("stop strings need text: use generate()")
        return list(self._token_stream(self.prompt_ids(prompt), params))

    def _token_stream(self, ids: list[int], params: Sampling) -> Iterator[int]:
        """Sampled token ids until EOS, max_tokens or a full context."""
        if params.max_tokens == 0:
            return
        eos = set(self.tokenizer.eos_ids)
        sampler = Sampler(params)
        capacity = min(self.cfg.max_seq_len, len(ids) + params.max_tokens)
        cache = self.engine.new_cache(capacity)
        history = list(ids)
        logits = self.engine.forward(np.asarray(ids, np.int32), cache)
        for step in range(params.max_tokens):
            tok = sampler(logits, history)
            if tok in eos:
                return
            history.append(tok)
            yield tok
            if step + 1 == params.max_tokens or len(history) >= capacity:
                return
            logits = self.engine.forward(np.asarray([tok], np.int32), cache)

    def _generate(self, ids: list[int], params: Sampling) -> Iterator[str]:
        decoder = StreamDecoder(self.tokenizer)
        held = ""  # generated text not yet given out: it may still turn into a stop string
        for tok in self._token_stream(ids, params):
            held += decoder.push(tok)
            if not params.stop:
                if held:
                    yield held
                    held = ""
                continue
            cuts = [held.find(s) for s in params.stop if s in held]
            if cuts:
                if held[:min(cuts)]:
                    yield held[:min(cuts)]
                return
            safe = len(held)  # keep back the longest tail that begins some stop string
            for s in params.stop:
                for j in range(min(len(s) - 1, len(held)), 0, -1):
                    if held.endswith(s[:j]):
                        safe = min(safe, len(held) - j)
                        break
            if safe:
                yield held[:safe]
                held = held[safe:]
        if held:
            yield held


def load(path, threads: int | None = None, engine: str | None = None) -> Model:
    """Load an edgepanel model file (memory-mapped)."""
    return Model(path, threads=threads, engine=engine)
