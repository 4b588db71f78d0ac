"""Target selection, freezing, disabling, unwrapping and dtypes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rankwise as rw
from rankwise.core.inject import adapted_modules, find_targets

from _models import tiny_gpt2


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(8, 8)
        self.out_proj = nn.Linear(8, 8)
        self.attn = nn.Module()
        self.attn.c_attn = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.q_proj(x) + self.attn.c_attn(x))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(3))
        self.classifier = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.classifier(x)


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        ("q_proj", ["layers.0.q_proj", "layers.1.q_proj", "layers.2.q_proj"]),
        ("proj", []),  # names match whole path components: "proj" is not "q_proj"
        ("attn.c_attn", ["layers.0.attn.c_attn", "layers.1.attn.c_attn", "layers.2.attn.c_attn"]),
        (
            "re:layers\\.[01]\\..*_proj",
            ["layers.0.q_proj", "layers.0.out_proj", "layers.1.q_proj", "layers.1.out_proj"],
        ),
        (("layers.2.out_proj", "classifier"), ["layers.2.out_proj", "classifier"]),
    ],
)
def test_target_selection(targets, expected) -> None:
    config = rw.LoRAConfig(targets=targets)
    if not expected:
        with pytest.raises(ValueError, match="matches no module"):
            find_targets(Net(), config)
    else:
        assert find_targets(Net(), config) == expected


def test_all_linear_leaves_out_the_trainable_head_and_freezes_the_rest() -> None:
    model = rw.adapt(Net(), rw.LoRAConfig(rank=2, targets="all-linear", trainable="classifier"))
    assert len(list(adapted_modules(model))) == 9
    assert isinstance(model.classifier, nn.Linear)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"classifier.weight", "classifier.bias"} | {
        f"layers.{i}.{name}.adapters.default.{factor}"
        for i in range(3)
        for name in ("q_proj", "out_proj", "attn.c_attn")
        for factor in "AB"
    }


def test_all_linear_leaves_out_the_layers_inside_a_trainable_module() -> None:
    model = rw.adapt(Net(), rw.LoRAConfig(rank=2, targets="all-linear", trainable="layers.0"))
    paths = [path for path, _ in adapted_modules(model)]
    assert len(paths) == 7 and not any(path.startswith("layers.0.") for path in paths)
    assert all(p.requires_grad for p in model.layers[0].parameters())


def test_all_linear_leaves_out_the_output_embedding_of_a_transformers_model() -> None:
    model = rw.adapt(tiny_gpt2(n_layer=1), rw.LoRAConfig(rank=2))
    paths = [path for path, _ in adapted_modules(model)]
    assert paths == [
        "transformer.h.0.attn.c_attn",
        "transformer.h.0.attn.c_proj",
        "transformer.h.0.mlp.c_fc",
        "transformer.h.0.mlp.c_proj",
    ]
    assert isinstance(model.lm_head, nn.Linear)


def test_trainable_modules_are_saved_and_loaded(tmp_path) -> None:
    torch.manual_seed(0)
    model = rw.adapt(Net(), rw.LoRAConfig(rank=2, targets="q_proj", trainable="classifier"))
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    rw.save_adapter(model, tmp_path)
    torch.manual_seed(0)
    loaded = rw.load_adapter(Net(), tmp_path)
    assert torch.equal(loaded.classifier.weight, model.classifier.weight)
    assert loaded.classifier.weight.requires_grad


def test_disabled_runs_the_base_model_and_restores() -> None:
    torch.manual_seed(0)
    base = Net()
    x = torch.randn(4, 8)
    expected = base(x)
    model = rw.adapt(base, rw.LoRAConfig(rank=2, targets="q_proj"))
    for _, layer in adapted_modules(model):
        nn.init.normal_(layer.delta.B)
    adapted = model(x)
    with rw.disabled(model):
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    torch.testing.assert_close(model(x), adapted, rtol=0, atol=0)


def test_unwrap_without_merge_drops_the_adapters() -> None:
    torch.manual_seed(0)
    base = Net()
    x = torch.randn(4, 8)
    expected = base(x)
    model = rw.adapt(base, rw.LoRAConfig(rank=2, targets="q_proj"))
    for _, layer in adapted_modules(model):
        nn.init.normal_(layer.delta.B)
    rw.merge(model)
    plain = rw.unwrap(model, merge=False)
    assert not list(adapted_modules(plain))
    torch.testing.assert_close(plain(x), expected, rtol=1e-6, atol=1e-6)


def test_an_adapter_changed_while_merged_unmerges_once_put_back() -> None:
    """The recovery the refusal names: the values at merge are kept, and unmerge is then exact."""
    torch.manual_seed(0)
    base = Net()
    weights = {k: v.clone() for k, v in base.state_dict().items()}
    model = rw.adapt(base, rw.LoRAConfig(rank=2, targets="q_proj"))
    layer = model.layers[0].q_proj
    nn.init.normal_(layer.delta.B)
    trained = layer.delta.B.clone()
    rw.merge(model)
    with torch.no_grad():
        layer.delta.B.add_(1.0)
    with pytest.raises(ValueError, match="changed while merged"):
        rw.unmerge(model)
    layer.delta.load_state_dict(layer.merged_adapter, strict=False)
    rw.unmerge(model)
    assert torch.equal(layer.delta.B, trained) and layer.merged_adapter is None
    after = rw.unwrap(model, merge=False).state_dict()
    torch.testing.assert_close(after, weights, rtol=0, atol=1e-6)


def test_a_merged_model_with_a_frozen_adapter_trains_its_other_parameters() -> None:
    torch.manual_seed(0)
    model = rw.adapt(Net(), rw.LoRAConfig(rank=2, targets="q_proj", trainable="classifier"))
    rw.merge(model)
    for _, layer in adapted_modules(model):
        layer.delta.requires_grad_(False)
    model(torch.randn(4, 8)).sum().backward()
    assert model.classifier.weight.grad is not None and model.classifier.weight.grad.abs().sum() > 0


def test_a_bare_layer_can_be_the_target() -> None:
    layer = nn.Linear(4, 3)
    adapted = rw.adapt(layer, rw.LoRAConfig(rank=1))
    assert isinstance(adapted, rw.Adapted)
    assert rw.unwrap(adapted) is layer


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_keeps_fp32_adapters_and_merges_within_its_epsilon(dtype) -> None:
    torch.manual_seed(0)
    model = rw.adapt(Net().to(dtype), rw.DoRAConfig(rank=2, targets="q_proj"))
    for _, layer in adapted_modules(model):
        assert layer.delta.A.dtype == torch.float32
        nn.init.normal_(layer.delta.B, std=0.1)
    x = torch.randn(4, 8, dtype=dtype)
    unmerged = model(x)
    assert unmerged.dtype == dtype
    rw.merge(model)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(model(x), unmerged, rtol=8 * eps, atol=8 * eps)


def test_summary_counts_and_lists_layers() -> None:
    model = rw.adapt(Net(), rw.LoRAConfig(rank=2, targets="q_proj"))
    summary = rw.summary(model)
    assert summary.trainable == 3 * 2 * (8 + 8)
    assert summary.total == sum(p.numel() for p in model.parameters())
    text = str(summary)
    assert "layers.1.q_proj" in text and "lora" in text and f"{summary.trainable:,} of {summary.total:,}" in text


class FakeQuantLinear(nn.Linear):
    """A Linear with a forward of its own, not ``x Wᵀ + b``: the weight rounded to a 1/8 grid."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, torch.round(self.weight * 8) / 8, self.bias)


@pytest.mark.parametrize("name", rw.methods())
def test_a_linear_subclass_with_its_own_forward_is_either_run_or_refused(name: str) -> None:
    # A method either adds to what the layer's own forward computes (so step 0 is that output) or
    # refuses the layer by name; it never runs x Wᵀ + b in its place.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.GELU(), FakeQuantLinear(256, 256))
    x = torch.randn(2, 5, 256)
    expected = model(x)
    try:
        model = rw.adapt(model, rw.make_config(name, targets=("0", "2")))
    except TypeError as error:
        assert "'2'" in str(error) and "FakeQuantLinear" in str(error), error
        assert not any(True for _ in adapted_modules(model))
        return
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
