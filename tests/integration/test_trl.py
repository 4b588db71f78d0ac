"""TRL's ``SFTTrainer`` trains a rankwise-adapted causal LM as it is, and ``rw.save_adapter`` saves
what it trained: the recipe of docs/trl.md, on a tiny Llama and a word-level tokenizer built here."""

from __future__ import annotations

import pytest
import torch
import transformers

import rankwise as rw

from _models import tiny_llama, word_tokenizer

trl = pytest.importorskip("trl", reason="trl is not installed (pip install rankwise[trl])")
datasets = pytest.importorskip("datasets", reason="datasets is not installed (trl depends on it)")

TEXTS = [
    "the king had a horse and the queen had a cat",
    "they rode to town every day",
    "the queen had a horse ; the king had a cat",
]


def _tokenizer() -> transformers.PreTrainedTokenizerFast:
    return word_tokenizer((word for text in TEXTS for word in text.split()), unk="<unk>", pad="<pad>", eos="<eos>")


def _llama(vocab_size: int) -> transformers.PreTrainedModel:
    # the pad and end ids are the tokenizer's: <pad> 0, <eos> 1
    return tiny_llama(vocab_size, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=1)


@pytest.mark.slow  # ten trainer steps and TRL's dataset preparation: about 5 s on 2 cores
def test_sft_trainer_lowers_the_loss_and_save_adapter_reloads_it(tmp_path) -> None:
    tokenizer = _tokenizer()
    model = _llama(len(tokenizer))
    model = rw.adapt(model, rw.LoRAConfig(rank=4, alpha=8, targets=("q_proj", "v_proj", "embed_tokens")))
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=10,
        per_device_train_batch_size=8,
        learning_rate=3e-2,
        max_length=32,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
    )
    trainer = trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_dict({"text": TEXTS * 8}),
        processing_class=tokenizer,
    )
    trainer.train()

    assert trainer.model is model  # no wrapper of TRL's or PEFT's around it
    assert model.is_gradient_checkpointing  # SFTConfig's default, non-reentrant in transformers 5
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 10
    assert sum(losses[-3:]) / 3 < 0.95 * losses[0]
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    adapter = ".adapters.default."
    assert any(f"embed_tokens{adapter}" in k for k in changed) and any(f"q_proj{adapter}" in k for k in changed)
    assert all(adapter in k for k in changed)

    rw.save_adapter(model, tmp_path / "adapter")
    reloaded = rw.load_adapter(_llama(len(tokenizer)), tmp_path / "adapter")
    ids = tokenizer(TEXTS[0], return_tensors="pt")["input_ids"]
    model.eval()
    # SFTConfig trains in bf16 autocast by default, and the Trainer leaves the model's forward under
    # it (accelerate wraps it): the reloaded model runs under the same autocast to compare bit for bit.
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(input_ids=ids).logits
        assert torch.equal(reloaded.eval()(input_ids=ids).logits, expected)
        with rw.disabled(model):  # the adapter did change the model
            assert (model(input_ids=ids).logits - expected).abs().max() > 1e-2
