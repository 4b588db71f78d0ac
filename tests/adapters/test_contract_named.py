"""The named-adapter contract every registered method keeps, on every base it declares: two adapters
of one method, built from different seeds on the same layers. It names no method."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import rankwise as rw
from rankwise.core import registry
from rankwise.core.adapted import Adapted

from _adapters import two_adapters
from _bases import PAD, VOCAB, Bases, base_input, cases


def _conv1d() -> nn.Module:  # GPT-2 layout: Conv1D(nf=out, nx=in)
    model = nn.Sequential(Conv1D(32, 16), nn.GELU(), Conv1D(16, 32))
    for layer in (model[0], model[2]):
        nn.init.normal_(layer.weight, std=0.1)
        nn.init.normal_(layer.bias, std=0.1)
    return model


BASES: Bases = {  # smaller than test_contract's, and a batch of 4
    "linear": ("linear", lambda: nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)), (4, 3, 16)),
    "embedding": (
        "embedding",
        lambda: nn.Sequential(nn.Embedding(VOCAB, 16, padding_idx=PAD), nn.GELU(), nn.Linear(16, 16)),
        (4, 3),
    ),
    "conv1d": ("conv1d", _conv1d, (4, 3, 16)),
    "conv2d-1x1": (
        "conv2d",
        lambda: nn.Sequential(nn.Conv2d(16, 32, 1), nn.GELU(), nn.Conv2d(32, 16, 1)),
        (4, 16, 3, 3),
    ),
    "conv2d-3x3": (
        "conv2d",
        lambda: nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.GELU(), nn.Conv2d(16, 16, 3, stride=2)),
        (4, 8, 6, 6),
    ),
}


def _plain(base: str) -> nn.Module:
    torch.manual_seed(0)
    return BASES[base][1]().eval()


def _config(method: str) -> rw.AdapterConfig:
    return rw.make_config(method, targets=("0", "2"), **registry.get(method).module_class.example_config)


def _two(method: str, base: str) -> nn.Module:
    return two_adapters(_plain(base), _config(method), _config(method))


def _alone(model: nn.Module, method: str, base: str, name: str) -> nn.Module:
    """A model holding only a copy of the adapter ``name``, built as one-adapter code builds it."""
    single = rw.adapt(_plain(base), _config(method)).eval()
    for i, layer in enumerate(single):
        if isinstance(layer, Adapted):
            layer.delta.load_state_dict(model[i].adapters[name].state_dict())
    return single


def _input(base: str) -> torch.Tensor:
    return base_input(BASES, base, seed=3)


CLOSE = {"rtol": 1e-4, "atol": 1e-5}


@pytest.mark.parametrize(("method", "base"), cases(BASES))
def test_two_named_adapters_of_one_method(method: str, base: str, tmp_path: Path) -> None:
    model, x, plain = _two(method, base), _input(base), _plain(base)
    only_a, only_b = _alone(model, method, base, "a"), _alone(model, method, base, "b")
    with torch.no_grad():
        # a active: the model holding only a, bit for bit.
        assert torch.equal(model(x), only_a(x))
        assert not torch.allclose(only_a(x), only_b(x))

        # Both active: per layer, the base output plus each adapter's difference to it.
        rw.set_active(model, ["a", "b"])
        expected = x
        for i, layer in enumerate(model):
            if isinstance(layer, Adapted):
                expected = only_a[i](expected) + only_b[i](expected) - plain[i](expected)
            else:
                expected = layer(expected)
        both = model(x)
        torch.testing.assert_close(both, expected, **CLOSE)

        # Merged, both active: the same output; unmerge writes the base weights back bit for bit.
        if all(layer.adapters["a"].mergeable for layer in model if isinstance(layer, Adapted)):
            rw.merge(model)
            torch.testing.assert_close(model(x), both, **CLOSE)
            rw.unmerge(model)
            pairs = [(a, p) for a, p in zip(model, plain, strict=True) if isinstance(a, Adapted)]
            assert all(torch.equal(a.base.weight, p.weight) for a, p in pairs)

        # Mixed batch: each example as it runs alone with its adapter (None: the base model).
        names = ["a", "b", None, "a"]
        with rw.per_example(model, names):
            mixed = model(x)
        for row, name in enumerate(names):
            alone = {"a": only_a, "b": only_b, None: plain}[name](x[row : row + 1])
            torch.testing.assert_close(mixed[row : row + 1], alone, **CLOSE)

    # Save and load by name: bit-exact, into a model that holds a, beside it.
    rw.save_adapter(model, tmp_path, name="b")
    loaded = _alone(model, method, base, "a")
    rw.load_adapter(loaded, tmp_path, name="b")
    for i, layer in enumerate(model):
        if isinstance(layer, Adapted):
            for name, ours in (("a", "default"), ("b", "b")):  # _alone names its one adapter "default"
                theirs = loaded[i].adapters[ours].state_dict()
                assert all(torch.equal(theirs[k], v) for k, v in layer.adapters[name].state_dict().items())
    with torch.no_grad():
        rw.set_active(loaded, "b")
        assert torch.equal(loaded(x), only_b(x))

        # Deleting a leaves b as it was: the model holding only b.
        rw.delete_adapter(model, "a")
        assert rw.adapter_names(model) == rw.active_adapters(model) == ["b"]
        assert torch.equal(model(x), only_b(x))
