"""Running a model: `generate`, `chat`, `perplexity`, and the pieces every model command shares
(the MODEL argument, threads, loading)."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from ..errors import EdgepanelError
from ..sample import Sampling
from .options import given, log, option


def model_command(sub, name: str, help_: str, func, model_required: bool = False):
    """A subcommand that runs a model: MODEL (a .ep file or a known name), threads, verbosity."""
    s = sub.add_parser(name, help=help_)
    if model_required:
        s.add_argument("model", help="model file (.ep) or a known model name")
    else:
        s.add_argument("model", nargs="?", help="model file (.ep) or a known model name (default: smollm2)")
    s.add_argument("-t", "--threads", type=int, default=None, help="threads (default: all cores)")
    s.add_argument("--kv-dtype", choices=("float16", "float32"), default=None,
                   help="what the key/value cache holds (default: float16, half the memory of float32)")
    s.add_argument("-v", "--verbose", action="store_true")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    s.set_defaults(func=func)
    return s


def load_model(a):
    from .. import hub
    from ..model import load
    quiet = getattr(a, "quiet", False)
    path = hub.resolve_model(a.model, log=None if quiet else log, progress=not quiet)
    t = time.time()
    m = load(path, threads=a.threads, kv_dtype=getattr(a, "kv_dtype", None))
    if getattr(a, "verbose", False):
        log(f"loaded {path} in {time.time() - t:.2f} s: {m}")
    return m


def sampling_options(s):
    g = s.add_argument_group("sampling (defaults: edgepanel.sample.Sampling)")
    option(g, Sampling, "max_tokens", "-n", "--max-tokens", type=int)
    option(g, Sampling, "temperature", "--temperature", type=float)
    option(g, Sampling, "top_k", "--top-k", type=int)
    option(g, Sampling, "top_p", "--top-p", type=float)
    option(g, Sampling, "min_p", "--min-p", type=float)
    option(g, Sampling, "repetition_penalty", "--repeat-penalty", type=float)
    option(g, Sampling, "seed", "--seed", type=int)
    option(g, Sampling, "stop", "--stop", action="append")


def sampling(a) -> dict:
    """generate()'s keyword arguments from the options given (the rest: Sampling's defaults)."""
    return given(a, Sampling)


def stream_out(pieces, verbose: bool) -> int:
    t0, n = time.time(), 0
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
        n += 1
    sys.stdout.write("\n")
    sys.stdout.flush()
    if verbose:
        log(f"[{n} pieces in {time.time() - t0:.2f} s]")
    return n


def cmd_generate(a) -> int:
    if a.best_of is not None and a.best_of < 1:
        raise ValueError(f"--best-of must be at least 1, got {a.best_of}")
    m = load_model(a)
    prompt = a.prompt if a.prompt is not None else sys.stdin.read()
    if a.best_of:
        return best_of_out(m, prompt, a)
    stream_out(m.generate(prompt, stream=True, chat=a.chat, truncate=a.truncate, **sampling(a)), a.verbose)
    return 0


def best_of_out(m, prompt, a) -> int:
    """--best-of N: the candidate with the highest implicit reward on stdout, every candidate's
    scores on stderr (tune/reward.py)."""
    from ..tune.reward import best_of
    opts = sampling(a)
    seed = opts.pop("seed", None)
    res = best_of(m, prompt, a.best_of, seed=seed, chat=a.chat, truncate=a.truncate, **opts)
    print(res.text)
    if not a.quiet:
        for i, c in enumerate(res.candidates):
            log(f"{'*' if i == res.index else ' '} candidate {i + 1}: reward {c.reward:+.4f}, mean log-prob "
                f"{c.mean_logp:.4f} over {c.tokens} tokens (seed {c.seed})")
    return 0


def cmd_chat(a) -> int:
    m = load_model(a)
    messages = [{"role": "system", "content": a.system}] if a.system else []
    log("chat: empty line or Ctrl-D to quit, /reset to start over")
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
        for piece in m.generate(messages, stream=True, truncate=True, **sampling(a)):
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


def register(sub):
    s = model_command(sub, "generate", "generate text from a prompt", cmd_generate)
    s.add_argument("-p", "--prompt", help="prompt text (default: standard input)")
    s.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    s.add_argument("--truncate", action="store_true", help="keep the end of a prompt longer than the context")
    s.add_argument("--best-of", type=int, default=None, metavar="N",
                   help="sample N continuations (seeds derived from --seed) and print the one with the highest "
                        "implicit reward against the reference the model file carries (ties: the highest mean "
                        "log-probability per token); the scores go to stderr")
    sampling_options(s)

    s = model_command(sub, "chat", "interactive multi-turn chat", cmd_chat)
    s.add_argument("--system", default=None, help="system message")
    sampling_options(s)

    s = model_command(sub, "perplexity", "perplexity of a UTF-8 text file", cmd_perplexity, model_required=True)
    s.add_argument("file")
    s.add_argument("--window", type=int, default=None, help="tokens per scored window (default: min(context, 1024))")
