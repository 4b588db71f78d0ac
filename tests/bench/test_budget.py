"""Sizing methods to a parameter budget on a tiny model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.bench.budget import count, default_budget, layer_shapes, size_to_budget

from _models import tiny_llama


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3))


TARGETS = ("0", "2")  # (in, out) = (10, 12) and (12, 12)


def test_lora_matches_its_own_rank_exactly_and_adapting_gives_that_count() -> None:
    budget = 4 * (10 + 12) + 4 * (12 + 12)
    sizing = size_to_budget(_model(), "lora", budget, targets=TARGETS, trainable=("4",))
    assert (sizing.value, sizing.params, sizing.matched, sizing.label) == (4, budget, True, "rank=4")
    model = rw.adapt(_model(), sizing.config)
    head = 12 * 3 + 3
    assert rw.summary(model).trainable == budget + head


def test_default_budget_is_lora_rank_8_on_the_targets() -> None:
    assert default_budget(_model(), TARGETS, ()) == 8 * (10 + 12) + 8 * (12 + 12)


def test_a_value_that_fails_at_build_is_skipped_for_the_next_nearest(fake_methods: dict[str, str]) -> None:
    # Stride counts (12 // block) · (10 + 12): block 5 and block 6 both give 44, but 5 does not
    # divide 12, which only building the layer's module reveals.
    sizing = size_to_budget(_model(), fake_methods["stride"], 44, targets=TARGETS)
    assert (sizing.value, sizing.params, sizing.matched) == (6, 44, True)
    rw.adapt(_model(), sizing.config)  # the chosen config really attaches


def test_a_budget_too_fine_for_the_knob_runs_at_the_nearest_setting_unmatched(fake_methods: dict[str, str]) -> None:
    # Block 1 gives 264 and block 2 gives 132: 150 is 18 from the nearest, more than 10%.
    sizing = size_to_budget(_model(), fake_methods["stride"], 150, targets=TARGETS)
    assert (sizing.value, sizing.params, sizing.matched) == (2, 132, False)


def test_a_method_without_a_knob_runs_at_its_default(fake_methods: dict[str, str]) -> None:
    sizing = size_to_budget(_model(), fake_methods["fixed"], 100, targets=TARGETS)
    assert (sizing.value, sizing.params, sizing.matched, sizing.label) == (None, 264, False, "fixed")


def test_a_method_that_cannot_adapt_the_targets_raises(fake_methods: dict[str, str]) -> None:
    with pytest.raises(TypeError, match="does not support"):
        size_to_budget(_model(), fake_methods["conv_only"], 100, targets=TARGETS)


def test_sizing_does_not_change_the_model() -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    size_to_budget(model, "lora", 100, targets=TARGETS)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(isinstance(m, rw.Adapted) for m in model.modules())


def test_a_budget_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="budget=0"):
        size_to_budget(_model(), "lora", 0, targets=TARGETS)


def test_ard_lora_is_sized_as_its_allocator_lays_it_out_per_attention_head() -> None:
    # The allocator gives q and v one α per head (each head its own A): the budget must count that
    # layout, the one that trains, not one α per matrix.
    llama = tiny_llama(50, tie_word_embeddings=False)  # 4 query heads over 2 key-value heads
    targets = ("q_proj", "v_proj")
    budget = default_budget(llama, targets, ())
    sizing = size_to_budget(llama, "ard_lora", budget, targets=targets)
    model = rw.adapt(tiny_llama(50, tie_word_embeddings=False), sizing.config)
    rw.allocate.ARDLoRAAllocator(model, total_steps=1)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sizing.params == trained, (sizing, trained)
    one_alpha_per_matrix = count(sizing.config, layer_shapes(llama, sizing.config))
    assert one_alpha_per_matrix < trained  # what the search counted before: it under-counted
    assert {layer.delta.config.heads for _, layer in rw.core.inject.adapted_modules(model)} == {4, 2}
