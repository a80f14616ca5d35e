"""The command line: `edgepanel COMMAND ...` (also `python -m edgepanel`).

    edgepanel generate -p "Once upon a time"      # the default model, fetched and converted once
    edgepanel generate model.ep -p "Hi" --chat
    edgepanel chat [MODEL]
    edgepanel convert SRC OUT.ep --planes 2 --group 64
    edgepanel perplexity MODEL FILE
    edgepanel fetch smollm2
    edgepanel info [MODEL]
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

from .errors import EdgepanelError


def err(msg: str):
    print(f"edgepanel: {msg}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# model resolution


def default_recipe():
    from .convert import Recipe, recover
    recipe = Recipe(**DEFAULT_RECIPE)
    if not recover.available():   # the same file name as what convert will really do
        recipe.tune_steps = 0
    return recipe


# The recipe a newcomer's first `edgepanel generate` uses (README, "The default model"): the best measured quality.
DEFAULT_RECIPE = dict(planes=4, group=64, scales="u8")


def resolve_model(spec: str | None, quiet: bool = False) -> Path:
    """A model file path from a path, a known model name, or None (the default model)."""
    from . import hub
    if spec and Path(spec).suffix == ".ep":
        if not Path(spec).exists():
            raise EdgepanelError(f"{spec}: no such model file")
        return Path(spec)
    name = spec or hub.DEFAULT_MODEL
    if name not in hub.MODELS:
        if spec and Path(spec).exists():
            raise EdgepanelError(f"{spec}: not an edgepanel model file (.ep); convert it first: "
                                 f"edgepanel convert {spec} OUT.ep")
        raise EdgepanelError(f"{spec}: no such model file or known model ({', '.join(sorted(hub.MODELS))})")
    recipe = default_recipe()
    out = hub.converted_path(name, recipe.tag())
    if out.exists():
        return out
    src = hub.fetch(name, log=(lambda m: None) if quiet else (lambda m: print(m, file=sys.stderr)))
    from .convert import convert
    if not quiet:
        print(f"converting {src.name} -> {out.name} (once; cached in {out.parent})", file=sys.stderr)
    report = convert(src, out, recipe, progress=not quiet,
                     log=None if quiet else (lambda m: print("  " + m, file=sys.stderr, flush=True)))
    if not quiet:
        print(f"done in {report.seconds:.0f} s: {report.linear_bits:.2f} bits/weight, "
              f"{report.file_bytes / 2**20:.1f} MiB", file=sys.stderr)
    return out


def sampling_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("sampling")
    g.add_argument("-n", "--max-tokens", type=int, default=256, help="tokens to generate (default 256)")
    g.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    g.add_argument("--min-p", type=float, default=0.05, help="drop tokens below min-p x the best (default 0.05)")
    g.add_argument("--repeat-penalty", type=float, default=1.1, help="repetition penalty (default 1.1)")
    g.add_argument("--seed", type=int, default=None, help="random seed (reproducible output)")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def sampling_kwargs(a) -> dict:
    return dict(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, min_p=a.min_p,
                repetition_penalty=a.repeat_penalty, seed=a.seed, stop=a.stop)


def load_model(a):
    from .model.model import load
    path = resolve_model(a.model, quiet=getattr(a, "quiet", False))
    t = time.time()
    m = load(path, threads=a.threads)
    if getattr(a, "verbose", False):
        print(f"loaded {path} in {time.time() - t:.2f} s: {m}", file=sys.stderr)
    return m


def stream_out(pieces, verbose: bool) -> int:
    t0, n = time.time(), 0
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
        n += 1
    sys.stdout.write("\n")
    sys.stdout.flush()
    if verbose:
        dt = time.time() - t0
        print(f"[{n} pieces in {dt:.2f} s]", file=sys.stderr)
    return n


# ---------------------------------------------------------------------------------------------
# commands


def cmd_info(a) -> int:
    from . import __version__, kernels
    from .kernels import _cffi

    print(f"edgepanel {__version__} on {platform.machine()} ({platform.system()}), Python {platform.python_version()}")
    print(f"kernels:   {kernels.info()}")
    print(f"compiled:  {', '.join(_cffi.compiled_isas()) or 'none (C extension not built)'}")
    print(f"runnable:  {', '.join(b if i is None else f'{b}/{i}' for b, i in kernels.available())}")
    if _cffi.lib is not None:
        print(f"cpus:      {_cffi.lib.ep_cpu_count()}")
    if a.model:
        from .format import ModelFile
        path = resolve_model(a.model)
        f = ModelFile(path)
        c, kinds = f.meta.config, {}
        for r in f.meta.tensors.values():
            key = r["kind"] + (f" k={r['k']} g={r['group']}" if r["kind"] == "planes" else "")
            kinds[key] = kinds.get(key, 0) + 1
        print(f"model:     {path} ({path.stat().st_size / 2**20:.1f} MiB)")
        print(f"           {f.meta.architecture}: {c['n_layers']} layers, dim {c['dim']}, heads {c['n_heads']}/"
              f"{c['n_kv_heads']}, MLP {c['hidden_dim']}, vocab {c['vocab_size']}, context {c['max_seq_len']}")
        print(f"tensors:   {', '.join(f'{v} {k}' for k, v in sorted(kinds.items()))}")
        print(f"source:    {f.meta.source.get('path')} ({f.meta.source.get('architecture')})")
        print(f"tokenizer: {'yes' if f.tokenizer_json else 'none (token ids only)'}; chat template: "
              f"{'yes' if f.meta.tokenizer.get('chat_template') else 'no'}")
    return 0


def cmd_fetch(a) -> int:
    from . import hub
    print(hub.fetch(a.name))
    return 0


def cmd_convert(a) -> int:
    from .convert import Recipe, convert
    budget = {}
    if a.bits is not None:  # --planes / --group restrict the formats the budget chooses from
        if a.planes:
            budget["bits_planes"] = (a.planes,)
        if a.group:
            budget["bits_groups"] = (a.group,)
    rows = "auto" if a.bits is not None else "int8"
    recipe = Recipe(planes=a.planes or 2, group=64 if a.group is None else a.group, keep=a.keep,
                    passthrough=a.passthrough, scales=a.scales, embed=a.embed or rows, head=a.head or rows, als_iters=a.als_iters,
                    calib=None if a.no_calib else a.calib, calib_tokens=a.calib_tokens, seq_len=a.seq_len,
                    rotate=not a.no_rotate, act_order=a.act_order, seed=a.seed, bits=a.bits,
                    tune_steps=a.tune_steps, tune_lr=a.tune_lr, **budget)
    log = (lambda m: None) if a.quiet else (lambda m: print(m, file=sys.stderr))
    report = convert(a.src, a.out, recipe, progress=not a.quiet, log=log)
    if a.eval:
        from .convert import evaluate
        report.perplexity = evaluate(a.src, a.out, a.eval, a.eval_tokens)
    if not a.quiet:
        print(report.table())
    return 0


def cmd_generate(a) -> int:
    m = load_model(a)
    prompt = a.prompt if a.prompt is not None else sys.stdin.read()
    pieces = m.generate(prompt, max_tokens=a.max_tokens, stream=True, chat=a.chat, truncate=a.truncate,
                        **sampling_kwargs(a))
    stream_out(pieces, a.verbose)
    return 0


def cmd_chat(a) -> int:
    m = load_model(a)
    messages = [{"role": "system", "content": a.system}] if a.system else []
    print("chat: empty line or Ctrl-D to quit, /reset to start over", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if not line.strip():
            return 0
        if line.strip() == "/reset":
            messages = messages[:1] if a.system else []
            continue
        messages.append({"role": "user", "content": line})
        reply = []
        for piece in m.generate(messages, max_tokens=a.max_tokens, stream=True, truncate=True, **sampling_kwargs(a)):
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})


def cmd_perplexity(a) -> int:
    m = load_model(a)
    try:
        text = Path(a.file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EdgepanelError(f"{a.file}: cannot read as UTF-8 text ({exc})") from None
    t = time.time()
    ppl = m.perplexity(text, window=a.window)
    print(f"perplexity {ppl:.3f} ({a.file}, {len(m.tokenizer.encode(text))} tokens, window {a.window or 'auto'}, "
          f"{time.time() - t:.1f} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .convert.base import Recipe   # the defaults below are the recipe's

    p = argparse.ArgumentParser(prog="edgepanel", description="Binarized language models on CPU-only edge devices.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def model_cmd(name, help_, func, model_required=False):
        s = sub.add_parser(name, help=help_)
        if model_required:
            s.add_argument("model", help="model file (.ep) or a known model name")
        else:
            s.add_argument("model", nargs="?", help="model file (.ep) or a known model name (default: smollm2)")
        s.add_argument("-t", "--threads", type=int, default=None, help="threads (default: all cores)")
        s.add_argument("-v", "--verbose", action="store_true")
        s.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
        s.set_defaults(func=func)
        return s

    s = sub.add_parser("info", help="kernels, machine, and optionally a model")
    s.add_argument("model", nargs="?")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("fetch", help="download a known model (e.g. smollm2)")
    s.add_argument("name", nargs="?", default="smollm2")
    s.set_defaults(func=cmd_fetch)

    s = sub.add_parser("convert", help="convert a Hugging Face directory or GGUF file to a model file")
    s.add_argument("src")
    s.add_argument("out")
    s.add_argument("--planes", "-k", type=int, default=None, help="binary planes per weight, 1..4 (default 2)")
    s.add_argument("--bits", type=float, default=None,
                   help="average bits per weight, scales included: planes and group size per tensor by "
                        "measured sensitivity (with --planes / --group: only that plane count / group size); "
                        "embeddings and head are chosen and counted too unless --embed / --head fix them")
    s.add_argument("--group", "-g", type=int, default=None, help="inputs per scale: 32, 64, 128, 256, 0 = row (default 64)")
    s.add_argument("--keep", action="append", default=[], metavar="PATTERN",
                   help="leave linear layers matching PATTERN (e.g. 'layers.0.*') unbinarized")
    s.add_argument("--passthrough", action="store_true", help="keep every weight at its source precision")
    s.add_argument("--embed", default=None, metavar="FORMAT",
                   help="embeddings: int8 (rows, the default), f16, f32, kK or kKgG (K planes, group G), "
                        "auto (chosen by --bits, its default there)")
    s.add_argument("--head", default=None, metavar="FORMAT", help="the output layer: as --embed")
    s.add_argument("--scales", choices=["f16", "u8"], default="f16",
                   help="plane scales: float16, or 8-bit codes under a float32 multiplier per row (half the "
                        "scale bytes; the same quality on SmolLM2)")
    s.add_argument("--als-iters", type=int, default=4, help="alternating least-squares rounds (default 4)")
    c = s.add_argument_group("calibration (on by default, with the shipped text)")
    c.add_argument("--calib", metavar="TEXT_FILE", default="default",
                   help="UTF-8 text the layers are fitted on (default: edgepanel/data/calib.txt)")
    c.add_argument("--no-calib", action="store_true", help="data-free fitting (greedy + ALS) instead")
    c.add_argument("--calib-tokens", type=int, default=Recipe.calib_tokens,
                   help="calibration tokens (default %(default)s)")
    c.add_argument("--seq-len", type=int, default=Recipe.seq_len,
                   help="tokens per calibration sequence (default %(default)s)")
    c.add_argument("--no-rotate", action="store_true", help="no rotation before calibration")
    c.add_argument("--act-order", action="store_true",
                   help="GPTQ rounds columns by decreasing input energy (helps layers with outlier inputs; "
                        "measured worse on SmolLM2 after rotation)")
    c.add_argument("--seed", type=int, default=0, help="seed of the random rotations and of the tuning order")
    c.add_argument("--tune-steps", type=int, default=Recipe.tune_steps,
                   help="after fitting, tune the plane scales against the float model's outputs for this "
                        "many steps, one calibration sequence each (default %(default)s; 0: off; needs torch)")
    c.add_argument("--tune-lr", type=float, default=None,
                   help="learning rate of the scale tuning (default: 1e-3 below 4 planes, 3e-4 from 4)")
    s.add_argument("--eval", metavar="TEXT_FILE", help="report perplexity before and after on this text")
    s.add_argument("--eval-tokens", type=int, default=2048, help="tokens of --eval scored (default 2048)")
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(func=cmd_convert)

    s = model_cmd("generate", "generate text from a prompt", cmd_generate)
    s.add_argument("-p", "--prompt", help="prompt text (default: standard input)")
    s.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    s.add_argument("--truncate", action="store_true", help="keep the end of a prompt longer than the context")
    sampling_args(s)

    s = model_cmd("chat", "interactive multi-turn chat", cmd_chat)
    s.add_argument("--system", default=None, help="system message")
    sampling_args(s)

    s = model_cmd("perplexity", "perplexity of a UTF-8 text file", cmd_perplexity, model_required=True)
    s.add_argument("file")
    s.add_argument("--window", type=int, default=None, help="tokens per scored window (default: min(context, 1024))")
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


if __name__ == "__main__":
    sys.exit(main())
