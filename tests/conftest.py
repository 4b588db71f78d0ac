"""Tiny models built from code, fixed seeds; no downloads."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


class MLP(nn.Module):
    def __init__(self, sizes: tuple[int, ...] = (16, 32, 24, 8)) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(sizes))
        self.head = nn.Linear(sizes[-1], 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.head(x)


@pytest.fixture
def mlp() -> MLP:
    return MLP()
