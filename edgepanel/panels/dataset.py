"""Panel datasets: JSON Lines (optionally gzip-compressed), one example a line,

    {"panel": {...}, "target": "the paragraph written from it"}       (+ free "x-..." keys)

validated line by line (a bad line is a `PanelError` naming the file, the line and the field), and
turned into token ids with a loss mask that covers the target's tokens only: the panel is context.

Conditions (what the model is given, for evaluation and ablations): "full" (the whole panel),
"none" (the bare instruction), "-FIELD" (the panel without FIELD).
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .render import Rendered, render
from .schema import FIELDS, Panel, PanelError


@dataclass(frozen=True)
class PanelExample:
    panel: Panel
    target: str
    where: str = ""             # "FILE:LINE", for messages
    extra: dict | None = None   # the line's "x-..." keys


def read_text(path) -> str:
    path = Path(path)
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
        return raw.decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError, gzip.BadGzipFile) as exc:
        raise PanelError(f"{path}: cannot read ({exc})") from None


def json_lines(path):
    """(line number, object, line text) for every non-empty line; a line that is not a JSON
    object is an error naming it."""
    for no, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except RecursionError:
            raise PanelError(f"{path}:{no}: JSON nested too deeply") from None
        except ValueError as exc:
            raise PanelError(f"{path}:{no}: not valid JSON ({getattr(exc, 'msg', exc)})") from None
        if not isinstance(obj, dict):
            raise PanelError(f"{path}:{no}: expected a JSON object, got {type(obj).__name__}")
        yield no, obj, line


def parse_line(obj: dict, where: str) -> PanelExample:
    keys = {k for k in obj if not k.startswith("x-")}
    if keys != {"panel", "target"}:
        missing = sorted({"panel", "target"} - keys)
        extra = sorted(keys - {"panel", "target"})
        what = f"missing {missing[0]!r}" if missing else f"unknown field {extra[0]!r} (free-form keys start with 'x-')"
        raise PanelError(f"{where}: a panel line holds {{\"panel\", \"target\"}}: {what}")
    if not isinstance(obj["target"], str) or not obj["target"].strip():
        raise PanelError(f"{where}: 'target' must be a non-empty string")
    try:
        panel = Panel.from_dict(obj["panel"], where)
    except PanelError as exc:   # name the field inside the line: "panel.characters[0].name"
        raise PanelError(str(exc).replace(f"{where}: ", f"{where}: panel.", 1)) from None
    return PanelExample(panel, obj["target"], where, {k: v for k, v in obj.items() if k.startswith("x-")} or None)


def load(path) -> list[PanelExample]:
    """Every example of a panel dataset, all validated (the first bad line raises)."""
    out = [parse_line(obj, f"{path}:{no}") for no, obj, _ in json_lines(path)]
    if not out:
        raise PanelError(f"{path}: no examples")
    return out


def condition_panel(panel: Panel, condition: str) -> Panel:
    if condition == "full":
        return panel
    if condition == "none":
        return Panel()
    if condition.startswith("-") and condition[1:] in FIELDS:
        return panel.without(condition[1:])
    raise PanelError(f"unknown condition {condition!r}: full, none or -FIELD ({', '.join(FIELDS)})")


def conditions_for(examples) -> list[str]:
    """full, none, and -FIELD for every field some example has."""
    present = {f for ex in examples for f in ex.panel.present()}
    return ["full", "none"] + [f"-{f}" for f in FIELDS if f in present]


@dataclass
class Tokenized:
    ids: np.ndarray         # (n,) int32: prompt then target
    mask: np.ndarray        # (n,) bool: True on the target's tokens
    rendered: Rendered


def tokenize(ex: PanelExample, tokenizer, seq_len: int = 1024, condition: str = "full",
             chat: bool | None = None) -> Tokenized:
    """Prompt (the rendered panel) and target as one sequence of at most `seq_len` tokens.  The
    target keeps at most half of it (its end cut); the panel is shortened into the rest."""
    if seq_len < 8:
        raise PanelError(f"seq_len must be at least 8, got {seq_len}")
    t = tokenizer.encode(ex.target, add_special_tokens=False)[: seq_len // 2]
    if not t:
        raise PanelError(f"{ex.where}: the target has no tokens")
    r = render(condition_panel(ex.panel, condition), tokenizer, seq_len - len(t), chat=chat)
    ids = np.asarray(list(r.ids) + list(t), np.int32)
    mask = np.zeros(len(ids), bool)
    mask[len(r.ids):] = True
    return Tokenized(ids, mask, r)
