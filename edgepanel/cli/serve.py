"""`edgepanel serve [MODEL]`: the OpenAI-compatible server (edgepanel/serve/).  Options and their
defaults come from edgepanel.serve.ServeOptions."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import EdgepanelError
from ..serve import InsecureBind, ServeOptions
from ..serve.options import parse_size
from .options import err, given, log, option
from .run import load_model, model_command


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def read_key_file(path: str) -> str:
    try:
        key = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise EdgepanelError(f"{path}: cannot read the API key ({exc})") from None
    if not key:
        raise EdgepanelError(f"{path}: the API key file is empty")
    return key


def cmd_serve(a) -> int:
    kw = given(a, ServeOptions)
    if a.api_key_file:
        kw["api_key"] = read_key_file(a.api_key_file)
    try:
        opts = ServeOptions(**kw)
    except InsecureBind as exc:
        err(str(exc))
        return 2
    from ..serve.server import require_stack
    require_stack()                  # before a long model load, not after
    if opts.warning():
        err("warning: " + opts.warning())
    m = load_model(a)
    from ..serve import run
    return run(m, opts, log=lambda msg: log(f"edgepanel: {msg}"), verbose=a.verbose)


def register(sub):
    s = model_command(sub, "serve", "an OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions)",
                      cmd_serve)
    g = s.add_argument_group("server (defaults: edgepanel.serve.ServeOptions)")
    option(g, ServeOptions, "host", "--host")
    option(g, ServeOptions, "port", "--port", type=int)
    key = g.add_mutually_exclusive_group()
    option(key, ServeOptions, "api_key", "--api-key", metavar="KEY")
    key.add_argument("--api-key-file", metavar="FILE", help="read the API key from FILE (not visible in ps)")
    option(g, ServeOptions, "insecure_no_key", "--insecure-no-key", action="store_true")
    option(g, ServeOptions, "parallel", "--parallel", type=int, metavar="N")
    option(g, ServeOptions, "max_queue", "--max-queue", type=int, metavar="N")
    option(g, ServeOptions, "ctx", "--ctx", type=int, metavar="TOKENS")
    option(g, ServeOptions, "max_body", "--max-body", type=_size, metavar="SIZE")
    option(g, ServeOptions, "metrics", "--metrics", action="store_true")
    option(g, ServeOptions, "shutdown_timeout", "--shutdown-timeout", type=float, metavar="SECONDS")
    option(g, ServeOptions, "model_id", "--model-id", metavar="NAME")
