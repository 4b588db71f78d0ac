"""GoRA's adapter: LoRA with per-layer ranks and a gradient-derived start, both set by
``rankwise.allocate.gora`` before training.

He et al., "GoRA: Gradient-driven Adaptive Low Rank Adaptation", NeurIPS 2025,
https://arxiv.org/abs/2502.12171. The trained adapter is LoRA with the rank-stabilized scale:

    ΔW = s · B A,   s = α / √r_i,   r_i ∝ avg|W ⊙ G| under the budget of rank r_ref everywhere

A method of its own (not a ``LoRAConfig``) so that its defaults are the paper's and a checkpoint
names it; the mathematics is :class:`rankwise.adapters.lora.LoRA`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..core.registry import register
from .lora import LoRA, LoRAConfig


@dataclass(frozen=True, kw_only=True)
class GoRAConfig(LoRAConfig):
    """GoRA's adapter hyperparameters: LoRA's, with ``rank`` as r_ref, the uniform rank whose
    parameter count is the budget ``rankwise.allocate.gora`` shares out."""

    # Official T5-base GLUE script (Adam, lr 1e-4); the LLaMA scripts use 5e-5 with LoRA+ (B × 16).
    recommended_lr: ClassVar[float] = 1e-4

    rank: int = 8  # r_ref, official LLaMA scripts
    alpha: float = 16.0  # official LLaMA scripts
    rslora: bool = True  # official scripts: rank-stabilized scale α/√r_i ("dynamic scaling" on)


@register("gora", GoRAConfig)
class GoRA(LoRA):
    """GoRA: LoRA whose per-layer ranks and initial B come from gradients (``rankwise.allocate.gora``)."""

    # Not embeddings: the gradient-derived start G·P_A projects through a random A over the whole
    # vocabulary, giving every token, the padding token too, an update before training.
    supported_bases = frozenset({"linear", "conv1d", "conv2d"})
