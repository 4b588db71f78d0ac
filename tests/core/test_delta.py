"""core.delta's up-projection products: the gradients of plain autograd, and no copy of ``up`` kept
for backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.core.delta import add_product, low_rank_product


@pytest.mark.parametrize("rank", [3, 0])
def test_products_have_plain_autograd_gradients(rank: int) -> None:
    torch.manual_seed(0)
    y = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    hidden = torch.randn(2, 5, rank, dtype=torch.float64, requires_grad=True)
    B = torch.randn(7, rank, dtype=torch.float64, requires_grad=True)  # up = Bᵀ, a transposed view
    weights = torch.randn(2, 5, 7, dtype=torch.float64)
    for fused, plain in (
        (add_product(y, hidden, B.t()), y + hidden @ B.t()),
        (low_rank_product(hidden, B.t()), hidden @ B.t()),
    ):
        torch.testing.assert_close(fused, plain)
        inputs = [t for t in (y, hidden, B) if t.grad_fn is None]
        got = torch.autograd.grad((fused * weights).sum(), inputs, allow_unused=True)
        want = torch.autograd.grad((plain * weights).sum(), inputs, allow_unused=True)
        for g, w in zip(got, want, strict=True):
            assert (g is None) == (w is None)
            if g is not None:
                torch.testing.assert_close(g, w)


CONFIGS = {
    "lora": rw.LoRAConfig(rank=4),
    "dora": rw.DoRAConfig(rank=4),
    "adalora": rw.make_config("adalora", rank=4),
    "loldu": rw.make_config("loldu", rank=4),
    "singlora": rw.make_config("singlora", rank=4),
}


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_backward_keeps_no_copy_of_the_up_projection(method: str) -> None:
    """Sizes chosen so that no activation has rank × out = 192 numbers (x: 160, hidden: 20,
    output: 240): a saved (rank, out) tensor that is not a parameter is a kept copy of ``Bᵀ``."""
    torch.manual_seed(0)
    model = rw.adapt(nn.Sequential(nn.Linear(32, 48)), CONFIGS[method])
    with torch.no_grad():  # B starts at zero for some methods; any value will do here
        for p in model.parameters():
            p.add_(0.1)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    parameters |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    kept: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in parameters:
            kept.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(torch.randn(5, 32)).square().sum()
    loss.backward()
    assert kept, "the hook saw nothing: the test measures nothing"
    assert all(torch.Size(shape).numel() != 4 * 48 for shape in kept), kept
