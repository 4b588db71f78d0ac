"""transformers' gradient (activation) checkpointing, re-entrant and not, recomputes every method's forward in
backward and gives the gradients of a run without it."""

from __future__ import annotations

import copy

import pytest
import torch

import rankwise as rw
from rankwise.core import registry

from _models import tiny_llama


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("name", registry.methods())
def test_gradients_equal_a_run_without_checkpointing(name: str, reentrant: bool) -> None:
    base = tiny_llama(64, max_position_embeddings=32, use_cache=False)
    example = registry.get(name).module_class.example_config  # the defaults may not fit width 32
    model = rw.adapt(base, rw.make_config(name, targets=("q_proj", "v_proj", "down_proj"), **example))
    with torch.no_grad():  # away from the identity init, so that every factor has a gradient
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    checkpointed = copy.deepcopy(model)
    # transformers 5 renamed gradient_checkpointing_enable (now a deprecated alias); pyproject allows 4.40+.
    enable = getattr(checkpointed, "activation_checkpointing_enable", checkpointed.gradient_checkpointing_enable)
    enable({"use_reentrant": reentrant})
    if reentrant:  # the re-entrant form needs an input that requires grad; the embeddings are frozen
        checkpointed.enable_input_require_grads()
    model.train()
    checkpointed.train()
    ids = torch.randint(0, 64, (2, 10))
    calls = {"plain": 0, "checkpointed": 0}
    for key, m in (("plain", model), ("checkpointed", checkpointed)):
        m.model.layers[0].self_attn.q_proj.register_forward_hook(
            lambda *_, key=key: calls.__setitem__(key, calls[key] + 1)
        )

    model(ids, labels=ids).loss.backward()
    checkpointed(ids, labels=ids).loss.backward()
    assert calls == {"plain": 1, "checkpointed": 2}  # the adapted layer did run again in backward
    expected = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    got = {n: p.grad for n, p in checkpointed.named_parameters() if p.requires_grad}
    assert got.keys() == expected.keys() and expected
    for key, grad in expected.items():
        assert got[key] is not None, key
        torch.testing.assert_close(got[key], grad, rtol=1e-5, atol=1e-6, msg=key)
