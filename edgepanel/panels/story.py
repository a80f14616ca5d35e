"""The story loop (after RecurrentGPT): write a paragraph from the panel, ask the model to update
the panel (short memory rewritten, the old one moved to long memory, the plan for the next
paragraph, new characters), check each update (an unusable answer keeps the old field and says
so), and go on.

The output is JSON Lines, one line per paragraph, written and flushed as it goes:

    {"index": k, "paragraph": "...", "panel": {the panel it was written from},
     "next_panel": {the updated panel}, "notes": ["kept the old plan: empty answer", ...]}

so an interrupted run keeps every finished paragraph, and `resume` continues from the last
complete line (a torn last line is cut off).  Paragraph k is sampled with seed + k: a resumed run
writes what an uninterrupted one would.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

from .build import clip_words, prompts
from .render import render
from .schema import Entity, Memory, Panel, PanelError

MAX_FIELD_WORDS = 120
LONG_MEMORY_ITEMS = 10


@dataclass
class StoryStep:
    index: int
    paragraph: str
    panel: Panel
    next_panel: Panel
    notes: list[str]

    def to_json(self) -> str:
        return json.dumps({"index": self.index, "paragraph": self.paragraph, "panel": self.panel.to_dict(),
                           "next_panel": self.next_panel.to_dict(), "notes": self.notes}, ensure_ascii=False)


def _ask(model, key: str, max_tokens: int, **fields) -> str:
    text = prompts()[key].format(**fields)
    prompt = [{"role": "user", "content": text}] if model.tokenizer.chat_template else text
    return model.generate(prompt, max_tokens=max_tokens, temperature=0.0, truncate=True).strip()


def _usable(answer: str) -> str | None:
    """Why an answer cannot become a panel field (None: it can)."""
    if not answer.strip():
        return "empty answer"
    if len(answer.split()) > MAX_FIELD_WORDS:
        return f"answer over {MAX_FIELD_WORDS} words"
    return None


def parse_characters(answer: str, known: set[str]) -> list[Entity]:
    """'Name: description' lines naming characters not known yet; other lines are ignored."""
    out = []
    for line in answer.splitlines():
        line = line.strip().lstrip("-*0123456789. ").strip()
        if ":" not in line:
            continue
        name, desc = (s.strip() for s in line.split(":", 1))
        words = name.split()
        if not (1 <= len(words) <= 4 and all(w[:1].isupper() for w in words)) or not desc or name in known:
            continue
        out.append(Entity(name, clip_words(desc, 40)))
        known.add(name)
    return out[:3]


def update(model, panel: Panel, paragraph: str, max_tokens: int = 80) -> tuple[Panel, list[str]]:
    """The panel for the paragraph after `paragraph`, and notes on updates that were refused."""
    notes = []
    mem = panel.memory or Memory()
    short = _ask(model, "update_memory", max_tokens, memory=mem.short or "(nothing yet)", paragraph=paragraph)
    why = _usable(short)
    if why:
        notes.append(f"kept the old short memory: {why}")
        short = mem.short
    long = list(mem.long) + ([mem.short] if (not why and mem.short) else [])
    plan = _ask(model, "update_plan", max_tokens, paragraph=paragraph)
    why = _usable(plan)
    if why:
        notes.append(f"kept the old plan: {why}")
        plan = panel.plan
    known = {e.name for e in panel.characters}
    answer = _ask(model, "update_characters", max_tokens, paragraph=paragraph, known=", ".join(sorted(known)) or "none")
    new = parse_characters(answer, known)
    memory = Memory(short, tuple(long[-LONG_MEMORY_ITEMS:])) if (short or long) else None
    return replace(panel, latest=paragraph, plan=plan, memory=memory, characters=panel.characters + tuple(new)), notes


def story(model, panel: Panel, paragraphs: int, *, start: int = 0, seed: int = 0, budget: int | None = None,
          max_tokens: int = 200, on_text: Callable[[str], None] | None = None, **sampling) -> Iterator[StoryStep]:
    """Write `paragraphs` paragraphs from `panel` (numbered from `start`), yielding each step.
    `on_text` receives the paragraph's text as it is generated.  Sampling options as generate's."""
    budget = budget or max(16, model.cfg.max_seq_len - max_tokens - 1)
    stop_given = sampling.pop("stop", None)
    for k in range(start, start + paragraphs):
        r = render(panel, model.tokenizer, budget)
        stop = stop_given or ([] if r.chat else ["\n\n"])   # a plain-text paragraph ends at a blank line
        pieces = []
        for piece in model.generate(r.ids, max_tokens=max_tokens, stream=True, seed=seed + k, stop=stop, **sampling):
            pieces.append(piece)
            if on_text:
                on_text(piece)
        paragraph = " ".join("".join(pieces).split())
        notes = [f"panel shortened: {', '.join(r.dropped)}"] if r.dropped else []
        if not paragraph:
            notes.append("the model wrote nothing")
        nxt, more = update(model, panel, paragraph or (panel.latest or ""))
        yield StoryStep(k, paragraph, panel, nxt, notes + more)
        panel = nxt


def resume_point(path) -> tuple[int, Panel | None]:
    """(next index, panel to continue from) from an existing story file; a torn last line (an
    interrupted write) is cut off the file.  (0, None) when there is nothing to resume."""
    path = Path(path)
    if not path.exists():
        return 0, None
    raw = path.read_bytes()
    good = raw.rfind(b"\n") + 1           # everything after the last newline is a torn line
    if good < len(raw):
        with open(path, "r+b") as f:
            f.truncate(good)
    lines = raw[:good].decode("utf-8").splitlines()
    if not lines:
        return 0, None
    try:
        last = json.loads(lines[-1])
        return int(last["index"]) + 1, Panel.from_dict(last["next_panel"], f"{path}:{len(lines)}")
    except (ValueError, KeyError, TypeError) as exc:
        raise PanelError(f"{path}:{len(lines)}: not a story line ({exc})") from None


def write_story(model, panel: Panel | None, paragraphs: int, out, resume: bool = False, **kw) -> list[StoryStep]:
    """Run the loop into `out` (JSON Lines), each line flushed and synced as it is written."""
    out = Path(out)
    start = 0
    if resume:
        start, last = resume_point(out)
        panel = last or panel
    elif out.exists():
        raise PanelError(f"{out} exists: pass resume=True (--resume) to continue it, or choose another file")
    if panel is None:
        raise PanelError("no panel to start from")
    steps = []
    with open(out, "a", encoding="utf-8") as f:
        for step in story(model, panel, max(0, paragraphs - start), start=start, **kw):
            f.write(step.to_json() + "\n")
            f.flush()
            os.fsync(f.fileno())
            steps.append(step)
    return steps
