"""Named adapters on one model: add, switch, delete, disable, merge several, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.core.adapted import Adapted

from _adapters import perturb


def _base() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8), nn.GELU(), nn.Linear(8, 8))


def _two() -> nn.Module:
    """LoRA "a" on layers 0 and 2, LoRA "b" of another rank on layers 2 and 4."""
    model = rw.adapt(_base(), rw.LoRAConfig(rank=2, targets=("0", "2")), name="a")
    rw.adapt(model, rw.LoRAConfig(rank=3, alpha=4, targets=("2", "4")), name="b")
    perturb(model, "a", seed=1, size=0.1)
    perturb(model, "b", seed=2, size=0.1)
    return model


def _state(model: nn.Module) -> dict[str, object]:
    return {
        "tensors": {k: v.clone() for k, v in model.state_dict().items()},
        "grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "types": [type(m) for m in model.modules()],
        "active": rw.active_adapters(model),
    }


def _assert_same(before: dict[str, object], after: dict[str, object]) -> None:
    assert before["grad"] == after["grad"] and before["types"] == after["types"]
    assert before["active"] == after["active"]
    tensors, now = before["tensors"], after["tensors"]
    assert isinstance(tensors, dict) and isinstance(now, dict) and tensors.keys() == now.keys()
    assert all(torch.equal(tensors[k], now[k]) for k in tensors)


X = torch.randn(5, 16, generator=torch.Generator().manual_seed(3))


def test_add_keeps_the_first_active_and_wraps_new_layers_with_the_new_adapter_inactive() -> None:
    model = _two()
    assert rw.adapter_names(model) == ["a", "b"] and rw.active_adapters(model) == ["a"]
    assert list(model[0].adapters) == ["a"] and list(model[2].adapters) == ["a", "b"]
    assert list(model[4].adapters) == ["b"] and model[4].active == ()
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{i}.adapters.a.{f}" for i in (0, 2) for f in "AB"}  # b is frozen while inactive
    assert not model[4].base.weight.requires_grad


def test_an_added_all_linear_adapter_leaves_the_models_trainable_head_out_and_training() -> None:
    # The head given with the first adapter is the model's, trained in full under every adapter:
    # an added "all-linear" adapter once wrapped it and froze it, so training "a" left it unchanged.
    model = rw.adapt(_base(), rw.LoRAConfig(rank=2, targets=("0",), trainable=("4",)), name="a")
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    rw.adapt(model, rw.LoRAConfig(rank=2), name="b")
    assert [type(layer) for layer in model] == [Adapted, nn.GELU, Adapted, nn.GELU, nn.Linear]
    assert list(model[0].adapters) == ["a", "b"] and list(model[2].adapters) == ["b"]
    assert {k for k, p in model.named_parameters() if p.requires_grad} == trainable
    assert trainable == {"0.adapters.a.A", "0.adapters.a.B", "4.weight", "4.bias"}
    head = model[4].weight.detach().clone()
    model(X).square().sum().backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    assert (model[4].weight - head).abs().max() > 1e-4  # a step of "a" trains the head


def test_set_active_switches_outputs_and_requires_grad() -> None:
    model = _two()
    only_a = rw.adapt(_base(), rw.LoRAConfig(rank=2, targets=("0", "2")))
    only_b = rw.adapt(_base(), rw.LoRAConfig(rank=3, alpha=4, targets=("2", "4")))
    for reference, name in ((only_a, "a"), (only_b, "b")):
        for i, layer in enumerate(reference):
            if isinstance(layer, Adapted):
                layer.delta.load_state_dict(model[i].adapters[name].state_dict())
    assert torch.equal(model(X), only_a(X))
    rw.set_active(model, "b")
    assert torch.equal(model(X), only_b(X))
    assert {k for k, p in model.named_parameters() if p.requires_grad} == {
        f"{i}.adapters.b.{f}" for i in (2, 4) for f in "AB"
    }
    rw.set_active(model, [])
    assert torch.equal(model(X), _base()(X))
    with rw.disabled(rw.set_active(model, ["a", "b"])):
        assert torch.equal(model(X), _base()(X))


def test_several_active_add_their_differences_to_the_base_output() -> None:
    model = _two()
    rw.set_active(model, ["b", "a"])
    assert rw.active_adapters(model) == ["a", "b"]  # in the order added
    layer = model[2]
    w0, bias = layer.base.weight, layer.base.bias
    delta_a, delta_b = layer.adapters["a"].delta_weight(), layer.adapters["b"].delta_weight()
    h = torch.randn(4, 32, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(layer(h), h @ (w0 + delta_a + delta_b).t() + bias, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"adapters \['b', 'a'\] are active \(held: \['a', 'b'\]\)"):
        _ = layer.delta


def test_merge_of_several_active_equals_their_sum_and_unmerge_restores_the_base_bit_exactly() -> None:
    model = _two()
    rw.set_active(model, ["a", "b"])
    weights = [m.base.weight.detach().clone() for m in model if isinstance(m, Adapted)]
    expected = model(X)
    rw.merge(model)
    delta = model[2].adapters["a"].delta_weight() + model[2].adapters["b"].delta_weight()
    torch.testing.assert_close(model[2].base.weight, weights[1] + delta, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(X), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="while merged"):
        rw.set_active(model, "a")
    rw.unmerge(model)
    assert torch.equal(model[2].base.weight, weights[1])  # two merged: the copy written back
    torch.testing.assert_close(model[0].base.weight, weights[0], rtol=0, atol=1e-6)  # one: as today


def test_a_merged_adapter_that_changed_refuses_unmerge_when_several_are_merged() -> None:
    model = _two()
    rw.set_active(model, ["a", "b"])
    rw.merge(model)
    with torch.no_grad():
        model[2].adapters["b"].B.add_(1.0)
    with pytest.raises(ValueError, match=r"'2': the adapter changed while merged \(adapters.b.B\)"):
        rw.unmerge(model)


def test_lora_and_c3a_on_the_same_layer_work_together_and_merge() -> None:
    model = rw.adapt(_base(), rw.LoRAConfig(rank=2, targets=("2",)), name="lora")
    rw.adapt(model, rw.C3AConfig(block_size=4, targets=("2",)), name="c3a")
    perturb(model, "lora", seed=1, size=0.1)
    perturb(model, "c3a", seed=2, size=0.1)
    rw.set_active(model, ["lora", "c3a"])
    layer = model[2]
    h = torch.randn(4, 32, generator=torch.Generator().manual_seed(4))
    dense = layer.base.weight + layer.adapters["lora"].delta_weight() + layer.adapters["c3a"].delta_weight()
    torch.testing.assert_close(layer(h), h @ dense.t() + layer.base.bias, rtol=1e-5, atol=1e-5)
    expected = model(X)
    rw.merge(model)
    torch.testing.assert_close(model(X), expected, rtol=1e-5, atol=1e-5)


def test_delete_unwraps_layers_left_without_adapters_and_keeps_the_others_active() -> None:
    model = _two()
    rw.set_active(model, ["a", "b"])
    rw.delete_adapter(model, "a")
    assert isinstance(model[0], nn.Linear) and list(model[2].adapters) == ["b"]
    assert rw.adapter_names(model) == ["b"] and rw.active_adapters(model) == ["b"]
    rw.delete_adapter(model, "b")
    assert not any(isinstance(m, Adapted) for m in model.modules())
    assert torch.equal(model(X), _base()(X))


def test_unwrap_merges_the_active_adapters() -> None:
    model = _two()
    rw.set_active(model, ["a", "b"])
    expected = model(X)
    plain = rw.unwrap(model, merge=True)
    assert not any(isinstance(m, Adapted) for m in plain.modules())
    torch.testing.assert_close(plain(X), expected, rtol=1e-5, atol=1e-6)


def test_save_and_load_by_name(tmp_path: Path) -> None:
    model = _two()
    rw.save_adapter(model, tmp_path / "b", name="b")
    single = rw.load_adapter(_base(), tmp_path / "b")  # a one-adapter checkpoint in today's format
    assert torch.equal(single[4].delta.A, model[4].adapters["b"].A)
    again = rw.adapt(_base(), rw.LoRAConfig(rank=2, targets=("0", "2")), name="a")
    rw.load_adapter(again, tmp_path / "b", name="b")
    assert rw.adapter_names(again) == ["a", "b"] and rw.active_adapters(again) == ["a"]
    for i in (2, 4):
        for key, value in model[i].adapters["b"].state_dict().items():
            assert torch.equal(again[i].adapters["b"].state_dict()[key], value)
    rw.save_adapter(model, tmp_path / "all")
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == ["a", "b"]
    with pytest.raises(rw.CheckpointError, match=r"holds several adapters, one per subfolder \['a', 'b'\]"):
        rw.load_adapter(_base(), tmp_path / "all")
    with pytest.raises(ValueError, match=r"holds the adapters \['a', 'b'\]; name one"):
        rw.adapter_state_dict(model)
    assert set(rw.adapter_state_dict(model, "a")) == {f"{i}.delta.{f}" for i in (0, 2) for f in "AB"}


def _run_per_example(model: nn.Module, names: list[str | None]) -> None:
    with rw.per_example(model, names):
        model(X[: len(names)])


def _merge_inside_per_example(model: nn.Module, names: list[str | None]) -> None:
    with rw.per_example(model, names):
        rw.merge(model)


BAD = [  # (what, call, error, message)
    ("unknown name to activate", lambda m: rw.set_active(m, ["a", "c"]), ValueError, r"unknown adapter names \['c'\]"),
    ("repeated name to set_active", lambda m: rw.set_active(m, ["a", "a"]), ValueError, "repeated"),
    ("unknown name to delete", lambda m: rw.delete_adapter(m, "c"), ValueError, "unknown adapter name 'c'"),
    ("unknown name to save", lambda m: rw.save_adapter(m, "unused", name="c"), ValueError, "unknown adapter name"),
    (
        "duplicate name",
        lambda m: rw.adapt(m, rw.LoRAConfig(rank=2, targets=("4",)), name="b"),
        ValueError,
        "already has an adapter named 'b'",
    ),
    (
        "invalid name",
        lambda m: rw.adapt(m, rw.LoRAConfig(rank=2, targets=("4",)), name="x.y"),
        ValueError,
        "without '.'",
    ),
    (
        "added adapter with trainable modules",
        lambda m: rw.adapt(m, rw.LoRAConfig(rank=2, targets=("0",), trainable=("4",)), name="c"),
        ValueError,
        "belong to the model",
    ),
    (
        "added adapter on a layer it cannot fit",
        lambda m: rw.adapt(m, rw.C3AConfig(block_size=5, targets=("0", "2")), name="c"),
        ValueError,
        "block_size",
    ),
    (
        "merge inside per_example",  # a merged layer runs its active adapters for every row
        lambda m: _merge_inside_per_example(m, ["b", None, "a"]),
        ValueError,
        r"cannot merge inside `with rankwise.per_example",
    ),
    (
        "per_example with an unknown name",
        lambda m: _run_per_example(m, ["a", "z"]),
        ValueError,
        r"unknown adapter names \['z'\]",
    ),
]


@pytest.mark.parametrize(("what", "call", "error", "match"), BAD, ids=[case[0] for case in BAD])
def test_bad_input_raises_one_clear_error_and_changes_nothing(what: str, call, error, match: str) -> None:
    model = _two()
    before = _state(model)
    with pytest.raises(error, match=match):
        call(model)
    _assert_same(before, _state(model))


def test_per_example_with_a_list_of_the_wrong_length_names_both_numbers_and_changes_nothing() -> None:
    model = _two()
    before = _state(model)
    with rw.per_example(model, ["a", "b", None]), pytest.raises(ValueError, match=r"given 3 adapter names.* 5 rows"):
        model(X)
    _assert_same(before, _state(model))
    assert all(m.rows is None for m in model.modules() if isinstance(m, Adapted))


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_per_example_leaves_the_base_layers_output_as_the_base_returned_it(grad: bool) -> None:
    """A forward hook on a base layer (or a cache of activations) keeps ``base(x)``: the adapters'
    rows are added into a new tensor, with or without autograd."""
    model = _two()
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    model[2].base.register_forward_hook(lambda module, inputs, output: seen.append((inputs[0], output)))
    names = ["b", None, "a", "b", "a"]  # layer 2 holds both: two groups added, one row left as the base's
    with torch.set_grad_enabled(grad), rw.per_example(model, names):
        mixed = model(X)
    [(x, kept)] = seen
    with torch.no_grad():
        assert torch.equal(kept, model[2].base(x))
        for row, name in enumerate(names):
            rw.set_active(model, [name] if name else [])
            torch.testing.assert_close(mixed[row], model(X)[row], rtol=0, atol=1e-6)


def test_summary_has_one_row_per_adapter_of_each_layer() -> None:
    model = _two()
    rows = [(r.path, r.adapter, r.params, r.active) for r in rw.summary(model).layers]
    assert rows == [("0", "a", 2 * 48, True), ("2", "a", 2 * 40, True), ("2", "b", 0, False), ("4", "b", 0, False)]
    assert rw.summary(model).trainable == 2 * 48 + 2 * 40


def test_a_state_dict_saved_before_adapters_were_named_loads_into_a_one_adapter_model() -> None:
    model = rw.adapt(_base(), rw.LoRAConfig(rank=2, targets=("0", "2")))
    perturb(model, "default", seed=1, size=0.1)
    old = {k.replace(".adapters.default.", ".delta."): v for k, v in model.state_dict().items()}
    assert "0.delta.A" in old
    fresh = rw.adapt(_base(), rw.LoRAConfig(rank=2, targets=("0", "2")))
    assert fresh.load_state_dict(old) is not None and "0.delta.A" in old  # the caller's dict is left as it was
    assert torch.equal(fresh(X), model(X))
    with pytest.raises(RuntimeError, match="Unexpected key"):
        _two().load_state_dict({**_two().state_dict(), "2.delta.A": torch.zeros(2, 32)})


def test_the_base_model_is_refused_where_a_trainable_head_was_trained_in_place() -> None:
    # The head is trained in place and shared by the adapters: with every adapter off it would still
    # run as trained, not as the base model's (PEFT keeps the original beside it; rankwise does not).
    model = rw.adapt(_base(), rw.LoRAConfig(rank=2, targets=("0",), trainable=("4",)), name="a")
    rw.adapt(model, rw.LoRAConfig(rank=2, targets=("2",)), name="b")
    perturb(model, "a", seed=1, size=0.1)
    perturb(model, "b", seed=2, size=0.1)
    before = _state(model)
    refusal = r"rankwise.disabled cannot run the base model: its trainable modules \['4'\]"
    with pytest.raises(ValueError, match=refusal), rw.disabled(model):
        pass
    with pytest.raises(ValueError, match=r"with a None row \(the base model\) cannot run the base model"):
        _run_per_example(model, ["a", None])
    _assert_same(before, _state(model))
    rw.set_active(model, "b")
    alone = model(X[1:2])
    with rw.per_example(model, ["a", "b"]):  # named rows use the shared, trained head: allowed
        torch.testing.assert_close(model(X[:2])[1:], alone, rtol=1e-6, atol=1e-6)
