"""A loaded model: its config, its weights as views of the mapped file, the forward engines (C and
the NumPy reference), generation, and the API (`Model`, `load`)."""
from .model import ContextOverflow, Model, load

__all__ = ["ContextOverflow", "Model", "load"]
