"""Preference pairs from a panel dataset (the lines tune/prefs.py reads):

    {"panel": {...}, "chosen": the book's paragraph (the example's target), "rejected": ...,
     "x-source": {...as in the panel line...}, "x-rejected": {"kind": ..., ...}}

The rejected paragraph is either
  - mismatch: the target of another example, from the same book when the dataset has another
    example of it (else from any), drawn by a generator keyed by (seed, line): fast, no model;
  - model:    a paragraph the model writes from the same panel (rendered as in training, within
    the context less max_tokens), sampled with a seed derived from (seed, line).
Lines whose rejected paragraph would be empty or equal to the chosen one are left out.

With classes=True the model-written paragraphs become C-RLFT lines instead: each panel gives
{"panel", "target": book paragraph, "class": "book"} and {"panel", "target": the model's, "class":
"model"}.

`write_lines` writes any such lines (and panel datasets) atomically.
"""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from ..progress import bar
from .dataset import PanelExample
from .render import render


def _book(ex: PanelExample) -> str:
    src = (ex.extra or {}).get("x-source")
    return str(src.get("book", "")) if isinstance(src, dict) else ""


def mismatch_partners(examples: list[PanelExample], seed: int = 0) -> list[int | None]:
    """For each example, the index of another example whose target is its rejected paragraph
    (None when every other target is the same text)."""
    books: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        books.setdefault(_book(ex), []).append(i)
    out = []
    for i, ex in enumerate(examples):
        rng = np.random.default_rng([seed, i])
        same = [j for j in books[_book(ex)] if examples[j].target != ex.target]
        pool = same or [j for j in range(len(examples)) if examples[j].target != ex.target]
        out.append(int(pool[rng.integers(len(pool))]) if pool else None)
    return out


def _line(ex: PanelExample, **fields) -> dict:
    out = {"panel": ex.panel.to_dict(), **fields}
    for k, v in (ex.extra or {}).items():     # the panel line's "x-..." keys (x-source) travel along
        out.setdefault(k, v)
    return out


def write_lines(path, lines) -> int:
    """JSON Lines to `path` (gzip when it ends in .gz, with no timestamp: the same data gives the
    same bytes), through a temporary file renamed into place; returns the number of lines."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    n = 0
    try:
        with open(tmp, "wb") as raw:
            f = gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") if path.suffix == ".gz" else raw
            for line in lines:
                f.write((json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8"))
                n += 1
            if f is not raw:
                f.close()
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return n


def mismatch_pairs(examples: list[PanelExample], seed: int = 0) -> Iterator[dict]:
    for i, (ex, j) in enumerate(zip(examples, mismatch_partners(examples, seed))):
        if j is not None:
            yield _line(ex, chosen=ex.target, rejected=examples[j].target,
                        **{"x-rejected": {"kind": "mismatch", "example": j + 1, "seed": seed}})


def paragraph_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, np.uint32)[0])


def write_paragraph(model, ex: PanelExample, seed: int, max_tokens: int = 200, **sampling) -> str:
    """A paragraph the model writes from the example's panel, on one line."""
    r = render(ex.panel, model.tokenizer, max(16, model.cfg.max_seq_len - max_tokens - 1))
    if not r.chat:
        sampling.setdefault("stop", ["\n\n"])    # a plain-text paragraph ends at a blank line
    return " ".join(model.generate(r.ids, max_tokens=max_tokens, seed=seed, **sampling).split())


def model_pairs(model, examples: list[PanelExample], seed: int = 0, max_tokens: int = 200, classes: bool = False,
                progress: bool = False, **sampling) -> Iterator[dict]:
    """Pairs (or, with classes, C-RLFT lines) whose rejected paragraph the model wrote."""
    pb = bar(total=len(examples), desc="writing paragraphs", unit="ex", disable=not progress)
    for i, ex in enumerate(examples):
        s = paragraph_seed(seed, i)
        text = write_paragraph(model, ex, s, max_tokens, **sampling)
        pb.update(1)
        if not text or text == ex.target:
            continue
        about = {"kind": "model", "model": model.path.name, "seed": s}
        if classes:
            yield _line(ex, target=ex.target, **{"class": "book"})
            yield _line(ex, target=text, **{"class": "model", "x-rejected": about})
        else:
            yield _line(ex, chosen=ex.target, rejected=text, **{"x-rejected": about})
    pb.close()
