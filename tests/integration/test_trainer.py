"""An adapted model trains with the transformers Trainer, unchanged."""

from __future__ import annotations

import torch
import transformers

import rankwise as rw


def test_three_trainer_steps_move_only_the_adapters(tmp_path) -> None:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=8, bos_token_id=0, eos_token_id=0
    )
    model = rw.adapt(transformers.GPT2LMHeadModel(config), rw.LoRAConfig(rank=2, targets="c_attn"))
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 50, (12, 8))]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_steps=1,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    assert trainer.state.global_step == 3
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".adapters.default." in k for k in changed)
    assert any(k.endswith("default.B") for k in changed)
