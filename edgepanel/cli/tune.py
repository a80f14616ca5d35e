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
    m = load_model(a)
    train = data.load(a.data, m.tokenizer, cfg.seq_len)
    held = data.load(a.eval, m.tokenizer, cfg.seq_len) if a.eval else None
    checkpoint = Path(a.checkpoint or str(a.out) + ".ckpt")
    if not a.quiet:
        log(f"fine-tuning {m.path.name}: {len(train)} examples ({sum(e.targets for e in train)} target tokens)"
            f"{f', {len(held)} held out' if held else ''}; checkpoints to {checkpoint}")

    def report(info):
        if not a.quiet and info.eval_loss is not None:
            log(f"step {info.step}: train loss {info.loss:.4f}, held-out loss {info.eval_loss:.4f} "
                f"({info.seconds:.0f} s)")

    t = finetune(m, train, cfg, eval_data=held, out=a.out, checkpoint=checkpoint, resume=a.resume,
                 callback=report, progress=not a.quiet)
    if not a.quiet:
        log(f"wrote {a.out} after {t.step} steps ({t.params.size} trained values)")
    return 0


def register(sub):
    s = model_command(sub, "finetune", "fine-tune a model on the device by zeroth-order steps", cmd_finetune)
    s.add_argument("--data", required=True, metavar="FILE", help="training data: a UTF-8 text, or JSONL lines "
                   '{"text": ...} or {"prompt": ..., "target": ...} (the loss counts the target only)')
    s.add_argument("--eval", metavar="FILE", help="held-out data of the same kind, evaluated every --eval-every steps")
    s.add_argument("--out", required=True, metavar="OUT.ep", help="the tuned model file")
    s.add_argument("--checkpoint", metavar="FILE", help="checkpoint path (default: OUT.ep.ckpt)")
    s.add_argument("--resume", metavar="FILE", help="continue from this checkpoint (bit for bit as if never stopped)")
    g = s.add_argument_group("training (defaults: edgepanel.tune.TuneConfig)")
    for name, typ in (("objective", str), ("params", str), ("layers", str), ("granularity", str), ("steps", int),
                      ("lr", float), ("eps", float), ("n_perturb", int), ("noise", str), ("optimizer", str),
                      ("schedule", str), ("warmup", int), ("weight_decay", float), ("clip", float),
                      ("batch", int), ("seq_len", int), ("seed", int), ("eval_every", int),
                      ("eval_batches", int), ("checkpoint_every", int)):
        option(g, TuneConfig, name, "--" + name.replace("_", "-"), type=typ)
    g.add_argument("--no-clip", action="store_true", help="do not clip the projected gradient")
