"""The adapter methods; importing a method's file registers it (registration order = listing order)."""

from .lora import LoRA, LoRAConfig
from .dora import DoRA, DoRAConfig

__all__ = [
    "LoRA", "LoRAConfig",
    "DoRA", "DoRAConfig",
]
