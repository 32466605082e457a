"""A model as a static jit argument plus its traced weights (used by the samplers and the likelihood).

``split_model(model) -> (static, params)``: an NNX module splits into its graph definition
(static, hashable) and its state (traced, so new weights reuse the compiled program); a plain
callable is held by identity with no params.  ``merge_model(static, params)`` rebuilds it inside
the jitted function.
"""

from __future__ import annotations

from flax import nnx

__all__ = ["merge_model", "split_model"]


class _ById:
    """Hashable-by-identity holder for a plain callable used as a static jit argument."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __hash__(self):
        return id(self.obj)

    def __eq__(self, other):
        return isinstance(other, _ById) and other.obj is self.obj


def split_model(model):
    """``(static, params)`` of an NNX module or a plain callable (``params`` None)."""
    if isinstance(model, nnx.Module):
        graphdef, state = nnx.split(model)
        return ("nnx", graphdef), state
    return ("fn", _ById(model)), None


def merge_model(static, params):
    """The callable that :func:`split_model` split into ``static`` and ``params``."""
    kind, obj = static
    return nnx.merge(obj, params) if kind == "nnx" else obj.obj
