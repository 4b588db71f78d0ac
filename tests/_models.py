"""Tiny transformers models with seeded random weights, and word-level tokenizers built offline: the
one place the tests build them, each call site giving only the sizes it differs in.

transformers is imported inside each function, not here: a test module that skips itself where
transformers is absent (``pytest.importorskip``) can still import this one."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    import transformers


def tiny_llama(vocab_size: int, *, classes: int = 0, seed: int = 0, **config: Any) -> transformers.PreTrainedModel:
    """A 2-layer, 32-wide Llama (MLP 64; 4 query heads over 2 key-value heads: grouped-query
    attention), its weights drawn after ``torch.manual_seed(seed)``; in training mode, as built.

    Args:
        vocab_size: the embedding's rows.
        classes: 0 for a causal LM (``LlamaForCausalLM``); else a ``LlamaForSequenceClassification``
            with that many labels.
        seed: the torch seed set just before the weights are drawn.
        config: ``LlamaConfig`` fields over those sizes (another width, tied embeddings, token ids).
    """
    import transformers

    sizes = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    if classes:
        config["num_labels"] = classes
    llama_config = transformers.LlamaConfig(vocab_size=vocab_size, **{**sizes, **config})
    torch.manual_seed(seed)
    if classes:
        return transformers.LlamaForSequenceClassification(llama_config)
    return transformers.LlamaForCausalLM(llama_config)


def tiny_gpt2(*, dropout: float = 0.1, seed: int = 0, **config: Any) -> transformers.GPT2LMHeadModel:
    """A 2-layer, 16-wide GPT-2 LM (2 heads, Conv1D layers) over 50 tokens and 8 positions, its
    weights drawn after ``torch.manual_seed(seed)``; in training mode, as built.

    Its begin and end token ids are 0, inside the vocabulary (GPT-2's own, 50256, is not: transformers
    warns of it).

    Args:
        dropout: the residual, embedding and attention dropout (GPT-2's default 0.1; 0.0 makes
            training steps deterministic).
        seed: the torch seed set just before the weights are drawn.
        config: ``GPT2Config`` fields over those (``vocab_size``, ``n_embd``, ``n_layer``, ...).
    """
    import transformers

    defaults = {"vocab_size": 50, "n_embd": 16, "n_layer": 2, "n_head": 2, "n_positions": 8}
    gpt2_config = transformers.GPT2Config(
        **{**defaults, "bos_token_id": 0, "eos_token_id": 0, **config},
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
    )
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(gpt2_config)


def word_tokenizer(
    words: Iterable[str], unk: str, pad: str | None = None, eos: str | None = None
) -> transformers.PreTrainedTokenizerFast:
    """A whitespace, word-level tokenizer over a fixed vocabulary, built offline (no download).

    Args:
        words: the vocabulary, in order of first appearance (repeats are dropped).
        unk: the unknown-word token.
        pad: a padding token, if any.
        eos: an end-of-sequence token, if any.

    Ids: the special tokens first, in the order pad, eos, unk (those given), then the words.
    """
    import tokenizers
    import transformers

    specials = {"pad_token": pad, "eos_token": eos, "unk_token": unk}
    given = {role: token for role, token in specials.items() if token is not None}
    vocab = {word: i for i, word in enumerate([*given.values(), *dict.fromkeys(words)])}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token=unk))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **given)
