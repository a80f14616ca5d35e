"""`finetune`: zeroth-order fine-tuning on the device (edgepanel.tune); options and defaults are
TuneConfig's."""
from __future__ import annotations

from pathlib import Path

from ..tune.trainer import TuneConfig
from .options import given, log, option
from .run import load_model, model_command


def cmd_finetune(a) -> int:
    from ..tune import data, finetune
    options = given(a, TuneConfig)
    if a.no_clip:
        options["clip"] = None
    cfg = TuneConfig(**options)
    if (cfg.objective == "kd") != bool(a.teacher):
        raise ValueError("--objective kd needs --teacher MODEL (and --teacher needs --objective kd)")
    m = load_model(a)
    if cfg.objective == "kd":
        train, held = kd_examples(a, m, cfg), None
    else:
        train = data.load(a.data, m.tokenizer, cfg.seq_len, a.condition)
        held = data.load(a.eval, m.tokenizer, cfg.seq_len, a.condition) if a.eval else None
    checkpoint = Path(a.checkpoint or str(a.out) + ".ckpt")
    if not a.quiet:
        log(f"fine-tuning {m.path.name}: {len(train)} examples ({sum(e.targets for e in train)} target tokens)"
            f"{f', {len(held)} held out' if held else ''}; checkpoints to {checkpoint}")

    if held and not a.quiet and not a.resume:
        from ..tune.trainer import held_out_loss
        log(f"held-out loss before: {held_out_loss(m, cfg, held):.4f}")

    def report(info):
        if not a.quiet and info.eval_loss is not None:
            log(f"step {info.step}: train loss {info.loss:.4f}, held-out loss {info.eval_loss:.4f} "
                f"({info.seconds:.0f} s)")

    t = finetune(m, train, cfg, eval_data=held, out=a.out, checkpoint=checkpoint, resume=a.resume,
                 callback=report, progress=not a.quiet)
    if not a.quiet:
        log(f"wrote {a.out} after {t.step} steps ({t.params.size} trained values)")
    return 0


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
                   "kd: a UTF-8 text")
    s.add_argument("--condition", default="full", help="panel datasets: what the model is given before each "
                   "target: full (the panel), none (the bare instruction: plain-text training on the same targets) "
                   "or -FIELD (default full)")
    s.add_argument("--eval", metavar="FILE", help="held-out data of the same kind, evaluated every --eval-every steps")
    s.add_argument("--out", required=True, metavar="OUT.ep", help="the tuned model file")
    s.add_argument("--checkpoint", metavar="FILE", help="checkpoint path (default: OUT.ep.ckpt)")
    s.add_argument("--resume", metavar="FILE", help="continue from this checkpoint (bit for bit as if never stopped)")
    s.add_argument("--teacher", metavar="MODEL", help="kd: the model whose next-token distributions are matched "
                   "(e.g. the source converted with --passthrough); its top-k are computed once and cached")
    s.add_argument("--teacher-k", type=int, default=64, help="kd: teacher log-probabilities kept per position (default 64)")
    s.add_argument("--teacher-windows", type=int, default=None,
                   help="kd: windows of --data the teacher scores (default: all)")
    g = s.add_argument_group("training (defaults: edgepanel.tune.TuneConfig)")
    for name, typ in (("objective", str), ("params", str), ("layers", str), ("granularity", str), ("steps", int),
                      ("lr", float), ("eps", float), ("n_perturb", int), ("noise", str), ("optimizer", str),
                      ("schedule", str), ("warmup", int), ("weight_decay", float), ("clip", float),
                      ("batch", int), ("seq_len", int), ("seed", int), ("eval_every", int),
                      ("eval_batches", int), ("checkpoint_every", int)):
        option(g, TuneConfig, name, "--" + name.replace("_", "-"), type=typ)
    g.add_argument("--no-clip", action="store_true", help="do not clip the projected gradient")
