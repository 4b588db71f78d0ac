"""The adapter methods; importing a method's file registers it (registration order = listing order)."""

from .lora import LoRA, LoRAConfig
from .dora import DoRA, DoRAConfig
from .bone import Bone, BoneConfig
from .bat import Bat, BatConfig
from .loldu import LoLDU, LoLDUConfig

__all__ = [
    "LoRA", "LoRAConfig",
    "DoRA", "DoRAConfig",
    "Bone", "BoneConfig",
    "Bat", "BatConfig",
    "LoLDU", "LoLDUConfig",
]
