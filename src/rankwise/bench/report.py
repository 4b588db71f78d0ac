"""Turn ``results.csv`` into ``results.md`` (mean ± std over seeds) and PNG plots.

Only the *selected* runs count: every seed at the learning rate the validation split chose (the
other runs of a sweep are in the CSV for inspection). Matplotlib's object API (``Figure``) is used,
not ``pyplot``, so making a report changes no global plotting state.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

from .tasks import Task

REPORT = "results.md"
CURVES = "curves.jsonl"
LOWER_IS_BETTER = {"perplexity"}
PERCENT = {"accuracy", "macro_f1"}  # shown ×100
LABELS = {"accuracy": "accuracy (%)", "macro_f1": "macro-F1 (%)", "perplexity": "perplexity"}
REFERENCES = {"frozen": "s", "full": "D"}  # reference rows and their markers, drawn in black
# Every method row of a plot gets its own (colour, marker): ten colours and eleven markers give 110
# pairs before one repeats.
MARKERS = "o^sDvP<X>p*"
# Methods sized to one budget often share a parameter count, and their points would hide one
# another: points closer than a marker's width, SPREAD of the axis's span in decades (about 9 of
# its 750 pixels), are placed that far apart.
SPREAD = 0.012


@dataclass(frozen=True)
class Row:
    """One recipe on one task, its selected runs aggregated."""

    method: str
    size: str
    adapter_params: int
    trainable_params: int
    matched: str
    lr: str
    seeds: int
    diverged: int
    metrics: dict[str, tuple[float, float]]  # name -> (mean, std over seeds; 0 for one seed)
    train_time_s: float
    peak_memory_mb: float


def aggregate(rows: Sequence[Mapping[str, str]], task: type[Task]) -> tuple[list[Row], dict[str, str]]:
    """The selected runs of ``task`` per method, and ``{method: reason}`` for those that could not run."""
    unsupported = {r["method"]: r["note"] for r in rows if r["task"] == task.name and r["status"] == "unsupported"}
    by_method: dict[str, list[Mapping[str, str]]] = {}
    for row in rows:
        if row["task"] == task.name and row["selected"] == "yes":
            by_method.setdefault(row["method"], []).append(row)
    result = []
    for method, runs in by_method.items():
        metrics = {}
        for name in task.metrics:
            values = [float(run[f"test_{name}"]) for run in runs]
            metrics[name] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
        first = runs[0]
        result.append(
            Row(
                method=method,
                size=first["size"],
                adapter_params=int(first["adapter_params"]),
                trainable_params=int(first["trainable_params"]),
                matched=first["budget_matched"],
                lr=first["lr"],
                seeds=len(runs),
                diverged=sum(run["status"] == "diverged" for run in runs),
                metrics=metrics,
                train_time_s=statistics.fmean(float(run["train_time_s"]) for run in runs),
                peak_memory_mb=statistics.fmean(float(run["peak_memory_mb"]) for run in runs),
            )
        )
    # Methods first in the order they ran, then the references.
    result.sort(key=lambda row: row.method in REFERENCES)
    return result, unsupported


def _value(name: str, mean: float, std: float, seeds: int) -> str:
    scale = 100 if name in PERCENT else 1
    digits = 1 if name in PERCENT else 2
    text = f"{mean * scale:.{digits}f}"
    return f"{text} ± {std * scale:.{digits}f}" if seeds > 1 else text


def _best(rows: list[Row], name: str, higher_is_better: bool) -> float | None:
    means = [row.metrics[name][0] for row in rows if math.isfinite(row.metrics[name][0])]
    if not means:
        return None
    return max(means) if higher_is_better else min(means)


def task_table(rows: Sequence[Mapping[str, str]], task: type[Task]) -> str:
    """The Markdown section of one task (empty when it has no rows)."""
    aggregated, unsupported = aggregate(rows, task)
    if not aggregated and not unsupported:
        return ""
    budgets = sorted({r["budget"] for r in rows if r["task"] == task.name and r["budget"]})
    lines = [f"## {task.name}: {task.description}", ""]
    lines.append(f"Adapter parameter budget: {', '.join(f'{int(b):,}' for b in budgets)}.")
    lines.append("")
    header = [
        "method",
        "size",
        "adapter params",
        "trainable",
        "lr",
        "seeds",
        *(LABELS[m] for m in task.metrics),
        "train s",
        "peak MB",
    ]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    best = {name: _best(aggregated, name, name not in LOWER_IS_BETTER) for name in task.metrics}
    for row in aggregated:
        params = f"{row.adapter_params:,}" + (" †" if row.matched == "no" else "")
        seeds = f"{row.seeds}" + (f" ({row.diverged} diverged)" if row.diverged else "")
        cells = [row.method, row.size, params, f"{row.trainable_params:,}", row.lr, seeds]
        for name in task.metrics:
            mean, std = row.metrics[name]
            text = _value(name, mean, std, row.seeds)
            cells.append(f"**{text}**" if best[name] is not None and mean == best[name] else text)
        cells += [f"{row.train_time_s:.1f}", f"{row.peak_memory_mb:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if unsupported:
        lines += ["", "Not run (the method cannot adapt this task's target layers):", ""]
        lines += [f"- {method}: {reason}" for method, reason in unsupported.items()]
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, rows: Sequence[Mapping[str, str]], tasks: Mapping[str, type[Task]]) -> None:
    sections = [task_table(rows, task) for task in tasks.values()]
    text = "\n".join(
        [
            "# Benchmark results",
            "",
            "Written by `rankwise bench`. Test metrics, mean ± standard deviation over seeds, each recipe at the",
            "learning rate its validation split chose. Best mean per column in bold. † the method's size could",
            "not match the budget (within 10%); it ran at its nearest setting. `trainable` includes the task",
            "head. Method: docs/benchmarks.md.",
            "",
            *[section for section in sections if section],
        ]
    )
    path.write_text(text)


def read_curves(path: Path) -> dict[tuple[str, str, str, str], list[float]]:
    """``{(task, method, seed, lr_factor): losses}`` of the full-length runs in ``curves.jsonl`` (the
    shortened runs of a proxy sweep are left out: one of them shares its key with a full run)."""
    if not path.is_file():
        return {}
    curves = {}
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        if entry.get("proxy"):
            continue
        curves[entry["task"], entry["method"], str(entry["seed"]), entry["lr_factor"]] = entry["losses"]
    return curves


def spread(counts: Sequence[int], step: float) -> list[float]:
    """x positions on a log axis for positive ``counts``, so that no two points are closer than
    ``step`` decades: a count with no other that close stays where it is; a run of closer counts is
    spaced ``step`` apart around its middle, in the order of the counts (ties in the given order).
    Runs whose points would collide are one run."""
    order = sorted(range(len(counts)), key=lambda i: counts[i])
    logs = [math.log10(counts[i]) for i in order]

    def extent(run: list[int]) -> tuple[float, float]:
        middle, half = (logs[run[0]] + logs[run[-1]]) / 2, step * (len(run) - 1) / 2
        return middle - half, middle + half

    runs: list[list[int]] = []
    for k in range(len(order)):
        runs.append([k])
        while len(runs) > 1 and extent(runs[-1])[0] - extent(runs[-2])[1] < step:
            last = runs.pop()
            runs[-1].extend(last)
    positions = [float(count) for count in counts]
    for run in runs:
        if len(run) > 1:
            left = extent(run)[0]
            for j, k in enumerate(run):
                positions[order[k]] = 10 ** (left + step * j)
    return positions


def plot_metric_vs_params(path: Path, rows: Sequence[Mapping[str, str]], task: type[Task]) -> None:
    """The primary test metric against trainable parameters (no file when the task has no runs)."""
    aggregated, _ = aggregate(rows, task)
    if not aggregated:
        return
    figure = Figure(figsize=(9, 4.5), layout="constrained")
    axes = figure.subplots()
    scale = 100 if task.primary in PERCENT else 1
    trained = [row for row in aggregated if row.trainable_params > 0]
    counts = [row.trainable_params for row in trained]
    # A log axis shows at least about one decade, however close the counts.
    decades = max(1.0, math.log10(max(counts) / min(counts))) if counts else 1.0
    positions = dict(zip((row.method for row in trained), spread(counts, SPREAD * decades), strict=True))
    methods = 0
    for row in aggregated:
        mean, std = (v * scale for v in row.metrics[task.primary])
        if row.trainable_params == 0:  # nothing trained: a line at the untrained model's value
            axes.axhline(mean, color="grey", linestyle="--", linewidth=1)
            axes.annotate(row.method, (0.01, mean), xycoords=("axes fraction", "data"), fontsize=8, color="grey")
            continue
        if row.method in REFERENCES:
            color, marker = "black", REFERENCES[row.method]
        else:
            color, marker = f"C{methods % 10}", MARKERS[methods % len(MARKERS)]
            methods += 1
        axes.errorbar(
            positions[row.method],
            mean,
            yerr=std,
            linestyle="none",
            capsize=3,
            markersize=5,
            label=row.method,
            color=color,
            marker=marker,
        )
    axes.set_xscale("log")
    axes.set_xlabel("trainable parameters (incl. head); points of near-equal counts spread sideways")
    axes.set_ylabel(f"test {LABELS[task.primary]}")
    axes.set_title(task.description, fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.savefig(path, dpi=120)


def plot_losses(
    path: Path,
    rows: Sequence[Mapping[str, str]],
    curves: Mapping[tuple[str, str, str, str], list[float]],
    task: type[Task],
) -> None:
    """Training loss of each method's first selected seed, smoothed (no file when there is none)."""
    first: dict[str, Mapping[str, str]] = {}
    for row in rows:
        if row["task"] == task.name and row["selected"] == "yes" and row["method"] not in first:
            first[row["method"]] = row
    series = {
        method: losses
        for method, row in first.items()
        if (losses := curves.get((task.name, method, row["seed"], row["lr_factor"])))
    }
    if not series:
        return
    figure = Figure(figsize=(8, 4.5), layout="constrained")
    axes = figure.subplots()
    for method, losses in series.items():
        window = max(1, len(losses) // 10)  # a moving average: single batches are noisy
        smooth = [statistics.fmean(losses[max(0, i - window + 1) : i + 1]) for i in range(len(losses))]
        axes.plot(range(1, len(smooth) + 1), smooth, label=method, linestyle="--" if method in REFERENCES else "-")
    axes.set_xlabel("step")
    axes.set_yscale("log")  # one diverging method would otherwise flatten every other curve
    axes.set_ylabel("training loss (moving average)")
    axes.set_title(task.description, fontsize=9)
    axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    axes.grid(alpha=0.3)
    figure.savefig(path, dpi=120)


def write(folder: Path, rows: Sequence[Mapping[str, str]], tasks: Mapping[str, type[Task]]) -> None:
    """``results.md`` and, per task with results, ``<task>_metric_vs_params.png`` and ``<task>_loss.png``."""
    write_markdown(folder / REPORT, rows, tasks)
    curves = read_curves(folder / CURVES)
    for task in tasks.values():
        plot_metric_vs_params(folder / f"{task.name}_metric_vs_params.png", rows, task)
        plot_losses(folder / f"{task.name}_loss.png", rows, curves, task)
