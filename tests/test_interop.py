"""PEFT's format both ways, checked against the installed PEFT."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import transformers
from torch import nn

import rankwise as rw
from rankwise.core.inject import adapted_modules


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16))
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def _gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=8, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def _randomize(model: nn.Module) -> None:
    with torch.no_grad():
        for _, layer in adapted_modules(model):
            for p in layer.delta.parameters():
                p.add_(0.1 * torch.randn_like(p))


@pytest.mark.parametrize(
    "config",
    [rw.LoRAConfig(rank=4, targets=("c_attn", "c_fc")), rw.LoRAConfig(rank=4, rslora=True, targets="c_attn"),
     rw.DoRAConfig(rank=2, targets=("c_attn", "mlp.c_proj"))],
    ids=["lora", "rslora", "dora"],
)
def test_to_peft_loads_in_peft_with_equal_outputs(config, tmp_path) -> None:
    ours = rw.adapt(_gpt2(), config)
    _randomize(ours)
    rw.interop.to_peft(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(_gpt2(), tmp_path)
    ids = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_round_trip_with_head_convolution_and_a_rank_pattern(tmp_path) -> None:
    torch.manual_seed(0)
    base = Classifier()
    reference = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2", "conv"], modules_to_save=["head"],
                        rank_pattern={"2": 2}, init_lora_weights=False),
    )
    with torch.no_grad():
        reference.base_model.model.head.modules_to_save["default"].weight.add_(1.0)
    reference.save_pretrained(tmp_path / "peft")

    ours = rw.interop.from_peft(copy.deepcopy(base), tmp_path / "peft")
    assert ours.encoder[2].delta.A.shape == (2, 16) and ours.encoder[0].delta.A.shape == (4, 8)
    assert ours.head.weight.requires_grad
    x, image = torch.randn(5, 8), torch.randn(1, 3, 6, 6)
    torch.testing.assert_close(ours(x), reference(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.conv(image), reference.base_model.model.conv(image), rtol=1e-5, atol=1e-5)

    rw.interop.to_peft(ours, tmp_path / "back")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "back")
    torch.testing.assert_close(again(x), reference(x), rtol=1e-5, atol=1e-5)


def test_from_peft_refuses_what_it_does_not_model_and_leaves_the_model_alone(tmp_path) -> None:
    torch.manual_seed(0)
    base = Classifier()
    peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["0"], bias="all")).save_pretrained(tmp_path)
    before = copy.deepcopy(base.state_dict())
    with pytest.raises(rw.CheckpointError, match="'bias': 'all'"):
        rw.interop.from_peft(base, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    assert not list(adapted_modules(base))


def test_from_peft_names_tensors_that_do_not_fit(tmp_path) -> None:
    torch.manual_seed(0)
    peft.get_peft_model(Classifier(), peft.LoraConfig(r=2, target_modules=["0"])).save_pretrained(tmp_path)
    other = nn.Sequential()
    other.encoder = nn.Sequential(nn.Linear(8, 32))
    with pytest.raises(rw.CheckpointError, match="mis-shaped keys.*encoder.0.lora_B"):
        rw.interop.from_peft(other, tmp_path)
