"""``results.md``: mean ± std over the selected runs, the best in bold, unmatched budgets marked; the
metric plot tells every row apart."""

from __future__ import annotations

import math
from itertools import pairwise
from pathlib import Path

import pytest
from matplotlib.figure import Figure

from rankwise.bench import report
from rankwise.bench.runner import FIELDS
from rankwise.bench.tasks import Friends, Synthetic


def _row(
    method: str,
    seed: int,
    metrics: dict[str, float],
    *,
    task: str = "synthetic",
    selected: str = "yes",
    matched: str = "yes",
    status: str = "ok",
) -> dict[str, str]:
    row = dict.fromkeys(FIELDS, "")
    row.update(
        task=task,
        method=method,
        seed=str(seed),
        lr="0.001",
        lr_factor="1",
        selected=selected,
        status=status,
        size="rank=8",
        budget="1024",
        adapter_params="1024",
        trainable_params="1156",
        budget_matched=matched,
        train_time_s="2.0",
        peak_memory_mb="300",
    )
    row.update({f"test_{name}": str(value) for name, value in metrics.items()})
    return row


def test_means_and_sample_std_over_seeds_with_the_best_in_bold() -> None:
    rows = [
        _row("lora", 0, {"accuracy": 0.80, "macro_f1": 0.70}),
        _row("lora", 1, {"accuracy": 0.90, "macro_f1": 0.60}),
        _row("dora", 0, {"accuracy": 0.70, "macro_f1": 0.75}),
        _row("dora", 1, {"accuracy": 0.70, "macro_f1": 0.75}),
        _row("dora", 2, {"accuracy": 0.99, "macro_f1": 0.99}, selected="no"),  # a sweep run not chosen
    ]
    table = report.task_table(rows, Synthetic)
    lora = next(line for line in table.splitlines() if line.startswith("| lora "))
    dora = next(line for line in table.splitlines() if line.startswith("| dora "))
    assert "**85.0 ± 7.1**" in lora and "65.0 ± 7.1" in lora  # std of (0.8, 0.9) is 0.0707
    assert "70.0 ± 0.0" in dora and "**75.0 ± 0.0**" in dora
    assert "| 2 |" in dora  # the unselected run is not counted


def test_lower_perplexity_is_best_and_an_unmatched_budget_is_marked() -> None:
    rows = [
        _row("lora", 0, {"perplexity": 20.0}, task="friends"),
        _row("loldu", 0, {"perplexity": 25.0}, task="friends", matched="no"),
    ]
    table = report.task_table(rows, Friends)
    assert "**20.00**" in next(line for line in table.splitlines() if line.startswith("| lora "))
    assert "1,024 †" in next(line for line in table.splitlines() if line.startswith("| loldu "))


def test_methods_that_could_not_run_are_listed_with_the_reason() -> None:
    unsupported = dict.fromkeys(FIELDS, "")
    unsupported.update(task="synthetic", method="surm", status="unsupported", note="needs square layers", budget="1024")
    table = report.task_table([_row("lora", 0, {"accuracy": 0.8, "macro_f1": 0.8}), unsupported], Synthetic)
    assert "- surm: needs square layers" in table
    assert "| surm " not in table


def test_a_task_without_rows_has_no_section() -> None:
    assert report.task_table([_row("lora", 0, {"accuracy": 0.8, "macro_f1": 0.8})], Friends) == ""


def test_points_of_near_equal_counts_are_spread_apart_in_order_and_lone_points_stay() -> None:
    counts = [1156, 100, 1156, 1092, 1172, 5000, 1156]
    positions = report.spread(counts, 0.02)
    assert positions[1] == 100 and positions[5] == 5000
    crowded = sorted((positions[i], counts[i], i) for i in (0, 2, 3, 4, 6))
    assert [i for _, _, i in crowded] == [3, 0, 2, 6, 4]  # by count, ties in the given order
    logs = [math.log10(x) for x, _, _ in crowded]
    assert all(b - a >= 0.02 * 0.999 for a, b in pairwise(logs))


def test_the_metric_plot_has_a_legend_entry_per_trained_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    labels = []
    monkeypatch.setattr(
        Figure,
        "savefig",
        lambda self, path, **_: labels.extend(text.get_text() for text in self.axes[0].get_legend().get_texts()),
    )
    methods = ["lora", "dora", "bone", "full"]
    rows = [_row(method, 0, {"accuracy": 0.8, "macro_f1": 0.8}) for method in methods]
    report.plot_metric_vs_params(tmp_path / "plot.png", rows, Synthetic)
    assert labels == methods
