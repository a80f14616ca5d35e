"""edgepanel: binarized language models on CPU-only edge devices.

    import edgepanel
    m = edgepanel.load("model.ep")
    print(m.generate("Once upon a time", max_tokens=64))
"""
from .errors import BackendUnavailable, EdgepanelError, EdgepanelWarning, FormatError

__version__ = "0.1.0"

__all__ = ["BackendUnavailable", "EdgepanelError", "EdgepanelWarning", "FormatError", "load", "Model",
           "best_of", "reward", "__version__"]


def __getattr__(name):  # keep `import edgepanel` light: the model code loads on first use
    if name in ("load", "Model"):
        from .model import model
        return getattr(model, name)
    if name in ("reward", "best_of"):   # the implicit reward of preference tuning: edgepanel/tune/reward.py
        from .tune import reward
        return getattr(reward, name)
    raise AttributeError(f"module 'edgepanel' has no attribute {name!r}")
