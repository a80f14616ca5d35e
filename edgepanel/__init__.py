"""edgepanel: binarized language models on CPU-only edge devices."""
from .errors import BackendUnavailable, EdgepanelError, EdgepanelWarning, FormatError

__version__ = "0.1.0"

__all__ = ["BackendUnavailable", "EdgepanelError", "EdgepanelWarning", "FormatError", "__version__"]
