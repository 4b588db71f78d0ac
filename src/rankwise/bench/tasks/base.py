"""What every benchmark task is: a pretrained model, train / validation / test splits, a loss and
metrics (:class:`Task`), and how much of it a preset uses (:class:`Sizes`).

Data splits use the fixed seed ``DATA_SEED``, so every method and every run seed sees the same
examples; the run seed sets the adapter's initialization, dropout and the batch order.
"""

from __future__ import annotations

import abc
import copy
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.inject import replace_module

DATA_SEED = 0

Batch = dict[str, Tensor]


class AssetMissing(RuntimeError):
    """A pretrained model or dataset a task needs is not installed; the message says how to get it."""


@dataclass(frozen=True)
class Sizes:
    """How much of a task a preset uses; equal for every method within a task.

    Args:
        train: training examples (language modelling: blocks of ``length`` tokens) drawn from the
            training split.
        val: validation examples, used only to choose the learning rate.
        test: test examples the metric is reported on.
        length: tokens per sequence (text), or the image side in pixels.
        steps: optimizer steps per run.
        batch_size: training examples per step.
        eval_batch_size: examples per forward pass when evaluating.
        probe: examples the classification head is fitted on (a linear probe), apart from the
            other splits; unused by language modelling.
    """

    train: int
    val: int
    test: int
    length: int
    steps: int
    batch_size: int
    eval_batch_size: int = 64
    probe: int = 512

    def __post_init__(self) -> None:
        for name in ("train", "val", "test", "length", "steps", "batch_size", "eval_batch_size", "probe"):
            if getattr(self, name) < 1:
                raise ValueError(f"Sizes: {name}={getattr(self, name)} must be >= 1")


class Task(abc.ABC):
    """A pretrained model and its data. Subclasses load both in :meth:`_load`.

    Class variables:
        name: the task's key in :data:`TASKS` and on the command line.
        kind: what sort of task it is (``"classification"``, ``"lm"``): a preset's sizes for a
            task it does not list by name are those of its kind.
        description: one line for reports.
        metrics: the metrics :meth:`evaluate` returns; ``primary`` is the one learning rates are
            chosen by and plots show.
        higher_is_better: the direction of ``primary``.
        targets: the layers every method adapts (``AdapterConfig.targets``).
        head: paths of the new task head, trained in every row (``AdapterConfig.trainable``).
        full_lr: the starting learning rate of the full fine-tuning reference.
        frozen_layers_cacheable: the model is a transformers decoder called as
            ``model(input_ids=...)`` on unpadded blocks, so a preset may run it from the cached
            input of its first trained block (:mod:`rankwise.bench.cache`, which checks the rest).
    """

    name: ClassVar[str]
    kind: ClassVar[str]
    description: ClassVar[str]
    metrics: ClassVar[tuple[str, ...]]
    primary: ClassVar[str]
    higher_is_better: ClassVar[bool]
    targets: ClassVar[tuple[str, ...]]
    head: ClassVar[tuple[str, ...]] = ()
    full_lr: ClassVar[float]
    frozen_layers_cacheable: ClassVar[bool] = False

    def __init__(self, sizes: Sizes) -> None:
        self.sizes = sizes
        self._model: nn.Module | None = None
        self._data: dict[str, Batch] = {}

    def check(self) -> str:
        """Refuse, before any model is loaded, data that cannot fill ``sizes``; return one line on the
        data used (how it was split), or ``""`` when there is nothing to add to the docs.

        The built-in tasks read fixed corpora whose sizes the presets were written for, so they
        check in :meth:`_load`; a task on a user's file checks here, before the runner trains
        anything.

        Raises:
            ValueError: a split has fewer examples than ``sizes`` asks for.
        """
        return ""

    def settings(self) -> dict[str, object]:
        """What identifies this task's data and model beyond its name and sizes (a user's files),
        recorded with the results so that a resume cannot mix two versions; JSON values."""
        return {}

    def prepare(self) -> None:
        """Load the model and the data once.

        Raises:
            AssetMissing: an asset is not installed (the message names the install command).
        """
        if self._model is None:
            self._model, self._data = self._load()
            self._model.requires_grad_(False)

    @abc.abstractmethod
    def _load(self) -> tuple[nn.Module, dict[str, Batch]]:
        """The pretrained model and ``{split: {name: tensor with a leading example axis}}`` for the
        splits "train", "val", "test" (and "probe" for classification)."""

    @property
    def pretrained(self) -> nn.Module:
        """The loaded model, shared and never trained: read it (e.g. to size adapters), don't change it."""
        if self._model is None:
            raise RuntimeError(f"task {self.name!r}: call prepare() first")
        return self._model

    def model(self) -> nn.Module:
        """A fresh copy of the pretrained model (with its fitted head, for a classification task)."""
        return copy.deepcopy(self.pretrained)

    def train_mode(self, model: nn.Module) -> None:
        """Put ``model`` in training mode (a task may keep some layers in eval mode)."""
        model.train()

    def num_examples(self, split: str) -> int:
        """Examples (language modelling: blocks) in ``split``."""
        return len(next(iter(self._data[split].values())))

    def batch(self, split: str, index: Tensor, device: torch.device | str = "cpu") -> Batch:
        """The examples at ``index`` of ``split``, ready for :meth:`loss`."""
        return {key: values[index].to(device) for key, values in self._data[split].items()}

    def eval_batches(self, split: str, device: torch.device | str = "cpu") -> list[Batch]:
        """All of ``split`` in order, ``eval_batch_size`` examples a batch."""
        n = self.num_examples(split)
        step = self.sizes.eval_batch_size
        return [self.batch(split, torch.arange(i, min(i + step, n)), device) for i in range(0, n, step)]

    @abc.abstractmethod
    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """The training loss of one batch (a scalar)."""

    @abc.abstractmethod
    def evaluate(self, model: nn.Module, split: str, device: torch.device | str = "cpu") -> dict[str, float]:
        """The task's metrics on ``split`` ("val" or "test"), with the model in eval mode."""


class Classification(Task):
    """A task scored by accuracy and macro-F1 of the arg-max of ``logits``.

    The new head (one ``nn.Linear``) is fitted once, by logistic regression on the frozen model's
    features, before any method runs: linear probing, then fine-tuning (Kumar et al., "Fine-Tuning
    can Distort Pretrained Features and Underperform Out-of-Distribution",
    https://arxiv.org/abs/2202.10054). Every method then starts from the same sensible head and
    trains it with its own learning rate, so a method whose recommended rate is small (2e-5) is not
    judged by how slowly a random head learns. The probe is fitted on its own split: fitted on the
    training examples (fewer than the feature dimensions) it would classify them perfectly and
    leave the methods no gradient to learn from.
    """

    kind = "classification"
    metrics = ("accuracy", "macro_f1")
    primary = "accuracy"
    higher_is_better = True

    def probe_layer(self) -> str:
        """Path of the ``nn.Linear`` the probe fits: the one that outputs the logits. By default
        the head is that one layer."""
        (path,) = self.head
        return path

    def prepare(self) -> None:
        """Load the model and the data once, and fit the head on the probe split."""
        if self._model is None:
            super().prepare()
            self._fit_head()

    def _fit_head(self) -> None:
        path = self.probe_layer()
        head = self.pretrained.get_submodule(path)
        if not isinstance(head, nn.Linear):
            raise TypeError(f"{self.name}: the probe fits a linear head; '{path}' is a {type(head).__name__}")
        # The features are what the model outputs with the head replaced by the identity: whatever
        # the model does after its head (Llama's classifier scores every token, then keeps the last
        # real one) is a selection, and applies to the features the same way.
        replace_module(self.pretrained, path, nn.Identity())
        self.pretrained.eval()
        features, labels = [], []
        try:
            with torch.no_grad():
                for batch in self.eval_batches("probe"):
                    features.append(self.logits(self.pretrained, batch))
                    labels.append(batch["labels"])
        finally:
            replace_module(self.pretrained, path, head)
        x, y = torch.cat(features), torch.cat(labels)
        l2 = 0.5 / len(x)  # scikit-learn's LogisticRegression default (C = 1), per example
        with torch.no_grad():
            for parameter in head.parameters():  # a head may have no bias (Llama's score)
                parameter.zero_()
        head.requires_grad_(True)
        optimizer = torch.optim.LBFGS(head.parameters(), max_iter=500, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(head(x), y) + l2 * head.weight.square().sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            optimizer.step(closure)
        head.requires_grad_(False)

    @abc.abstractmethod
    def logits(self, model: nn.Module, batch: Batch) -> Tensor:
        """(batch, classes) scores."""

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        return F.cross_entropy(self.logits(model, batch), batch["labels"])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, device: torch.device | str = "cpu") -> dict[str, float]:
        model.eval()
        predictions, labels = [], []
        for batch in self.eval_batches(split, device):
            predictions.append(self.logits(model, batch).argmax(-1).cpu())
            labels.append(batch["labels"].cpu())
        predicted, truth = torch.cat(predictions).numpy(), torch.cat(labels).numpy()
        return {"accuracy": float((predicted == truth).mean()), "macro_f1": macro_f1(truth, predicted)}


def macro_f1(truth: np.ndarray, predicted: np.ndarray) -> float:
    """Unweighted mean of per-class F1 over the classes in ``truth`` or ``predicted`` (scikit-learn's
    default), so a rare class counts as much as a frequent one."""
    scores = []
    for label in np.union1d(truth, predicted):
        tp = np.sum((predicted == label) & (truth == label))
        fp = np.sum((predicted == label) & (truth != label))
        fn = np.sum((predicted != label) & (truth == label))
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def _split(order: np.ndarray, counts: dict[str, int], task: str) -> dict[str, np.ndarray]:
    """Consecutive, disjoint slices of ``order``, one per split, in the order of ``counts``."""
    if sum(counts.values()) > len(order):
        raise ValueError(f"{task}: the splits {counts} need {sum(counts.values())} examples, the data has {len(order)}")
    bounds = np.cumsum([0, *counts.values()])
    return {split: order[start:stop] for split, start, stop in zip(counts, bounds, bounds[1:], strict=False)}
