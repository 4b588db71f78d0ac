"""The benchmark harness: every registered method on pretrained models and real data, at equal
trainable-parameter budgets. ``rankwise bench`` drives it; docs/benchmarks.md gives the method.

    from rankwise.bench import PRESETS, run_bench
    run_bench("results/quick", PRESETS["quick"])

Your own model folder and data file (``rankwise bench --model DIR --data FILE --task KIND``)::

    from rankwise.bench import PRESETS, register_task, run_bench, task_from_files
    task = register_task(task_from_files("my-model", "reviews.csv", "classification"))
    run_bench("results/reviews", PRESETS["quick"], tasks=[task.name])
"""

from .budget import Sizing, default_budget, size_to_budget
from .runner import PRESETS, Preset, Recipe, recipes, run_bench
from .tasks import TASKS, AssetMissing, Sizes, Task, register_task, task_from_files

__all__ = [
    "PRESETS",
    "TASKS",
    "AssetMissing",
    "Preset",
    "Recipe",
    "Sizes",
    "Sizing",
    "Task",
    "default_budget",
    "recipes",
    "register_task",
    "run_bench",
    "size_to_budget",
    "task_from_files",
]
