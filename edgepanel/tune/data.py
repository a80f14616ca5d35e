"""Training examples: token ids and a loss mask (True where a token is a target).

    a UTF-8 text file      windows of seq_len tokens; every token after the first is a target
    a JSONL file           one object a line: {"text": ...} (every token a target),
    (.jsonl.gz too)        {"prompt": ..., "target": ...} (only the target's tokens count: the
                           prompt is conditioning), or {"panel": {...}, "target": ...} (a panel,
                           rendered as edgepanel.panels does, is the prompt; `condition` "none"
                           gives the bare instruction instead: the same targets without panels)

A line that does not parse or has the wrong fields is an error naming the file and the line.
Preference pairs and C-RLFT lines ({"chosen", "rejected"}, {"target", "class"}) are read by
tune/prefs.py into `Pair`s and class-carrying `Example`s.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import EdgepanelError


class DataError(EdgepanelError, ValueError):
    """A training or evaluation file is malformed."""


@dataclass
class Example:
    ids: np.ndarray       # (n,) int32
    mask: np.ndarray      # (n,) bool: True where the token is a target (its prediction counts)
    teacher: tuple | None = None   # kd: (top_ids (n-1, K), top_logp (n-1, K), rest_logp (n-1,)), tune/teacher.py
    cls: str | None = None         # crlft: the source class rendered into the prompt ("book", "model")

    @property
    def targets(self) -> int:
        return int(self.mask[1:].sum())


@dataclass
class Pair:
    """A preference pair: one prompt, two continuations (tune/prefs.py builds them).  Both
    Examples hold the same prompt tokens; their masks cover the continuation only."""
    chosen: Example
    rejected: Example
    ref: tuple[float, float] | None = None   # log pi_ref(chosen | x), log pi_ref(rejected | x): cached
    where: str = ""                          # "FILE:LINE"

    @property
    def targets(self) -> int:
        """Means over pairs count each pair once (held-out losses weight batches by this)."""
        return 1


def from_text(tokenizer, text: str, seq_len: int) -> list[Example]:
    ids = np.asarray(tokenizer.encode(text), np.int32)
    out = []
    for s in range(0, len(ids) - 1, seq_len):
        w = ids[s:s + seq_len]
        if len(w) >= 2:
            m = np.ones(len(w), bool)
            m[0] = False
            out.append(Example(w, m))
    return out


def from_pair(tokenizer, prompt: str, target: str, seq_len: int) -> Example:
    """The prompt's tokens then the target's; the loss counts the target's only.  Too long: the
    prompt loses its beginning first, then the target its end."""
    p = tokenizer.encode(prompt) if prompt else tokenizer.encode("")[:1]
    t = tokenizer.encode(target, add_special_tokens=False)
    t = t[:seq_len - 1]
    p = p[max(0, len(p) - (seq_len - len(t))):] if len(p) + len(t) > seq_len else p
    ids = np.asarray(list(p) + list(t), np.int32)
    mask = np.zeros(len(ids), bool)
    mask[len(p):] = True
    return Example(ids, mask)


def load(path, tokenizer, seq_len: int = 256, condition: str = "full") -> list[Example]:
    """Examples from a text or JSONL file (by content: a file whose every non-empty line is a JSON
    object is JSONL)."""
    from ..panels.dataset import read_text
    path = Path(path)
    if seq_len < 2:
        raise DataError(f"seq_len must be at least 2, got {seq_len}")
    try:
        text = read_text(path)
    except EdgepanelError as exc:
        raise DataError(str(exc)) from None
    if path.suffix in (".jsonl", ".gz") or (text.lstrip().startswith("{") and path.suffix != ".txt"):
        out = []
        for no, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise DataError(f"{path}:{no}: not a JSON object ({exc})") from None
            out.append(_example(obj, tokenizer, seq_len, f"{path}:{no}", condition))
    else:
        out = from_text(tokenizer, text, seq_len)
    if not out:
        raise DataError(f"{path}: no examples (a text needs at least 2 tokens)")
    return out


def _example(obj, tokenizer, seq_len: int, where: str, condition: str = "full") -> Example:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    keys = set(obj)
    if "chosen" in keys or "rejected" in keys:
        raise DataError(f"{where}: a preference pair: train it with --objective dpo or ipo (tune/prefs.py)")
    if "class" in keys:
        raise DataError(f"{where}: a C-RLFT line: train it with --objective crlft (tune/prefs.py)")
    if "panel" in obj:
        from ..panels import dataset
        t = dataset.tokenize(dataset.parse_line(obj, where), tokenizer, seq_len, condition)
        return Example(t.ids, t.mask)
    if keys == {"text"} and isinstance(obj["text"], str) and obj["text"]:
        ex = from_text(tokenizer, obj["text"], seq_len)
        if not ex:
            raise DataError(f"{where}: 'text' is too short (needs at least 2 tokens)")
        return ex[0]
    if keys == {"prompt", "target"}:
        for k in ("prompt", "target"):
            if not isinstance(obj[k], str):
                raise DataError(f"{where}: '{k}' must be a string, got {type(obj[k]).__name__}")
        if not obj["target"]:
            raise DataError(f"{where}: 'target' is empty")
        return from_pair(tokenizer, obj["prompt"], obj["target"], seq_len)
    raise DataError(f"{where}: a line holds {{\"text\"}}, {{\"prompt\", \"target\"}} or {{\"panel\", \"target\"}}, "
                    f"got fields {sorted(keys)}")
