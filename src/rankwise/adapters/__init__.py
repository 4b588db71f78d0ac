"""The adapter methods; importing a method's file registers it."""

from .dora import DoRA, DoRAConfig
from .lora import LoRA, LoRAConfig

__all__ = ["DoRA", "DoRAConfig", "LoRA", "LoRAConfig"]
