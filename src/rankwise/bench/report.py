"""Turn ``results.csv`` into ``results.md`` (mean ± std over seeds, a comparison across tasks) and
PNG plots.

Only the *selected* runs count: every seed at the learning rate the validation split chose (the
other runs of a sweep are in the CSV for inspection). Matplotlib's object API (``Figure``) is used,
not ``pyplot``, so making a report changes no global plotting state.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

from .budget import within_budget
from .tasks import Task

RESULTS = "results.csv"  # every run, one row each; written by the runner
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
# A method is in a task's top group when its mean trails the best adapter's by at most TOP seed
# standard deviations (the larger of the two): three seeds cannot order the methods inside it.
TOP = 2.0


@dataclass(frozen=True)
class Row:
    """One recipe on one task, its selected runs aggregated."""

    method: str
    size: str
    adapter_params: tuple[int, int]  # (smallest, largest) over the seeds: a start from data varies it
    trainable_params: tuple[int, int]
    trainable_mean: float  # where the row is plotted
    matched: str  # "yes": every seed's adapter count within the budget's tolerance; "n/a": a reference
    lr: str
    seeds: int
    diverged: int
    metrics: dict[str, tuple[float, float]]  # name -> (mean, std over seeds; 0 for one seed)
    train_time_s: float
    peak_memory_mb: float  # the smallest over the seeds (see aggregate)


def _matched(runs: Sequence[Mapping[str, str]]) -> str:
    """``"n/a"`` for a reference (the runner writes ``budget_matched`` ``n/a`` for a recipe without
    a method: it has no budget to match); else whether every run's measured adapter count is within
    the budget's tolerance, recomputed from the counts, so that rows written when the flag came from
    the budget search (before a start from data such as GoRA's moved the count) are judged right."""
    if any(run["budget_matched"] == "n/a" for run in runs):
        return "n/a"
    counts = all(within_budget(int(run["adapter_params"]), int(run["budget"])) for run in runs)
    return "yes" if counts else "no"


def _selected_runs(rows: Sequence[Mapping[str, str]], task: type[Task]) -> dict[str, list[Mapping[str, str]]]:
    """``{method: its selected runs on task}``, one per seed, all at one learning rate.

    Raises:
        ValueError: two selected runs of one method and seed, or selected runs at several
            learning-rate factors (a results file edited, or joined from two folders).
    """
    by_method: dict[str, list[Mapping[str, str]]] = {}
    for row in rows:
        if row["task"] == task.name and row["selected"] == "yes":
            by_method.setdefault(row["method"], []).append(row)
    for method, runs in by_method.items():
        seeds = [run["seed"] for run in runs]
        twice = sorted({seed for seed in seeds if seeds.count(seed) > 1}, key=int)
        if twice:
            raise ValueError(
                f"task {task.name!r}, method {method!r}: more than one selected run for seed {', '.join(twice)} "
                f"(lr_factor {', '.join(run['lr_factor'] for run in runs if run['seed'] in twice)}); the runner "
                "writes one per seed: delete the extra rows from results.csv"
            )
        factors: dict[str, list[str]] = {}
        for run in runs:
            factors.setdefault(run["lr_factor"], []).append(run["seed"])
        if len(factors) > 1:
            found = "; ".join(f"lr_factor {factor} for seed {', '.join(of)}" for factor, of in factors.items())
            raise ValueError(
                f"task {task.name!r}, method {method!r}: the selected runs are at several learning rates "
                f"({found}); a row averages the seeds of one rate: delete the rows of the other rates from "
                "results.csv and run those seeds again"
            )
    return by_method


def aggregate(rows: Sequence[Mapping[str, str]], task: type[Task]) -> tuple[list[Row], dict[str, str]]:
    """The selected runs of ``task`` per method, and ``{method: reason}`` for those that could not run.

    Everything a row shows is derived from its runs' recorded values. Parameter counts are given as
    their range over the seeds (GoRA's allocation differs by seed); the budget is matched only if
    every seed's count is. Peak memory is the smallest over the seeds: runs written before the
    runner released each run's model before the next one carry earlier models in the later seeds'
    peaks, and the smallest is the least inflated (the one that started clean, in a proxy sweep's
    folder); runs that all started clean differ by noise only.

    Raises:
        ValueError: two selected runs of one method and seed, or selected runs of one method at
            several learning rates.
    """
    unsupported = {r["method"]: r["note"] for r in rows if r["task"] == task.name and r["status"] == "unsupported"}
    result = []
    for method, runs in _selected_runs(rows, task).items():
        metrics = {}
        for name in task.metrics:
            values = [float(run[f"test_{name}"]) for run in runs]
            metrics[name] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
        adapter = [int(run["adapter_params"]) for run in runs]
        trainable = [int(run["trainable_params"]) for run in runs]
        first = runs[0]
        result.append(
            Row(
                method=method,
                size=first["size"],
                adapter_params=(min(adapter), max(adapter)),
                trainable_params=(min(trainable), max(trainable)),
                trainable_mean=statistics.fmean(trainable),
                matched=_matched(runs),
                lr=first["lr"],
                seeds=len(runs),
                diverged=sum(run["status"] == "diverged" for run in runs),
                metrics=metrics,
                train_time_s=statistics.fmean(float(run["train_time_s"]) for run in runs),
                peak_memory_mb=min(float(run["peak_memory_mb"]) for run in runs),
            )
        )
    # Methods first in the order they ran, then the references.
    result.sort(key=lambda row: row.method in REFERENCES)
    return result, unsupported


def mean_sd(name: str, mean: float, std: float, seeds: int) -> str:
    """Metric ``name``'s mean ± standard deviation over ``seeds``, as the tables print it."""
    scale = 100 if name in PERCENT else 1
    digits = 1 if name in PERCENT else 2
    text = f"{mean * scale:.{digits}f}"
    return f"{text} ± {std * scale:.{digits}f}" if seeds > 1 else text


def _count(span: tuple[int, int]) -> str:
    """A parameter count, or its range over the seeds where they differ: ``123,720–130,512``."""
    low, high = span
    return f"{low:,}" if low == high else f"{low:,}–{high:,}"


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
        params = _count(row.adapter_params) + (" †" if row.matched == "no" else "")
        seeds = f"{row.seeds}" + (f" ({row.diverged} diverged)" if row.diverged else "")
        cells = [row.method, row.size, params, _count(row.trainable_params), row.lr, seeds]
        for name in task.metrics:
            mean, std = row.metrics[name]
            text = mean_sd(name, mean, std, row.seeds)
            cells.append(f"**{text}**" if best[name] is not None and mean == best[name] else text)
        cells += [f"{row.train_time_s:.1f}", f"{row.peak_memory_mb:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if unsupported:
        lines += ["", "Not run (the method cannot adapt this task's target layers):", ""]
        lines += [f"- {method}: {reason}" for method, reason in unsupported.items()]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Standing:
    """The methods of one task measured against its frozen model and its best adapter, on the
    task's primary test metric."""

    task: str
    metric: str
    frozen: Row
    adapters: list[Row]  # best first; the references (frozen, full) are not adapters
    references: list[Row]

    def _signed(self, row: Row) -> float:
        mean = row.metrics[self.metric][0]
        return -mean if self.metric in LOWER_IS_BETTER else mean

    def _sd(self, row: Row) -> float:
        return row.metrics[self.metric][1]

    @property
    def best(self) -> Row:
        return self.adapters[0]

    @property
    def worst(self) -> Row:
        return self.adapters[-1]

    def share(self, row: Row) -> float | None:
        """Percent of the best adapter's gain over the frozen model that ``row`` reaches (None when
        no adapter gains)."""
        gain = self._signed(self.best) - self._signed(self.frozen)
        return 100 * (self._signed(row) - self._signed(self.frozen)) / gain if gain > 0 else None

    def in_top_group(self, row: Row) -> bool:
        """Within :data:`TOP` seed deviations of the best adapter (the larger of the two deviations)."""
        return self._signed(self.best) - self._signed(row) <= TOP * max(self._sd(self.best), self._sd(row))

    def best_over_frozen(self) -> float:
        """The best adapter's gain over the frozen model in its own seed deviations (inf for 0)."""
        return _ratio(self._signed(self.best) - self._signed(self.frozen), self._sd(self.best))

    def best_over_worst(self) -> float:
        """The best adapter's lead over the worst in the larger of their seed deviations."""
        return _ratio(
            self._signed(self.best) - self._signed(self.worst), max(self._sd(self.best), self._sd(self.worst))
        )


def _ratio(difference: float, deviation: float) -> float:
    return difference / deviation if deviation > 0 else math.copysign(math.inf, difference) if difference else 0.0


def standing(rows: Sequence[Mapping[str, str]], task: type[Task]) -> Standing | None:
    """``task``'s :class:`Standing`, or None when it lacks the frozen reference or any adapter."""
    aggregated, _ = aggregate(rows, task)
    frozen = next((row for row in aggregated if row.method == "frozen"), None)
    adapters = [row for row in aggregated if row.method not in REFERENCES]
    if frozen is None or not adapters:
        return None
    metric = task.primary
    sign = -1 if metric in LOWER_IS_BETTER else 1
    adapters.sort(key=lambda row: -sign * row.metrics[metric][0])
    references = [row for row in aggregated if row.method in REFERENCES]
    return Standing(task.name, metric, frozen, adapters, references)


def across_tasks(rows: Sequence[Mapping[str, str]], tasks: Mapping[str, type[Task]]) -> str:
    """The Markdown section that compares methods over the tasks that have a frozen reference and
    an adapter: each method's share of the best adapter's gain, its top-group membership, and how far
    each task's rows separate (empty when no task qualifies)."""
    standings = [s for task in tasks.values() if (s := standing(rows, task)) is not None]
    if not standings:
        return ""
    compared = {s.task for s in standings}
    left_out = [name for name in tasks if name not in compared and any(row["task"] == name for row in rows)]
    methods = list(dict.fromkeys(row.method for s in standings for row in [*s.adapters, *s.references]))
    gainless = [s.task for s in standings if s.share(s.best) is None]
    table: dict[str, list[str]] = {}
    means: dict[str, float] = {}
    for method in methods:
        cells, shares, top, ran = [], [], 0, 0
        for s in standings:
            rows_of_task = [s.frozen, *s.adapters, *s.references]
            row = next((r for r in rows_of_task if r.method == method), None)
            if row is None:
                cells.append("–")
                continue
            ran += 1
            share = s.share(row)
            if share is not None:  # None: no adapter beats the frozen model, there is no gain to share
                shares.append(share)
            leading = method not in REFERENCES and s.in_top_group(row)
            top += leading
            most = max(r.seeds for r in rows_of_task)
            marks = [" ★" if leading else "", " †" if row.matched == "no" else ""]
            marks.append(f" ({row.seeds} of {most} seeds)" if row.seeds < most else "")
            cells.append(("n/a" if share is None else f"{share:.0f}") + "".join(marks))
        means[method] = statistics.fmean(shares) if shares else -math.inf
        average = f"{means[method]:.0f}" if shares else "n/a"  # it ran only where nothing gains
        table[method] = [method, *cells, average, f"{top} of {ran}" if method not in REFERENCES else "–"]
    order = sorted(methods, key=lambda m: (m in REFERENCES, -means[m]))
    header = ["method", *(s.task for s in standings), "mean share", "top group"]
    lines = [
        "## Across tasks",
        "",
        "Share of the gain: (method − frozen) / (best adapter − frozen) on each task's primary test metric,",
        f"in %. ★ the task's top group: within {TOP:g} seed deviations of the best adapter (the larger",
        "deviation of the two). † off the budget. – not run on that task; a row still running gives its",
        "seeds so far. Sorted by the mean share over the tasks a method ran.",
        "",
        *(
            [
                f"n/a: no adapter beats the frozen model on {', '.join(gainless)}, so there is no gain to share;",
                "the mean share leaves the task out, the top group counts it.",
                "",
            ]
            if gainless
            else []
        ),
        *([f"Left out, no frozen reference or no adapter yet: {', '.join(left_out)}.", ""] if left_out else []),
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(table[m]) + " |" for m in order),
        "",
        "How far each task's rows separate (differences in seed deviations: the best adapter's own",
        "against the frozen model; the larger of the two against the worst adapter):",
        "",
        "| task | metric | frozen | best adapter | best − frozen | worst adapter | best − worst |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in standings:
        value = {row.method: mean_sd(s.metric, *row.metrics[s.metric], row.seeds) for row in [s.frozen, *s.adapters]}
        lines.append(
            f"| {s.task} | {s.metric} | {value['frozen']} | {s.best.method} {value[s.best.method]} | "
            f"{s.best_over_frozen():.1f} SD | {s.worst.method} {value[s.worst.method]} | {s.best_over_worst():.1f} SD |"
        )
    return "\n".join(lines) + "\n"


def compare_folders(folders: Sequence[Path], tasks: Mapping[str, type[Task]]) -> str:
    """:func:`across_tasks` over the ``results.csv`` of several benchmark folders (one task per folder,
    or several: each task may come from one folder only).

    Raises:
        ValueError: a folder without ``results.csv``, a task found in two folders, or a task not in
            ``tasks`` (a task of your own data: register it first, :func:`rankwise.bench.register_task`).
    """
    rows: list[dict[str, str]] = []
    source: dict[str, Path] = {}
    for folder in folders:
        path = folder / RESULTS
        if not path.is_file():
            raise ValueError(f"{folder} holds no results.csv (a folder that rankwise bench --out wrote)")
        with path.open(newline="") as file:
            found = list(csv.DictReader(file))
        for name in dict.fromkeys(row["task"] for row in found):
            if name in source:
                raise ValueError(f"task {name!r} is in both {source[name]} and {folder}; give each task once")
            if name not in tasks:
                raise ValueError(
                    f"{folder}: task {name!r} is not registered (known: {sorted(tasks)}); a task of your own "
                    "data compares from Python after rankwise.bench.register_task"
                )
            source[name] = folder
        rows += found
    named = [name for name in tasks if name in source]
    text = across_tasks(rows, {name: tasks[name] for name in named})
    if not text:
        raise ValueError(f"no task in {[str(f) for f in folders]} has both the frozen reference and an adapter")
    return text


def write_markdown(path: Path, rows: Sequence[Mapping[str, str]], tasks: Mapping[str, type[Task]]) -> None:
    sections = [task_table(rows, task) for task in tasks.values()]
    if len({row["task"] for row in rows}) > 1:
        sections.append(across_tasks(rows, tasks))
    text = "\n".join(
        [
            "# Benchmark results",
            "",
            "Written by `rankwise bench`. Test metrics, mean ± standard deviation over seeds, each recipe at the",
            "learning rate its validation split chose. Best mean per column in bold. † the adapter parameters",
            "of some seed are off the budget by more than 10% (the method's nearest size, or a start from data",
            "that laid the layers out again); a range gives the counts where the seeds differ. `trainable`",
            "includes the task head. `peak MB` is the smallest over the seeds. Method: docs/benchmarks.md.",
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


def spread(counts: Sequence[float], step: float) -> list[float]:
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
    trained = [row for row in aggregated if row.trainable_mean > 0]
    counts = [row.trainable_mean for row in trained]
    # A log axis shows at least about one decade, however close the counts.
    decades = max(1.0, math.log10(max(counts) / min(counts))) if counts else 1.0
    positions = dict(zip((row.method for row in trained), spread(counts, SPREAD * decades), strict=True))
    methods = 0
    for row in aggregated:
        mean, std = (v * scale for v in row.metrics[task.primary])
        if row.trainable_mean == 0:  # nothing trained: a line at the untrained model's value
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
    axes.set_xlabel("trainable parameters (incl. head; mean over seeds); points of near-equal counts spread sideways")
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
