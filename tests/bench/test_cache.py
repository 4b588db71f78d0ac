"""The frozen-layer cache: a run from the cached input of the first trained block gives the losses
of a run without it, and the cache refuses models where that would not hold."""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from rankwise.bench import Preset, Sizes, runner, task_from_files
from rankwise.bench.budget import size_to_budget
from rankwise.bench.cache import FrozenLayersCache
from rankwise.bench.tasks import Task

LM = Sizes(train=12, val=3, test=4, length=16, steps=5, batch_size=3, eval_batch_size=4)
UPPER = r"re:model\.layers\.[23]\.self_attn\.(q_proj|o_proj)"  # layers 2 and 3 of 4
CPU = torch.device("cpu")


def _task(folder: Path, story: Path, targets: str = UPPER) -> Task:
    task = task_from_files(folder, story, "lm", targets=[targets])(LM)
    task.check()
    task.prepare()
    return task


def _lora(task: Task) -> tuple[runner.Recipe, object]:
    recipe = runner.recipes()["lora"]
    sizing = size_to_budget(task.pretrained, recipe.method, 256, targets=task.targets, trainable=task.head)
    return recipe, recipe.configured(sizing.config, task)


def test_a_run_from_the_cache_gives_the_losses_and_metrics_of_a_run_without(llama: Path, story: Path) -> None:
    task = _task(llama, story)
    recipe, config = _lora(task)
    plain = runner.train(task, recipe, config, 0, 0.1, CPU, steps=30)
    cache = FrozenLayersCache()
    cached = runner.train(task, recipe, config, 0, 0.1, CPU, steps=30, cache=cache)
    assert type(cached.model.model.layers[1]).__name__ == "_Skipped"  # it did run from the cache
    assert type(plain.model.model.layers[1]).__name__ == "LlamaDecoderLayer"
    assert len(cache) == LM.train + LM.val + LM.test  # every example once, at the input of block 2
    before = task.evaluate(task.pretrained, "test")["perplexity"]
    # The run moves the model (by far more than the tolerance below), so equal results say something.
    assert task.evaluate(plain.model, "test")["perplexity"] < 0.98 * before
    assert cached.losses == pytest.approx(plain.losses, rel=1e-5)
    for split in ("val", "test"):
        assert task.evaluate(cached.model, split)["perplexity"] == pytest.approx(
            task.evaluate(plain.model, split)["perplexity"], rel=1e-5
        )
    # A second run reuses the entries: nothing is added, and the losses repeat.
    again = runner.train(task, recipe, config, 0, 0.1, CPU, steps=30, cache=cache)
    assert len(cache) == LM.train + LM.val + LM.test and again.losses == cached.losses


def test_the_cache_refuses_a_model_it_would_change(make_decoder: Callable[..., Path], llama: Path, story: Path) -> None:
    cache = FrozenLayersCache()
    task = _task(llama, story)
    table = runner.recipes()

    def prepared(recipe: str, config: object = None, source: Task = task) -> torch.nn.Module:
        return table[recipe].prepare(source.model(), source, config)

    assert cache.refusal(prepared("full"), task, CPU) == "block 0 trains: no frozen block below it"
    assert cache.refusal(prepared("frozen"), task, CPU) == "no block trains"
    _, config = _lora(task)
    embedding_trains = prepared("lora", config)
    embedding_trains.model.embed_tokens.requires_grad_(True)  # tied to the output layer, which runs last
    assert cache.refusal(embedding_trains, task, CPU) == "a module that runs before block 2 trains"
    with pytest.raises(ValueError, match="cannot serve this model: a module that runs before block 2 trains"):
        cache.attach(embedding_trains, task, CPU)
    assert len(cache) == 0

    dropout = _task(make_decoder(attention_dropout=0.5), story)
    assert cache.refusal(prepared("lora", _lora(dropout)[1], dropout), dropout, CPU) == (
        "the blocks below block 2 are random in training mode (dropout)"
    )

    # GPT-2 adds its position embeddings to inputs_embeds: cached states would get them twice.
    gpt2 = _task(
        make_decoder("gpt2", embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0),
        story,
        r"re:transformer\.h\.[23]\.attn\.c_proj",
    )
    reason = cache.refusal(prepared("lora", _lora(gpt2)[1], gpt2), gpt2, CPU)
    # Older transformers blocks return tuples, so the shortcut fails outright instead of differing.
    assert re.match(r"run from the input of block 2, the model (does not reproduce its logits|fails)", reason)
    assert len(cache) == 0


def test_a_preset_with_the_cache_records_it_and_gives_the_rows_of_one_without(
    llama: Path, story: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = task_from_files(llama, story, "lm", targets=[UPPER])
    monkeypatch.setitem(runner.TASKS, task.name, task)
    rows = {}
    for cached in (False, True):
        preset = Preset(
            "test", tasks=(), seeds=(0,), lr_factors=(1.0,), sizes={}, kinds={"lm": LM}, cache_frozen_layers=cached
        )
        runner.run_bench(tmp_path / str(cached), preset, tasks=[task.name], methods=["lora", "full"], progress=False)
        with (tmp_path / str(cached) / "results.csv").open(newline="") as file:
            rows[cached] = {row["method"]: row for row in csv.DictReader(file)}
        settings = json.loads((tmp_path / str(cached) / "settings.json").read_text())
        assert settings.get("cache_frozen_layers", False) is cached
    for method in ("lora", "full"):
        for column in ("final_train_loss", "test_perplexity"):
            assert float(rows[True][method][column]) == pytest.approx(float(rows[False][method][column]), rel=1e-4)
