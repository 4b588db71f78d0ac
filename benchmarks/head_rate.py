"""How much of an adapter row's result is the rate its classification head trained at.

In a benchmark row the new head is in the adapters' optimizer group, so it trains at the rate the
row chose for its adapters; the ``frozen`` reference sweeps the head's rate alone. This script
measures the difference that makes: it reruns recipes of a finished ``standard`` folder, each at
the rate that folder chose for it, with one change: the head in a group of its own at the rate
``frozen`` chose there. Same task sizes, seeds, schedule and budget; test metrics per seed, next to
the folder's own.

Not a test. One process, a fixed thread count. Each finished run is appended to
``OUT/results.csv`` at once; a second call skips the runs already there.

    python benchmarks/head_rate.py benchmarks/results/standard-r8 --methods bone bat lora --threads 1
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import statistics
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from rankwise.bench import PRESETS, recipes, size_to_budget
from rankwise.bench.budget import default_budget
from rankwise.bench.report import RESULTS, mean_sd
from rankwise.bench.runner import OptimizerFactory, train
from rankwise.bench.tasks import TASKS

FIELDS = ("task", "method", "seed", "lr", "head_lr", "test_accuracy", "test_macro_f1", "train_time_s")


def head_in_own_group(factory: OptimizerFactory, head: Iterable[str], head_lr: float) -> OptimizerFactory:
    """``factory``'s optimizer with the parameters of the modules at ``head`` moved out of their
    groups into one group of their own at ``head_lr`` (the other groups keep their rates). Built
    before any step, so there is no optimizer state to move."""

    def build(model: nn.Module, lr: float) -> torch.optim.Optimizer:
        optimizer = factory(model, lr)
        head_ids = {id(p) for path in head for p in model.get_submodule(path).parameters()}
        moved = [p for group in optimizer.param_groups for p in group["params"] if id(p) in head_ids]
        if len(moved) != len(head_ids):
            raise ValueError(f"the optimizer holds {len(moved)} of the head's {len(head_ids)} parameters")
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in head_ids]
        optimizer.param_groups = [group for group in optimizer.param_groups if group["params"]]
        optimizer.add_param_group({"params": moved, "lr": head_lr})
        return optimizer

    return build


def _chosen(rows: list[dict[str, str]], method: str) -> tuple[float, dict[int, dict[str, str]]]:
    """The rate ``method`` ran its seeds at in a finished folder, and its row per seed."""
    selected = {int(row["seed"]): row for row in rows if row["method"] == method and row["selected"] == "yes"}
    if not selected:
        raise SystemExit(f"{method}: no finished seed in the folder")
    rates = {row["lr"] for row in selected.values()}
    if len(rates) != 1:
        raise SystemExit(f"{method}: its seeds ran at several rates {sorted(rates)}")
    return float(rates.pop()), selected


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a finished standard-preset folder of one classification task")
    parser.add_argument("--methods", nargs="+", required=True, help="recipes to rerun")
    parser.add_argument("--out", type=Path, help="results folder (default: benchmarks/results/head-rate-TASK)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    settings = json.loads((args.folder / "settings.json").read_text())
    preset = PRESETS[settings["preset"]]
    with (args.folder / RESULTS).open(newline="") as file:
        rows = list(csv.DictReader(file))
    (task_name,) = {row["task"] for row in rows}
    task = TASKS[task_name](preset.sizes_for(TASKS[task_name]))
    if not task.head:
        raise SystemExit(f"{task_name} has no head to train at its own rate")
    head_lr, frozen_runs = _chosen(rows, "frozen")
    out = args.out or Path("benchmarks/results") / f"head-rate-{task_name}"
    out.mkdir(parents=True, exist_ok=True)
    done_path = out / RESULTS
    done = list(csv.DictReader(done_path.open(newline=""))) if done_path.exists() else []
    # A resumed call must be the same experiment: rows of another task or head rate would be
    # skipped as done and averaged with these.
    foreign = {(row["task"], row["head_lr"]) for row in done} - {(task_name, f"{head_lr:.3g}")}
    if foreign:
        raise SystemExit(f"{done_path} holds runs of other tasks or head rates {sorted(foreign)}; give another --out")

    task.prepare()
    budget = settings["budget"] or default_budget(task.pretrained, task.targets, task.head)
    table = recipes()
    for method in args.methods:
        recipe = table[method]
        if recipe.method is None:
            raise SystemExit(f"{method} is a reference; the head-rate change is for adapter rows")
        lr, own = _chosen(rows, method)
        sizing = size_to_budget(task.pretrained, recipe.method, budget, targets=task.targets, trainable=task.head)
        config = recipe.configured(sizing.config, task)
        separate = dataclasses.replace(recipe, optimizer=head_in_own_group(recipe.optimizer, task.head, head_lr))
        for seed in sorted(own):
            earlier = [row for row in done if row["method"] == method and int(row["seed"]) == seed]
            if earlier and earlier[0]["lr"] != f"{lr:.3g}":
                raise SystemExit(
                    f"{done_path}: {method} seed {seed} ran at {earlier[0]['lr']}, the folder chose {lr:.3g}"
                )
            if earlier:
                continue
            trained = train(task, separate, config, seed, lr, torch.device("cpu"))
            metrics = task.evaluate(trained.model, "test")
            row = {
                "task": task_name,
                "method": method,
                "seed": seed,
                "lr": f"{lr:.3g}",
                "head_lr": f"{head_lr:.3g}",
                "test_accuracy": f"{metrics['accuracy']:.6g}",
                "test_macro_f1": f"{metrics['macro_f1']:.6g}",
                "train_time_s": f"{trained.seconds:.2f}",
            }
            with done_path.open("a", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=FIELDS)
                if file.tell() == 0:
                    writer.writeheader()
                writer.writerow(row)
            done.append(row)
            print(f"{method} seed {seed}: {100 * metrics['accuracy']:.2f}% (head at {head_lr:g})", flush=True)

    print(f"\n{task_name}: the head at the row's rate (the folder) and at frozen's rate {head_lr:g} (this run)")
    print("| method | lr | accuracy, head at the row's rate | accuracy, head at frozen's rate |")
    print("|---|---|---|---|")
    frozen = [float(row["test_accuracy"]) for row in frozen_runs.values()]
    print(f"| frozen | {head_lr:g} | {_spread(frozen)} | {_spread(frozen)} |")
    for method in args.methods:
        lr, own = _chosen(rows, method)
        before = [float(row["test_accuracy"]) for row in own.values()]
        after = [float(row["test_accuracy"]) for row in done if row["method"] == method]
        print(f"| {method} | {lr:g} | {_spread(before)} | {_spread(after)} |")


def _spread(values: list[float]) -> str:
    """Accuracies as the benchmark's tables print them, with the number of seeds when not 3."""
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean_sd("accuracy", statistics.fmean(values), sd, len(values)) + (
        "" if len(values) == 3 else f" ({len(values)} seeds)"
    )


if __name__ == "__main__":
    main()
