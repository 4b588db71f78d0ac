"""The factor pairs ``(A, B, s)`` of an adapted model's :class:`~rankwise.core.capabilities.Factored`
adapters, and the param groups for everything else: what the optimizers that treat the two factors
of a layer together (LoRA-Pro, LoRA+) start from."""

from __future__ import annotations

from typing import Any, NamedTuple

from torch import nn

from ..core.capabilities import Factored
from ..core.inject import adapted_modules


class FactorPair(NamedTuple):
    """One adapted layer's factors, as its adapter declares them through ``factors()``: ``s · B A`` is
    the method's low-rank update (see :class:`~rankwise.core.capabilities.Factored`)."""

    path: str
    A: nn.Parameter  # (rank, in_features)
    B: nn.Parameter  # (out_features, rank)
    scale: float  # s in s · B A


def factor_pairs(model: nn.Module, user: str) -> list[FactorPair]:
    """The trainable ``(A, B, s)`` of every adapted layer whose adapter is ``Factored``.

    Args:
        model: a model adapted with :func:`rankwise.adapt`.
        user: the optimizer's name, for error messages.

    Raises:
        ValueError: no adapted layer declares trainable factors, or a layer has exactly one of
            its two factors trainable (the pair is stepped jointly).
    """
    pairs, methods = [], set()
    for path, layer in adapted_modules(model):
        methods.add(layer.config.method)
        if not isinstance(layer.delta, Factored):
            continue
        A, B, scale = layer.delta.factors()
        if A.requires_grad != B.requires_grad:
            raise ValueError(f"{user}: '{path}' has only one of its factors A, B trainable; freeze both or neither")
        if A.requires_grad:
            pairs.append(FactorPair(path, A, B, scale))
    if not pairs:
        found = f"its adapted layers use {sorted(methods)}" if methods else "it has no rankwise adapters"
        raise ValueError(
            f"{user} needs adapters that declare factors() -> (A, B, scale), such as LoRA or DoRA, "
            f"with trainable factors; {found}"
        )
    return pairs


def other_parameter_groups(model: nn.Module, pairs: list[FactorPair], weight_decay: float) -> list[dict[str, Any]]:
    """Param groups for the trainable parameters outside ``pairs`` (a classifier head, DoRA's magnitude).

    Matrices are decayed, vectors are not (nanoGPT's rule: biases, norm gains and DoRA's magnitude
    are not pulled towards zero). Empty groups are left out.
    """
    paired = {id(p) for pair in pairs for p in (pair.A, pair.B)}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in paired]
    groups = [
        {"params": [p for p in rest if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in rest if p.ndim < 2], "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]
