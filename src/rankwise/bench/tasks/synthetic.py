"""A task that needs no assets and runs in milliseconds: what the tests drive."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from .base import DATA_SEED, Batch, Classification


class SyntheticNet(nn.Module):
    """Two square hidden layers and a head: a stand-in for a pretrained encoder."""

    def __init__(self, width: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh())
        self.head = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x))


class Synthetic(Classification):
    """Labels of a random teacher network on Gaussian inputs. The "pretrained" model is the
    teacher with noise added to its encoder, so its frozen features carry part of the signal and
    adapting the encoder recovers the rest."""

    name = "synthetic"
    description = "synthetic 4-class teacher labels; a 32-wide MLP (for tests)"
    targets = ("encoder.0", "encoder.2")
    head = ("head",)
    full_lr = 1e-2
    width = 32
    noise = 0.5  # relative to the teacher's weights: enough that the frozen features are not the answer

    def _load(self) -> tuple[nn.Module, dict[str, Batch]]:
        generator = torch.Generator().manual_seed(DATA_SEED)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(DATA_SEED)
            teacher = SyntheticNet(self.width)
        model = copy.deepcopy(teacher)
        with torch.no_grad():
            for layer in (model.encoder[0], model.encoder[2]):
                assert isinstance(layer, nn.Linear)  # SyntheticNet's encoder: Linear, Tanh, Linear, Tanh
                noise = torch.randn(layer.weight.shape, generator=generator)
                layer.weight.add_(self.noise * layer.weight.std() * noise)
            # Centre the teacher's logits so that the four classes are about equally frequent.
            teacher.head.bias.sub_(teacher(torch.randn(4096, self.width, generator=generator)).mean(0))
        s = self.sizes
        data = {}
        for split, count in (("train", s.train), ("val", s.val), ("test", s.test), ("probe", s.probe)):
            x = torch.randn(count, self.width, generator=generator)
            with torch.no_grad():
                data[split] = {"inputs": x, "labels": teacher(x).argmax(-1)}
        return model, data

    def logits(self, model: nn.Module, batch: Batch) -> Tensor:
        return model(batch["inputs"])
