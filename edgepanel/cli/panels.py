"""Panels on the command line: `data build|validate|show|pairs|refine`, `eval` (what a panel is
worth) and `story` (the write / update loop)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .options import log
from .run import load_model, model_command, sampling, sampling_options


def positive(name: str, value, low: int = 1):
    if value is not None and value < low:
        raise ValueError(f"{name} must be at least {low}, got {value}")


def cmd_data_build(a) -> int:
    positive("--limit", a.limit)
    from ..panels.books import open_book
    from ..panels.build import ModelSummarizer, build_lines
    summarizer = None
    if a.model:
        summarizer = ModelSummarizer(load_model(a))
    books = [open_book(b) for b in a.books]
    per_book = None if a.limit is None else -(-a.limit // len(books))

    def lines():
        for spec, book in zip(a.books, books):
            yield from build_lines(book, per_book, a.seed, summarizer, source=spec)

    from ..panels.pairs import write_lines
    n = write_lines(Path(a.out), lines())
    if not a.quiet:
        log(f"wrote {n} examples from {len(books)} book(s) to {a.out}")
    return 0


def cmd_data_validate(a) -> int:
    from ..panels import dataset
    ex = dataset.load(a.file)
    fields = sorted({f for e in ex for f in e.panel.present()})
    print(f"{a.file}: {len(ex)} valid examples; fields used: {', '.join(fields)}")
    return 0


def cmd_data_show(a) -> int:
    from ..panels import dataset
    ex = dataset.load(a.file)
    if not 1 <= a.n <= len(ex):
        raise ValueError(f"{a.file} has {len(ex)} examples; N must be 1..{len(ex)}, got {a.n}")
    m = load_model(a)
    t = dataset.tokenize(ex[a.n - 1], m.tokenizer, a.seq_len, a.condition)
    start = int(t.mask.argmax())
    print(t.rendered.text, end="")
    print(f"\n----- target ({len(t.ids) - start} tokens) -----\n{ex[a.n - 1].target}")
    print(f"----- {start} prompt tokens + {len(t.ids) - start} target tokens = {len(t.ids)} "
          f"(chat template: {'yes' if t.rendered.chat else 'no'}; dropped: {', '.join(t.rendered.dropped) or 'nothing'})")
    return 0


def cmd_data_pairs(a) -> int:
    from ..panels import dataset
    from ..panels.pairs import mismatch_pairs, model_pairs, write_lines
    positive("--limit", a.limit)
    if a.mismatch and a.crlft:
        raise ValueError("--crlft needs model-written paragraphs: leave out --mismatch")
    if a.mismatch and a.model:
        raise ValueError("--mismatch takes the rejected paragraphs from other panels: leave out --model")
    ex = dataset.load(a.file)[: a.limit]
    opts = sampling(a)
    seed = opts.pop("seed", None) or 0
    if a.mismatch:
        lines = mismatch_pairs(ex, seed)
    else:
        from ..sample import Sampling
        m = load_model(a)
        max_tokens = opts.pop("max_tokens", Sampling.default("max_tokens"))
        lines = model_pairs(m, ex, seed, max_tokens, classes=a.crlft, progress=not a.quiet, **opts)
    n = write_lines(Path(a.out), lines)
    if not a.quiet:
        log(f"wrote {n} {'C-RLFT lines' if a.crlft else 'pairs'} from {len(ex)} examples to {a.out}")
    return 0


def cmd_data_refine(a) -> int:
    from ..tune.refine import TUNE_DEFAULTS, RefineConfig, refine
    from .options import given
    from .tune import tune_config
    cfg = RefineConfig(**given(a, RefineConfig))
    tune = tune_config(a, TUNE_DEFAULTS)
    from .. import hub
    path = hub.resolve_model(a.model, log=None if a.quiet else log, progress=not a.quiet)
    res = refine(path, a.data, a.out, cfg, tune, eval_data=a.eval, threads=a.threads,
                 log=None if a.quiet else log, progress=not a.quiet)
    print("| round | examples | rewrites kept | mean I (%) | held-out loss before | after |")
    print("|---|---|---|---|---|---|")
    for r in res:
        fmt = (lambda v: "" if v is None else f"{v:.4f}")
        print(f"| {r.round} | {r.examples} | {r.rewrites_kept} | {r.mean_I:.2f} | {fmt(r.held_out_before)} | "
              f"{fmt(r.held_out_after)} |")
    if not a.quiet:
        from ..tune.refine import rounds_dir
        log(f"wrote {a.out}; each round's data and model in {rounds_dir(a.out)}")
    return 0


def cmd_eval(a) -> int:
    from ..panels import dataset
    from ..panels.evaluate import evaluate, table
    positive("--limit", a.limit)
    positive("--seq-len", a.seq_len, 8)
    ex = dataset.load(a.data)[: a.limit]
    m = load_model(a)
    conditions = a.conditions.split(",") if a.conditions else None
    if conditions:
        for c in conditions:
            dataset.condition_panel(ex[0].panel, c)   # an unknown condition fails before any work
    res = evaluate(m, ex, conditions, a.seq_len, progress=not a.quiet)
    res["model"] = str(m.path)
    res["data"] = str(a.data)
    print(table(res))
    if a.json:
        tmp = Path(f"{a.json}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, a.json)
    return 0


def cmd_story(a) -> int:
    from ..panels import load_panel
    from ..panels.story import write_story
    positive("--paragraphs", a.paragraphs)
    panel = load_panel(a.panel) if a.panel else None
    if panel is None and not a.resume:
        raise ValueError("--panel FILE is needed (or --resume with an existing --out)")
    m = load_model(a)
    opts = sampling(a)
    max_tokens = opts.pop("max_tokens", 200)

    def show(piece):
        if not a.quiet:
            sys.stdout.write(piece)
            sys.stdout.flush()

    steps = []
    for step in write_story(m, panel, a.paragraphs, a.out, resume=a.resume, max_tokens=max_tokens,
                            on_text=show, **opts):
        steps.append(step)
    if not a.quiet:
        sys.stdout.write("\n")
        for s in steps:
            for note in s.notes:
                log(f"paragraph {s.index + 1}: {note}")
        log(f"wrote {len(steps)} paragraph(s) to {a.out}")
    return 0


def register(sub):
    d = sub.add_parser("data", help="panel datasets: build from books, validate, show")
    dsub = d.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    b = dsub.add_parser("build", help="panel datasets from books (text files or austen:NAME)")
    b.add_argument("books", nargs="+", metavar="BOOK",
                   help="a UTF-8 text file, or austen:NAME (sensesensibility, prideprejudice, mansfieldpark, "
                        "emma, northangerabbey, persuasion; Debian's r-cran-janeaustenr)")
    b.add_argument("--out", required=True, metavar="FILE.jsonl[.gz]")
    b.add_argument("--model", metavar="MODEL", help="a model writes memory and plan (default: extractive heuristics)")
    b.add_argument("--limit", type=int, default=None, help="examples in all (split evenly across books; default: every paragraph)")
    b.add_argument("--seed", type=int, default=0, help="which paragraphs are sampled under --limit (default 0)")
    b.add_argument("-t", "--threads", type=int, default=None)
    b.add_argument("-q", "--quiet", action="store_true")
    b.set_defaults(func=cmd_data_build)
    v = dsub.add_parser("validate", help="check every line of a panel dataset")
    v.add_argument("file")
    v.set_defaults(func=cmd_data_validate)
    s = dsub.add_parser("show", help="example N (1-based) rendered as the model sees it, with its token count")
    s.add_argument("file")
    s.add_argument("n", type=int)
    s.add_argument("--model", default=None, help="model file or name (default: smollm2)")
    s.add_argument("--seq-len", type=int, default=1024)
    s.add_argument("--condition", default="full", help="full, none or -FIELD")
    s.add_argument("-t", "--threads", type=int, default=None)
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(func=cmd_data_show)

    pr = dsub.add_parser("pairs", help="preference pairs from a panel dataset: chosen = the book's paragraph, "
                         "rejected = a model-written one or (--mismatch) another panel's target")
    pr.add_argument("file", help="a panel dataset (JSONL, .gz allowed)")
    pr.add_argument("--out", required=True, metavar="FILE.jsonl[.gz]")
    pr.add_argument("--mismatch", action="store_true", help="rejected = the target of another example (same book "
                    "when possible), drawn with --seed; no model needed")
    pr.add_argument("--model", metavar="MODEL", help="the model that writes the rejected paragraphs (default: smollm2)")
    pr.add_argument("--crlft", action="store_true", help='write C-RLFT lines instead: the book\'s paragraph as class '
                    '"book", the model\'s as class "model"')
    pr.add_argument("--limit", type=int, default=None, help="the first N examples only")
    pr.add_argument("-t", "--threads", type=int, default=None)
    pr.add_argument("-q", "--quiet", action="store_true")
    sampling_options(pr)
    pr.set_defaults(func=cmd_data_pairs)

    from ..tune.refine import TUNE_DEFAULTS, RefineConfig
    from .options import option
    from .tune import training_options
    rf = dsub.add_parser("refine", help="the data-model loop: the model rewrites panel fields, rewrites that lower "
                         "the target's perplexity are kept, the model is fine-tuned on the result; ROUNDS times")
    rf.add_argument("model", help="model file (.ep) or a known model name")
    rf.add_argument("--data", required=True, metavar="FILE", help="a panel dataset (JSONL, .gz allowed)")
    rf.add_argument("--out", required=True, metavar="FILE.jsonl[.gz]", help="the refined data of the last round; "
                    "each round's data and model go to OUT.rounds/")
    rf.add_argument("--eval", metavar="FILE", help="held-out panel dataset: its target loss with the panel, each round")
    g = rf.add_argument_group("the loop (defaults: edgepanel.tune.refine.RefineConfig)")
    for name, typ in (("rounds", int), ("threshold", float), ("fields", str), ("max_tokens", int), ("limit", int)):
        option(g, RefineConfig, name, "--" + name.replace("_", "-"), type=typ)
    option(g, RefineConfig, "rewrite", "--no-rewrite", action="store_const", const=False, show_default=False,
           help="the control run: fine-tune each round on the data as given, nothing rewritten, with the same "
                "seeds and held-out measurement (the fine-tuning's share of a loop's gain)")
    training_options(rf, leave_out=("objective", "beta", "label_smoothing", "class_weights"), defaults=TUNE_DEFAULTS)
    rf.add_argument("-t", "--threads", type=int, default=None)
    rf.add_argument("-q", "--quiet", action="store_true")
    rf.set_defaults(func=cmd_data_refine)

    e = model_command(sub, "eval", "loss, accuracy and entropy of panel targets: full panel, none, each field removed", cmd_eval)
    e.add_argument("--data", required=True, metavar="FILE", help="a panel dataset (JSONL, .gz allowed)")
    e.add_argument("--json", metavar="OUT", help="write the result as JSON")
    e.add_argument("--limit", type=int, default=None, help="first N examples only")
    e.add_argument("--seq-len", type=int, default=1024, help="tokens per example, panel shortened to fit (default 1024)")
    e.add_argument("--conditions", help="comma-separated: full,none,-plan,... (default: all)")

    st = model_command(sub, "story", "write a story paragraph by paragraph from a panel, updating it as it goes", cmd_story)
    st.add_argument("--panel", metavar="FILE", help="the starting panel (JSON)")
    st.add_argument("--paragraphs", type=int, default=3, help="paragraphs in all (default 3)")
    st.add_argument("--out", required=True, metavar="FILE.jsonl", help="one line per paragraph, flushed as written")
    st.add_argument("--resume", action="store_true", help="continue an interrupted --out")
    sampling_options(st)
