"""The benchmark runner: tasks × recipes × seeds at one trainable-parameter budget, resumable.

A *recipe* is how one row of the results is trained. The default recipe of a registered method is
its config sized to the budget (:mod:`rankwise.bench.budget`) and fitted to the run's length,
``rankwise.adapt`` and AdamW, with what the method declares (:mod:`rankwise.core.capabilities`): a
rank allocator that drives its adapters, a start computed from data. Other recipes change the
optimizer (LoRA-Pro, LoRA+); two references bracket every task: ``frozen`` (only the task head
trains) and ``full`` (every parameter trains).

Learning rates: each recipe starts from its config's ``recommended_lr`` (the references from
``HEAD_LR`` and the task's ``full_lr``). With more than one ``lr_factors`` the first seed runs once
per factor, the validation split picks the factor, and the remaining seeds run at it (a later call
with other seeds reuses that sweep, whatever seed it ran on); test metrics are kept for chosen runs
only, so the test split never informs a choice.

Every finished run is appended to ``results.csv`` at once (a learning-rate sweep when the whole
sweep is done), so a run that is interrupted resumes where it stopped when called again with the
same ``--out``.
"""

from __future__ import annotations

import csv
import dataclasses
import gc
import json
import math
import platform
import resource
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

import rankwise as rw

from ..core import registry
from ..core.capabilities import AllocatorFactory, Initializer
from ..core.config import AdapterConfig
from ..core.inject import adapted_modules, module_overrides
from . import report
from .budget import Sizing, default_budget, size_to_budget, within_budget
from .cache import FrozenLayersCache
from .tasks import METRICS, TASKS, AssetMissing, Sizes, Task

HEAD_LR = 1e-3  # Adam's usual rate for a linear probe
WEIGHT_DECAY = 0.0  # decay pulls an adapter toward the base model and DoRA's magnitude toward zero
GRAD_CLIP = 1.0
WARMUP = 0.1  # fraction of steps with a linear warm-up; then linear decay to zero
# Batches a start from data reads gradients from; GoRA's official scripts use 32 or 64, for far
# longer runs.
INIT_BATCHES = 8
SETTINGS = "settings.json"
PROXY = "proxy"  # ``selected`` of a shortened sweep run: it chose the factor, it is not counted

OptimizerFactory = Callable[[nn.Module, float], torch.optim.Optimizer]
TaskInitializer = Callable[[nn.Module, Task, int, torch.device], None]  # (model, task, seed, device)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Each trainable parameter once (tied weights are one parameter)."""
    return list({id(p): p for p in model.parameters() if p.requires_grad}.values())


def adamw(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters: the default recipe's optimizer."""
    return torch.optim.AdamW(trainable_parameters(model), lr=lr, weight_decay=WEIGHT_DECAY)


@dataclass(frozen=True)
class Recipe:
    """How one benchmark row is trained.

    Args:
        name: the row's name; a registry method's name for its default recipe.
        summary: one line for listings.
        method: the registry method whose config is sized to the budget and given to
            ``rankwise.adapt``; ``None`` for a reference, which adapts nothing.
        optimizer: builds the optimizer from the prepared model and the learning rate.
        allocator: a rank allocator driving the adapters during training (its penalty is added to
            the loss; its ``step`` runs after each optimizer step).
        initialize: runs on the adapted model before the optimizer is built (a method's start
            from data: ranks and values from gradients); its time counts as training time.
        reference: for a reference, what trains: ``"head"`` (the task head) or ``"all"``.
        lr_from: where the starting learning rate comes from: ``"method"`` (the config's
            ``recommended_lr``), ``"head"`` (``HEAD_LR``) or ``"full"`` (the task's full
            fine-tuning rate).
    """

    name: str
    summary: str
    method: str | None = None
    optimizer: OptimizerFactory = adamw
    allocator: AllocatorFactory | None = None
    initialize: TaskInitializer | None = None
    reference: Literal["head", "all"] | None = None
    lr_from: Literal["method", "head", "full"] = "method"
    # Adjusts the config to the task, after the method's own fit to the run (``for_run``).
    configure: Callable[[AdapterConfig, Task], AdapterConfig] | None = None

    def __post_init__(self) -> None:
        if (self.method is None) == (self.reference is None):
            raise ValueError(f"recipe {self.name!r}: give exactly one of method and reference")
        if self.method is None and self.lr_from == "method":
            raise ValueError(f"recipe {self.name!r}: a reference has no method to take a learning rate from")

    def base_lr(self, task: Task) -> float:
        if self.lr_from == "method":
            assert self.method is not None  # __post_init__ refuses lr_from="method" without one
            return registry.get(self.method).config_class.recommended_lr
        return HEAD_LR if self.lr_from == "head" else task.full_lr

    def configured(self, config: AdapterConfig, task: Task, steps: int | None = None) -> AdapterConfig:
        """The budget-sized ``config`` as this recipe trains it on ``task``: fitted by the method to
        a run of ``steps`` optimizer steps (default: the task's; a schedule measured in steps),
        then by ``configure``."""
        assert self.method is not None  # a reference has no config to fit
        config = registry.get(self.method).module_class.for_run(config, task.sizes.steps if steps is None else steps)
        return config if self.configure is None else self.configure(config, task)

    def trains(self, task: Task) -> bool:
        """Whether anything trains (the frozen reference of a task without a head trains nothing)."""
        return self.reference != "head" or bool(task.head)

    def prepare(self, model: nn.Module, task: Task, config: AdapterConfig | None) -> nn.Module:
        """Adapt ``model`` (or set which parameters train, for a reference)."""
        if self.method is not None:
            if config is None:
                raise ValueError(f"recipe {self.name!r}: method {self.method!r} needs a config to adapt with")
            return rw.adapt(model, config)
        model.requires_grad_(self.reference == "all")
        for path in task.head:
            model.get_submodule(path).requires_grad_(True)
        return model


def _lora_pro(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return rw.optim.LoRAPro(model, lr=lr, weight_decay=WEIGHT_DECAY)


def _lora_plus(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return rw.optim.LoRAPlus(model, lr=lr, weight_decay=WEIGHT_DECAY)  # B at 16 × lr, the paper's ratio


def _from_data(initializer: Initializer, model: nn.Module, task: Task, seed: int, device: torch.device) -> None:
    """Run a method's start from data on ``INIT_BATCHES`` training batches, with the initializer's
    defaults. The count it lays out can differ from the config's, the budget it was sized to: GoRA
    caps each layer's rank (``r_max``, and a layer's in_features) and does not hand what the caps
    drop to other layers, so it can train well under the budget (about 30% under on ``fashion``'s
    narrow convolutions), by an amount that varies with the seed's batches. Each row records the
    count measured after this start and whether it is within the budget."""
    generator = torch.Generator().manual_seed(seed)
    indices = _batch_indices(task.num_examples("train"), task.sizes.batch_size, INIT_BATCHES, generator)
    initializer(model, [task.batch("train", index, device) for index in indices], loss_fn=task.loss, seed=seed)


def _default_recipe(name: str) -> Recipe:
    """The row of registered method ``name``: its config and what its module declares, a rank
    allocator (without which it would be a fixed-rank adapter) and a start from data."""
    method = registry.get(name)
    initializer = method.module_class.initializer
    return Recipe(
        name,
        method.summary,
        method=name,
        allocator=method.module_class.allocator,
        initialize=None if initializer is None else partial(_from_data, initializer),
    )


def recipes() -> dict[str, Recipe]:
    """Every benchmark row: each registered method's default recipe, the optimizer recipes, then the
    two references. Read at call time, so methods registered later appear."""
    table = {name: _default_recipe(name) for name in rw.methods()}
    # LoRA-Pro makes LoRA's step approximate a full-fine-tuning AdamW step, so it starts from the
    # full fine-tuning rate (the paper uses 2e-5 on Llama-2-7B, a full fine-tuning rate).
    table["lora_pro"] = Recipe(
        "lora_pro",
        "LoRA trained by LoRA-Pro (full-gradient approximation)",
        method="lora",
        optimizer=_lora_pro,
        lr_from="full",
    )
    table["lora_plus"] = Recipe(
        "lora_plus", "LoRA with B's learning rate 16x A's (LoRA+)", method="lora", optimizer=_lora_plus
    )
    table["frozen"] = Recipe(
        "frozen",
        "reference: the pretrained model frozen, only the (linear-probed) head trains",
        reference="head",
        lr_from="head",
    )
    table["full"] = Recipe(
        "full", "reference: full fine-tuning, every parameter trains", reference="all", lr_from="full"
    )
    return table


@dataclass(frozen=True)
class Preset:
    """A named benchmark configuration.

    Args:
        tasks: tasks run when none are selected.
        seeds: run seeds when none are selected.
        lr_factors: multiples of each recipe's starting learning rate; more than one means a sweep
            on the first seed, chosen on the validation split.
        sizes: data, sequence length and steps per task (every built-in task, so any can be
            selected).
        kinds: sizes per task kind (``"classification"``, ``"lm"``), for a task the preset does not
            list by name: a user's own.
        lr_proxy: with a sweep, its runs train this fraction of the steps (a complete, shorter
            run: warm-up and decay fit its length), and then every seed runs at full length at
            the chosen factor. ``None``: the sweep runs at full length, and its chosen run is the
            first seed's.
        lr_extend: with a proxy sweep, how many more grid steps it may take past either end of
            ``lr_factors`` while the best factor is that end and strictly better than its neighbour:
            a recipe whose best rate lies outside the grid is not judged at the grid's edge.
        cache_frozen_layers: on tasks that allow it, compute the frozen blocks below the first
            trained one once per example (:mod:`rankwise.bench.cache`); the results are those of
            uncached runs to fp32 rounding.
    """

    name: str
    tasks: tuple[str, ...]
    seeds: tuple[int, ...]
    lr_factors: tuple[float, ...]
    sizes: dict[str, Sizes] = field(hash=False)
    kinds: dict[str, Sizes] = field(default_factory=dict, hash=False)
    lr_proxy: float | None = None
    lr_extend: int = 0
    cache_frozen_layers: bool = False

    def __post_init__(self) -> None:
        if self.lr_proxy is not None and not 0 < self.lr_proxy < 1:
            raise ValueError(f"preset {self.name!r}: lr_proxy={self.lr_proxy} must be between 0 and 1")
        if self.lr_extend and (self.lr_proxy is None or len(self.lr_factors) < 2):
            raise ValueError(f"preset {self.name!r}: lr_extend needs a proxy sweep over at least two factors")

    def sizes_for(self, task: type[Task]) -> Sizes:
        """The sizes of ``task``: those listed under its name, else those of its kind.

        Raises:
            ValueError: the preset has neither.
        """
        if task.name in self.sizes:
            return self.sizes[task.name]
        kind = getattr(task, "kind", None)
        if kind in self.kinds:
            return self.kinds[kind]
        raise ValueError(
            f"preset {self.name!r} has no sizes for task {task.name!r} nor for its kind {kind!r}; "
            f"it has the tasks {sorted(self.sizes)} and the kinds {sorted(self.kinds)}"
        )


def _preset(name: str, sizes: dict[str, Sizes], **options: Any) -> Preset:
    """A preset whose sizes for a user's own task are those of the built-in task of its kind:
    ``tweets``' for a classification (at 64 tokens: a user's texts are not tweets), ``friends``' for a
    language model."""
    kinds = {"classification": dataclasses.replace(sizes["tweets"], length=64), "lm": sizes["friends"]}
    return Preset(name, sizes=sizes, kinds=kinds, **options)


PRESETS: dict[str, Preset] = {
    # All methods on one task, one seed, short tweets: README's first command and the CI smoke test.
    # About 3 minutes on 2 CPU cores (measured: docs/benchmarks.md, Cost).
    "quick": _preset(
        "quick",
        tasks=("tweets",),
        seeds=(0,),
        lr_factors=(1.0,),
        sizes={
            "tweets": Sizes(train=384, val=64, test=320, length=40, steps=24, batch_size=16, probe=384),
            "r8": Sizes(train=384, val=64, test=320, length=64, steps=24, batch_size=16, probe=384),
            "friends": Sizes(train=40, val=8, test=16, length=64, steps=10, batch_size=4, eval_batch_size=8),
            "fashion": Sizes(train=384, val=64, test=320, length=64, steps=24, batch_size=16, probe=384),
            "synthetic": Sizes(train=384, val=64, test=128, length=1, steps=24, batch_size=16, probe=256),
        },
    ),
    # Long enough to separate methods: hundreds of optimizer steps per run, and a learning-rate grid
    # wide enough to reach each recipe's useful rate (0.1 to 31.6 times its starting rate, in
    # half-decades: the full preset's 1/3 to 3 left Bone and Bat at 2e-5-scale rates that do not
    # move the model). The sweep runs a quarter of the steps on the first seed, and goes up to three
    # half-decades further where the best rate is at an end of the grid (LoRA and Bone on friends
    # were); the chosen factor then runs in full for every seed. Hours per task (docs/benchmarks.md,
    # Cost).
    "standard": _preset(
        "standard",
        tasks=("tweets", "r8", "friends", "fashion"),
        seeds=(0, 1, 2),
        lr_factors=tuple(10 ** (k / 2) for k in range(-2, 4)),
        lr_proxy=0.25,
        lr_extend=3,
        cache_frozen_layers=True,
        sizes={
            "tweets": Sizes(train=3840, val=256, test=1024, length=40, steps=240, batch_size=16),
            "r8": Sizes(train=3840, val=256, test=2189, length=48, steps=240, batch_size=16),
            "friends": Sizes(train=400, val=32, test=64, length=64, steps=100, batch_size=4, eval_batch_size=16),
            "fashion": Sizes(train=3840, val=512, test=2000, length=64, steps=240, batch_size=16),
            "synthetic": Sizes(train=3840, val=256, test=512, length=1, steps=240, batch_size=16),
        },
    ),
    # About 80 minutes on 2 CPU cores with the 19 recipes of now (measured: docs/benchmarks.md,
    # Cost). Each run sees its training subset once (train = steps × batch_size).
    "full": _preset(
        "full",
        tasks=("tweets", "r8", "friends", "fashion"),
        seeds=(0, 1, 2),
        lr_factors=(1 / 3, 1.0, 3.0),
        sizes={
            "tweets": Sizes(train=384, val=128, test=512, length=40, steps=24, batch_size=16),
            "r8": Sizes(train=320, val=128, test=512, length=48, steps=20, batch_size=16),
            "friends": Sizes(train=40, val=12, test=24, length=64, steps=10, batch_size=4, eval_batch_size=12),
            "fashion": Sizes(train=512, val=256, test=800, length=64, steps=32, batch_size=16),
            "synthetic": Sizes(train=1600, val=256, test=512, length=1, steps=100, batch_size=16),
        },
    ),
}

FIELDS = (
    "task",
    "method",
    "seed",
    "lr",
    "lr_factor",
    "selected",
    "status",
    "note",
    "size",
    "budget",
    "adapter_params",
    "trainable_params",
    "budget_matched",
    "steps",
    "final_train_loss",
    *(f"val_{m}" for m in METRICS),
    *(f"test_{m}" for m in METRICS),
    "train_time_s",
    "peak_memory_mb",
    "memory",
)


@dataclass
class Trained:
    """One finished training run."""

    model: nn.Module
    losses: list[float]
    seconds: float
    peak_mb: float
    memory: str
    trainable: int
    adapter: int  # trainable parameters outside the task head
    diverged_at: int | None


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, Any]]:
    """Measure the peak memory of the block; the dict gets ``mb`` and ``source`` on exit.

    Sources: ``cuda-allocated`` (``torch.cuda.max_memory_allocated``); on Linux CPU
    ``rss-hwm``, the process's resident-set high-water mark reset at the start
    (``/proc/self/clear_refs``); elsewhere ``rss-process-peak``, the peak since the process
    started (``resource.getrusage``), an upper bound. CPU figures are the whole process, so they
    include the pretrained model kept for the next run, the same for every row of a task. Garbage
    is collected before the reset, so that an earlier run's model whose last reference was dropped
    (the caller's job) but which sits in a reference cycle is not part of this peak.
    """
    result: dict[str, Any] = {}
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif platform.system() == "Linux":
        Path("/proc/self/clear_refs").write_text("5")  # "5": reset the peak RSS to the current RSS
    yield result
    if device.type == "cuda":
        result.update(mb=torch.cuda.max_memory_allocated(device) / 2**20, source="cuda-allocated")
    elif platform.system() == "Linux":
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        result.update(mb=int(status["VmHWM"].split()[0]) / 1024, source="rss-hwm")
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, kB elsewhere
        result.update(mb=peak / 2**20 if platform.system() == "Darwin" else peak / 1024, source="rss-process-peak")


def _schedule(steps: int) -> Callable[[int], float]:
    """The learning-rate multiplier at each step: linear warm-up, then linear decay to zero."""
    warmup = max(1, round(WARMUP * steps))
    return lambda step: (step + 1) / warmup if step < warmup else (steps - step) / max(1, steps - warmup)


def _batch_indices(examples: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """``steps`` batches, reshuffling at each pass over the data."""
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        while len(order) < batch_size:
            order = torch.cat([order, torch.randperm(examples, generator=generator)])
        yield order[:batch_size]
        order = order[batch_size:]


def _count(model: nn.Module, task: Task, params: list[nn.Parameter]) -> tuple[int, int]:
    """(trainable parameters, those outside the task head)."""
    head = {id(p) for path in task.head for p in model.get_submodule(path).parameters()}
    return sum(p.numel() for p in params), sum(p.numel() for p in params if id(p) not in head)


def train(
    task: Task,
    recipe: Recipe,
    config: AdapterConfig | None,
    seed: int,
    lr: float,
    device: torch.device,
    steps: int | None = None,
    cache: FrozenLayersCache | None = None,
) -> Trained:
    """One run: a fresh model, prepared by ``recipe``, trained for ``steps`` steps (default: the
    task's). With ``cache``, the model runs from it where its checks allow (the frozen blocks below
    the first trained one are computed once per example); otherwise as is."""
    steps = task.sizes.steps if steps is None else steps
    with peak_memory(device) as memory:
        torch.manual_seed(seed)  # the adapter's init and dropout
        model = recipe.prepare(task.model(), task, config).to(device)
        if cache is not None and cache.refusal(model, task, device) is None:
            cache.attach(model, task, device)
        task.train_mode(model)
        losses: list[float] = []
        diverged_at = None
        start = time.perf_counter()
        if recipe.initialize is not None:
            recipe.initialize(model, task, seed, device)
        # The allocator before the parameters are read: ARD-LoRA's splits attention heads, which
        # rebuilds those adapters, and an optimizer built earlier would train the old ones.
        allocator = recipe.allocator(model, total_steps=steps) if recipe.allocator is not None else None
        params = trainable_parameters(model)  # after initialize (GoRA replaces the adapters) and the allocator
        trainable, adapter = _count(model, task, params)
        if params:
            optimizer = recipe.optimizer(model, lr)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(steps))
            generator = torch.Generator().manual_seed(seed)
            batches = _batch_indices(task.num_examples("train"), task.sizes.batch_size, steps, generator)
            for step, index in enumerate(batches):
                loss = task.loss(model, task.batch("train", index, device))
                if not torch.isfinite(loss):
                    diverged_at = step
                    break
                objective = loss + allocator.penalty() if allocator is not None and allocator.has_penalty else loss
                objective.backward()
                torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
                optimizer.step()
                # The allocator reads this step's gradients, so it runs before zero_grad.
                if allocator is not None and allocator.step(optimizer):
                    params = trainable_parameters(model)  # it replaced the resized parameters
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                rw.step(model)  # advances the per-step schedules of methods that have one (SingLoRA)
                losses.append(loss.item())
        seconds = time.perf_counter() - start
    return Trained(
        model=model,
        losses=losses,
        seconds=seconds,
        peak_mb=memory["mb"],
        memory=memory["source"],
        trainable=trainable,
        adapter=adapter,
        diverged_at=diverged_at,
    )


def _row(
    task: Task, recipe: Recipe, sizing: Sizing | None, budget: int, seed: int, factor: float, lr: float, run: Trained
) -> dict[str, Any]:
    tail = run.losses[-max(1, len(run.losses) // 10) :]
    row: dict[str, Any] = dict.fromkeys(FIELDS, "")
    row.update(
        task=task.name,
        method=recipe.name,
        seed=seed,
        lr=f"{lr:.3g}" if run.trainable else "-",
        lr_factor=f"{factor:.4g}",
        selected="no",
        status="ok" if run.diverged_at is None else "diverged",
        note=_size_pattern(run.model) if run.diverged_at is None else f"non-finite loss at step {run.diverged_at}",
        size=sizing.label if sizing else "-",
        budget=budget,
        adapter_params=run.adapter,
        trainable_params=run.trainable,
        # The count that trained, not the search's: a start from data (GoRA) lays the layers out again.
        budget_matched=("yes" if within_budget(run.adapter, budget) else "no") if sizing else "n/a",
        steps=len(run.losses),
        final_train_loss=f"{sum(tail) / len(tail):.4f}" if tail else "",
        train_time_s=f"{run.seconds:.2f}",
        peak_memory_mb=f"{run.peak_mb:.0f}",
        memory=run.memory,
    )
    return row


def _size_pattern(model: nn.Module) -> str:
    """Each layer's final size (e.g. rank) where layers differ: what a rank allocator decided."""
    layers = [layer for _, layer in adapted_modules(model)]
    if not any(module_overrides(layer) for layer in layers):
        return ""
    knob = type(layers[0].config).size_knob
    assert knob is not None  # layers of different sizes: the method has a size knob
    return f"final {knob} per layer: " + " ".join(str(getattr(layer.delta.config, knob)) for layer in layers)


def _add_metrics(row: dict[str, Any], split: str, metrics: dict[str, float]) -> None:
    row.update({f"{split}_{name}": f"{value:.6g}" for name, value in metrics.items()})


def _factor(factors: tuple[float, ...], row: dict[str, Any]) -> float:
    """The factor of ``factors`` a row was run with (rows store it rounded)."""
    return next(f for f in factors if f"{f:.4g}" == row["lr_factor"])


def _score(task: Task, row: dict[str, Any]) -> float:
    """Higher is better; a diverged or non-finite run ranks last."""
    value = float(row[f"val_{task.primary}"])
    if row["status"] != "ok" or not math.isfinite(value):
        return -math.inf
    return value if task.higher_is_better else -value


class Results:
    """``results.csv`` and ``curves.jsonl`` in a folder: rows read back for resuming, new ones
    appended and flushed as runs finish."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / report.RESULTS
        self.rows: list[dict[str, str]] = []
        if self.path.is_file():
            with self.path.open(newline="") as file:
                reader = csv.DictReader(file)
                if tuple(reader.fieldnames or ()) != FIELDS:
                    raise ValueError(f"{self.path} has columns {reader.fieldnames}, expected {list(FIELDS)}")
                self.rows = list(reader)

    def find(
        self, task: str, method: str, seed: int | None = None, factor: float | None = None
    ) -> list[dict[str, str]]:
        """The rows of ``task`` and ``method``, optionally of one seed and learning-rate factor."""
        return [
            row
            for row in self.rows
            if row["task"] == task
            and row["method"] == method
            and (seed is None or row["seed"] == str(seed))
            and (factor is None or row["lr_factor"] == f"{factor:.4g}")
        ]

    def add(self, rows: list[dict[str, Any]], curves: list[dict[str, Any]]) -> None:
        new = not self.path.is_file()
        with self.path.open("a", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=FIELDS)
            if new:
                writer.writeheader()
            writer.writerows(rows)
        with (self.folder / report.CURVES).open("a") as file:
            file.writelines(json.dumps(curve) + "\n" for curve in curves)
        self.rows.extend({k: str(v) for k, v in row.items()} for row in rows)


def _check_settings(folder: Path, settings: dict[str, Any]) -> None:
    """Refuse to mix runs of different settings in one folder; record them for a fresh one.

    ``settings["tasks"]`` (the tasks sized by kind, with their files) grows: a task not recorded
    yet is added, one recorded must match.
    """
    path = folder / SETTINGS
    tasks = settings.pop("tasks")
    if path.is_file():
        before = json.loads(path.read_text())
        recorded = before.pop("tasks", {})
        changed = sorted(k for k in settings.keys() | before.keys() if before.get(k) != settings.get(k))
        for name in sorted(tasks.keys() & recorded.keys()):
            now, then = tasks[name], recorded[name]
            changed += [f"tasks.{name}.{k}" for k in sorted(now.keys() | then.keys()) if now.get(k) != then.get(k)]
        if changed:
            raise ValueError(f"{folder} holds results made with other settings ({changed}); use another --out")
        tasks = {**recorded, **tasks}
    # Written only when there are such tasks: a folder of built-in tasks keeps the settings it had.
    path.write_text(json.dumps({**settings, **({"tasks": tasks} if tasks else {})}, indent=2) + "\n")


def run_bench(
    out: str | Path,
    preset: Preset,
    *,
    tasks: Iterable[str] | None = None,
    methods: Iterable[str] | None = None,
    seeds: Iterable[int] | None = None,
    budget: int | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> Path:
    """Run (or resume) a benchmark and write its results, report and plots to ``out``.

    Args:
        out: the results folder; runs already in its ``results.csv`` are not run again.
        preset: sizes, seeds and learning-rate factors.
        tasks: task names, built-in or registered (:func:`rankwise.bench.register_task`; default:
            the preset's).
        methods: recipe names (default: all of :func:`recipes`).
        seeds: run seeds (default: the preset's).
        budget: adapter parameters per task (default: LoRA at rank 8 on the task's targets).
        device: where to train (``"cpu"``, ``"cuda"``).
        progress: show a progress bar.

    Every task is checked before anything is written (:meth:`Task.check`: a user's data against the
    sizes). A task whose asset is missing is skipped with the install command.

    Returns:
        ``out``, holding ``results.csv``, ``curves.jsonl``, ``results.md`` and PNG plots.

    Raises:
        ValueError: an unknown task or method, a task the preset has no sizes for or whose data
            is too small for them, or ``out`` holds results of other settings.
        AssetMissing: every task was skipped; the message says what to install.
    """
    table = recipes()
    task_names = tuple(tasks or preset.tasks)
    method_names = tuple(methods or table)
    seed_list = tuple(preset.seeds if seeds is None else seeds)
    unknown = [t for t in task_names if t not in TASKS] + [m for m in method_names if m not in table]
    if unknown:
        raise ValueError(f"unknown {unknown}; tasks: {sorted(TASKS)}; methods: {list(table)}")
    if not seed_list:
        raise ValueError("give at least one seed")
    pending = [TASKS[name](preset.sizes_for(TASKS[name])) for name in task_names]
    for task in pending:  # a user's data is checked against the sizes before anything is written
        line = task.check()
        if line:
            tqdm.write(line)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    _check_settings(
        folder,
        {
            "preset": preset.name,
            "lr_factors": list(preset.lr_factors),
            "budget": budget,
            "sizes": {name: dataclasses.asdict(sizes) for name, sizes in sorted(preset.sizes.items())},
            # Recorded only when set, so that folders written before they existed keep their settings.
            **({"lr_proxy": preset.lr_proxy} if preset.lr_proxy is not None else {}),
            **({"lr_extend": preset.lr_extend} if preset.lr_extend else {}),
            **({"cache_frozen_layers": True} if preset.cache_frozen_layers else {}),
            # Tasks the preset sizes by kind, a user's own: their sizes and what identifies their files.
            "tasks": {
                task.name: {"sizes": dataclasses.asdict(task.sizes), **task.settings()}
                for task in pending
                if task.name not in preset.sizes
            },
        },
    )
    results = Results(folder)
    per_method = _runs_per_recipe(preset.lr_factors, seed_list, preset.lr_proxy)
    bar = tqdm(total=len(task_names) * len(method_names) * per_method, disable=not progress, unit="run")
    torch_device = torch.device(device)
    skipped = {}
    while pending:
        task = pending.pop(0)  # dropped after its runs: the next task's model replaces it in memory
        try:
            task.prepare()
        except AssetMissing as missing:
            skipped[task.name] = str(missing)
            bar.write(f"skipping task {task.name}: {missing}")
            bar.update(len(method_names) * per_method)
            continue
        task_budget = budget or default_budget(task.pretrained, task.targets, task.head)
        cache = FrozenLayersCache() if preset.cache_frozen_layers and task.frozen_layers_cacheable else None
        for name in method_names:
            bar.set_description(f"{task.name} {name}")
            _run_recipe(task, table[name], task_budget, seed_list, preset, results, torch_device, bar, cache)
        report.write(folder, results.rows, TASKS)
        del task
    bar.close()
    if len(skipped) == len(task_names):
        raise AssetMissing(
            "no task could run; install what they need: "
            + "; ".join(f"{name}: {reason}" for name, reason in skipped.items())
        )
    report.write(folder, results.rows, TASKS)
    return folder


def _runs_per_recipe(factors: tuple[float, ...], seeds: tuple[int, ...], proxy: float | None) -> int:
    """One run per seed, and a sweep: on the first seed in place of its run, or (``proxy``) shortened
    runs before it."""
    if len(factors) == 1:
        return len(seeds)
    return len(factors) + len(seeds) - (proxy is None)


def _choice(task: Task, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The sweep's row with the best validation metric; the first (the smaller rate) on a tie."""
    best = rows[0]
    for row in rows[1:]:
        if _score(task, row) > _score(task, best):
            best = row
    return best


def _extended(factors: tuple[float, ...], steps: int) -> tuple[float, ...]:
    """``factors`` (a geometric grid, ascending) with ``steps`` more grid steps past either end."""
    ratio = factors[1] / factors[0]
    return (
        *(factors[0] / ratio**k for k in range(steps, 0, -1)),
        *factors,
        *(factors[-1] * ratio**k for k in range(1, steps + 1)),
    )


def _extensions(task: Task, rows: list[dict[str, Any]], grid: tuple[float, ...]) -> Iterator[float]:
    """Factors of ``grid`` past the swept ones, one step at a time, while the best row is an end of
    the sweep and strictly better than the row beside it (``rows`` grows as the caller runs each)."""
    while True:
        ordered = sorted(rows, key=lambda row: _factor(grid, row))
        best = _choice(task, ordered)
        low, high = grid.index(_factor(grid, ordered[0])), grid.index(_factor(grid, ordered[-1]))
        if best is ordered[-1] and _score(task, best) > _score(task, ordered[-2]) and high + 1 < len(grid):
            yield grid[high + 1]
        elif best is ordered[0] and _score(task, best) > _score(task, ordered[1]) and low > 0:
            yield grid[low - 1]
        else:
            return


def _run_recipe(
    task: Task,
    recipe: Recipe,
    budget: int,
    seeds: tuple[int, ...],
    preset: Preset,
    results: Results,
    device: torch.device,
    bar: Any,
    cache: FrozenLayersCache | None,
) -> None:
    factors, proxy = preset.lr_factors, preset.lr_proxy
    planned = _runs_per_recipe(factors, seeds, proxy)
    if any(row["status"] == "unsupported" for row in results.find(task.name, recipe.name)):
        bar.update(planned)
        return
    sizing = None
    if recipe.method is not None:
        try:
            sizing = size_to_budget(task.pretrained, recipe.method, budget, targets=task.targets, trainable=task.head)
        except (ValueError, TypeError) as error:  # the method cannot adapt this task's layers
            row: dict[str, Any] = dict.fromkeys(FIELDS, "")
            row.update(task=task.name, method=recipe.name, status="unsupported", note=str(error), budget=budget)
            results.add([row], [])
            bar.write(f"{task.name} / {recipe.name}: unsupported: {error}")
            bar.update(planned)
            return
    base_lr = recipe.base_lr(task)

    def run(
        seed: int, factor: float, splits: tuple[str, ...], steps: int | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """One run, evaluated on ``splits``: its row and its loss curve. Its model is released on
        return, so that it is not in memory while the next run is measured."""
        lr = base_lr * factor
        config = recipe.configured(sizing.config, task, steps) if sizing else None
        trained = train(task, recipe, config, seed, lr, device, steps, cache)
        row = _row(task, recipe, sizing, budget, seed, factor, lr, trained)
        for split in splits:
            _add_metrics(row, split, task.evaluate(trained.model, split, device))
        curve = {
            "task": task.name,
            "method": recipe.name,
            "seed": seed,
            "lr_factor": row["lr_factor"],
            "losses": trained.losses,
        }
        return row, curve

    chosen = factors[0]
    swept_now = None  # the seed whose chosen full-length sweep run this call ran: its seed's run
    if len(factors) > 1 and not recipe.trains(task):
        # Nothing trains, so there is no learning rate to choose: one run per seed.
        chosen = 1.0
        bar.update(planned - len(seeds))
    elif len(factors) > 1:
        done = _sweep_rows(results, task, recipe)
        if done:
            bar.update(planned - len(seeds))
        elif proxy is not None:
            # Shortened runs on the first seed; every seed then runs in full.
            steps = max(1, round(proxy * task.sizes.steps))
            curves: list[dict[str, Any]] = []

            def sweep(factor: float) -> None:
                row, curve = run(seeds[0], factor, ("val",), steps)
                row["selected"] = PROXY
                done.append(row)
                curves.append({**curve, "proxy": True})
                bar.update(1)

            for factor in factors:
                sweep(factor)
            for factor in _extensions(task, done, _extended(factors, preset.lr_extend)):
                bar.total += 1  # a run the plan did not count
                sweep(factor)
            results.add(done, curves)  # the whole sweep at once, so a resumed run sees all or none
        else:
            # Every factor runs in full on the first seed, and the chosen run is that seed's.
            curves, tests = [], []
            for factor in factors:
                # Test is evaluated now, so that this run's model is gone before the next run
                # starts; only the chosen run keeps its test metrics (the choice reads validation).
                row, curve = run(seeds[0], factor, ("val", "test"))
                tests.append({key: row[key] for key in row if key.startswith("test_")})
                row.update(dict.fromkeys(tests[-1], ""))
                done.append(row)
                curves.append(curve)
                bar.update(1)
            best = _choice(task, done)
            best.update(selected="yes", **tests[done.index(best)])
            results.add(done, curves)
            swept_now = seeds[0]
        if proxy is not None:
            grid = _extended(factors, preset.lr_extend)
            # In the order of the rates, so that a tie goes to the smaller one wherever it was swept.
            chosen = _factor(grid, _choice(task, sorted(done, key=lambda row: _factor(grid, row))))
        else:
            chosen = _factor(factors, next(row for row in done if row["selected"] == "yes"))
    for seed in seeds:
        if seed == swept_now:
            continue  # counted with the sweep
        # A seed with a selected run is done, whatever its rate: run again, it would count twice.
        if not [row for row in results.find(task.name, recipe.name, seed) if row["selected"] == "yes"]:
            row, curve = run(seed, chosen, ("test",))
            row["selected"] = "yes"
            results.add([row], [curve])
        bar.update(1)


def _sweep_rows(results: Results, task: Task, recipe: Recipe) -> list[dict[str, str]]:
    """The learning-rate sweep of ``recipe`` on ``task`` already in ``results``, whatever seed it ran
    on (a later call may start from another seed): its proxy rows, or the full-length rows of the
    seed that ran every factor (its ``no`` rows and its ``yes`` row); ``[]`` when there is none. A
    folder written before sweeps were looked up this way can hold a second sweep, on a later call's
    first seed: the first one written is the sweep."""
    swept = [row for row in results.find(task.name, recipe.name) if row["selected"] in (PROXY, "no")]
    if not swept:
        return []
    kinds = (PROXY,) if swept[0]["selected"] == PROXY else ("yes", "no")
    return [row for row in results.find(task.name, recipe.name, int(swept[0]["seed"])) if row["selected"] in kinds]
