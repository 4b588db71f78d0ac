"""``RankAllocationCallback`` drives an allocator from the transformers Trainer."""

from __future__ import annotations

import pytest
import torch
import transformers

import rankwise as rw
from rankwise import integrations

from _models import tiny_gpt2
from _trainer import cpu_trainer, token_rows

STEPS = 8


def _gpt2() -> transformers.GPT2LMHeadModel:
    return tiny_gpt2(dropout=0.0)


def _data() -> list[dict[str, torch.Tensor]]:
    return token_rows(16, torch.Generator().manual_seed(1))


def test_trainer_runs_adalora_to_its_budget_and_the_result_reloads(tmp_path) -> None:
    model = rw.adapt(_gpt2(), rw.AdaLoRAConfig(rank=4, targets=("c_attn", "c_fc")))
    alloc = rw.allocate.AdaLoRAAllocator(model, total_steps=STEPS, budget=10, t_init=1, t_final=3, delta_t=1)
    callback = integrations.RankAllocationCallback(alloc)
    trainer = cpu_trainer(model, tmp_path, _data(), lr=1e-2, steps=STEPS, callbacks=[callback])
    trainer.train()
    assert alloc.t == trainer.state.global_step == STEPS
    assert alloc.total() == 10 and alloc.history.totals[-1] == 10
    assert sum(layer.delta.rank for layer in alloc.layers.values()) == 10  # masked triplets removed
    assert alloc.model._forward_hooks == {}  # the penalty hook is gone after training
    rw.save_adapter(model, tmp_path / "adapter")
    loaded = rw.load_adapter(_gpt2(), tmp_path / "adapter")
    ids = _data()[0]["input_ids"][None]
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_the_penalty_is_added_to_the_training_loss_only() -> None:
    model = rw.adapt(_gpt2(), rw.ElaLoRAConfig(rank=3, targets="c_attn"))
    alloc = rw.allocate.ElaLoRAAllocator(model, total_steps=STEPS, orth_weight=0.5)
    callback = integrations.RankAllocationCallback(alloc)
    batch = {k: v[None] for k, v in _data()[0].items()}
    plain = model(**batch).loss
    callback.on_train_begin(None, transformers.TrainerState(), transformers.TrainerControl())
    penalty = alloc.penalty()
    assert penalty.item() > 0
    torch.testing.assert_close(model(**batch).loss, plain + penalty)
    model.eval()
    torch.testing.assert_close(model(**batch).loss, plain)
    model.train()
    with pytest.raises(ValueError, match="return a loss"):
        model(input_ids=batch["input_ids"])
    callback.on_train_end(None, transformers.TrainerState(), transformers.TrainerControl())
    torch.testing.assert_close(model(**batch).loss, plain)


def test_refuses_what_it_cannot_do(monkeypatch) -> None:
    model = rw.adapt(_gpt2(), rw.ElaLoRAConfig(rank=3, targets="c_attn"))
    callback = integrations.RankAllocationCallback(rw.allocate.ElaLoRAAllocator(model, total_steps=STEPS))
    resumed = transformers.TrainerState(global_step=3)
    with pytest.raises(ValueError, match="has run 0 steps, the Trainer 3"):
        callback.on_train_begin(None, resumed, transformers.TrainerControl())
    monkeypatch.setattr(integrations, "world_size", lambda: 2)
    with pytest.raises(RuntimeError, match="cannot rebuild its DDP"):
        callback.on_train_begin(None, transformers.TrainerState(), transformers.TrainerControl())
