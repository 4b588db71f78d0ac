"""Stand-in methods for the harness tests, registered for one test at a time, tiny sizes, and tiny
transformers models saved as save_pretrained writes them (for the tasks on a user's files)."""

from __future__ import annotations

import csv
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor, nn

from rankwise.bench import Preset, Sizes
from rankwise.core import registry
from rankwise.core.config import AdapterConfig, check_range
from rankwise.core.delta import Delta

TINY = Sizes(train=64, val=32, test=32, length=1, steps=6, batch_size=8, eval_batch_size=32, probe=64)


def tiny_preset(
    *,
    seeds: tuple[int, ...] = (0,),
    lr_factors: tuple[float, ...] = (1.0,),
    sizes: Sizes = TINY,
    lr_proxy: float | None = None,
    lr_extend: int = 0,
) -> Preset:
    return Preset(
        "test",
        tasks=("synthetic",),
        seeds=seeds,
        lr_factors=lr_factors,
        sizes={"synthetic": sizes},
        lr_proxy=lr_proxy,
        lr_extend=lr_extend,
    )


@pytest.fixture
def tiny() -> Sizes:
    """Sizes that make a synthetic run take milliseconds."""
    return TINY


@pytest.fixture
def make_preset() -> Callable[..., Preset]:
    return tiny_preset


@dataclass(frozen=True, kw_only=True)
class StrideConfig(AdapterConfig):
    size_knob: ClassVar[str | None] = "block"
    block: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "block", 1)


class Stride(Delta):
    """ΔW whose rows repeat in groups of ``block``: (out // block) · in parameters. ``num_params``
    does not check that ``block`` divides ``out_features``; building the module does, as shape
    checks do in real methods."""

    supported_bases = frozenset({"linear"})

    def __init__(self, w0: Tensor, config: StrideConfig) -> None:
        super().__init__(w0, config)
        if self.out_features % config.block:
            raise ValueError(f"block={config.block} must divide out_features={self.out_features}")
        self.block = config.block
        self.rows = nn.Parameter(torch.zeros(self.out_features // config.block, self.in_features))

    @classmethod
    def num_params(cls, in_features: int, out_features: int, config: StrideConfig) -> int:
        return out_features // config.block * in_features

    def delta_weight(self) -> Tensor:
        return self.rows.repeat_interleave(self.block, 0)

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.delta_weight().T


@dataclass(frozen=True, kw_only=True)
class FixedConfig(StrideConfig):
    size_knob: ClassVar[str | None] = None


class Fixed(Stride):
    """Stride with no size knob."""


@dataclass(frozen=True, kw_only=True)
class ConvOnlyConfig(StrideConfig):
    pass


class ConvOnly(Stride):
    """Stride that claims to support only convolutions."""

    supported_bases = frozenset({"conv2d"})


@pytest.fixture
def fake_methods(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Register the stand-ins in copies of the registry's tables, restored after the test."""
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    monkeypatch.setattr(registry, "_BY_CONFIG", dict(registry._BY_CONFIG))
    registry.register("test-stride", StrideConfig)(Stride)
    registry.register("test-fixed", FixedConfig)(Fixed)
    registry.register("test-conv-only", ConvOnlyConfig)(ConvOnly)
    return {"stride": "test-stride", "fixed": "test-fixed", "conv_only": "test-conv-only"}


WORDS = {
    "warm": ["sun", "warm", "happy", "bright", "glad", "calm", "kind", "sweet"],
    "cold": ["rain", "cold", "sad", "dark", "angry", "loud", "cruel", "bitter"],
}
COMMON = ["the", "a", "day", "was", "is", "very", "and", "it", "felt"]


def _sentence(rng: random.Random, label: str) -> str:
    """A text whose label shows in about half its words."""
    return " ".join(rng.choice(WORDS[label] if rng.random() < 0.5 else COMMON) for _ in range(rng.randint(4, 12)))


def _labelled_texts(count: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [(_sentence(rng, label), label) for label in ("warm", "cold") * (count // 2)]


def _documents(count: int, seed: int = 0) -> list[str]:
    """Documents of 3 to 6 sentences; the i-th begins with the word ``doc<i>``, which says where a
    block's text came from."""
    rng = random.Random(seed)
    return [
        f"doc{i} " + " ".join(_sentence(rng, rng.choice(list(WORDS))) for _ in range(rng.randint(3, 6)))
        for i in range(count)
    ]


def _word_level(texts: list[str], specials: list[str]) -> Any:
    """A WordLevel tokenizer trained on ``texts`` (offline: the tokenizers library, no download)."""
    import tokenizers

    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token=specials[0]))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(texts, tokenizers.trainers.WordLevelTrainer(special_tokens=specials))
    return tokenizer


@pytest.fixture
def labelled_texts() -> Callable[..., list[tuple[str, str]]]:
    """``(text, label)`` pairs, alternately "warm" and "cold", the label showing in half the words."""
    return _labelled_texts


@pytest.fixture(scope="session")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 16-wide BERT body (no head) and its WordLevel tokenizer, as save_pretrained writes them."""
    transformers = pytest.importorskip("transformers")
    import tokenizers

    folder = tmp_path_factory.mktemp("bert")
    tokenizer = _word_level([text for text, _ in _labelled_texts(200)], ["[UNK]", "[PAD]", "[CLS]", "[SEP]"])
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
    ).save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    transformers.BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def make_decoder(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``make_decoder(architecture="llama", **config)``: a folder with a 4-layer, 16-wide causal LM
    (Llama: grouped-query attention, tied embeddings; or "gpt2") and a WordLevel tokenizer with an
    end token and no padding token."""
    transformers = pytest.importorskip("transformers")
    made: dict[tuple[str, tuple[tuple[str, Any], ...]], Path] = {}

    def make(architecture: str = "llama", **overrides: Any) -> Path:
        key = architecture, tuple(sorted(overrides.items()))
        if key not in made:
            folder = tmp_path_factory.mktemp(architecture)
            tokenizer = _word_level(_documents(120), ["<unk>", "<s>", "</s>"])
            transformers.PreTrainedTokenizerFast(
                tokenizer_object=tokenizer,
                unk_token="<unk>",
                bos_token="<s>",
                eos_token="</s>",
            ).save_pretrained(folder)
            torch.manual_seed(0)
            if architecture == "llama":
                config = transformers.LlamaConfig(
                    **{
                        "vocab_size": tokenizer.get_vocab_size(),
                        "hidden_size": 16,
                        "intermediate_size": 32,
                        "num_hidden_layers": 4,
                        "num_attention_heads": 2,
                        "num_key_value_heads": 1,
                        "max_position_embeddings": 64,
                        "tie_word_embeddings": True,
                        **overrides,
                    }
                )
                transformers.LlamaForCausalLM(config).save_pretrained(folder)
            else:
                config = transformers.GPT2Config(
                    **{
                        "vocab_size": tokenizer.get_vocab_size(),
                        "n_embd": 16,
                        "n_layer": 4,
                        "n_head": 2,
                        "n_positions": 64,
                        **overrides,
                    }
                )
                transformers.GPT2LMHeadModel(config).save_pretrained(folder)
            made[key] = folder
        return made[key]

    return make


@pytest.fixture(scope="session")
def llama(make_decoder: Callable[..., Path]) -> Path:
    """The default tiny Llama of ``make_decoder``."""
    return make_decoder()


@pytest.fixture
def reviews(tmp_path: Path) -> Path:
    """160 labelled texts in a CSV file with an id, a text and a label column."""
    path = tmp_path / "reviews.csv"
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["id", "text", "label"])
        writer.writerows((i, text, label) for i, (text, label) in enumerate(_labelled_texts(160)))
    return path


@pytest.fixture
def story(tmp_path: Path) -> Path:
    """120 documents in a text file, separated by blank lines."""
    path = tmp_path / "story.txt"
    path.write_text("\n\n".join(_documents(120)) + "\n")
    return path
