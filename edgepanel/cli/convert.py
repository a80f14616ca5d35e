"""Getting models: `convert` (a Hugging Face directory or GGUF file to a model file) and `fetch`
(a known model's source).  Conversion options and their defaults are Recipe's."""
from __future__ import annotations

from ..convert.base import ROW_FORMATS, TUNE_GRANULARITIES, Recipe
from .options import given, log, option


def cmd_convert(a) -> int:
    from ..convert import convert
    options = given(a, Recipe)
    if a.no_calib:
        options["calib"] = None
    for flag, field in (("no_rotate", "rotate"), ("act_order", "act_order"), ("passthrough", "passthrough")):
        if getattr(a, flag):
            options[field] = flag == field
    if a.bits is not None:   # --planes / --group restrict the formats the budget chooses from
        if a.planes is not None:
            options["bits_planes"] = (a.planes,)
        if a.group is not None:
            options["bits_groups"] = (a.group,)
    recipe = Recipe(**options)
    report = convert(a.src, a.out, recipe, progress=not a.quiet, log=(lambda m: None) if a.quiet else log)
    if a.eval:
        from ..convert import evaluate
        report.perplexity = evaluate(a.src, a.out, a.eval, a.eval_tokens)
    if not a.quiet:
        print(report.table())
    return 0


def cmd_fetch(a) -> int:
    from .. import hub
    print(hub.fetch(a.name))
    return 0


def register(sub):
    s = sub.add_parser("fetch", help="download a known model (e.g. smollm2)")
    s.add_argument("name", nargs="?", default="smollm2")
    s.set_defaults(func=cmd_fetch)

    s = sub.add_parser("convert", help="convert a Hugging Face directory or GGUF file to a model file")
    s.add_argument("src")
    s.add_argument("out")
    option(s, Recipe, "planes", "--planes", "-k", type=int)
    option(s, Recipe, "bits", "--bits", type=float,
           help="average bits per weight, scales included: planes and group size per tensor by measured "
                "sensitivity (with --planes / --group: only that plane count / group size); embeddings and "
                "head are chosen and counted too unless --embed / --head fix them")
    option(s, Recipe, "group", "--group", "-g", type=int)
    option(s, Recipe, "keep", "--keep", action="append", metavar="PATTERN")
    s.add_argument("--passthrough", action="store_true",
                   help=Recipe.__dataclass_fields__["passthrough"].metadata["help"])
    option(s, Recipe, "embed", "--embed", metavar="FORMAT", help=f"embeddings: {ROW_FORMATS} (default: int8, "
                                                                  "or auto with --bits)", show_default=False)
    option(s, Recipe, "head", "--head", metavar="FORMAT", help="the output layer: as --embed")
    option(s, Recipe, "scales", "--scales", choices=["f16", "u8"])
    option(s, Recipe, "als_iters", "--als-iters", type=int)
    c = s.add_argument_group("calibration (on by default, with the shipped text)")
    option(c, Recipe, "calib", "--calib", metavar="TEXT_FILE",
           help="UTF-8 text the layers are fitted on (default: the shipped edgepanel/assets/calib.txt)",
           show_default=False)
    c.add_argument("--no-calib", action="store_true", help="data-free fitting (greedy + ALS) instead")
    option(c, Recipe, "calib_tokens", "--calib-tokens", type=int)
    option(c, Recipe, "seq_len", "--seq-len", type=int)
    c.add_argument("--no-rotate", action="store_true", help="no rotation before calibration")
    c.add_argument("--act-order", action="store_true", help=Recipe.__dataclass_fields__["act_order"].metadata["help"])
    option(c, Recipe, "seed", "--seed", type=int)
    option(c, Recipe, "tune_steps", "--tune-steps", type=int)
    option(c, Recipe, "tune_lr", "--tune-lr", type=float)
    option(c, Recipe, "tune", "--tune", choices=["auto", "fo", "numpy", "zo"])
    option(c, Recipe, "tune_granularity", "--tune-granularity", choices=list(TUNE_GRANULARITIES))
    option(c, Recipe, "tune_dtype", "--tune-dtype", choices=["auto", "float32", "bfloat16"])
    option(c, Recipe, "calib_dtype", "--calib-dtype", choices=["auto", "float32", "bfloat16"])
    s.add_argument("--eval", metavar="TEXT_FILE", help="report perplexity before and after on this text")
    s.add_argument("--eval-tokens", type=int, default=2048, help="tokens of --eval scored (default 2048)")
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(func=cmd_convert)
