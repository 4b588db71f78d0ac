import torch
from torch import nn

import rankwise as rw


def test_an_inactive_adapter_keeps_its_step_and_starts_from_the_base_model() -> None:
    torch.manual_seed(0)
    model = rw.adapt(nn.Sequential(nn.Linear(6, 6)), rw.SingLoRAConfig(rank=2, targets=("0",), ramp_steps=4))
    rw.adapt(model, rw.SingLoRAConfig(rank=2, targets=("0",), ramp_steps=4), name="b")
    x = torch.randn(3, 6)
    with rw.disabled(model):
        base = model(x)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    rw.step_with(optimizer, model)
    for _ in range(3):  # trains "default"; "b" is inactive
        model(x).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    layer = model[0]
    assert [layer.adapters[n].step.item() for n in ("default", "b")] == [3, 0]
    rw.set_active(model, "b")
    assert torch.equal(model(x), base)  # u(0) = 0: the new adapter starts as the base model
    assert rw.step(model) == 1
    assert [layer.adapters[n].step.item() for n in ("default", "b")] == [3, 1]
