"""Exporting a model to other runtimes: `export-onnx MODEL OUT.onnx` (options and defaults:
edgepanel.export.onnx.ExportOptions)."""
from __future__ import annotations

from pathlib import Path

from .options import err, given, log, option


def cmd_export_onnx(a) -> int:
    from .. import hub
    from ..export.onnx import ExportOptions, export_onnx, sidecar_paths
    try:
        opts = ExportOptions(**given(a, ExportOptions))
        opts.check()
        if Path(a.out).suffix != ".onnx":
            raise ValueError(f"{a.out}: the output must be a .onnx file")
    except ValueError as exc:
        err(str(exc))
        return 2
    path = hub.resolve_model(a.model, log=None if a.quiet else log, progress=not a.quiet)
    desc = export_onnx(path, a.out, opts)
    if not a.quiet:
        js, tok = sidecar_paths(Path(a.out))
        print(f"{a.out}: {desc['bytes'] / 2**20:.1f} MiB ({opts.format}, opset {opts.opset}); "
              f"{js.name}" + (f", {tok.name}" if desc["tokenizer"]["file"] else "") + " beside it")
    return 0


def register(sub):
    from ..export.onnx import FORMATS, ExportOptions
    s = sub.add_parser("export-onnx", help="export a model as an ONNX decoder graph (KV cache in and out)")
    s.add_argument("model", help="model file (.ep) or a known model name")
    s.add_argument("out", help="the .onnx file to write (OUT.json and OUT.tokenizer.json go beside it)")
    option(s, ExportOptions, "opset", "--opset", type=int)
    option(s, ExportOptions, "format", "--format", choices=FORMATS)
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(func=cmd_export_onnx)
