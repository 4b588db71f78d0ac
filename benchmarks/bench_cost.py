"""What the benchmark's runs cost: the frozen-layer cache's saving per step, and the time of the
``standard`` preset per task, estimated from short runs.

Not a test. One process, a fixed thread count.

``cache``: on ``friends`` (SmolLM2-135M, LoRA on layers 22-29), alternates runs of a few steps with
and without the frozen-layer cache, same seed, so that load from other processes hits both alike;
reports seconds per step of each (median over rounds), the one-time cost of filling the cache,
and the largest difference between the two runs' losses.

``estimate``: per task of a preset, each recipe trains a few steps at the preset's sizes (after an
untimed warm-up run of the task). A step's time is the median of the intervals between the
optimizer steps after the first (``rankwise.step`` is called after each), robust to the load of
other processes; the rest of the run's wall time is its fixed cost (copying the model, the cache's
checks, a start from data such as GoRA's gradient pass, the first step's allocations). A step x the
steps the preset runs (its proxy sweep and every seed), plus the fixed cost per run and the
evaluations (validation once per factor, test once per seed), give the task's time.

``spent``: what finished runs cost, from the ``results.csv`` of benchmark folders: the training
time summed over every run (proxy sweeps, unchosen factors and seeds included) per task, split
into the recipes' own time and the references', with the recipes done.

    python benchmarks/bench_cost.py cache --threads 1
    python benchmarks/bench_cost.py estimate --threads 1 --tasks tweets r8 friends fashion
    python benchmarks/bench_cost.py spent benchmarks/results/standard-*
"""

from __future__ import annotations

import argparse
import csv
import itertools
import os
import statistics
import time
from functools import partial
from pathlib import Path

import torch

import rankwise
from rankwise.bench import PRESETS, Preset, Sizes, recipes, size_to_budget
from rankwise.bench.budget import default_budget
from rankwise.bench.cache import FrozenLayersCache
from rankwise.bench.report import REFERENCES, RESULTS
from rankwise.bench.runner import Recipe, train
from rankwise.bench.tasks import TASKS, AssetMissing, Batch, Fashion, Task

CPU = torch.device("cpu")
step = rankwise.step  # the runner calls it after every optimizer step: the script times steps by it


def _timed(times: list[float], model: torch.nn.Module) -> None:
    times.append(time.perf_counter())
    step(model)


class RandomImages(Fashion):
    """EfficientNet-Lite0 on random images of Fashion-MNIST's shape and labels: the step time of
    the fashion task where the dataset is not installed (it does not depend on the pixels)."""

    def _images(self) -> dict[str, Batch]:
        generator = torch.Generator().manual_seed(0)
        counts = {"train": self.sizes.train, "val": self.sizes.val, "test": self.sizes.test, "probe": self.sizes.probe}
        return {
            split: {
                "images": torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=generator),
                "labels": torch.randint(0, 10, (n,), generator=generator),
            }
            for split, n in counts.items()
        }


def _task(name: str, sizes: Sizes) -> Task:
    task = TASKS[name](sizes)
    try:
        task.prepare()
    except AssetMissing:
        if name != "fashion":
            raise
        task = RandomImages(sizes)
        task.prepare()
    return task


def _config(task: Task, recipe: Recipe, budget: int, steps: int) -> object:
    if recipe.method is None:
        return None
    sizing = size_to_budget(task.pretrained, recipe.method, budget, targets=task.targets, trainable=task.head)
    return recipe.configured(sizing.config, task, steps)


def cache_saving(steps: int, rounds: int) -> None:
    task = _task("friends", PRESETS["standard"].sizes["friends"])
    recipe = recipes()["lora"]
    config = _config(task, recipe, default_budget(task.pretrained, task.targets, task.head), steps)
    cache = FrozenLayersCache()
    start = time.perf_counter()
    train(task, recipe, config, 0, recipe.base_lr(task), CPU, steps=1, cache=cache)  # fills the cache
    fill = time.perf_counter() - start
    per_step: dict[bool, list[float]] = {False: [], True: []}
    losses: dict[bool, list[float]] = {}
    for _ in range(rounds):
        for cached in (False, True):
            used = cache if cached else None
            run = train(task, recipe, config, 0, recipe.base_lr(task), CPU, steps=steps, cache=used)
            per_step[cached].append(run.seconds / steps)
            losses[cached] = run.losses
    plain, fast = statistics.median(per_step[False]), statistics.median(per_step[True])
    difference = max(abs(a - b) / abs(a) for a, b in zip(losses[False], losses[True], strict=True))
    print(
        f"friends, lora, {steps} steps x {rounds} rounds, {torch.get_num_threads()} thread(s), "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"  without the cache: {plain:.3f} s/step; with it: {fast:.3f} s/step; saving {1 - fast / plain:.0%} "
        f"({plain / fast:.2f}x)"
    )
    print(f"  filling it ({len(cache)} examples, once per process, in the first run): {fill:.1f} s")
    print(f"  largest relative difference between the runs' losses: {difference:.1e}")


def estimate(preset: Preset, names: list[str], steps: int) -> None:
    print(
        f"preset {preset.name}, {torch.get_num_threads()} thread(s), load average {os.getloadavg()[0]:.2f} "
        f"at the start; {len(preset.lr_factors)} factors, proxy {preset.lr_proxy}, {len(preset.seeds)} seeds"
    )
    table = recipes()
    for name in names:
        sizes = preset.sizes[name]
        task = _task(name, sizes)
        cache = FrozenLayersCache() if preset.cache_frozen_layers and task.frozen_layers_cacheable else None
        budget = default_budget(task.pretrained, task.targets, task.head)
        proxy_steps = max(1, round(preset.lr_proxy * sizes.steps)) if preset.lr_proxy else sizes.steps
        lora = table["lora"]
        train(task, lora, _config(task, lora, budget, 1), 0, lora.base_lr(task), CPU, steps=1, cache=cache)  # warm-up
        evaluated = train(task, lora, _config(task, lora, budget, 1), 0, lora.base_lr(task), CPU, steps=1, cache=cache)
        start = time.perf_counter()
        task.evaluate(evaluated.model, "val")
        per_example = (time.perf_counter() - start) / sizes.val
        runs = len(preset.lr_factors) + len(preset.seeds)
        evaluation = per_example * (len(preset.lr_factors) * sizes.val + len(preset.seeds) * sizes.test)
        total, lines = 0.0, []
        for recipe_name, recipe in table.items():
            try:
                config = _config(task, recipe, budget, steps)
            except (ValueError, TypeError):  # the method cannot adapt this task: not run
                continue
            stepped: list[float] = []
            rankwise.step = partial(_timed, stepped)
            start = time.perf_counter()
            try:
                run = train(task, recipe, config, 0, recipe.base_lr(task), CPU, steps=steps, cache=cache)
            finally:
                rankwise.step = step
            wall = time.perf_counter() - start
            if run.trainable:
                rate = statistics.median(b - a for a, b in itertools.pairwise(stepped))
                fixed = max(0.0, wall - steps * rate)
                seconds = rate * (len(preset.lr_factors) * proxy_steps + len(preset.seeds) * sizes.steps)
                seconds += evaluation + runs * fixed
            else:  # nothing trains: one evaluation per seed
                rate, fixed = float("nan"), wall
                seconds = per_example * len(preset.seeds) * sizes.test + len(preset.seeds) * fixed
            total += seconds
            lines.append(f"    {recipe_name:<14} {rate:6.3f} s/step  {fixed:5.1f} s a run  {seconds / 60:6.1f} min")
        print(f"{name}: {total / 3600:.1f} h ({len(lines)} recipes; evaluation {evaluation / 60:.1f} min a recipe)")
        print("\n".join(lines))
        del task


def spent(folders: list[Path]) -> None:
    print("| task | recipes with every seed | training time, all runs | of it the references |")
    print("|---|---|---|---|")
    for folder in folders:
        with (folder / RESULTS).open(newline="") as file:
            rows = list(csv.DictReader(file))
        for task in dict.fromkeys(row["task"] for row in rows):
            ran = [row for row in rows if row["task"] == task and row["train_time_s"]]
            hours = sum(float(row["train_time_s"]) for row in ran) / 3600
            references = sum(float(row["train_time_s"]) for row in ran if row["method"] in REFERENCES) / 3600
            seeds = {}
            for row in ran:
                if row["selected"] == "yes":
                    seeds.setdefault(row["method"], set()).add(row["seed"])
            done = sum(len(s) == max(map(len, seeds.values())) for s in seeds.values())
            print(f"| {task} | {done} | {hours:.2f} h | {references:.2f} h |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    saving = commands.add_parser("cache", help="the frozen-layer cache's saving per step on friends")
    saving.add_argument("--steps", type=int, default=4)
    saving.add_argument("--rounds", type=int, default=3)
    cost = commands.add_parser("estimate", help="the time of a preset per task, from short runs")
    cost.add_argument("--preset", default="standard", choices=sorted(PRESETS))
    cost.add_argument("--tasks", nargs="+", default=["tweets", "r8", "friends", "fashion"])
    cost.add_argument("--steps", type=int, default=6, help="steps timed per recipe")
    for command in (saving, cost):
        command.add_argument("--threads", type=int, default=1)
    done = commands.add_parser("spent", help="training time of the finished runs in benchmark folders")
    done.add_argument("folders", type=Path, nargs="+")
    args = parser.parse_args()
    if args.command == "spent":
        spent(args.folders)
        return
    torch.set_num_threads(args.threads)
    if args.command == "cache":
        cache_saving(args.steps, args.rounds)
    else:
        estimate(PRESETS[args.preset], args.tasks, args.steps)


if __name__ == "__main__":
    main()
