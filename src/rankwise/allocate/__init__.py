"""Rank allocation during fine-tuning: AdaLoRA, ElaLoRA and ARD-LoRA-style allocators driven from
any training loop (``alloc.step(optimizer)`` after ``optimizer.step()``), and GoRA's one-off
allocation before training (``gora(model, batches)``)."""

from .adalora import AdaLoRAAllocator
from .ard_lora import ARDLoRAAllocator
from .base import History, RankAllocator
from .elalora import ElaLoRAAllocator
from .gora import GoRAAllocation, gora
from .plot import plot, rank_summary

__all__ = [
    "ARDLoRAAllocator",
    "AdaLoRAAllocator",
    "ElaLoRAAllocator",
    "GoRAAllocation",
    "History",
    "RankAllocator",
    "gora",
    "plot",
    "rank_summary",
]
