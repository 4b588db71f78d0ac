"""An adapted model trains with the transformers Trainer, unchanged."""

from __future__ import annotations

import torch

import rankwise as rw

from _models import tiny_gpt2
from _trainer import cpu_trainer, token_rows


def test_three_trainer_steps_move_only_the_adapters(tmp_path) -> None:
    model = rw.adapt(tiny_gpt2(), rw.LoRAConfig(rank=2, targets="c_attn"))
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainer = cpu_trainer(model, tmp_path, token_rows(12), lr=1e-2)
    trainer.train()
    assert trainer.state.global_step == 3
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".adapters.default." in k for k in changed)
    assert any(k.endswith("default.B") for k in changed)
