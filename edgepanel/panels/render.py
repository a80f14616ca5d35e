"""A panel as the model reads it: a fixed, deterministic text layout, wrapped in the model's chat
template when it has one (plain text otherwise), within a token budget.

When the rendered prompt is longer than the budget, the panel is shortened one unit at a time, in
this order (the first is dropped first):

    memory.long   oldest entry first        characters   last entry first
    places        last entry first          goals, tasks last entry first
    memory.short  earliest sentence first   latest       earliest sentence first (its end,
    plan          last sentence first                    next to the new paragraph, stays)

Units are whole list entries or whole sentences, so nothing is cut inside a word or a token; what
was dropped is reported.  A prompt that does not fit with every field dropped is an error.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from .schema import Entity, Memory, Panel, PanelError

INSTRUCTION = "Write the next paragraph of the story."
# appended to the body when the model has no chat template: the paragraph follows it
PLAIN_CUE = "\n\nNext paragraph:\n"

# (unit, which end goes first): "head" drops the earliest item, "tail" the last
PRIORITY = (("memory.long", "head"), ("places", "tail"), ("characters", "tail"), ("goals", "tail"),
            ("tasks", "tail"), ("memory.short", "head"), ("latest", "head"), ("plan", "tail"))
# a sentence ends at . ! ? (maybe closing a quote or bracket) before white space, except after a title
_SENTENCE_END = re.compile(r"(?<!\bMr\.)(?<!\bMrs\.)(?<!\bDr\.)(?<!\bSt\.)(?<!\bMs\.)(?:(?<=[.!?])|(?<=[.!?][\"'\u201d)]))\s+")


def sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


def body(panel: Panel, instruction: str = INSTRUCTION) -> str:
    """The panel's text (before any chat template): the instruction, then each present field."""
    parts = [instruction]
    if panel.characters:
        parts.append("Characters:\n" + "\n".join(f"- {e.name}: {e.description}" for e in panel.characters))
    if panel.places:
        parts.append("Places:\n" + "\n".join(f"- {e.name}: {e.description}" for e in panel.places))
    mem = panel.memory
    if mem is not None and (mem.long or mem.short):
        lines = ["Memory:"]
        if mem.long:
            lines += ["Earlier:"] + [f"- {m}" for m in mem.long]
        if mem.short:
            lines.append(f"Recently: {mem.short}")
        parts.append("\n".join(lines))
    if panel.goals:
        parts.append("Goals:\n" + "\n".join(f"- {g}" for g in panel.goals))
    if panel.tasks:
        parts.append("Tasks:\n" + "\n".join(f"- {t}" for t in panel.tasks))
    if panel.plan:
        parts.append(f"Plan for this paragraph: {panel.plan}")
    if panel.latest:
        parts.append(f"The paragraph before:\n{panel.latest}")
    return "\n\n".join(parts)


@dataclass
class Rendered:
    text: str                    # the prompt as text (chat template applied when chat)
    ids: list[int]               # its tokens
    panel: Panel                 # the panel as rendered (after shortening)
    dropped: list[str] = field(default_factory=list)   # e.g. "memory.long[0]", "latest: sentence 1 of 3"
    chat: bool = False


def prompt_text(panel: Panel, tokenizer, chat: bool, instruction: str = INSTRUCTION) -> str:
    text = body(panel, instruction)
    if chat:
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return text + PLAIN_CUE


def encode_prompt(text: str, tokenizer, chat: bool) -> list[int]:
    # a chat template writes its own special tokens; plain text gets the tokenizer's (e.g. BOS)
    return tokenizer.encode(text, add_special_tokens=not chat)


def uses_chat(tokenizer, chat: bool | None) -> bool:
    return bool(tokenizer.chat_template) if chat is None else chat


def render(panel: Panel, tokenizer, budget: int | None = None, *, chat: bool | None = None,
           instruction: str = INSTRUCTION) -> Rendered:
    """The prompt for `panel` in at most `budget` tokens (None: no limit).  `chat`: None uses the
    model's chat template when it has one."""
    chat = uses_chat(tokenizer, chat)
    if budget is not None and budget < 1:
        raise PanelError(f"the token budget must be positive, got {budget}")
    units = _Units(panel)
    dropped: list[str] = []
    while True:
        cur = units.panel()
        text = prompt_text(cur, tokenizer, chat, instruction)
        ids = encode_prompt(text, tokenizer, chat)
        if budget is None or len(ids) <= budget:
            return Rendered(text, ids, cur, dropped, chat)
        what = units.drop_next()
        if what is None:
            raise PanelError(f"the prompt needs {len(ids)} tokens with every panel field dropped; "
                             f"the budget is {budget}")
        dropped.append(what)


class _Units:
    """The droppable pieces of a panel, each remembering its place in the original."""

    def __init__(self, p: Panel):
        self.base = p
        mem = p.memory or Memory()
        self.items = {
            "memory.long": list(enumerate(mem.long)),
            "places": list(enumerate(p.places)),
            "characters": list(enumerate(p.characters)),
            "goals": list(enumerate(p.goals)),
            "tasks": list(enumerate(p.tasks)),
            "memory.short": list(enumerate(sentences(mem.short or ""))),
            "latest": list(enumerate(sentences(p.latest or ""))),
            "plan": list(enumerate(sentences(p.plan or ""))),
        }
        self.sentence_counts = {k: len(self.items[k]) for k in ("memory.short", "latest", "plan")}
        self.original = {"memory.short": mem.short, "latest": p.latest, "plan": p.plan}

    def drop_next(self) -> str | None:
        for name, end in PRIORITY:
            items = self.items[name]
            if items:
                i, _ = items.pop(0 if end == "head" else -1)
                if name in self.sentence_counts:
                    return f"{name}: sentence {i + 1} of {self.sentence_counts[name]}"
                return f"{name}[{i}]"
        return None

    def panel(self) -> Panel:
        def text(name):
            if len(self.items[name]) == self.sentence_counts[name]:    # untouched: exactly as given
                return self.original[name]
            return " ".join(v for _, v in self.items[name]) or None

        def values(name):
            return tuple(v for _, v in self.items[name])

        short, long = text("memory.short"), values("memory.long")
        memory = Memory(short, long) if (short or long) else None
        return replace(self.base, latest=text("latest"), plan=text("plan"), memory=memory,
                       characters=values("characters"), places=values("places"),
                       goals=values("goals"), tasks=values("tasks"))


__all__ = ["INSTRUCTION", "PRIORITY", "Rendered", "render", "body", "sentences", "Entity"]
