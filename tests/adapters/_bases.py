"""The case table of the contract tests (test_contract.py, test_contract_named.py): every registered
method on every base of a ``BASES`` dict that it declares, and the inputs of those bases. Each test
module keeps its own ``BASES`` (its own sizes); what a method declares decides the cases."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from rankwise.core import registry

# name -> (base kind, model builder, input shape). The kind is what a method declares in
# ``supported_bases``; the base named "conv2d-3x3" is the spatial one (``spatial_conv``).
Bases = dict[str, tuple[str, Callable[[], nn.Module], tuple[int, ...]]]

# An embedding base has VOCAB rows, of which PAD is the padding row, as transformers' embeddings have.
VOCAB, PAD = 40, 1


def cases(bases: Bases) -> list:
    """A ``pytest.param(method, base)`` for every registered method and every base of ``bases`` whose
    kind it supports: the 3x3 convolution only where it also declares ``spatial_conv``."""
    params = []
    for name in registry.methods():
        module_class = registry.get(name).module_class
        for base, (kind, _, _) in bases.items():
            if kind in module_class.supported_bases and (base != "conv2d-3x3" or module_class.spatial_conv):
                params.append(pytest.param(name, base, id=f"{name}-{base}"))
    return params


def base_input(bases: Bases, base: str, seed: int) -> torch.Tensor:
    """An input of ``base``'s shape drawn from a generator seeded ``seed``: token ids below VOCAB
    with PAD in the first column for an embedding, a standard normal tensor otherwise."""
    kind, _, shape = bases[base]
    generator = torch.Generator().manual_seed(seed)
    if kind == "embedding":
        return torch.randint(0, VOCAB, shape, generator=generator).index_fill_(1, torch.tensor([0]), PAD)
    return torch.randn(*shape, generator=generator)
