"""The exceptions and warnings edgepanel raises (one place, so callers can catch them by type)."""


class EdgepanelError(Exception):
    """Base class of edgepanel's own errors."""


class FormatError(EdgepanelError, ValueError):
    """A model file (or a source checkpoint) is malformed, truncated, or of an unknown version."""


class BackendUnavailable(EdgepanelError, RuntimeError):
    """A kernel backend or ISA variant that was asked for cannot run here."""


class EdgepanelWarning(UserWarning):
    """Something works, but not the way it was meant to (e.g. the kernels fell back to Numba)."""


class NonFiniteError(EdgepanelError, FloatingPointError):
    """The model computed a NaN or an infinity (its logits while sampling, a training loss)."""
