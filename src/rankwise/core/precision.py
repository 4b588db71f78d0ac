"""The dtype a method's own written-out products run in, so that they follow ``torch.autocast``.

Inside a custom ``autograd.Function`` autocast still recasts the operands of autocast-eligible ops
(``F.linear``, ``@``) but not of in-place or out-of-list ones (``addmm_``, ``cat``), so a forward
mixing the two fails with a dtype mismatch. The methods with such functions cast their operands
to one dtype and call the function with autocast off: the autocast dtype where autocast is on for
the input's device (what PEFT's plain-op forwards get), the input's dtype otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def compute_dtype(x: Tensor) -> torch.dtype:
    """Autocast's dtype for ``x``'s device where autocast is on there, else ``x.dtype``."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    """``dtype`` widened to fp32 where it is narrower (fp16, bf16), else unchanged (fp32, fp64):
    the dtype of the computations a half-precision type is too coarse for (FFTs, norms, LU,
    Gram matrices, merged weights); each caller says which."""
    return torch.promote_types(dtype, torch.float32)


def apply_in(dtype: torch.dtype, function: Callable[..., Tensor], *args: Any) -> Tensor:
    """``function(*args)`` with every floating tensor argument cast to ``dtype`` (differentiably)
    and autocast off for the call."""
    cast = [a.to(dtype) if isinstance(a, Tensor) and a.is_floating_point() else a for a in args]
    device = next(a for a in args if isinstance(a, Tensor)).device.type
    with torch.autocast(device, enabled=False):
        return function(*cast)
