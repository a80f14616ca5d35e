"""The zeroth-order fine-tuning loop: batches, perturbations, the update (SGD or ZO-Adam), the
learning-rate schedule, held-out evaluation, checkpoints and resume.

Everything random is keyed by (seed, step): the batch of a step, its perturbations' noise
(tune/zo.py).  A checkpoint holds theta, the optimizer's moments and the step; resuming from it
gives bit for bit the parameters of an uninterrupted run.  Memory: theta and the model's
parameters are float32 copies of the continuous parameters (small); a step scores one batch at a
time, so training needs about what scoring that batch needs.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import EdgepanelError
from . import zo
from .objectives import OBJECTIVES, PREFERENCE, evaluate_pairs, parse_class_weights
from .params import GRANULARITIES, KINDS, Trainable, parse_layers

CHECKPOINT_FORMAT = "edgepanel-zo-checkpoint"


def _opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class TuneConfig:
    """Zeroth-order fine-tuning options: the one home of their defaults (the CLI reads them)."""
    objective: str = _opt("nll", "loss: nll (mean cross-entropy of the target tokens), kd (KL to a teacher's "
                                 "cached top-k next-token distributions), dpo, rdpo or ipo (preference pairs "
                                 "against cached reference log-probabilities), crlft (class-conditioned, "
                                 "class-weighted nll)")
    params: str = _opt("scales", f"parameter kinds to train, comma-separated: {', '.join(KINDS)}")
    layers: str | None = _opt(None, "layers to train, e.g. '20-29' or '0-3,7' (default: all, and the model-level ones)")
    tensors: str | None = _opt(None, "tensor names to train among --params, comma-separated, e.g. 'wq,wk' or "
                               "'attn_norm,final_norm' (default: all)")
    gradient: str = _opt("spsa", "spsa: zeroth-order estimates (forward passes on the C engine only); exact: the "
                                 "gradient by backpropagation in NumPy (torch-free; kd and nll; scales, norms and "
                                 "biases; the memory of the conversion's tuning, not inference's)")
    granularity: str = _opt("tensor", f"plane-scale multipliers: {', '.join(GRANULARITIES)} (kind: one per kind of tensor and plane, shared by every layer, norms too; shared: one per kind)")
    steps: int = _opt(100, "optimizer steps")
    lr: float = _opt(6e-3, "learning rate (peak, for the schedule); measured best of 2e-3, 6e-3, 1.5e-2 (docs/finetune.md)")
    eps: float = _opt(1e-2, "perturbation size (a relative change of a scale multiplier)")
    n_perturb: int = _opt(1, "perturbations averaged per step (each costs two forward passes)")
    noise: str = _opt("rademacher", f"perturbation distribution: {', '.join(zo.DISTRIBUTIONS)} (hadamard: "
                                    "orthogonal +-1 directions; with --n-perturb at the power of two >= the "
                                    "trained values, a step's estimate is the exact central-difference gradient)")
    optimizer: str = _opt("sgd", "sgd, or adam (moments on the estimated gradient)")
    schedule: str = _opt("constant", "learning-rate schedule after warm-up: constant or cosine")
    warmup: int = _opt(0, "warm-up steps (linear from 0)")
    weight_decay: float = _opt(0.0, "weight decay (toward 1 for scale multipliers, 0 for biases; never norms)")
    clip: float | None = _opt(50.0, "clip the projected gradient to +-clip (None: off)")
    batch: int = _opt(4, "examples per step")
    seq_len: int = _opt(256, "tokens per example at most")
    seed: int = _opt(0, "seed of batches and perturbations")
    eval_every: int = _opt(50, "evaluate on the held-out data every this many steps (0: only at the end)")
    eval_batches: int = _opt(8, "held-out examples scored per evaluation, times batch")
    checkpoint_every: int = _opt(25, "write the checkpoint every this many steps")
    beta: float = _opt(0.1, "dpo, rdpo, ipo: beta, the implicit reward's scale (how tightly the model stays near "
                            "its reference)")
    label_smoothing: float = _opt(0.0, "dpo, rdpo: the probability that a pair's preference is flipped, in [0, 0.5)")
    class_weights: str = _opt("book=1,model=0.1", "crlft: the weight of each source class's loss")

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"{name} {why}, got {getattr(self, name)!r}")
        if self.objective not in OBJECTIVES:
            bad("objective", f"must be one of {', '.join(OBJECTIVES)}")
        for name in ("steps", "batch", "n_perturb", "seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1 or v > 10**9:
                bad(name, "must be an integer in 1..1e9")
        for name in ("warmup", "eval_every", "eval_batches", "checkpoint_every", "seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0 or v > 10**9:
                bad(name, "must be an integer in 0..1e9")
        for name in ("lr", "eps"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0 < v < math.inf:
                bad(name, "must be a positive number")
        if not 0 <= self.weight_decay < math.inf:
            bad("weight_decay", "must be >= 0")
        if self.clip is not None and not 0 < self.clip < math.inf:
            bad("clip", "must be positive or None")
        if self.tensors is not None and (not isinstance(self.tensors, str)
                                         or not [t for t in self.tensors.split(",") if t.strip()]):
            bad("tensors", "must be tensor names separated by commas, e.g. 'wq,wk'")
        if self.granularity not in GRANULARITIES:
            bad("granularity", f"must be one of {', '.join(GRANULARITIES)}")
        if self.noise not in zo.DISTRIBUTIONS:
            bad("noise", f"must be one of {', '.join(zo.DISTRIBUTIONS)}")
        if self.gradient not in ("spsa", "exact"):
            bad("gradient", "must be spsa or exact")
        if self.gradient == "exact" and self.objective not in ("kd", "nll"):
            bad("objective", "must be kd or nll with --gradient exact")
        if self.optimizer not in ("sgd", "adam"):
            bad("optimizer", "must be sgd or adam")
        if self.schedule not in ("constant", "cosine"):
            bad("schedule", "must be constant or cosine")
        if not isinstance(self.beta, (int, float)) or not 0 < self.beta < math.inf:
            bad("beta", "must be a positive number")
        if not isinstance(self.label_smoothing, (int, float)) or not 0 <= self.label_smoothing < 0.5:
            bad("label_smoothing", "must be in [0, 0.5)")
        parse_class_weights(self.class_weights)

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(k.strip() for k in self.params.split(",") if k.strip())

    def loss_function(self) -> Callable:
        """objective's loss as f(model, batch), its options bound."""
        f = OBJECTIVES[self.objective]
        if self.objective in ("dpo", "rdpo"):
            return partial(f, beta=self.beta, label_smoothing=self.label_smoothing)
        if self.objective == "ipo":
            return partial(f, beta=self.beta)
        if self.objective == "crlft":
            return partial(f, class_weights=parse_class_weights(self.class_weights))
        return f

    @classmethod
    def for_objective(cls, **options) -> "TuneConfig":
        """The config of `options`, where those not given take the measured recipe of their
        objective (OBJECTIVE_RECIPES), then the field defaults."""
        recipe = EXACT_RECIPE if options.get("gradient") == "exact" else OBJECTIVE_RECIPES.get(options.get("objective", "nll"), {})
        return cls(**(recipe | options))

    def learning_rate(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / (self.warmup + 1)
        if self.schedule == "cosine":
            t = (step - self.warmup) / max(1, self.steps - self.warmup)
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * t))
        return self.lr


# What the measurements support for an objective where it differs from the field defaults
# (docs/preferences.md, "Orthogonal directions"): DPO on the 28 per-kind scale multipliers, with the
# exact central-difference gradient of each step's batch from 32 Hadamard directions (64 forward
# passes of the batch), Adam: held-out rewards/accuracies 0.717 after 10 steps, 0.733 after 20,
# where 840 multipliers and one random direction a step stayed at 0.567.
#
# Exact gradients (docs/finetune.md, "Exact gradients"): every scale its own multiplier and Adam, as the
# conversion's first-order tuning.
EXACT_RECIPE = dict(granularity="group", optimizer="adam", lr=1e-3, batch=1, steps=80, eval_every=20)
_PREFERENCE_RECIPE = dict(granularity="kind", noise="hadamard", n_perturb=32, optimizer="adam", lr=1e-3,
                          eps=0.05, steps=20, eval_every=10)
OBJECTIVE_RECIPES = {"dpo": _PREFERENCE_RECIPE, "rdpo": _PREFERENCE_RECIPE}


@dataclass
class StepInfo:
    step: int             # steps done
    loss: float           # mean of L+ and L- over the perturbations; exact gradients: the float pass's loss
    grad: float           # mean projected gradient (after clipping); exact gradients: their norm
    lr: float
    seconds: float        # since the run (or the resume) started
    eval_loss: float | None = None
    eval_metrics: dict | None = None   # dpo, rdpo, ipo: rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies


class ZOTrainer:
    """Zeroth-order fine-tuning of `model`'s continuous parameters on `train` (Examples)."""

    def __init__(self, model, train, config: TuneConfig | None = None, eval_data=None):
        self.model, self.cfg = model, config or TuneConfig()
        if not train:
            raise ValueError("no training examples")
        self.train, self.eval_data = list(train), list(eval_data or [])
        self.loss_fn = self.cfg.loss_function()
        self.params = Trainable(model, self.cfg.kinds, parse_layers(self.cfg.layers, model.cfg.n_layers),
                                self.cfg.granularity, self.cfg.tensors)
        self.exact = None
        if self.cfg.gradient == "exact":
            from .backprop import ExactGradient
            self.exact = ExactGradient(model, self.params)
        self.step = 0
        self.m = {n: np.zeros_like(a) for n, a in self.params.theta.items()} if self.cfg.optimizer == "adam" else {}
        self.v = {n: np.zeros_like(a) for n, a in self.params.theta.items()} if self.cfg.optimizer == "adam" else {}
        self.history: list[StepInfo] = []

    # -- one step --------------------------------------------------------------------------------
    def batch_for(self, step: int) -> list:
        """The examples of `step`: a draw without replacement keyed by (seed, step)."""
        rng = np.random.Generator(np.random.Philox(key=np.array([self.cfg.seed, 0x5A17], np.uint64),
                                                   counter=np.array([step, 0, 0, 0], np.uint64)))
        idx = rng.choice(len(self.train), size=min(self.cfg.batch, len(self.train)), replace=False)
        return [self.train[i] for i in sorted(idx)]

    def loss(self, batch) -> float:
        return self.loss_fn(self.model, batch)

    def do_step(self) -> StepInfo:
        c, p, t = self.cfg, self.params, self.step
        batch = self.batch_for(t)
        if self.exact is not None:
            loss, g = self.exact.loss_and_grad(batch, c.objective)
            norm = math.sqrt(sum(float(np.vdot(a, a)) for a in g.values()))
            lr = c.learning_rate(t)
            self._update(t, lr, lambda name, theta: g[name])
            self.step += 1
            return StepInfo(self.step, loss, norm, lr, 0.0)
        saved = p.copy()                  # theta is small: restore from a copy, exactly
        grads, losses = [], []
        for k in range(c.n_perturb):
            zo.perturb(p.theta, c.seed, t, k, c.eps, c.noise)
            p.apply()
            lp = self.loss(batch)
            zo.perturb(p.theta, c.seed, t, k, -2 * c.eps, c.noise)
            p.apply()
            lm = self.loss(batch)
            p.restore(saved)
            grads.append(zo.projected_gradient(lp, lm, c.eps, c.clip))
            losses.append(0.5 * (lp + lm))
        lr = c.learning_rate(t)
        where = zo.layout(p.theta)
        self._update(t, lr, lambda name, theta: zo.gradient(name, theta.shape, c.seed, t, grads, c.noise, where[name]))
        self.step += 1
        return StepInfo(self.step, float(np.mean(losses)), float(np.mean(grads)), lr, 0.0)

    def _update(self, t: int, lr: float, gradient: Callable):
        """Step every theta along gradient(name, theta) (weight decay, SGD or Adam), then project
        and apply."""
        c, p = self.cfg, self.params
        for name, theta in p.theta.items():
            g = gradient(name, theta)
            if c.weight_decay and p.decays(name):
                g += np.float32(c.weight_decay) * (theta - np.float32(p.anchor(name)))
            if c.optimizer == "adam":
                b1, b2 = 0.9, 0.999
                self.m[name] *= np.float32(b1)
                self.m[name] += np.float32(1 - b1) * g
                self.v[name] *= np.float32(b2)
                self.v[name] += np.float32(1 - b2) * g * g
                mh = self.m[name] / np.float32(1 - b1 ** (t + 1))
                vh = self.v[name] / np.float32(1 - b2 ** (t + 1))
                theta -= np.float32(lr) * mh / (np.sqrt(vh) + np.float32(1e-8))
            else:
                theta -= np.float32(lr) * g
        p.project()
        p.apply()

    def evaluate(self) -> float | None:
        """Mean target loss over the held-out examples (the first eval_batches x batch)."""
        return self.evaluate_metrics()[0]

    def evaluate_metrics(self) -> tuple[float | None, dict | None]:
        """(held-out loss, preference metrics or None); (None, None) without held-out data."""
        return held_out(self.model, self.cfg, self.eval_data) if self.eval_data else (None, None)

    # -- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self, path) -> Path:
        from ..format import write_tensors
        tensors = {f"theta/{n}": a for n, a in self.params.theta.items()}
        tensors.update({f"adam_m/{n}": a for n, a in self.m.items()})
        tensors.update({f"adam_v/{n}": a for n, a in self.v.items()})
        meta = {"format": CHECKPOINT_FORMAT, "step": str(self.step),
                "config": json.dumps(asdict(self.cfg), sort_keys=True), "model": str(self.model.path)}
        return write_tensors(path, tensors, meta)

    def load_checkpoint(self, path):
        from ..format import SafetensorsFile, FormatError
        f = SafetensorsFile(path)
        if f.metadata.get("format") != CHECKPOINT_FORMAT:
            raise FormatError(f"{path}: not an edgepanel fine-tuning checkpoint")
        saved = json.loads(f.metadata.get("config", "{}"))
        mine = asdict(self.cfg)
        defaults = {d.name: d.default for d in fields(TuneConfig)}   # options added since keep their default
        differ = sorted(k for k in mine if k not in ("steps", "eval_every", "checkpoint_every")
                        and saved.get(k, defaults[k]) != mine[k])
        if differ:
            raise EdgepanelError(f"{path}: the checkpoint was made with other options ({', '.join(differ)}: "
                                 + ", ".join(f"{saved.get(k)!r} vs {mine[k]!r}" for k in differ) + ")")
        for prefix, store in (("theta/", self.params.theta), ("adam_m/", self.m), ("adam_v/", self.v)):
            for n, a in store.items():
                arr = f.tensors.get(prefix + n)
                if arr is None or arr.shape != a.shape or arr.dtype != a.dtype:
                    raise FormatError(f"{path}: '{prefix + n}' is missing or of another shape")
                a[...] = arr
        self.step = int(f.metadata["step"])
        self.params.project()
        self.params.apply()

    # -- the loop --------------------------------------------------------------------------------
    def run(self, checkpoint=None, callback: Callable[[StepInfo], None] | None = None, progress: bool = False):
        """Train until cfg.steps steps are done (continuing from self.step), writing `checkpoint`
        every checkpoint_every steps and at the end; `callback(StepInfo)` after every step."""
        from ..progress import bar
        c, t0 = self.cfg, time.time()
        pb = bar(total=c.steps, initial=self.step, desc="fine-tuning", unit="step", force=progress)
        try:
            while self.step < c.steps:
                info = self.do_step()
                info.seconds = time.time() - t0
                if (c.eval_every and info.step % c.eval_every == 0) or info.step == c.steps:
                    info.eval_loss, info.eval_metrics = self.evaluate_metrics()
                self.history.append(info)
                if checkpoint and (info.step % max(1, c.checkpoint_every) == 0 or info.step == c.steps):
                    self.save_checkpoint(checkpoint)
                if callback:
                    callback(info)
                if pb is not None and hasattr(pb, "set_postfix"):
                    post = dict(loss=f"{info.loss:.4f}", g=f"{info.grad:+.3g}")
                    if info.eval_loss is not None:
                        post["eval"] = f"{info.eval_loss:.4f}"
                    pb.set_postfix(post)
                    pb.update(1)
        finally:
            if pb is not None and hasattr(pb, "close"):
                pb.close()
        return self.history


def held_out_loss(model, cfg: TuneConfig, examples) -> float:
    """cfg.objective's mean loss per target token (per pair for preference objectives) over the
    first eval_batches x batch examples, scored batch by batch; nothing is trained or widened."""
    return held_out(model, cfg, examples)[0]


def held_out(model, cfg: TuneConfig, examples) -> tuple[float, dict | None]:
    """(held_out_loss, the preference metrics over the same pairs, or None for other objectives)."""
    ex = examples[:cfg.eval_batches * cfg.batch]
    if cfg.objective in PREFERENCE:
        m = evaluate_pairs(cfg.objective, model, ex, cfg.beta, cfg.label_smoothing)
        return m["loss"], m
    loss, total, count = cfg.loss_function(), 0.0, 0
    for i in range(0, len(ex), cfg.batch):
        b = ex[i:i + cfg.batch]
        n = sum(e.targets for e in b)
        total += loss(model, b) * n
        count += n
    return total / count, None


def finetune(model, train, config: TuneConfig | None = None, eval_data=None, out=None, checkpoint=None,
             resume=None, callback=None, progress: bool = False) -> ZOTrainer:
    """Fine-tune `model` in place by zeroth-order steps and, with `out`, save the tuned model file
    (its metadata records the run; after a preference objective the file also carries the
    parameters training started from, the reference of its implicit reward: tune/reward.py).
    `resume`: a checkpoint to continue from."""
    trainer = ZOTrainer(model, train, config, eval_data)
    if resume:
        trainer.load_checkpoint(resume)
    trainer.run(checkpoint=checkpoint, callback=callback, progress=progress)
    if out:
        last = trainer.history[-1] if trainer.history else None
        history = {"zo_finetune": asdict(trainer.cfg), "steps": trainer.step,
                   "train_loss": None if last is None else last.loss,
                   "eval_loss": None if last is None else last.eval_loss}
        if trainer.cfg.objective in PREFERENCE:
            from .reward import save_with_reference
            history["eval_metrics"] = None if last is None else last.eval_metrics
            save_with_reference(model, out, history)
        else:
            model.save(out, history=history)
    return trainer
