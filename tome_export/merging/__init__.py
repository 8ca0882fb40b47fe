"""Token-merging algorithms in plain PyTorch, and the registry of methods.

``apply(model, method, **options)`` patches a model in place; the patched eager model is
the reference every export is verified against.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from tome_export.errors import UserError
from tome_export.merging import ops  # noqa: F401  (registers the custom ops)
from tome_export.merging.tome import apply_tome, merge_state
from tome_export.merging.tomesd import apply_tomesd

METHODS: dict[str, Callable[..., nn.Module]] = {}


def register_method(name: str):
    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        METHODS[name] = fn
        return fn

    return decorator


@register_method("none")
def _apply_none(model: nn.Module, **options) -> nn.Module:
    return model


register_method("tome")(apply_tome)
register_method("tomesd")(apply_tomesd)


def _apply_tdtm(model: nn.Module, **options) -> nn.Module:
    from tome_export.merging.tdtm import apply_tdtm

    return apply_tdtm(model, **options)


register_method("tdtm")(_apply_tdtm)


def _apply_todo(model: nn.Module, **options) -> nn.Module:
    from tome_export.merging.todo import apply_todo

    return apply_todo(model, **options)


register_method("todo")(_apply_todo)


def apply(model: nn.Module, method: str = "tome", **options) -> nn.Module:
    """Patch ``model`` in place with a merging ``method`` and return it."""
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[method](model, **options)


__all__ = ["METHODS", "apply", "merge_state", "register_method"]
