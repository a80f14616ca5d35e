"""The data-model loop: the model rewrites the panels it learns from, a rewrite is kept when it
makes the target easier to predict, the model is fine-tuned on the refined data, and again.

One round, with the model M of the round before (the given model first):
  1. for every example and every field of `fields` in turn (plan, memory, descriptions), M
     proposes a rewrite from a prompt in panels/prompts.json (greedy: deterministic), and
         I = 100 * (1 - PPL(target | new panel) / PPL(target | current panel))
     is measured under M (PPL: exp of the mean NLL of the target's tokens, as the nll objective
     counts them).  The rewrite is kept when I > threshold; a rewrite that copies `LEAK_WORDS`
     consecutive words of the target is refused whatever its I (it would hand over the answer);
  2. the refined data is written, then M is fine-tuned on it (nll, the panel as prompt) into the
     round's model; with held-out data, its target loss with the panel is measured.  Round R
     trains with its own seed, `round_seed(seed, R)` (round 1: the seed itself): with one seed
     for every round, round 2 would replay round 1's batches and perturbations on nearly the same
     data, so the noise of its zeroth-order steps would add to round 1's instead of averaging out.

Files, beside `out` in the directory OUT.rounds/: roundR.jsonl.gz (the round's data), roundR.ep
(its model, with roundR.ep.ckpt while training), roundR.partial.jsonl (the examples done so far,
each line flushed), summary.json; each written atomically.  Run again after an interruption, it
skips what exists and continues the partial file and the checkpoint: the results are those of an
uninterrupted run.  `out` receives the last round's data.

The control run (`rewrite` False) skips step 1 and keeps everything else: the same data each
round, the same round seeds and held-out measurement.  Set beside a loop with the same options,
it tells how much of the loop's gain the rewrites bring and how much the fine-tuning alone.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from ..panels import dataset
from ..panels.build import ModelSummarizer, clip_words
from ..panels.pairs import write_lines
from ..panels.schema import Entity, Memory, Panel
from .data import Example
from .objectives import nll

FIELDS = ("plan", "memory", "descriptions")
LEAK_WORDS = 8
# The loop's fine-tuning differs from finetune's defaults here: lr 2e-3 lowered the held-out loss
# in both rounds of two seeds where 6e-3 (best for recovering a k = 2 model) moved it by -0.022 to
# +0.018 (docs/preferences.md, "The loop again").
TUNE_DEFAULTS = {"lr": 2e-3}


def _opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class RefineConfig:
    """The data-model loop's options: the one home of their defaults (the CLI reads them)."""
    rounds: int = _opt(2, "rounds of rewriting and fine-tuning")
    threshold: float = _opt(1.0, "keep a rewrite when it lowers the target's perplexity by more than this many "
                                 "percent (I = 100 (1 - PPL new / PPL old))")
    fields: str = _opt("plan,memory,descriptions", f"panel fields the model rewrites, in this order: {', '.join(FIELDS)}")
    max_tokens: int = _opt(80, "tokens a proposed rewrite may have")
    limit: int | None = _opt(None, "the first N examples only")
    rewrite: bool = _opt(True, "False: the control run. Every round fine-tunes on the data as given (no rewriting), "
                               "with the same seeds, steps and held-out measurement, so that a loop's gain splits "
                               "into the rewrites' share and the fine-tuning's")

    def __post_init__(self):
        for name in ("rounds", "max_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise ValueError(f"limit must be None or an integer >= 1, got {self.limit!r}")
        if not isinstance(self.rewrite, bool):
            raise ValueError(f"rewrite must be True or False, got {self.rewrite!r}")
        if not isinstance(self.threshold, (int, float)) or not math.isfinite(self.threshold):
            raise ValueError(f"threshold must be a finite number, got {self.threshold!r}")
        bad = [f for f in self.field_list if f not in FIELDS]
        if bad or not self.field_list:
            raise ValueError(f"fields must be among {', '.join(FIELDS)}, got {self.fields!r}")

    @property
    def field_list(self) -> list[str]:
        return [f.strip() for f in self.fields.split(",") if f.strip()]


# -- one example ------------------------------------------------------------------------------

def perplexity(model, panel: Panel, target: str, seq_len: int) -> float:
    """exp(mean NLL) of the target's tokens after the rendered panel (the nll objective's count)."""
    t = dataset.tokenize(dataset.PanelExample(panel, target), model.tokenizer, seq_len)
    return math.exp(nll(model, [Example(t.ids, t.mask)]))


def improvement(ppl_new: float, ppl_old: float) -> float:
    return 100.0 * (1.0 - ppl_new / ppl_old)


def leaks(text: str, target: str, n: int = LEAK_WORDS) -> bool:
    """Whether `text` repeats n consecutive words of `target` (case and punctuation aside)."""
    def words(s):
        return re.findall(r"[a-z0-9']+", s.lower())
    t = words(target)
    grams = {tuple(t[i:i + n]) for i in range(len(t) - n + 1)}
    w = words(text)
    return any(tuple(w[i:i + n]) in grams for i in range(len(w) - n + 1))


def parse_descriptions(answer: str, names: list[str]) -> dict[str, str]:
    """{name: description} from 'Name: description' pieces of `answer` (lines may have been
    joined), for the known names only."""
    if not names:
        return {}
    alt = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    out = {}
    pieces = re.split(rf"(?:^|\s|[-*])(?=(?:{alt})\s*:)", answer)
    for piece in pieces:
        m = re.match(rf"\s*({alt})\s*:\s*(.+)", piece, re.S)
        if m and m[1] not in out:
            desc = " ".join(m[2].split()).strip(" -*")
            if desc:
                out[m[1]] = clip_words(desc, 25)
    return out


def propose(ask: Callable[..., str], panel: Panel, target: str, name: str) -> Panel | None:
    """The panel with field `name` rewritten by `ask(prompt key, **fields)`, or None when the field
    is absent or the answer unusable."""
    if name == "plan":
        new = ask("refine_plan", target=target, plan=panel.plan or "(none)")
        return replace(panel, plan=new) if _usable(new) else None
    if name == "memory":
        mem = panel.memory
        if mem is None or not mem.short:
            return None
        new = ask("refine_memory", memory=mem.short, latest=panel.latest or "(none)")
        return replace(panel, memory=Memory(new, mem.long)) if _usable(new) else None
    if name == "descriptions":
        if not panel.characters:
            return None
        names = [e.name for e in panel.characters]
        answer = ask("refine_characters", text="\n\n".join(t for t in (panel.latest, target) if t), names=", ".join(names))
        got = parse_descriptions(answer, names)
        if not got:
            return None
        return replace(panel, characters=tuple(Entity(e.name, got.get(e.name, e.description)) for e in panel.characters))
    raise ValueError(f"no field {name!r} to rewrite: {', '.join(FIELDS)}")


def _usable(text: str) -> bool:
    return bool(text.strip()) and text != "(nothing)" and len(text.split()) <= 120


def refine_example(model, ex: dataset.PanelExample, cfg: RefineConfig, round_no: int, seq_len: int = 256,
                   ask=None) -> dict:
    """The example's line after one round: each field's rewrite kept when I > threshold, the
    measurements under "x-refine".  Scored in `seq_len` tokens (the panel shortened to fit)."""
    ask = ask or ModelSummarizer(model, cfg.max_tokens).ask
    panel, start = ex.panel, perplexity(model, ex.panel, ex.target, seq_len)
    ppl, kept, refused = start, [], []
    for name in cfg.field_list:
        new = propose(ask, panel, ex.target, name)
        if new is None or new == panel:
            refused.append({"field": name, "I": None, "why": "no usable rewrite"})
            continue
        fresh = {k: v for k, v in new.to_dict().items() if v != panel.to_dict().get(k)}
        if leaks(json.dumps(fresh, ensure_ascii=False), ex.target):
            refused.append({"field": name, "I": None, "why": f"copies {LEAK_WORDS} words of the target"})
            continue
        p = perplexity(model, new, ex.target, seq_len)
        gain = improvement(p, ppl)
        if gain > cfg.threshold:
            panel, ppl = new, p
            kept.append({"field": name, "I": gain})
        else:
            refused.append({"field": name, "I": gain, "why": "not above the threshold"})
    return _line(ex, panel, {"round": round_no, "ppl_before": start, "ppl_after": ppl, "I": improvement(ppl, start),
                             "kept": kept, "refused": refused})


def _line(ex: dataset.PanelExample, panel: Panel, record: dict) -> dict:
    """A round's data line: `panel`, the example's target and extra fields, `record` as "x-refine"."""
    line = {"panel": panel.to_dict(), "target": ex.target}
    line.update({k: v for k, v in (ex.extra or {}).items() if k != "x-refine"})
    line["x-refine"] = record
    return line


def unchanged_example(ex: dataset.PanelExample, round_no: int) -> dict:
    """The example's line in a control round (`RefineConfig.rewrite` False): as given, nothing
    proposed or measured."""
    return _line(ex, ex.panel, {"round": round_no, "control": True, "I": 0.0, "kept": [], "refused": []})


# -- the loop ---------------------------------------------------------------------------------

@dataclass
class RoundResult:
    round: int
    examples: int
    rewrites_kept: int
    mean_I: float                    # over the examples (0 where nothing was kept)
    held_out_before: float | None    # the round's starting model, on the held-out data
    held_out_after: float | None     # the round's tuned model
    data: str
    model: str


def round_seed(seed: int, round_no: int) -> int:
    """The fine-tuning seed of round `round_no` (1-based): `seed` for round 1, then a number drawn
    from (seed, round) by NumPy's SeedSequence, below 2**29 (inside TuneConfig's range)."""
    if round_no == 1:
        return seed
    return int(np.random.SeedSequence([seed, round_no]).generate_state(1, np.uint32)[0] >> 3)


def rounds_dir(out) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".rounds")


def held_out_nll(model, examples: list[dataset.PanelExample], seq_len: int) -> float:
    """Mean NLL (nats per target token) of the held-out targets with their panels."""
    ex = []
    for e in examples:
        t = dataset.tokenize(e, model.tokenizer, seq_len)
        ex.append(Example(t.ids, t.mask))
    return nll(model, ex)


def _partial_lines(path: Path) -> list[dict]:
    """The finished lines of a partial file; a torn last line (a write cut short) is cut off."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    good = raw.rfind(b"\n") + 1
    if good < len(raw):
        with open(path, "r+b") as f:
            f.truncate(good)
    return [json.loads(ln) for ln in raw[:good].decode("utf-8").splitlines() if ln.strip()]


def _write_json(path: Path, obj):
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def refine(model_path, data, out, cfg: RefineConfig | None = None, tune=None, eval_data=None, threads=None,
           log: Callable[[str], None] | None = None, on_example: Callable[[int, int], None] | None = None,
           progress: bool = False) -> list[RoundResult]:
    """Run cfg.rounds rounds (see the module's text); `tune`: the fine-tuning TuneConfig (objective
    nll; None: TuneConfig's defaults with TUNE_DEFAULTS); `eval_data`: a held-out panel dataset;
    `on_example(round, index)` after each example."""
    from ..model import load
    from ..progress import bar
    from . import data as tdata
    from .trainer import TuneConfig, finetune
    cfg = cfg or RefineConfig()
    tune = tune or TuneConfig(**TUNE_DEFAULTS)
    if tune.objective != "nll":
        raise ValueError(f"the loop fine-tunes with the nll objective, got {tune.objective!r}")
    out = Path(out)
    work = rounds_dir(out)
    work.mkdir(parents=True, exist_ok=True)
    held = dataset.load(eval_data) if eval_data else None
    summary_path = work / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    settings = {"refine": asdict(cfg), "tune": asdict(tune), "model": str(model_path), "data": str(data),
                "eval": None if eval_data is None else str(eval_data)}
    if summary and summary.get("settings") != settings:
        raise ValueError(f"{work} holds a run with other settings: remove it or choose another --out")
    summary = {"settings": settings, "rounds": summary.get("rounds", [])}
    _write_json(summary_path, summary)      # the settings first: a resumed run must use the same
    results, model_file, data_file = [], Path(model_path), Path(data)
    for r in range(1, cfg.rounds + 1):
        round_data, round_model = work / f"round{r}.jsonl.gz", work / f"round{r}.ep"
        model = load(model_file, threads=threads)
        if not round_data.exists():
            examples = dataset.load(data_file)[:cfg.limit]
            partial = work / f"round{r}.partial.jsonl"
            done = _partial_lines(partial)
            what = "rewriting" if cfg.rewrite else "copying"
            pb = bar(total=len(examples), initial=len(done), desc=f"round {r}: {what}", unit="ex", disable=not progress)
            with open(partial, "a", encoding="utf-8") as f:
                for i in range(len(done), len(examples)):
                    line = (refine_example(model, examples[i], cfg, r, tune.seq_len) if cfg.rewrite
                            else unchanged_example(examples[i], r))
                    f.write(json.dumps(line, ensure_ascii=False) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                    done.append(line)
                    pb.update(1)
                    if on_example:
                        on_example(r, i)
            pb.close()
            write_lines(round_data, done)
            partial.unlink()
        lines = [obj for _, obj, _ in dataset.json_lines(round_data)]
        kept = sum(len(ln["x-refine"]["kept"]) for ln in lines)
        mean_i = float(np.mean([ln["x-refine"]["I"] for ln in lines]))
        if log:
            log(f"round {r}: {kept} rewrites kept over {len(lines)} examples, mean I {mean_i:.2f}%")
        ckpt = Path(str(round_model) + ".ckpt")
        if not round_model.exists():
            train = tdata.load(round_data, model.tokenizer, tune.seq_len)
            seeded = replace(tune, seed=round_seed(tune.seed, r))
            finetune(model, train, seeded, out=round_model, checkpoint=ckpt, resume=ckpt if ckpt.exists() else None,
                     progress=progress)
        if ckpt.exists():
            ckpt.unlink()
        done_rounds = {d["round"]: d for d in summary["rounds"]}
        if r not in done_rounds:
            if results:        # the model of the round before, already measured
                before = results[-1].held_out_after
            else:
                before = held_out_nll(load(model_file, threads=threads), held, tune.seq_len) if held else None
            after = held_out_nll(load(round_model, threads=threads), held, tune.seq_len) if held else None
            res = RoundResult(r, len(lines), kept, mean_i, before, after, str(round_data), str(round_model))
            summary["rounds"].append(asdict(res))
            _write_json(summary_path, summary)
        else:
            res = RoundResult(**done_rounds[r])
        if log and res.held_out_after is not None:
            log(f"round {r}: held-out loss with the panel {res.held_out_before:.4f} -> {res.held_out_after:.4f}")
        results.append(res)
        model_file, data_file = round_model, round_data
    write_lines(out, [obj for _, obj, _ in dataset.json_lines(data_file)])
    return results
