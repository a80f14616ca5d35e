"""`finetune`: zeroth-order fine-tuning on the device (edgepanel.tune); options and defaults are
TuneConfig's.  Preference objectives (dpo, rdpo, ipo) read pair files and cache the reference
log-probabilities beside the output; crlft reads class-carrying lines (tune/prefs.py)."""
from __future__ import annotations

from pathlib import Path

from ..tune.trainer import OBJECTIVE_RECIPES, TuneConfig
from .options import given, log, option
from .run import load_model, model_command


def cmd_finetune(a) -> int:
    from ..tune import data, finetune
    cfg = tune_config(a)
    if (cfg.objective == "kd") != bool(a.teacher):
        raise ValueError("--objective kd needs --teacher MODEL (and --teacher needs --objective kd)")
    from ..tune import prefs
    from ..tune.objectives import PREFERENCE
    if a.reference_cache and cfg.objective not in PREFERENCE:
        raise ValueError("--reference-cache goes with a preference objective (dpo, rdpo, ipo)")
    m = load_model(a)
    if cfg.objective == "kd":
        train, held = kd_examples(a, m, cfg), None
    elif cfg.objective in PREFERENCE:
        train = prefs.load_pairs(a.data, m.tokenizer, cfg.seq_len)
        held = prefs.load_pairs(a.eval, m.tokenizer, cfg.seq_len) if a.eval else []
        # the reference is the model as loaded: its log-probabilities once, before any step (a
        # resumed run reads the same cache)
        prefs.attach_reference(m, train + held, a.reference_cache or str(a.out) + ".reference",
                               log=None if a.quiet else log, progress=not a.quiet)
        held = held or None
    elif cfg.objective == "crlft":
        train = prefs.load_classed(a.data, m.tokenizer, cfg.seq_len)
        held = prefs.load_classed(a.eval, m.tokenizer, cfg.seq_len) if a.eval else None
    else:
        train = data.load(a.data, m.tokenizer, cfg.seq_len, a.condition)
        held = data.load(a.eval, m.tokenizer, cfg.seq_len, a.condition) if a.eval else None
    checkpoint = Path(a.checkpoint or str(a.out) + ".ckpt")
    if not a.quiet:
        size = f"{len(train)} pairs" if cfg.objective in PREFERENCE else \
            f"{len(train)} examples ({sum(e.targets for e in train)} target tokens)"
        log(f"fine-tuning {m.path.name}: {size}{f', {len(held)} held out' if held else ''}; checkpoints to {checkpoint}")

    if held and not a.quiet and not a.resume:
        from ..tune.trainer import held_out
        loss, metrics = held_out(m, cfg, held)
        log(f"held-out loss before: {loss:.4f}{metrics_text(metrics)}")

    def report(info):
        if not a.quiet and info.eval_loss is not None:
            log(f"step {info.step}: train loss {info.loss:.4f}, held-out loss {info.eval_loss:.4f}"
                f"{metrics_text(info.eval_metrics)} ({info.seconds:.0f} s)")

    t = finetune(m, train, cfg, eval_data=held, out=a.out, checkpoint=checkpoint, resume=a.resume,
                 callback=report, progress=not a.quiet)
    if not a.quiet:
        log(f"wrote {a.out} after {t.step} steps ({t.params.size} trained values)")
    return 0


def metrics_text(metrics) -> str:
    if not metrics:
        return ""
    return "; " + ", ".join(f"{k} {v:+.4f}" if k != "rewards/accuracies" else f"{k} {v:.3f}"
                            for k, v in metrics.items() if k.startswith("rewards/"))


def kd_examples(a, m, cfg):
    """Windows of the --data text with the teacher's top-k targets, cached beside the output."""
    from .. import hub
    from ..model import load
    from ..tune import teacher
    try:
        text = Path(a.data).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{a.data}: cannot read as UTF-8 text ({exc}); kd reads a plain text") from None
    t = load(hub.resolve_model(a.teacher, log=None if a.quiet else log), threads=a.threads)
    if t.cfg.vocab_size != m.cfg.vocab_size:
        raise ValueError(f"the teacher's vocabulary ({t.cfg.vocab_size}) is not the student's ({m.cfg.vocab_size})")
    return teacher.build(t, m.tokenizer, text, cfg.seq_len, a.teacher_windows, a.teacher_k,
                         path=str(a.out) + f".teacher-top{a.teacher_k}", log=None if a.quiet else log)


def register(sub):
    s = model_command(sub, "finetune", "fine-tune a model on the device by zeroth-order steps", cmd_finetune)
    s.add_argument("--data", required=True, metavar="FILE", help="training data: a UTF-8 text, or JSONL lines "
                   '{"text": ...} or {"prompt": ..., "target": ...} (the loss counts the target only); '
                   'kd: a UTF-8 text; dpo, rdpo, ipo: {"panel" or "prompt", "chosen", "rejected"} lines; '
                   'crlft: {"panel" or "prompt", "target", "class"} lines')
    s.add_argument("--condition", default="full", help="panel datasets: what the model is given before each "
                   "target: full (the panel), none (the bare instruction: plain-text training on the same targets) "
                   "or -FIELD (default full)")
    s.add_argument("--eval", metavar="FILE", help="held-out data of the same kind, evaluated every --eval-every steps")
    s.add_argument("--out", required=True, metavar="OUT.ep", help="the tuned model file")
    s.add_argument("--checkpoint", metavar="FILE", help="checkpoint path (default: OUT.ep.ckpt)")
    s.add_argument("--resume", metavar="FILE", help="continue from this checkpoint (bit for bit as if never stopped)")
    s.add_argument("--reference-cache", metavar="FILE", help="dpo, rdpo, ipo: where the reference log-probabilities "
                   "of the pairs are cached (default: OUT.ep.reference); reused when it holds these pairs under "
                   "this model")
    s.add_argument("--teacher", metavar="MODEL", help="kd: the model whose next-token distributions are matched "
                   "(e.g. the source converted with --passthrough); its top-k are computed once and cached")
    s.add_argument("--teacher-k", type=int, default=64, help="kd: teacher log-probabilities kept per position (default 64)")
    s.add_argument("--teacher-windows", type=int, default=None,
                   help="kd: windows of --data the teacher scores (default: all)")
    training_options(s)


TRAINING_OPTIONS = (("objective", str), ("gradient", str), ("params", str), ("tensors", str), ("layers", str), ("granularity", str), ("steps", int),
                    ("lr", float), ("eps", float), ("n_perturb", int), ("noise", str), ("optimizer", str),
                    ("schedule", str), ("warmup", int), ("weight_decay", float), ("clip", float),
                    ("batch", int), ("seq_len", int), ("seed", int), ("eval_every", int),
                    ("eval_batches", int), ("checkpoint_every", int), ("beta", float), ("label_smoothing", float),
                    ("class_weights", str))


def training_options(s, leave_out=(), defaults=None):
    """TuneConfig's options (and --no-clip) on parser `s`; `defaults`: the command's own default of
    some fields, shown in their help (tune_config applies them)."""
    defaults = defaults or {}
    g = s.add_argument_group("training (defaults: edgepanel.tune.TuneConfig; --objective dpo and rdpo default to "
                             "their measured recipe: " + ", ".join(f"--{k.replace('_', '-')} {v}"
                                                                 for k, v in OBJECTIVE_RECIPES["dpo"].items()) + ")")
    for name, typ in TRAINING_OPTIONS:
        if name in leave_out:
            continue
        if name in defaults:
            text = TuneConfig.__dataclass_fields__[name].metadata.get("help", "")
            option(g, TuneConfig, name, "--" + name.replace("_", "-"), type=typ, show_default=False,
                   help=f"{text} (default for this command: {defaults[name]})")
        else:
            option(g, TuneConfig, name, "--" + name.replace("_", "-"), type=typ)
    g.add_argument("--no-clip", action="store_true", help="do not clip the projected gradient")


def tune_config(a, defaults=None) -> TuneConfig:
    """TuneConfig from the options given (the rest: `defaults`, then its own defaults)."""
    options = dict(defaults or {}) | given(a, TuneConfig)
    if a.no_clip:
        options["clip"] = None
    return TuneConfig.for_objective(**options)
