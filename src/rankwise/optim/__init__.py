"""Optimizers for adapters; they find a layer's factors through the ``factors()`` its adapter declares."""

from .factors import factor_pairs
from .lora_plus import LoRAPlus, lora_plus_param_groups
from .lora_pro import LoRAPro, LoRAProSGD, adjusted_gradients, equivalent_gradient

__all__ = [
    "LoRAPlus",
    "LoRAPro",
    "LoRAProSGD",
    "adjusted_gradients",
    "equivalent_gradient",
    "factor_pairs",
    "lora_plus_param_groups",
]
