"""A small CNN shaped like the networks TRP and Cuttlefish compress: a stem, k x k convs (one
strided), a 1 x 1 shortcut and a linear classifier."""

from __future__ import annotations

import torch
from torch import nn


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.shortcut = nn.Conv2d(8, 16, 1, stride=2)
        self.conv3 = nn.Conv2d(16, 24, 3, padding=1, bias=False)
        self.head = nn.Linear(24, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        y = torch.relu(self.conv2(torch.relu(self.conv1(h)))) + self.shortcut(h)
        y = torch.relu(self.conv3(y))
        return self.head(y.mean((2, 3)))


def batches(count: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random 10 x 10 images whose label is the quadrant holding the brightest pixel."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        x = torch.rand(8, 1, 10, 10, generator=generator)
        flat = x.flatten(1).argmax(1)
        rows, cols = flat // 10, flat % 10
        out.append((x, (rows >= 5).long() * 2 + (cols >= 5).long()))
    return out
