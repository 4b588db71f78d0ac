"""The benchmark harness: every registered method on pretrained models and real data, at equal
trainable-parameter budgets. ``rankwise bench`` drives it; docs/benchmarks.md gives the method.

    from rankwise.bench import PRESETS, run_bench
    run_bench("results/quick", PRESETS["quick"])
"""

from .budget import Sizing, default_budget, size_to_budget
from .runner import PRESETS, Preset, Recipe, recipes, run_bench
from .tasks import TASKS, AssetMissing, Sizes, Task

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
    "run_bench",
    "size_to_budget",
]
