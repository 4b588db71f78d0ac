"""Adapters on ``nn.Embedding``: the lookup against the dense form, PEFT's LoRA and DoRA on identical
weights, the padding row, dropout, selection, refusals, tied embeddings and checkpoints. The methods
come from the registry's declarations (``"embedding"`` in ``supported_bases``); none is named for
what all of them promise."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.core import geometry, registry
from rankwise.core.capabilities import EmbeddingAdapter
from rankwise.core.delta import Delta, OutputAdapter, Reparam
from rankwise.core.inject import adapted_modules

from _adapters import LORA_VARIANTS, peft_lora_twin, perturb
from _models import tiny_llama

VOCAB, DIM, PAD = 40, 16, 1

EMBEDDING_METHODS = [n for n in registry.methods() if "embedding" in registry.get(n).module_class.supported_bases]
OTHER_METHODS = [n for n in registry.methods() if n not in EMBEDDING_METHODS]


class Tokens(nn.Module):
    """An embedding with a padding row, then a Linear: token ids in, features out."""

    def __init__(self, **embedding: object) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM, padding_idx=PAD, **embedding)  # type: ignore[arg-type]
        self.proj = nn.Linear(DIM, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.embed(ids))


def _ids() -> torch.Tensor:
    ids = torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = PAD
    return ids


def test_every_method_declaring_embeddings_has_the_lookup() -> None:
    for name in EMBEDDING_METHODS:
        module_class = registry.get(name).module_class
        assert issubclass(module_class, OutputAdapter) or all(
            callable(getattr(module_class, m, None)) for m in ("embed", "reset_for_embedding")
        ), name


@pytest.mark.parametrize("name", EMBEDDING_METHODS)
def test_lookup_is_the_dense_rows_of_the_adapted_weight(name) -> None:
    torch.manual_seed(0)
    model = rw.adapt(Tokens(), rw.make_config(name, targets="embed")).eval()
    perturb(model, seed=2, size=0.1)
    layer, ids = model.embed, _ids()
    w0 = geometry.weight_matrix(layer.base, "embedding")  # (dim, vocabulary)
    rows = layer.base(ids)
    torch.testing.assert_close(rows, w0.t()[ids])
    delta = layer.delta
    if isinstance(delta, OutputAdapter):
        expected = delta(rows)
    elif isinstance(delta, Delta):
        expected = rows + delta.delta_weight().t()[ids]
    else:
        assert isinstance(delta, Reparam)
        expected = delta.merged_weight(w0).t()[ids]
    actual = layer(ids)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    assert (actual - rows).abs().max() > 1e-3  # the adapter does change the rows


@pytest.mark.parametrize("name", EMBEDDING_METHODS)
def test_gradient_reaches_only_the_adapter_and_the_padding_update_stays_zero(name) -> None:
    torch.manual_seed(0)
    model = rw.adapt(Tokens(), rw.make_config(name, targets="embed"))
    layer = model.embed
    base_weight = layer.base.weight.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ids = _ids()
    for _ in range(3):
        optimizer.zero_grad()
        model(ids).square().mean().backward()
        assert layer.base.weight.grad is None and model.proj.weight.grad is None
        assert all(p.grad is not None for p in layer.delta.parameters())
        optimizer.step()
    assert torch.equal(layer.base.weight, base_weight)
    delta = layer.delta
    if isinstance(delta, EmbeddingAdapter):  # an OutputAdapter maps every row, the padding one too
        # nn.Embedding never trains its padding row (zero at init); the adapted row stays it.
        pad = torch.tensor([[PAD]])
        assert torch.equal(layer(pad), layer.base(pad))
        assert layer(ids[:, 1:]).sub(layer.base(ids[:, 1:])).abs().max() > 0
    if isinstance(delta, Delta):
        assert torch.equal(delta.delta_weight()[:, PAD], torch.zeros(DIM))


def test_lora_starts_as_loralib_and_peft_start_an_embedding() -> None:
    # A = 0, B ~ N(0, 1): the branch reads one column of A per token.
    model = rw.adapt(Tokens(), rw.LoRAConfig(rank=4, targets=("embed", "proj")))
    assert torch.equal(model.embed.delta.A, torch.zeros(4, VOCAB))
    assert 0.5 < model.embed.delta.B.std() < 1.5
    assert not torch.equal(model.proj.delta.A, torch.zeros_like(model.proj.delta.A))  # a Linear keeps kaiming


@pytest.mark.parametrize(
    "name", [n for n in EMBEDDING_METHODS if issubclass(registry.get(n).module_class, EmbeddingAdapter)]
)
def test_dropout_drops_a_tokens_whole_update(name) -> None:
    # Dropout on the one-hot input: each token's update W'ᵀ[t] − W0ᵀ[t] is 0 or 1 / (1 − p) times
    # the whole one (for LoRA, the rows of ΔWᵀ).
    torch.manual_seed(0)
    model = rw.adapt(Tokens(), rw.make_config(name, dropout=0.5, targets="embed"))
    perturb(model, seed=2, size=0.1)
    layer, ids = model.embed, torch.arange(2, VOCAB).reshape(2, -1)
    rows = layer.base(ids)
    with torch.no_grad():
        update = layer(ids) - rows  # training mode
        layer.eval()
        full = layer(ids) - rows
    kept = update.abs().sum(-1) > 0
    assert 0 < kept.sum() < kept.numel()
    torch.testing.assert_close(update[kept], 2 * full[kept], rtol=1e-5, atol=1e-6)
    assert torch.equal(update[~kept], torch.zeros_like(update[~kept]))
    if isinstance(layer.delta, Delta):
        torch.testing.assert_close(full, layer.delta.delta_weight().t()[ids], rtol=1e-5, atol=1e-6)


def _llama(tied: bool = False) -> nn.Module:
    return tiny_llama(
        VOCAB,
        hidden_size=DIM,
        intermediate_size=32,
        num_attention_heads=2,
        tie_word_embeddings=tied,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=PAD,
    ).eval()


@LORA_VARIANTS
def test_outputs_and_gradients_equal_peft_on_an_embedding(config_class, rslora) -> None:
    # PEFT's factors are random (ΔW ≠ 0), the padding column of its A too.
    reference, ours = peft_lora_twin(_llama(), config_class, rslora, targets=("embed_tokens", "q_proj"))
    peft_root = reference.base_model.model
    pairs = []
    with torch.no_grad():
        for path, layer in adapted_modules(ours):
            theirs = peft_root.get_submodule(path)
            if layer.kind == "embedding":
                A, B = theirs.lora_embedding_A["default"], theirs.lora_embedding_B["default"]
            else:
                A, B = theirs.lora_A["default"].weight, theirs.lora_B["default"].weight
            layer.delta.A.copy_(A)
            layer.delta.B.copy_(B)
            pairs += [(layer.delta.A, A), (layer.delta.B, B)]
            if config_class is rw.DoRAConfig:
                magnitude = theirs.lora_magnitude_vector["default"].weight
                assert magnitude.shape == (DIM,) if layer.kind == "embedding" else True  # one per dimension
                layer.delta.magnitude.add_(0.1 * torch.randn_like(layer.delta.magnitude))
                magnitude.copy_(layer.delta.magnitude)
                pairs.append((layer.delta.magnitude, magnitude))
    assert ours.model.embed_tokens.kind == "embedding"
    ids = _ids()
    expected = reference(input_ids=ids).logits
    actual = ours(input_ids=ids).logits
    with rw.disabled(ours):
        assert (ours(input_ids=ids).logits - expected).abs().max() > 1e-3
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    expected.square().mean().backward()
    actual.square().mean().backward()
    for mine, theirs in pairs:
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-4, atol=1e-6)
    assert torch.equal(ours.model.embed_tokens.delta.A.grad[:, PAD], torch.zeros(4))  # padding_idx, as PEFT
    rw.merge(ours)
    torch.testing.assert_close(ours(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_dora_magnitude_starts_at_peft_per_dimension_norms() -> None:
    reference = peft.get_peft_model(_llama(), peft.LoraConfig(r=4, target_modules=["embed_tokens"], use_dora=True))
    ours = rw.adapt(_llama(), rw.DoRAConfig(rank=4, targets="embed_tokens"))
    expected = reference.base_model.model.model.embed_tokens.lora_magnitude_vector["default"].weight
    torch.testing.assert_close(ours.model.embed_tokens.delta.magnitude, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(expected, ours.model.embed_tokens.base.weight.norm(dim=0), rtol=1e-6, atol=1e-6)


def test_all_linear_never_selects_an_embedding_and_a_name_does() -> None:
    model = rw.adapt(_llama(), rw.LoRAConfig(rank=2, targets="all-linear"))
    assert type(model.model.embed_tokens) is nn.Embedding
    assert {layer.kind for _, layer in adapted_modules(model)} == {"linear"}
    model = rw.adapt(_llama(), rw.LoRAConfig(rank=2, targets=("all-linear", "embed_tokens")))
    assert model.model.embed_tokens.kind == "embedding"


@pytest.mark.parametrize("name", OTHER_METHODS)
def test_a_method_that_cannot_adapt_an_embedding_refuses_by_name(name) -> None:
    model = Tokens()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TypeError, match=rf"^{name} does not support Embedding \('embed'\).*support embedding: \["):
        rw.adapt(model, rw.make_config(name, targets=("proj", "embed")))
    assert not list(adapted_modules(model))
    assert all(torch.equal(t, before[k]) for k, t in model.state_dict().items())


class ScaledEmbedding(nn.Embedding):
    """A lookup scaled in forward, as Gemma's word embedding is."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * 4.0


def test_embeddings_an_adapter_cannot_follow_are_refused() -> None:
    with pytest.raises(TypeError, match=r"'embed': Embedding with max_norm=1.0 rewrites its weight"):
        rw.adapt(Tokens(max_norm=1.0), rw.LoRAConfig(targets="embed"))
    model = Tokens()
    model.embed = ScaledEmbedding(VOCAB, DIM)
    with pytest.raises(TypeError, match=r"'embed': ScaledEmbedding defines its own forward"):
        rw.adapt(model, rw.LoRAConfig(targets="embed"))


def test_compressors_do_not_take_an_embedding() -> None:
    message = r"'embed' is a Embedding; this takes nn.Linear, transformers Conv1D and nn.Conv2d$"
    with pytest.raises(TypeError, match=message):
        rw.compress.lord(Tokens(), targets="embed", rank_ratio=0.5)


def test_merging_a_tied_embedding_is_refused_and_unmerged_training_works() -> None:
    model = rw.adapt(_llama(tied=True), rw.LoRAConfig(rank=2, targets="embed_tokens"))
    perturb(model, seed=2, size=0.1)
    head = model.get_output_embeddings().weight
    assert head is model.model.embed_tokens.base.weight  # tied
    before = head.detach().clone()
    with pytest.raises(ValueError, match=r"cannot merge 'model.embed_tokens'.*shared with \['lm_head.weight'\]"):
        rw.merge(model)
    assert torch.equal(head, before) and not model.model.embed_tokens.merged
    model(input_ids=_ids()).logits.square().mean().backward()
    assert head.grad is None and model.model.embed_tokens.delta.A.grad is not None


def test_checkpoint_records_the_embedding_and_refuses_another_layer(tmp_path) -> None:
    torch.manual_seed(0)
    model = rw.adapt(Tokens(), rw.LoRAConfig(rank=2, targets=("embed", "proj")))
    perturb(model, seed=2, size=0.1)
    rw.save_adapter(model, tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())["modules"]["embed"]
    assert (meta["base"], meta["in_features"], meta["out_features"]) == ("embedding", VOCAB, DIM)
    ids = _ids()
    torch.manual_seed(0)
    assert torch.equal(rw.load_adapter(Tokens(), tmp_path)(ids), model(ids))

    bigger = Tokens()
    bigger.embed = nn.Embedding(VOCAB + 1, DIM)
    with pytest.raises(rw.CheckpointError, match=rf"layer 'embed' is {VOCAB + 1} -> {DIM}, the checkpoint expects"):
        rw.load_adapter(bigger, tmp_path)
    assert type(bigger.embed) is nn.Embedding
    linear = Tokens()
    linear.embed = nn.Linear(VOCAB, DIM)
    with pytest.raises(rw.CheckpointError, match=r"layer 'embed' is a Linear, the checkpoint expects a embedding"):
        rw.load_adapter(linear, tmp_path)
