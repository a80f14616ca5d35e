"""The command line: `edgepanel COMMAND ...` (also `python -m edgepanel`).  One module per command
group; each has `register(subparsers)`.  This package imports the rest of edgepanel and nothing
imports it.

    edgepanel generate -p "Once upon a time"      # the default model, fetched and converted once
    edgepanel generate model.ep -p "Hi" --chat
    edgepanel chat [MODEL]
    edgepanel perplexity MODEL FILE
    edgepanel convert SRC OUT.ep --planes 2 --group 64
    edgepanel finetune MODEL --data train.txt --out tuned.ep
    edgepanel fetch smollm2
    edgepanel info [MODEL]
"""
from __future__ import annotations

import argparse
import sys

from ..errors import EdgepanelError
from . import bench, convert, export, info, panels, run, serve, tune
from .options import err

GROUPS = (run, convert, tune, panels, bench, serve, export, info)


class _Parser(argparse.ArgumentParser):
    """A usage error is one line and exit code 2, like every other error (argparse's own prints
    the usage block first); subcommands' parsers are of this class too."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="edgepanel", description="Binarized language models on CPU-only edge devices.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for group in GROUPS:
        group.register(sub)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (EdgepanelError, ValueError, TypeError, OSError) as exc:
        err(str(exc))
        return 1
    except KeyboardInterrupt:
        err("interrupted")
        return 130


__all__ = ["build_parser", "main"]
