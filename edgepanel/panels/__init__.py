"""Panels: the structured material a paragraph is written from (schema, rendering within a token
budget, datasets, data built from books, evaluation of what each field is worth, the story loop)."""
from .render import Rendered, render
from .schema import FIELDS, Entity, Memory, Panel, PanelError, load_panel, parse

__all__ = ["FIELDS", "Entity", "Memory", "Panel", "PanelError", "Rendered", "load_panel", "parse", "render"]
