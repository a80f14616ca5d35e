"""On-device fine-tuning without gradients: zeroth-order (SPSA / MeZO) steps on the continuous
parameters of a binarized model, through the C engine's batched scoring.

    from edgepanel import tune
    data = tune.data.load("train.txt", model.tokenizer, seq_len=256)
    tune.finetune(model, data, tune.TuneConfig(steps=100), out="tuned.ep")
"""
from . import data, objectives, params, prefs, refine, reward, zo
from .trainer import StepInfo, TuneConfig, ZOTrainer, finetune

__all__ = ["StepInfo", "TuneConfig", "ZOTrainer", "data", "finetune", "objectives", "params", "prefs", "refine", "reward",
           "zo"]
