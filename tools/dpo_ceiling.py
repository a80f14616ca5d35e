"""First-order DPO on the default model's plane-scale multipliers (torch, exact gradients), at the
granularity a zeroth-order run would train: how far that parametrization can go on the preference
pairs, so that a zeroth-order result can be read against it (docs/preferences.md).

    python tools/dpo_ceiling.py --granularity tensor --steps 40 --json out.json

The student is the model file's planes and scales in torch (convert/recover.py's forward, with
norms, rotation and int8 embeddings and head rebuilt from the source as the conversion does);
its next-token log-probabilities are checked against the C engine's on one sequence.  The
reference is the untuned model.  Pairs: --train-n / --eval-n evenly spaced lines of the shipped
pair files (as tools/prefs_experiment.sh picks them).  After training, the scales are written back
into the engine's model and the held-out accuracy is measured there too; --out saves that model.
Granularities: recover.mult_shape's (group, row, column, tensor) and kind (one multiplier per kind
of tensor and plane, shared by every layer).
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from edgepanel import bits, hub  # noqa: E402
from edgepanel.convert import calibrate as cal  # noqa: E402
from edgepanel.convert import open_checked, recover  # noqa: E402
from edgepanel.format import ModelFile  # noqa: E402
from edgepanel.model.model import load  # noqa: E402
from edgepanel.model.reference import log_softmax_at  # noqa: E402
from edgepanel.model.weights import load_weights  # noqa: E402
from edgepanel.tune import objectives, prefs  # noqa: E402


def spaced(path: Path, k: int, work: Path) -> Path:
    """k evenly spaced lines of a (gzipped) JSONL file, written to `work`."""
    lines = [ln for ln in gzip.open(path, "rt", encoding="utf-8").read().splitlines() if ln.strip()]
    pick = [lines[round(i * (len(lines) - 1) / max(1, k - 1))] for i in range(min(k, len(lines)))]
    out = work / f"{path.name.split('.')[0]}-{k}.jsonl"
    out.write_text("\n".join(pick) + "\n", encoding="utf-8")
    return out


def student_of(torch, model_path: Path, granularity: str):
    """The model file as recover._TorchModel, with its multipliers (a list of tensors)."""
    src = hub.fetch("smollm2")
    _, cfg, _, emitted, _, _ = open_checked(src)
    fm = cal.FloatModel(cfg, emitted)
    recipe = ModelFile(model_path).meta.recipe
    if recipe.get("rotate", True) and cal.can_rotate(fm.cfg):
        cal.rotate(fm, recipe.get("seed", 0))
    w = load_weights(ModelFile(model_path))
    fitted = {ln.name: (ln.planes, None) for ln in w.linears() if ln.planes is not None}
    s = recover._TorchModel(torch, fm.cfg, fm, fitted, ("int8", "int8"),
                            granularity="tensor" if granularity == "kind" else granularity)
    if granularity != "kind":
        return s, [s.planes[n][3] for n in sorted(s.planes)]
    shared = {}
    for n, (pm, codes, alpha0, mult) in list(s.planes.items()):
        shared.setdefault(n.split(".")[-1], mult)
        s.planes[n] = (pm, codes, alpha0, shared[n.split(".")[-1]])
    return s, list(shared.values())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None,
                    help="a conversion of SmolLM2-135M-Instruct (default: the default model)")
    ap.add_argument("--granularity", default="tensor", choices=["group", "row", "column", "tensor", "kind"])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--train-n", type=int, default=120)
    ap.add_argument("--eval-n", type=int, default=60)
    ap.add_argument("--seq-len", type=int, default=192)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=None, help="save the tuned model file here")
    a = ap.parse_args()
    import torch
    torch.manual_seed(a.seed)
    path = a.model or hub.resolve_model(None)
    model = load(path)
    work = a.json.parent
    work.mkdir(parents=True, exist_ok=True)
    data = ROOT / "data" / "panels"
    train = prefs.load_pairs(spaced(data / "austen-pairs-train.jsonl.gz", a.train_n, work), model.tokenizer, a.seq_len)
    held = prefs.load_pairs(spaced(data / "austen-pairs-eval.jsonl.gz", a.eval_n, work), model.tokenizer, a.seq_len)
    s, mults = student_of(torch, path, a.granularity)
    print(f"{sum(m.numel() for m in mults)} trained values", file=sys.stderr, flush=True)

    def logp(ex):
        t = torch.from_numpy(ex.ids.astype(np.int64))
        lp = torch.log_softmax(s.logits(t)[:-1], -1).gather(1, t[1:, None])[:, 0]
        return lp[torch.from_numpy(ex.mask[1:].astype(bool))].sum()

    def pair_lp(pairs):
        with torch.no_grad():
            return np.array([[float(logp(p.chosen)), float(logp(p.rejected))] for p in pairs])

    ids = train[0].chosen.ids
    with torch.no_grad():
        lt = torch.log_softmax(s.logits(torch.from_numpy(ids.astype(np.int64))), -1).numpy()
    engine_lp = log_softmax_at(model.logits(ids.tolist())[:-1], ids[1:])
    check = float(np.abs(lt[np.arange(len(ids) - 1), ids[1:]] - engine_lp).mean())
    print(f"torch against the engine: mean |log-probability difference| of the next token {check:.4f}",
          file=sys.stderr, flush=True)
    t0 = time.time()
    params = model.parameters(kinds=["scales"])   # float32 scales from here on, before and after alike
    engine_base = objectives.pair_logps(model, held)
    ref_train, ref_held = pair_lp(train), pair_lp(held)

    def metrics(pol, ref):
        h = (pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1])
        return {"rewards/accuracies": float((h > 0).mean()), "rewards/margins": float(a.beta * h.mean()),
                "rewards/chosen": float(a.beta * (pol[:, 0] - ref[:, 0]).mean()),
                "rewards/rejected": float(a.beta * (pol[:, 1] - ref[:, 1]).mean())}

    opt = torch.optim.Adam(mults, lr=a.lr)
    rng = np.random.default_rng(a.seed)
    losses, evals = [], []
    for step in range(a.steps):
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for i in rng.choice(len(train), min(a.batch, len(train)), replace=False):
            p = train[i]
            h = (logp(p.chosen) - ref_train[i, 0]) - (logp(p.rejected) - ref_train[i, 1])
            loss = -torch.nn.functional.logsigmoid(a.beta * h) / a.batch
            loss.backward()
            total += float(loss.detach())
        opt.step()
        with torch.no_grad():
            for m in mults:
                m.clamp_(min=0)   # scales are magnitudes
        losses.append(total)
        if (step + 1) % a.eval_every == 0 or step + 1 == a.steps:
            evals.append({"step": step + 1, "seconds": time.time() - t0, "train_loss": float(np.mean(losses[-a.eval_every:])),
                          **metrics(pair_lp(held), ref_held)})
            print(json.dumps(evals[-1]), file=sys.stderr, flush=True)
    with torch.no_grad():
        for n, (_, _, alpha0, mult) in s.planes.items():
            params[n + ".scales"][...] = bits.tile_scales((alpha0 * mult).numpy())
    engine = metrics(objectives.pair_logps(model, held), engine_base)
    print("the C engine, held-out:", json.dumps(engine), file=sys.stderr, flush=True)
    if a.out:
        model.save(a.out)
    a.json.write_text(json.dumps({
        "model": str(path), "granularity": a.granularity, "trained_values": int(sum(m.numel() for m in mults)),
        "steps": a.steps, "lr": a.lr, "beta": a.beta, "batch": a.batch, "train_pairs": len(train),
        "held_pairs": len(held), "seq_len": a.seq_len, "torch_engine_logp_diff": check,
        "untuned_prefers_chosen": float((ref_held[:, 0] > ref_held[:, 1]).mean()),
        "losses": losses, "evals": evals, "engine": engine}, indent=1))


if __name__ == "__main__":
    main()
