"""Every allocator under DDP (gloo, CPU, two processes): both processes end with the same ranks and
the same adapter weights, equal to one process on the same global batches."""

from __future__ import annotations

import json
import os

import pytest
import safetensors.torch
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import rankwise as rw

pytestmark = pytest.mark.slow  # spawns two processes per allocator

STEPS = 12
GLOBAL_BATCH = 8
METHODS = ("adalora", "elalora", "ard_lora", "gora")


def _model(method: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 2))
    rank = 2 if method in ("ard_lora", "gora") else 3
    model = rw.adapt(model, rw.make_config(method, rank=rank, targets=("0", "2", "4")))
    if method in ("adalora", "elalora"):
        with torch.no_grad():  # e ≠ 0: every triplet has a gradient and a distinct score from step 0
            for layer in (model[0], model[2], model[4]):
                layer.delta.e.normal_(0, 0.3)
    return model


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(GLOBAL_BATCH, 6, generator=generator), torch.randn(GLOBAL_BATCH, 2, generator=generator))
        for _ in range(STEPS)
    ]


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.mse_loss(model(batch[0]), batch[1])


def _train(method: str, rank: int = 0, world: int = 1) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    share = GLOBAL_BATCH // world
    batches = [(x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]) for x, y in _batches()]
    model = _model(method)
    alloc = None
    if method == "gora":  # before DDP and before the optimizer; gradients are averaged across processes
        ranks = rw.allocate.gora(model, batches[:3], loss_fn=_loss).ranks
    elif method == "adalora":
        alloc = rw.allocate.AdaLoRAAllocator(model, total_steps=STEPS, budget=5, t_init=2, t_final=4, delta_t=2)
    elif method == "elalora":
        alloc = rw.allocate.ElaLoRAAllocator(model, total_steps=STEPS, changes=2, t_init=1, t_final=2, delta_t=2)
    else:
        alloc = rw.allocate.ARDLoRAAllocator(
            model, total_steps=STEPS, warmup=2, budget=120, l1=1e-2, heads={"2": (2, "out")}
        )
    wrapped = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    for batch in batches:
        loss = _loss(wrapped, batch)
        (loss + alloc.penalty() if alloc else loss).backward()
        optimizer.step()
        if alloc is not None and alloc.step(optimizer) and world > 1:
            wrapped = nn.parallel.DistributedDataParallel(model)  # its reducer holds the replaced parameters
        optimizer.zero_grad()
    return rw.adapter_state_dict(model), alloc.ranks() if alloc else ranks


def _worker(rank: int, world: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    torch.set_num_threads(1)
    ranks = {}
    for method in METHODS:
        state, ranks[method] = _train(method, rank, world)
        safetensors.torch.save_file(
            {k: v.contiguous() for k, v in state.items()}, os.path.join(folder, f"{method}-{rank}.safetensors")
        )
    with open(os.path.join(folder, f"ranks-{rank}.json"), "w") as file:
        json.dump(ranks, file)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> tuple[str, list[dict]]:
    folder = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, str(folder)), nprocs=2, join=True)
    ranks = [json.loads((folder / f"ranks-{r}.json").read_text()) for r in range(2)]
    return str(folder), ranks


@pytest.mark.parametrize("method", METHODS)
def test_two_processes_agree_with_each_other_and_with_one(ddp_results, method: str) -> None:
    folder, ranks = ddp_results
    single_state, single_ranks = _train(method)
    assert ranks[0][method] == ranks[1][method] == pytest.approx(single_ranks, abs=1e-5)
    states = [safetensors.torch.load_file(os.path.join(folder, f"{method}-{r}.safetensors")) for r in range(2)]
    assert states[0].keys() == states[1].keys() == single_state.keys()
    for key in single_state:
        assert torch.equal(states[0][key], states[1][key]), key
        torch.testing.assert_close(states[0][key], single_state[key], rtol=1e-4, atol=1e-5)
    if method in ("adalora", "elalora", "gora"):
        assert len(set(single_ranks.values())) > 1  # the allocation did something non-uniform
