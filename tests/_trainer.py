"""The transformers Trainer as the tests run it: on the CPU, on a few random token rows for
``tiny_gpt2`` (tests/_models.py), saving and reporting nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers


def token_rows(count: int, generator: torch.Generator | None = None) -> list[dict[str, torch.Tensor]]:
    """``count`` rows of 8 random ids below 50 (tiny_gpt2's context and vocabulary), each row its
    own label: a language-modelling data set.

    Args:
        count: how many rows.
        generator: where the ids are drawn from; torch's global generator when None.
    """
    ids = torch.randint(0, 50, (count, 8), generator=generator)
    return [{"input_ids": row, "labels": row} for row in ids]


def cpu_trainer(
    model: torch.nn.Module,
    output_dir: Path,
    data: list[dict[str, torch.Tensor]],
    *,
    lr: float,
    steps: int = 3,
    **trainer: Any,
) -> transformers.Trainer:
    """A Trainer of ``steps`` steps over batches of 4, logging every step.

    Args:
        model: what trains.
        output_dir: the Trainer's output folder (no checkpoints: save_strategy "no").
        data: the training rows.
        lr: the learning rate.
        steps: how many optimizer steps.
        trainer: further ``transformers.Trainer`` arguments (``optimizers``, ``callbacks``).
    """
    args = transformers.TrainingArguments(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=lr,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_steps=1,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=data, **trainer)
