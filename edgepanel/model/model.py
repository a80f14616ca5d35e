"""The Python API: load a model file, generate, score.

    m = edgepanel.load("smol.ep")
    for piece in m.generate("Once upon a time", max_tokens=64, stream=True): print(piece, end="")
    m.logits([1, 2, 3]); m.perplexity(text); m.tokenizer.encode("hi")
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import EdgepanelError, FormatError
from ..format import ModelFile, huge_pages
from ..sample import Sampling
from ..tokenizer import Tokenizer
from .generate import text_stream, token_stream
from .weights import load_weights


MAX_THREADS = 256   # the C thread pool's size (csrc/threads.c)


class ContextOverflow(EdgepanelError, ValueError):
    """The prompt does not fit the model's context."""


def _engine(weights, threads, name, kv_dtype=None):
    from . import engine
    return engine.make(weights, threads, name, kv_dtype)


def use_mmap(mmap: bool | None) -> bool:
    """Whether to map the model file (True) or read its streamed tensors into memory (False), for
    load's `mmap`: None takes EDGEPANEL_MMAP (1 or 0) when set, else reads into memory where the
    kernel offers transparent huge pages (faster decode: SafetensorsFile.read_into_memory) and
    maps the file elsewhere."""
    if mmap is not None:
        if not isinstance(mmap, bool):
            raise ValueError(f"mmap must be True, False or None, got {mmap!r}")
        return mmap
    env = os.environ.get("EDGEPANEL_MMAP", "").strip()
    if env:
        if env not in ("0", "1"):
            raise EdgepanelError(f"EDGEPANEL_MMAP must be 1 (map the model file) or 0 (read it into memory), got {env!r}")
        return env == "1"
    return not huge_pages()


def streamed_tensors(names) -> list[str]:
    """The tensors a decode step reads whole: all but an embedding table that is not also the
    head (a step reads one of its rows; mapped, the rows never looked up stay on disk)."""
    names = list(names)
    untied = any(n.startswith("head.") for n in names)
    return [n for n in names if not (untied and n.startswith("embed."))]


class Model:
    def __init__(self, path, threads: int | None = None, engine: str | None = None, kv_dtype: str | None = None,
                 mmap: bool | None = None):
        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool)
                                    or not 0 <= threads <= MAX_THREADS):
            raise ValueError(f"threads must be an integer in 0..{MAX_THREADS} (0 or None: all cores), got {threads!r}")
        self.path = Path(path)
        self.file = ModelFile(self.path)
        if not use_mmap(mmap):
            self.file.read_into_memory(streamed_tensors(self.file.tensors))
        self.weights = load_weights(self.file)
        self.cfg = self.weights.cfg
        self.meta = self.file.meta
        self.tokenizer = Tokenizer(self.file.tokenizer_json, self.meta.tokenizer, where=str(self.path))
        self.engine = _engine(self.weights, threads, engine, kv_dtype)

    def __repr__(self):
        c = self.cfg
        return (f"<edgepanel.Model {self.path.name}: {c.arch}, {c.n_layers} layers, dim {c.dim}, "
                f"vocab {c.vocab_size}, engine {self.engine.name}>")

    @property
    def threads(self):
        return self.engine.threads

    def _check_file(self):
        """The weights not read into memory (all of them with mmap=True, the embedding table
        otherwise) are views of the mapped file: a file truncated or rewritten in place since
        `load` would give SIGBUS or other outputs.  Checked (size and modification time of the
        mapped file, one fstat) at every call that runs the model; a file replaced by rename, as
        edgepanel writes, is no change: the mapping keeps the old one."""
        why = self.file.changed()
        if why is not None:
            raise FormatError(f"{self.path} changed while loaded ({why}); load it again")

    def parameters(self, kinds=None, layers=None) -> dict[str, np.ndarray]:
        """The continuous parameters (plane scales, norms, biases, embeddings' and head's scales)
        by kind ("scales", "norms", "biases", "embeddings", "head"; None: all) and layer range
        (e.g. range(20, 30); None: all layers and the model-level parameters), as float32 arrays
        the engine reads at every call: change them in place and the next call sees it.  Scales
        stored as float16 widen exactly: the outputs stay bit for bit the same until a parameter
        changes.  Scales stored as 8-bit codes become their float32 values, and from then on those
        products add each plane in float (as every float32-scaled matrix does) rather than each
        group's planes as exact integers: a change of rounding, which the int8 requantization of
        activations at every layer carries on (on the default model about 0.16 of a logit on
        average, the greedy choice at a few percent of positions), once; the results stay
        deterministic.  Load the file again for its integer arithmetic."""
        return self.weights.parameters(kinds, layers)

    def save(self, path, history: dict | None = None) -> Path:
        """Write a complete model file with the current parameters, atomically (`path` may be
        this model's own file: it stays mapped until the model is dropped).  Scales are stored as
        the file stored them (8-bit codes re-quantized as the converter does, float16 rounded);
        tensors that did not change are written bit for bit as they were.  `history`: a record
        of what changed them (e.g. a fine-tuning run's options), appended to the metadata."""
        from dataclasses import replace

        from ..format import ModelWriter
        w = self.weights
        changed: dict[str, np.ndarray] = {}
        for name, _, _, owner, attr in w.named_parameters():
            if attr != "planes":
                changed[name] = getattr(owner, attr)
                continue
            orig = w.stored_planes.get(name)
            pm = owner.planes
            if orig is None or np.array_equal(pm.scales, orig.float_scales()):
                continue          # never widened, or widened and unchanged: the stored codes stand
            base = name[:-len(".scales")]
            if orig.scales.dtype == np.float32:
                new = pm
            else:
                try:
                    new = pm.stored("u8" if orig.scale_rows is not None else "f16")
                except ValueError as exc:
                    raise EdgepanelError(f"{base}: cannot save its scales ({exc})") from None
            changed[name] = new.scales
            if new.scale_rows is not None:
                changed[base + ".scale_rows"] = new.scale_rows
            if new.planes is not pm.planes:   # negative scales stored as signs flipped
                changed[base + ".planes"] = new.planes
        meta = self.meta if history is None else replace(self.meta, history=self.meta.history + [history])
        path = Path(path)
        with ModelWriter(path) as out:
            for name, arr in self.file.tensors.items():
                out.add(name, changed.get(name, arr))
            out.close(meta, self.file.tokenizer_json)
        return path

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
        self._check_file()
        cache = self.engine.new_cache(len(ids))
        return self.engine.forward(ids, cache, all_logits=True)

    def token_logprobs(self, token_ids) -> np.ndarray:
        """log p(token_t | tokens before t) for t = 1..n-1, float64 (n-1,)."""
        ids = self._check_ids(token_ids)
        self._check_file()
        return self.engine.logprobs([ids])[0]

    def score(self, sequences, masks=None, batch_tokens: int = 2048) -> list[np.ndarray]:
        """Per-token log-probabilities log p(seq[t] | seq[:t]), t = 1..len-1, of several
        sequences, each from an empty context; they run together in batched forward passes of
        about `batch_tokens` tokens.  With masks (one bool array per sequence, True where a
        token counts), the positions outside the mask are dropped, and sequences whose tokens
        before their first counted position are the same (a prompt with several continuations:
        preference pairs, best-of-n candidates) run that prefix once (identical results)."""
        seqs = [self._check_ids(s) for s in sequences]
        if masks is not None:
            if len(masks) != len(seqs):
                raise ValueError(f"masks must have one entry per sequence ({len(seqs)}), got {len(masks)}")
            masks = [np.asarray(m, bool) for m in masks]
            for i, (m, s) in enumerate(zip(masks, seqs)):
                if m.shape != (len(s),):
                    raise ValueError(f"masks[{i}] must have one entry per token ({len(s)}), got {m.shape}")
        if masks is None:
            return self._batched(seqs, None, batch_tokens)
        out = self._shared(seqs, masks, batch_tokens)
        return [lp[m[1:]] for lp, m in zip(out, masks)]

    def score_at(self, sequences, ids, batch_tokens: int = 2048) -> list[np.ndarray]:
        """log p(ids[i][t-1, j] | seq_i[:t]) for t = 1..len-1: the log-probabilities of several
        candidate next tokens per position (e.g. a teacher's top-k), float32 (len-1, K) per
        sequence, computed in C like score (no logits leave the engine)."""
        seqs = [self._check_ids(s) for s in sequences]
        if len(ids) != len(seqs):
            raise ValueError(f"ids must have one entry per sequence ({len(seqs)}), got {len(ids)}")
        ids = [np.asarray(a) for a in ids]
        k = ids[0].shape[1] if ids and ids[0].ndim == 2 else None
        for i, (a, s) in enumerate(zip(ids, seqs)):
            if a.ndim != 2 or a.shape != (len(s) - 1, k) or not np.issubdtype(a.dtype, np.integer):
                raise ValueError(f"ids[{i}] must be integers of shape ({len(s) - 1}, K) with one K for all, got {a.shape}")
            if a.size and a.max() >= self.cfg.vocab_size:
                raise ValueError(f"ids[{i}] holds {a.max()}, outside the vocabulary of {self.cfg.vocab_size}")
        return self._batched(seqs, ids, batch_tokens)

    def _batched(self, seqs, targets, batch_tokens: int) -> list[np.ndarray]:
        """engine.logprobs over batches of about batch_tokens tokens, in order."""
        if batch_tokens < 1:
            raise ValueError("batch_tokens must be at least 1")
        self._check_file()
        out: list[np.ndarray] = []
        start = 0
        for i in range(1, len(seqs) + 1):
            if i == len(seqs) or sum(map(len, seqs[start:i + 1])) > batch_tokens:
                out.extend(self.engine.logprobs(seqs[start:i], None if targets is None else targets[start:i]))
                start = i
        return out

    def _shared(self, seqs, masks, batch_tokens: int) -> list[np.ndarray]:
        """_batched's log-probabilities (len-1 per sequence), with the prefix before the first
        counted position run once per group of sequences that share it; the positions of a
        shared prefix, which no mask counts, are left 0."""
        first = [int(np.argmax(m[1:])) if m[1:].any() else 0 for m in masks]  # output index = position
        groups: dict[bytes, list[int]] = {}
        for i, (q, f) in enumerate(zip(seqs, first)):
            if f > 0:
                groups.setdefault(q[:f].tobytes(), []).append(i)
        units = [g for g in groups.values() if len(g) > 1]
        if not units:
            return self._batched(seqs, None, batch_tokens)
        if batch_tokens < 1:
            raise ValueError("batch_tokens must be at least 1")
        self._check_file()
        shared = {i for g in units for i in g}
        units += [[i] for i in range(len(seqs)) if i not in shared]
        units.sort(key=lambda g: g[0])
        out: list[np.ndarray | None] = [None] * len(seqs)

        def run(batch):
            prefixes, owners, rests, members = [], [], [], []
            for g in batch:
                if len(g) > 1:
                    prefixes.append(seqs[g[0]][:first[g[0]]])
                for i in g:
                    f = first[i] if len(g) > 1 else 0
                    owners.append(len(prefixes) - 1 if len(g) > 1 else -1)
                    rests.append(seqs[i][f:])
                    members.append((i, f))
            lps = self.engine.logprobs(rests, None, prefixes or None, owners if prefixes else None)
            for (i, f), lp in zip(members, lps):
                full = np.zeros(len(seqs[i]) - 1, np.float64)
                full[f:] = lp
                out[i] = full

        batch, size = [], 0
        for g in units:
            cost = sum(len(seqs[i]) - (first[i] if len(g) > 1 else 0) for i in g)
            cost += first[g[0]] if len(g) > 1 else 0     # the prefix runs in the same call
            if batch and size + cost > batch_tokens:
                run(batch)
                batch, size = [], 0
            batch.append(g)
            size += cost
        if batch:
            run(batch)
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
            ids = self._checked(self.tokenizer.encode(prompt))
            if not ids:
                raise ValueError("the prompt is empty (and the tokenizer adds no beginning-of-text token): "
                                 "give at least one token")
            return ids
        if isinstance(prompt, (list, tuple, np.ndarray)):
            return [int(t) for t in self._check_ids(prompt, check_length=False)]
        raise TypeError("prompt must be a string, a list of chat messages, or a list of token ids")

    def _checked(self, ids: list[int]) -> list[int]:
        bad = [i for i in ids if not 0 <= i < self.cfg.vocab_size]
        if bad:
            raise EdgepanelError(f"the tokenizer produced id {bad[0]}, outside the model's vocabulary of "
                                 f"{self.cfg.vocab_size}: tokenizer and weights do not belong together")
        return ids

    def fit_prompt(self, ids, truncate: bool = False):
        """`ids` when they leave room for one new token in the context; else ContextOverflow, or
        with truncate=True their last tokens that do."""
        limit = self.cfg.max_seq_len - 1
        if len(ids) > limit:
            if not truncate:
                raise ContextOverflow(f"the prompt is {len(ids)} tokens; the context holds {self.cfg.max_seq_len} "
                                      "(pass truncate=True to keep its last tokens)")
            ids = ids[-limit:]
        return ids

    def generate(self, prompt, max_tokens: int | None = None, stream: bool = False, *, chat: bool | None = None,
                 truncate: bool = False, **sampling):
        """Continue `prompt` (text, chat messages, or token ids).  Sampling options (defaults in
        edgepanel.sample.Sampling): temperature, top_k, top_p, min_p, repetition_penalty, seed, stop.  stream=True yields text pieces as
        they come; otherwise returns the whole text.  A prompt longer than the context raises
        ContextOverflow, unless truncate=True keeps its last tokens."""
        params = _sampling(max_tokens, sampling)
        ids = self.fit_prompt(self.prompt_ids(prompt, chat), truncate)
        it = self._generate(ids, params)
        return it if stream else "".join(it)

    def generate_ids(self, prompt, max_tokens: int | None = None, **sampling) -> list[int]:
        """Like generate, but returns the new token ids (no tokenizer needed for id prompts)."""
        params = _sampling(max_tokens, sampling)
        if params.stop:
            raise ValueError("stop strings need text: use generate()")
        return list(self._token_stream(self.prompt_ids(prompt), params))

    def _token_stream(self, ids: list[int], params: Sampling) -> Iterator[int]:
        self._check_file()
        return token_stream(self.engine, self.cfg, ids, params, self.tokenizer.eos_ids)

    def _generate(self, ids: list[int], params: Sampling) -> Iterator[str]:
        return text_stream(self._token_stream(ids, params), self.tokenizer, params.stop)


def _sampling(max_tokens, options: dict) -> Sampling:
    """Sampling from generate's options; what is not given keeps Sampling's default."""
    return Sampling(**options) if max_tokens is None else Sampling(max_tokens=max_tokens, **options)


def load(path, threads: int | None = None, engine: str | None = None, kv_dtype: str | None = None,
         mmap: bool | None = None) -> Model:
    """Load an edgepanel model file.  `kv_dtype`: what the engine's key/value caches hold:
    "float16" (the default: half the memory and the bytes attention reads) or "float32".
    `mmap`: True maps the file (its pages shared with other processes and the page cache);
    False reads the tensors a decode step streams (all but an untied embedding table) into
    memory backed by 2 MiB pages where the kernel offers them (a decode step 1.07-1.20x faster
    than from 4 KiB pages); None (the default): EDGEPANEL_MMAP when set, else read into memory
    where transparent huge pages are on, mapped elsewhere."""
    return Model(path, threads=threads, engine=engine, kv_dtype=kv_dtype, mmap=mmap)
