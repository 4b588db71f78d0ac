"""torch.compile works on an adapted model for every method, and rankwise's code adds no graph
break. The ``aot_eager`` backend traces forward and backward as inductor would, without its
compile time, so the test stays in CI."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch._dynamo
from torch import nn

import rankwise as rw
from rankwise.core import registry
from rankwise.core.inject import adapted_modules

pytestmark = pytest.mark.slow  # a dynamo trace per method: about a sixth of the suite's time


@pytest.mark.parametrize("name", registry.methods())
def test_compiles_without_graph_breaks(name: str) -> None:
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = rw.adapt(
        nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 512)), rw.make_config(name, targets=("0", "2"))
    )
    with torch.no_grad():
        for _, layer in adapted_modules(model):
            for p in layer.delta.parameters():
                p.add_(0.02 * torch.randn_like(p))
    x = torch.randn(2, 3, 256)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        explanation = torch._dynamo.explain(model)(x)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        y = compiled(x)
    assert explanation.graph_break_count == 0, [str(reason) for reason in explanation.break_reasons]
    # Dynamo warns about code it traces with a caveat (a cached function, say) and names the file.
    assert not [str(w.message) for w in caught if "rankwise" in str(w.message)]
    torch.testing.assert_close(y, model(x), rtol=1e-5, atol=1e-5)
    y.square().mean().backward()
    assert all(p.grad is not None for _, layer in adapted_modules(model) for p in layer.delta.parameters())
