"""Stand-in methods for the harness tests, registered for one test at a time, and tiny sizes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import Tensor, nn

from rankwise.bench import Preset, Sizes
from rankwise.core import registry
from rankwise.core.config import AdapterConfig, check_range
from rankwise.core.delta import Delta

TINY = Sizes(train=64, val=32, test=32, length=1, steps=6, batch_size=8, eval_batch_size=32, probe=64)


def tiny_preset(*, seeds: tuple[int, ...] = (0,), lr_factors: tuple[float, ...] = (1.0,),
                sizes: Sizes = TINY) -> Preset:
    return Preset("test", tasks=("synthetic",), seeds=seeds, lr_factors=lr_factors, sizes={"synthetic": sizes})


@pytest.fixture
def tiny() -> Sizes:
    """Sizes that make a synthetic run take milliseconds."""
    return TINY


@pytest.fixture
def make_preset() -> Callable[..., Preset]:
    return tiny_preset


@dataclass(frozen=True, kw_only=True)
class StrideConfig(AdapterConfig):
    size_knob: ClassVar[str | None] = "block"
    block: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "block", 1)


class Stride(Delta):
    """ΔW whose rows repeat in groups of ``block``: (out // block) · in parameters. ``num_params``
    does not check that ``block`` divides ``out_features``; building the module does, as shape
    checks do in real methods."""

    supported_bases = frozenset({"linear"})

    def __init__(self, w0: Tensor, config: StrideConfig) -> None:
        super().__init__(w0, config)
        if self.out_features % config.block:
            raise ValueError(f"block={config.block} must divide out_features={self.out_features}")
        self.block = config.block
        self.rows = nn.Parameter(torch.zeros(self.out_features // config.block, self.in_features))

    @classmethod
    def num_params(cls, in_features: int, out_features: int, config: StrideConfig) -> int:
        return out_features // config.block * in_features

    def delta_weight(self) -> Tensor:
        return self.rows.repeat_interleave(self.block, 0)

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.delta_weight().T


@dataclass(frozen=True, kw_only=True)
class FixedConfig(StrideConfig):
    size_knob: ClassVar[str | None] = None


class Fixed(Stride):
    """Stride with no size knob."""


@dataclass(frozen=True, kw_only=True)
class ConvOnlyConfig(StrideConfig):
    pass


class ConvOnly(Stride):
    """Stride that claims to support only convolutions."""

    supported_bases = frozenset({"conv2d"})


@pytest.fixture
def fake_methods(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Register the stand-ins in copies of the registry's tables, restored after the test."""
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    monkeypatch.setattr(registry, "_BY_CONFIG", dict(registry._BY_CONFIG))
    registry.register("test-stride", StrideConfig)(Stride)
    registry.register("test-fixed", FixedConfig)(Fixed)
    registry.register("test-conv-only", ConvOnlyConfig)(ConvOnly)
    return {"stride": "test-stride", "fixed": "test-fixed", "conv_only": "test-conv-only"}
