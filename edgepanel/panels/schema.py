"""The panel: the material a paragraph is written from, one JSON document checked against one
schema (`panel.schema.json`, shipped beside this module) and held in Python as a `Panel`.

    {"latest": "...", "characters": [{"name": "...", "description": "..."}], "places": [...],
     "plan": "...", "goals": ["..."], "memory": {"short": "...", "long": ["..."]}, "tasks": ["..."]}

Every field is optional, at least one is present; keys starting with "x-" are kept and ignored.
A bad document is a `PanelError` naming the field (`characters[2].name`) and, when the document
came from a file, the line it is on.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from ..errors import EdgepanelError

SCHEMA_PATH = Path(__file__).with_name("panel.schema.json")
# the fields in the order a panel is rendered (the paragraph to continue comes last)
FIELDS = ("characters", "places", "memory", "goals", "tasks", "plan", "latest")


class PanelError(EdgepanelError, ValueError):
    """A panel, or a dataset line holding one, is malformed.  `field_path`: the bad field as
    validate() names it (`characters[2].name`; "" for the panel as a whole), None when not known."""

    def __init__(self, message: str, field_path: str | None = None):
        super().__init__(message)
        self.field_path = field_path


@dataclass(frozen=True)
class Entity:
    name: str
    description: str


@dataclass(frozen=True)
class Memory:
    short: str | None = None
    long: tuple[str, ...] = ()


@dataclass(frozen=True)
class Panel:
    latest: str | None = None
    characters: tuple[Entity, ...] = ()
    places: tuple[Entity, ...] = ()
    plan: str | None = None
    goals: tuple[str, ...] = ()
    memory: Memory | None = None
    tasks: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict, compare=False)   # the "x-..." keys, as given

    @classmethod
    def from_dict(cls, doc, where: str = "panel", text: str | None = None, base_line: int = 0) -> "Panel":
        """Validate `doc` (parsed JSON) and build the panel.  `text`: the JSON it was parsed from,
        so an error can name its line (`base_line` is added: the document's first line - 1)."""
        validate(doc, where, text, base_line)
        mem = doc.get("memory")
        return cls(
            latest=doc.get("latest"),
            characters=tuple(Entity(e["name"], e["description"]) for e in doc.get("characters", ())),
            places=tuple(Entity(e["name"], e["description"]) for e in doc.get("places", ())),
            plan=doc.get("plan"),
            goals=tuple(doc.get("goals", ())),
            memory=None if mem is None else Memory(mem.get("short"), tuple(mem.get("long", ()))),
            tasks=tuple(doc.get("tasks", ())),
            extra={k: v for k, v in doc.items() if k.startswith("x-")},
        )

    def to_dict(self) -> dict:
        """The JSON document (fields that are empty are left out; "x-" keys kept)."""
        d: dict = {}
        if self.latest is not None:
            d["latest"] = self.latest
        for name in ("characters", "places"):
            items = getattr(self, name)
            if items:
                d[name] = [{"name": e.name, "description": e.description} for e in items]
        if self.plan is not None:
            d["plan"] = self.plan
        if self.goals:
            d["goals"] = list(self.goals)
        if self.memory is not None:
            m = {}
            if self.memory.short is not None:
                m["short"] = self.memory.short
            if self.memory.long:
                m["long"] = list(self.memory.long)
            d["memory"] = m
        if self.tasks:
            d["tasks"] = list(self.tasks)
        d.update(self.extra)
        return d

    def present(self) -> list[str]:
        """The fields this panel fills, in rendering order."""
        d = self.to_dict()
        return [f for f in FIELDS if f in d]

    def without(self, *names: str) -> "Panel":
        """A copy with the named fields removed (ablation)."""
        bad = [n for n in names if n not in FIELDS]
        if bad:
            raise PanelError(f"no panel field {bad[0]!r}; fields: {', '.join(FIELDS)}")
        empty = {"latest": None, "characters": (), "places": (), "plan": None, "goals": (), "memory": None, "tasks": ()}
        from dataclasses import replace
        return replace(self, **{n: empty[n] for n in names})


@lru_cache(maxsize=1)
def schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


@lru_cache(maxsize=1)
def _validator():
    import jsonschema
    cls = jsonschema.validators.validator_for(schema())
    return cls(schema())


def validate(doc, where: str = "panel", text: str | None = None, base_line: int = 0) -> None:
    """Raise PanelError for the first problem of `doc` (the shallowest, so the message names the
    field the user wrote rather than a detail inside it)."""
    errors = sorted(_validator().iter_errors(doc), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    if not errors:
        return
    e = errors[0]
    path = list(e.absolute_path)
    name = field_name(path) or "the panel"
    if e.validator == "additionalProperties":
        extra = sorted(set(e.instance) - set(e.schema.get("properties", {})))
        extra = [k for k in extra if not (not path and k.startswith("x-"))]
        what = f"unknown field {extra[0]!r}" + ("" if path else " (free-form keys must start with 'x-')") if extra else e.message
        if extra:
            path = path + [extra[0]]
    elif e.validator == "anyOf" and not path:
        what = f"has none of the fields {', '.join(FIELDS)}"
    elif e.validator == "minProperties":
        what = "is empty: give at least one field"
    elif e.validator == "type":
        what = f"must be {_article(e.validator_value)}, got {_json_type(e.instance)}"
    elif e.validator == "required":
        what = e.message.replace("is a required property", "is missing")
    else:
        what = e.message
    line = locate(text, path) if text is not None else None
    at = f"{where}:{base_line + line}" if line else where
    raise PanelError(f"{at}: {field_name(path) or name}: {what}" if path else f"{at}: the panel {what}",
                     field_path=field_name(path))


def field_name(path) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _article(t) -> str:
    t = t if isinstance(t, str) else " or ".join(t)
    return {"object": "an object", "array": "a list", "string": "a string"}.get(t, t)


def _json_type(v) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(v), type(v).__name__)


def locate(text: str, path) -> int | None:
    """The 1-based line in JSON `text` where the value at `path` (keys and indices) begins; None if
    the text does not parse that far."""
    dec = json.JSONDecoder()
    pos = 0

    def ws(i):
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    try:
        pos = ws(pos)
        for step in path:
            if isinstance(step, int):
                if text[pos] != "[":
                    return None
                pos = ws(pos + 1)
                for _ in range(step):
                    _, pos = dec.raw_decode(text, pos)
                    pos = ws(pos)
                    if text[pos] != ",":
                        return None
                    pos = ws(pos + 1)
            else:
                if text[pos] != "{":
                    return None
                pos = ws(pos + 1)
                while True:
                    key, pos = dec.raw_decode(text, pos)
                    pos = ws(pos)
                    if text[pos] != ":":
                        return None
                    start = pos = ws(pos + 1)
                    if key == step:
                        break
                    _, pos = dec.raw_decode(text, pos)
                    pos = ws(pos)
                    if text[pos] != ",":
                        return None
                    pos = ws(pos + 1)
                pos = start
        return text.count("\n", 0, pos) + 1
    except (ValueError, IndexError):
        return None


def parse(text: str, where: str = "panel", base_line: int = 0) -> Panel:
    """A panel from its JSON text."""
    try:
        doc = json.loads(text)
    except RecursionError:
        raise PanelError(f"{where}: JSON nested too deeply") from None
    except ValueError as exc:
        line = getattr(exc, "lineno", None)
        at = f"{where}:{base_line + line}" if line else where
        raise PanelError(f"{at}: not valid JSON ({getattr(exc, 'msg', exc)})") from None
    return Panel.from_dict(doc, where, text, base_line)


def load_panel(path) -> Panel:
    """A panel from a JSON file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PanelError(f"{path}: cannot read the panel ({exc})") from None
    return parse(text, str(path))
