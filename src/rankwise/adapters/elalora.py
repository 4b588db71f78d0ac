"""ElaLoRA's adapter: AdaLoRA's SVD triplets, whose count per layer changes during training.

Chang et al., "ElaLoRA: Elastic & Learnable Low-Rank Adaptation for Efficient Model Fine-Tuning",
https://arxiv.org/abs/2504.00254. The mathematics is AdaLoRA's (:mod:`rankwise.adapters.adalora`):

    ΔW = s · B diag(e) A,   s = α / (r_init + 1e-5)

``rankwise.allocate.ElaLoRAAllocator`` prunes and grows triplets; the total rank stays ``N · rank``.
A method of its own (not an ``AdaLoRAConfig``) so that its defaults are ElaLoRA's and a checkpoint names it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..core.registry import register
from .adalora import AdaLoRA, AdaLoRAConfig


@dataclass(frozen=True, kw_only=True)
class ElaLoRAConfig(AdaLoRAConfig):
    """ElaLoRA's adapter hyperparameters: AdaLoRA's fields; ``rank`` is also the average rank the
    whole run keeps (ElaLoRA moves rank between layers, it does not shrink the total)."""

    # Official ElaLoRA GLUE scripts, DeBERTaV3-base: 8e-4 (CoLA, SST-2); 5e-4 to 1.2e-3 across tasks.
    recommended_lr: ClassVar[float] = 8e-4

    rank: int = 10  # official GLUE scripts (lora_r=10; QNLI uses 2)
    alpha: float = 16.0  # official GLUE scripts


@register("elalora", ElaLoRAConfig)
class ElaLoRA(AdaLoRA):
    """ElaLoRA: AdaLoRA's triplets, pruned and grown between layers by ``rankwise.allocate.ElaLoRAAllocator``."""

    # Not embeddings: a grown triplet's row of A is a random unit vector over the whole vocabulary,
    # so the padding token would get an update that nn.Embedding's padding_idx rules out.
    supported_bases = frozenset({"linear", "conv1d", "conv2d"})
