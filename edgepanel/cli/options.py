"""Command-line options built from the dataclasses that hold the defaults (Sampling, Recipe, ...),
so a default and its help text live in one place.  Every option's argparse default is None:
what the user did not give is left out, and the dataclass fills it in."""
from __future__ import annotations

import argparse
import dataclasses
import sys


def field_default(cls, name: str):
    f = cls.__dataclass_fields__[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def option(group, cls, name: str, *flags: str, help: str | None = None, show_default: bool = True, **kw):
    """Add the option for field `name` of dataclass `cls`: help from the field's metadata (or
    `help`) followed by the field's default."""
    default = field_default(cls, name)
    text = help if help is not None else cls.__dataclass_fields__[name].metadata.get("help", "")
    if show_default and default not in (None, [], (), False, ""):
        text += f" (default: {default})"
    group.add_argument(*(flags or ("--" + name.replace("_", "-"),)), dest=name, default=None,
                       help=text.replace("%", "%%"), **kw)


def given(args: argparse.Namespace, cls) -> dict:
    """The fields of `cls` the user gave on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if getattr(args, f.name, None) is not None}


def err(msg: str):
    print(f"edgepanel: {msg}", file=sys.stderr)


def log(msg: str):
    print(msg, file=sys.stderr, flush=True)
