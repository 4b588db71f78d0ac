"""The adapter methods; importing a method's file registers it (registration order = listing order)."""

from .lora import LoRA, LoRAConfig
from .dora import DoRA, DoRAConfig
from .bone import Bone, BoneConfig
from .bat import Bat, BatConfig
from .loldu import LoLDU, LoLDUConfig
from .singlora import SingLoRA, SingLoRAConfig
from .gralora import GraLoRA, GraLoRAConfig
from .bora import BoRA, BoRAConfig
from .c3a import C3A, C3AConfig
from .surm import SURM, SURMAdapter, SURMAdapterConfig, SURMConfig
from .adalora import AdaLoRA, AdaLoRAConfig
from .elalora import ElaLoRA, ElaLoRAConfig
from .ard_lora import ARDLoRA, ARDLoRAConfig
from .gora import GoRA, GoRAConfig

__all__ = [
    "LoRA",
    "LoRAConfig",
    "DoRA",
    "DoRAConfig",
    "Bone",
    "BoneConfig",
    "Bat",
    "BatConfig",
    "LoLDU",
    "LoLDUConfig",
    "SingLoRA",
    "SingLoRAConfig",
    "GraLoRA",
    "GraLoRAConfig",
    "BoRA",
    "BoRAConfig",
    "C3A",
    "C3AConfig",
    "SURM",
    "SURMConfig",
    "SURMAdapter",
    "SURMAdapterConfig",
    "AdaLoRA",
    "AdaLoRAConfig",
    "ElaLoRA",
    "ElaLoRAConfig",
    "ARDLoRA",
    "ARDLoRAConfig",
    "GoRA",
    "GoRAConfig",
]
