"""How the compressors feed a batch to a model and read a loss from it, one rule for calibration
and healing."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

LossFn = Callable[[Any, Any], Tensor]  # (model output, batch) -> scalar loss


def forward(model: nn.Module, batch: Any) -> Any:
    """A Mapping is passed as keyword arguments (a tokenizer's output), a tuple or list as
    positional arguments, anything else as the one argument."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def batch_loss(output: Any, batch: Any, loss: LossFn | None) -> Tensor | None:
    """``loss(output, batch)`` when given, else the output's own ``loss`` (a transformers model
    given ``labels``), else ``None``."""
    if loss is not None:
        return loss(output, batch)
    own = getattr(output, "loss", None)
    return own if isinstance(own, Tensor) else None
