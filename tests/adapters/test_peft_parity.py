"""LoRA, rsLoRA and DoRA equal PEFT's on identical weights, on BERT, GPT-2 (Conv1D) and Llama
built from small configs with random weights."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import transformers
from torch import nn

import rankwise as rw
from rankwise.core.inject import adapted_modules

from _adapters import LORA_VARIANTS, peft_lora_twin
from _models import tiny_gpt2, tiny_llama


def _bert() -> tuple[nn.Module, tuple[str, ...]]:
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    return transformers.BertModel(config), ("query", "value", "dense")


def _gpt2() -> tuple[nn.Module, tuple[str, ...]]:
    return tiny_gpt2(vocab_size=100, n_embd=32, n_head=4, n_positions=16), ("c_attn", "c_proj", "c_fc")


def _llama() -> tuple[nn.Module, tuple[str, ...]]:
    return tiny_llama(100, max_position_embeddings=16), ("q_proj", "v_proj", "up_proj", "down_proj")


def _output(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("build", [_bert, _gpt2, _llama], ids=["bert", "gpt2", "llama"])
@LORA_VARIANTS
def test_outputs_equal_peft(build, config_class, rslora) -> None:
    torch.manual_seed(0)
    base, targets = build()
    reference, ours = peft_lora_twin(base.eval(), config_class, rslora, targets)
    peft_root = reference.base_model.model
    layers = list(adapted_modules(ours))
    assert len(layers) == sum(1 for _, m in peft_root.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer))
    with torch.no_grad():
        for path, layer in layers:
            theirs = peft_root.get_submodule(path)
            layer.delta.A.copy_(theirs.lora_A["default"].weight)
            layer.delta.B.copy_(theirs.lora_B["default"].weight)
            if config_class is rw.DoRAConfig:
                layer.delta.magnitude.add_(0.1 * torch.randn_like(layer.delta.magnitude))
                theirs.lora_magnitude_vector["default"].weight.copy_(layer.delta.magnitude)
    ids = torch.randint(0, 100, (2, 12))
    expected = _output(reference, ids)
    with rw.disabled(ours):  # the adapters must change the output, or parity would prove nothing
        assert (_output(ours, ids) - expected).abs().max() > 1e-3
    torch.testing.assert_close(_output(ours, ids), expected, rtol=1e-5, atol=1e-5)
    rw.merge(ours)
    torch.testing.assert_close(_output(ours, ids), expected, rtol=1e-5, atol=1e-5)


def test_dora_magnitude_starts_at_peft_row_norms() -> None:
    torch.manual_seed(0)
    base, targets = _llama()
    reference = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=list(targets), use_dora=True)
    )
    ours = rw.adapt(base, rw.DoRAConfig(rank=4, targets=targets))
    for path, layer in adapted_modules(ours):
        expected = reference.base_model.model.get_submodule(path).lora_magnitude_vector["default"].weight
        torch.testing.assert_close(layer.delta.magnitude, expected, rtol=1e-6, atol=1e-6)
