"""Rank allocation during fine-tuning: AdaLoRA, ElaLoRA and ARD-LoRA-style allocators driven from
any training loop (``alloc.step(optimizer)`` after ``optimizer.step()``), and GoRA's one-off
allocation before training (``gora(model, batches)``)."""

from .adalora import AdaLoRA
from .ard_lora import ARDLoRA
from .base import History, RankAllocator
from .elalora import ElaLoRA
from .gora import GoRAAllocation, gora
from .plot import plot, summary

__all__ = ["ARDLoRA", "AdaLoRA", "ElaLoRA", "GoRAAllocation", "History", "RankAllocator", "gora", "plot", "summary"]
