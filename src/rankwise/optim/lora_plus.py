"""LoRA+: LoRA with a larger learning rate for B than for A.

Hayou, Ghosh, Yu, "LoRA+: Efficient Low Rank Adaptation of Large Models", ICML 2024,
https://arxiv.org/abs/2402.12354.

    η_B = λ · η_A,   λ ≈ 2⁴

In the infinite-width limit, one learning rate for both factors makes either A's or B's update
vanish or blow up; B (fan-in r) needs a rate Θ(width) times A's (fan-in d) for both to learn
features efficiently (paper §3–4).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .factors import factor_pairs, other_parameter_groups


def lora_plus_param_groups(
    model: nn.Module, lr: float, ratio: float = 16.0, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """Param groups for any ``torch.optim`` optimizer: A at ``lr``, B at ``ratio · lr``.

    The factors are found through ``factors()``, which LoRA-like adapters declare (LoRA, rsLoRA,
    DoRA). Other trainable parameters (a classifier head, DoRA's magnitude) get ``lr``; matrices
    are decayed, vectors are not.

    With the transformers ``Trainer``::

        optimizer = torch.optim.AdamW(lora_plus_param_groups(model, lr=1e-4))
        Trainer(model, args, optimizers=(optimizer, None))

    Args:
        model: adapted with a method whose adapter declares ``factors()``.
        lr: η_A, > 0.
        ratio: λ = η_B / η_A, > 0; 2⁴ is the paper's recommended default. The authors advise a
            larger ratio for harder tasks, with ``lr`` lowered (by about 2×) from the LoRA rate.
        weight_decay: applied to A, B and other matrices; ≥ 0.

    Raises:
        ValueError: a value is out of range, or the model has no trainable factors.
    """
    if lr <= 0:
        raise ValueError(f"LoRA+: lr={lr} must be > 0")
    if ratio <= 0:
        raise ValueError(f"LoRA+: ratio={ratio} must be > 0")
    if weight_decay < 0:
        raise ValueError(f"LoRA+: weight_decay={weight_decay} must be >= 0")
    pairs = factor_pairs(model, "LoRA+")
    return [
        {"params": [pair.A for pair in pairs], "lr": lr, "weight_decay": weight_decay},
        {"params": [pair.B for pair in pairs], "lr": ratio * lr, "weight_decay": weight_decay},
        *({**group, "lr": lr} for group in other_parameter_groups(model, pairs, weight_decay)),
    ]


class LoRAPlus(torch.optim.AdamW):
    """AdamW over :func:`lora_plus_param_groups`: LoRA+ as the paper trains it.

    Hayou et al., "LoRA+: Efficient Low Rank Adaptation of Large Models",
    https://arxiv.org/abs/2402.12354; ``η_B = ratio · η_A``.

    With the transformers ``Trainer``: ``Trainer(model, args, optimizers=(LoRAPlus(model, lr), None))``.

    Args:
        model: adapted with a method whose adapter declares ``factors()``.
        lr: η_A, > 0.
        ratio: η_B / η_A, > 0 (paper: 2⁴).
        betas: Adam's (β1, β2).
        eps: Adam's ε.
        weight_decay: decoupled, on A, B and other matrices; ≥ 0.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        ratio: float = 16.0,  # the paper's recommended 2⁴
        betas: tuple[float, float] = (0.9, 0.999),  # torch and the paper's AdamW
        eps: float = 1e-8,
        weight_decay: float = 0.0,  # PEFT's loraplus_weight_decay default
    ) -> None:
        super().__init__(lora_plus_param_groups(model, lr, ratio, weight_decay), lr=lr, betas=betas, eps=eps)
