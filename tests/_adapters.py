"""Helpers that set adapters up for a test: moved off their init, or built beside PEFT's LoRA.

peft is imported inside the function that uses it, so that tests which only perturb adapters do
not import it."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.core.adapted import DEFAULT
from rankwise.core.inject import adapted_modules

if TYPE_CHECKING:
    import peft


def two_adapters(plain: nn.Module, config_a: rw.AdapterConfig, config_b: rw.AdapterConfig) -> nn.Module:
    """``plain`` adapted twice, adapters ``a`` and ``b`` from different seeds, each moved off its
    init and stepped 500 times (a step-dependent adapter, a ramp from zero, then has an update);
    ``a`` active, in eval mode."""
    torch.manual_seed(10)
    model = rw.adapt(plain, config_a, name="a")
    torch.manual_seed(20)
    rw.adapt(model, config_b, name="b")
    perturb(model, "a", seed=1)
    perturb(model, "b", seed=2)
    rw.set_active(model, ["a", "b"])  # rw.step advances active adapters only
    for _ in range(500):
        rw.step(model)
    rw.set_active(model, "a")
    return model.eval()


def perturb(model: nn.Module, name: str = DEFAULT, *, seed: int, size: float = 0.05) -> None:
    """Move every parameter of the adapter ``name`` off its init by ``size`` times a standard normal
    draw (from a generator seeded ``seed``, layer by layer in module order), so that it changes the
    output and a merge has work to do.

    Raises:
        ValueError: if no layer of ``model`` holds an adapter ``name`` (the test would test nothing).
    """
    layers = [layer for _, layer in adapted_modules(model) if name in layer.adapters]
    if not layers:
        raise ValueError(f"no layer holds an adapter named {name!r}")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers:
            for p in layer.adapters[name].parameters():
                p.add_(size * torch.randn(p.shape, generator=generator, dtype=p.dtype))


# LoRA, rsLoRA and DoRA, each against PEFT's LoRA with the same switches (see peft_lora_twin).
LORA_VARIANTS = pytest.mark.parametrize(
    ("config_class", "rslora"),
    [(rw.LoRAConfig, False), (rw.LoRAConfig, True), (rw.DoRAConfig, False)],
    ids=["lora", "rslora", "dora"],
)


def peft_lora_twin(
    base: nn.Module, config_class: type[rw.LoRAConfig], rslora: bool, targets: Sequence[str]
) -> tuple[peft.PeftModel, nn.Module]:
    """PEFT's LoRA on a copy of ``base`` and rankwise's ``config_class`` on ``base`` itself, both of
    rank 4 and alpha 8 on ``targets``, with rsLoRA's scale if ``rslora`` and DoRA's magnitude if
    ``config_class`` is ``rw.DoRAConfig``.

    PEFT's factors are random (``init_lora_weights=False``: ΔW ≠ 0); the test copies them into
    rankwise's, whose layout it knows.

    Returns:
        PEFT's model, then rankwise's.
    """
    import peft

    reference = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=list(targets),
            use_rslora=rslora,
            use_dora=config_class is rw.DoRAConfig,
            init_lora_weights=False,
        ),
    )
    return reference, rw.adapt(base, config_class(rank=4, alpha=8, rslora=rslora, targets=tuple(targets)))
