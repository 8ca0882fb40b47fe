"""Token-merging algorithms in plain PyTorch, and ``apply`` over the methods table.

``apply(model, method, **options)`` patches a model in place; the patched eager model is
the reference every export is verified against. The methods (``tome``, ``tomesd``,
``tdtm``, ``todo``, ``none``) are the :class:`~tome_export.merging.methods.Method` records of
``METHODS`` in ``methods.py``; importing this package also defines the merge custom ops
(``ops.py``) that the exporter lowers.
"""

from __future__ import annotations

from torch import nn

from tome_export.merging import ops  # noqa: F401  (defines the torch.library custom ops)
from tome_export.merging.methods import METHODS, Method, get_method
from tome_export.merging.tome import merge_state


def apply(model: nn.Module, method: str = "tome", **options) -> nn.Module:
    """Patch ``model`` in place with a merging ``method`` and return it."""
    return get_method(method).apply(model, **options)


__all__ = ["METHODS", "Method", "apply", "get_method", "merge_state"]
