"""Preference pairs and C-RLFT examples for the zeroth-order trainer.

    pair lines    {"panel": {...}, "chosen": "...", "rejected": "..."}       (a plain "prompt": "..."
    C-RLFT lines  {"panel": {...}, "target": "...", "class": "book"}          may replace "panel")

JSON Lines (.gz too), free "x-..." keys allowed; every line is validated and a bad one is a
`DataError` naming the file, the line and the field.

Tokenized, a pair is one prompt and two continuations (`data.Pair`): each continuation keeps at
most seq_len/2 tokens (its end cut), and the panel is rendered once into what is left by the longer
one, so chosen and rejected see the same prompt.  A plain prompt is encoded as the trainer's
{"prompt", "target"} lines are (no chat template), keeping its end.

C-RLFT (OpenChat): the source class is a condition in the prompt, "Source: CLASS." before the
instruction (or the plain prompt), and the class's weight multiplies the example's loss
(objectives.crlft).  At generation the best class ("book") is the condition: `class_prompt_ids`.

The reference log-probabilities of the pairs (log pi_ref of chosen and rejected) are computed
once, before training, by `attach_reference`, and cached in a safetensors file keyed by the
pairs' tokens and the reference model's parameters: a second run (or a resume) reads them.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import EdgepanelError, FormatError
from ..panels.dataset import json_lines
from ..panels.render import INSTRUCTION, render
from ..panels.schema import Panel, PanelError
from .data import DataError, Example, Pair
from .objectives import pair_logps

CACHE_FORMAT = "edgepanel-reference-logps"
CLASS_NAME = re.compile(r"[A-Za-z0-9_-]{1,32}")
PAIR_KEYS = ("chosen", "rejected")
CLASS_KEYS = ("target", "class")


@dataclass(frozen=True)
class PairLine:
    source: Panel | str        # the panel, or a plain prompt
    chosen: str
    rejected: str
    where: str = ""
    extra: dict | None = None  # the line's "x-..." keys


@dataclass(frozen=True)
class ClassLine:
    source: Panel | str
    target: str
    cls: str
    where: str = ""
    extra: dict | None = None


def class_tag(cls: str) -> str:
    """The condition a class becomes in the prompt."""
    return f"Source: {cls}.\n"


# -- lines ------------------------------------------------------------------------------------

def _source(obj: dict, where: str, fields: tuple[str, ...]):
    keys = {k for k in obj if not k.startswith("x-")}
    want = set(fields)
    sources = keys & {"panel", "prompt"}
    kind = " + ".join(f'"{f}"' for f in fields)
    if len(sources) != 1:
        what = "both 'panel' and 'prompt'" if len(sources) == 2 else "missing 'panel' (or 'prompt')"
        raise DataError(f'{where}: a line holds {{"panel" or "prompt", {kind}}}: {what}')
    missing = sorted(want - keys)
    extra = sorted(keys - want - sources)
    if missing or extra:
        what = f"missing {missing[0]!r}" if missing else f"unknown field {extra[0]!r} (free-form keys start with 'x-')"
        raise DataError(f'{where}: a line holds {{"panel" or "prompt", {kind}}}: {what}')
    for f in fields:
        if not isinstance(obj[f], str) or not obj[f].strip():
            raise DataError(f"{where}: '{f}' must be a non-empty string")
    if "prompt" in sources:
        if not isinstance(obj["prompt"], str) or not obj["prompt"].strip():
            raise DataError(f"{where}: 'prompt' must be a non-empty string")
        return obj["prompt"]
    try:
        return Panel.from_dict(obj["panel"], where)
    except PanelError as exc:   # name the field inside the line: "panel.characters[0].name"
        raise DataError(str(exc).replace(f"{where}: ", f"{where}: panel.", 1)) from None


def _extra(obj: dict):
    return {k: v for k, v in obj.items() if k.startswith("x-")} or None


def parse_pair_line(obj: dict, where: str) -> PairLine:
    src = _source(obj, where, PAIR_KEYS)
    if obj["chosen"] == obj["rejected"]:
        raise DataError(f"{where}: 'chosen' and 'rejected' are the same text")
    return PairLine(src, obj["chosen"], obj["rejected"], where, _extra(obj))


def parse_class_line(obj: dict, where: str) -> ClassLine:
    src = _source(obj, where, CLASS_KEYS)
    if not CLASS_NAME.fullmatch(obj["class"]):
        raise DataError(f"{where}: 'class' must be 1-32 letters, digits, '_' or '-', got {obj['class']!r}")
    return ClassLine(src, obj["target"], obj["class"], where, _extra(obj))


def _read(path, parse) -> list:
    try:
        out = [parse(obj, f"{path}:{no}") for no, obj, _ in json_lines(path)]
    except PanelError as exc:          # unreadable file, a line that is not JSON
        raise DataError(str(exc)) from None
    if not out:
        raise DataError(f"{path}: no examples")
    return out


def read_pairs(path) -> list[PairLine]:
    """Every line of a pair file, validated (the first bad line raises)."""
    return _read(path, parse_pair_line)


def read_classed(path) -> list[ClassLine]:
    """Every line of a C-RLFT file, validated."""
    return _read(path, parse_class_line)


# -- tokens -----------------------------------------------------------------------------------

def prompt_ids(source, tokenizer, budget: int, cls: str | None = None, chat: bool | None = None) -> list[int]:
    """The prompt's tokens within `budget`: a panel rendered (chat template when the model has
    one, unless chat=False), or a plain prompt encoded (chat=True: in the chat template) with its
    beginning cut when too long.  `cls`: the C-RLFT condition."""
    if budget < 1:
        raise DataError(f"no room for the prompt (budget {budget} tokens)")
    if isinstance(source, Panel):
        instruction = INSTRUCTION if cls is None else class_tag(cls) + INSTRUCTION
        return list(render(source, tokenizer, budget, chat=chat, instruction=instruction).ids)
    text = source if cls is None else class_tag(cls) + source
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        ids = tokenizer.encode(text, add_special_tokens=False)
    else:
        ids = tokenizer.encode(text)
    if not ids:
        raise DataError("the prompt has no tokens")
    return list(ids[-budget:])


def continuation_ids(tokenizer, text: str, limit: int, where: str = "") -> list[int]:
    ids = tokenizer.encode(text, add_special_tokens=False)[:limit]
    if not ids:
        raise DataError(f"{where + ': ' if where else ''}the continuation has no tokens")
    return list(ids)


def sequence(prompt: list[int], continuation: list[int], cls: str | None = None) -> Example:
    """prompt + continuation as an Example whose mask covers the continuation."""
    ids = np.asarray(list(prompt) + list(continuation), np.int32)
    mask = np.zeros(len(ids), bool)
    mask[len(prompt):] = True
    return Example(ids, mask, cls=cls)


def tokenize_pair(line: PairLine, tokenizer, seq_len: int = 512) -> Pair:
    if seq_len < 8:
        raise DataError(f"seq_len must be at least 8, got {seq_len}")
    c = continuation_ids(tokenizer, line.chosen, seq_len // 2, line.where)
    r = continuation_ids(tokenizer, line.rejected, seq_len // 2, line.where)
    p = prompt_ids(line.source, tokenizer, seq_len - max(len(c), len(r)))
    return Pair(sequence(p, c), sequence(p, r), where=line.where)


def tokenize_classed(line: ClassLine, tokenizer, seq_len: int = 512, cls: str | None = None) -> Example:
    """The line's target after its source, conditioned on `cls` (default: the line's class)."""
    if seq_len < 8:
        raise DataError(f"seq_len must be at least 8, got {seq_len}")
    cls = line.cls if cls is None else cls
    t = continuation_ids(tokenizer, line.target, seq_len // 2, line.where)
    return sequence(prompt_ids(line.source, tokenizer, seq_len - len(t), cls), t, cls)


def load_pairs(path, tokenizer, seq_len: int = 512) -> list[Pair]:
    """Tokenized pairs of a pair file (reference log-probabilities not yet attached)."""
    return [tokenize_pair(line, tokenizer, seq_len) for line in read_pairs(path)]


def load_classed(path, tokenizer, seq_len: int = 512) -> list[Example]:
    """Tokenized, class-carrying examples of a C-RLFT file."""
    return [tokenize_classed(line, tokenizer, seq_len) for line in read_classed(path)]


def class_losses(model, lines, classes, seq_len: int = 512) -> dict[str, float]:
    """Mean loss (nats per target token) of each line's target under each class's condition;
    `lines`: ClassLines, or anything with .panel (or .source) and .target (panel datasets)."""
    from .objectives import nll
    out = {}
    for cls in classes:
        if not CLASS_NAME.fullmatch(cls):
            raise DataError(f"class must be 1-32 letters, digits, '_' or '-', got {cls!r}")
        ex = []
        for ln in lines:
            src = ln.source if hasattr(ln, "source") else ln.panel
            ex.append(tokenize_classed(ClassLine(src, ln.target, cls, getattr(ln, "where", "")), model.tokenizer,
                                       seq_len))
        out[cls] = nll(model, ex)
    return out


# -- the reference log-probabilities ---------------------------------------------------------

def pairs_key(pairs) -> str:
    """sha256 of every pair's tokens and masks: which pairs a cache belongs to."""
    h = hashlib.sha256()
    for p in pairs:
        for e in (p.chosen, p.rejected):
            h.update(np.int64(len(e.ids)).tobytes())
            h.update(np.ascontiguousarray(e.ids, np.int32).tobytes())
            h.update(np.packbits(e.mask).tobytes())
    return h.hexdigest()


def model_fingerprint(model) -> str:
    """sha256 of the model's continuous parameters as they are now (and of its shape): which
    reference a cache was computed with."""
    h = hashlib.sha256(json.dumps(model.meta.config, sort_keys=True).encode("utf-8"))
    for name, a in sorted(model.parameters().items()):
        h.update(name.encode("utf-8"))
        h.update(np.ascontiguousarray(a, np.float32).tobytes())
    return h.hexdigest()


def reference_logps(model, pairs, chunk: int = 16, progress: bool = False) -> np.ndarray:
    """(P, 2) float64: log pi(chosen), log pi(rejected) under `model` as it is now."""
    from ..progress import bar
    out = np.empty((len(pairs), 2), np.float64)
    pb = bar(total=len(pairs), desc="reference log-probabilities", unit="pair", disable=not progress)
    for i in range(0, len(pairs), chunk):
        out[i:i + chunk] = pair_logps(model, pairs[i:i + chunk])
        pb.update(len(pairs[i:i + chunk]))
    pb.close()
    return out


def attach_reference(model, pairs, path=None, log=None, progress: bool = False) -> bool:
    """Set every pair's `ref` to its log-probabilities under `model` (the reference: call this
    before training).  With `path`, read them from that cache when it holds these pairs under
    these parameters, else compute and write it.  Returns True when they were computed."""
    if not pairs:
        raise DataError("no pairs")
    key, fp = pairs_key(pairs), model_fingerprint(model)
    refs = _read_cache(path, key, fp, len(pairs)) if path is not None and Path(path).exists() else None
    computed = refs is None
    if computed:
        if log:
            log(f"reference: log-probabilities of {len(pairs)} pairs" + (f", cached in {path}" if path else ""))
        refs = reference_logps(model, pairs, progress=progress)
        if path is not None:
            from ..format import write_tensors
            write_tensors(path, {"logps": refs}, {"format": CACHE_FORMAT, "pairs": key, "model": fp,
                                                  "count": str(len(pairs))})
    elif log:
        log(f"reference: {len(pairs)} pairs' log-probabilities read from {path}")
    for p, r in zip(pairs, refs):
        p.ref = (float(r[0]), float(r[1]))
    return computed


def _read_cache(path, key: str, fp: str, count: int):
    """The cached (P, 2) log-probabilities, or None when the cache is for other pairs or another
    reference (it is then recomputed and overwritten)."""
    from ..format import SafetensorsFile
    try:
        f = SafetensorsFile(path)
    except FormatError as exc:
        raise EdgepanelError(f"{path}: not a reference cache ({exc}); remove it or choose another path") from None
    if f.metadata.get("format") != CACHE_FORMAT:
        raise EdgepanelError(f"{path}: not an edgepanel reference cache; remove it or choose another path")
    a = f.tensors.get("logps")
    if f.metadata.get("pairs") != key or f.metadata.get("model") != fp or a is None or a.shape != (count, 2):
        return None
    return np.array(a, np.float64)
