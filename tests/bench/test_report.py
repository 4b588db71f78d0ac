"""``results.md``: mean ± std over the selected runs, the best in bold, unmatched budgets marked; the
metric plot tells every row apart."""

from __future__ import annotations

import csv
import math
from itertools import pairwise
from pathlib import Path

import pytest
from matplotlib.figure import Figure

from rankwise.bench import report
from rankwise.bench.runner import FIELDS
from rankwise.bench.tasks import Friends, Synthetic, Tweets


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


def _two_tasks() -> list[dict[str, str]]:
    """synthetic (accuracy, higher is better) and friends (perplexity, lower is better), two seeds each."""
    rows = []
    accuracy = {"frozen": (0.60, 0.60), "lora": (0.80, 0.82), "dora": (0.79, 0.80), "bone": (0.65, 0.67)}
    for method, values in accuracy.items():
        rows += [_row(method, seed, {"accuracy": v, "macro_f1": v}) for seed, v in enumerate(values)]
    perplexity = {"frozen": (30.0, 30.0), "lora": (22.0, 22.2), "dora": (21.0, 21.2), "full": (18.0, 18.0)}
    for method, values in perplexity.items():
        rows += [_row(method, seed, {"perplexity": v}, task="friends") for seed, v in enumerate(values)]
    return rows


def test_across_tasks_gives_each_methods_share_of_the_best_gain_and_the_top_group() -> None:
    text = report.across_tasks(_two_tasks(), {"synthetic": Synthetic, "friends": Friends})
    table = [[cell.strip() for cell in row.strip("|").split("|")] for row in text.splitlines() if row.startswith("| ")]
    line = {cells[0]: cells[1:] for cells in table}
    assert line["method"] == ["synthetic", "friends", "mean share", "top group"]
    # synthetic: best lora 0.81 (sd 0.0141), frozen 0.60. dora 0.795: 93% of the gain, 0.015 behind
    # lora, within 2 sd (0.0283): top group. bone 0.66: 29%, out. friends: best dora 21.1, frozen 30;
    # lora 22.1: (30 - 22.1) / 8.9 = 89%, 1.0 behind, more than 2 sd (0.28): out. full: 12 / 8.9 = 135%.
    assert line["lora"] == ["100 ★", "89", "94", "1 of 2"]
    assert line["dora"] == ["93 ★", "100 ★", "96", "2 of 2"]
    assert line["bone"] == ["29", "–", "29", "0 of 1"]
    assert line["full"] == ["–", "135", "135", "–"]
    # By mean share, the references last.
    assert [cells[0] for cells in table][1:6] == ["dora", "lora", "bone", "full", "frozen"]
    # Separation: synthetic's best (lora, 0.81 ± 0.0141) is 0.21 above frozen: 14.8 of its sd; 0.15
    # above bone (sd 0.0141): 10.6.
    assert "| synthetic | accuracy | 60.0 ± 0.0 | lora 81.0 ± 1.4 | 14.8 SD | bone 66.0 ± 1.4 | 10.6 SD |" in text


def test_a_method_still_running_shows_its_seeds_and_a_task_without_frozen_is_left_out() -> None:
    c3a = _row("c3a", 0, {"accuracy": 0.70, "macro_f1": 0.7})
    rows = [*_two_tasks(), c3a, _row("lora", 0, {"accuracy": 0.9, "macro_f1": 0.9}, task="tweets")]  # no frozen
    text = report.across_tasks(rows, {"synthetic": Synthetic, "friends": Friends})
    assert "| c3a | 48 (1 of 2 seeds) | – |" in text
    assert "tweets" not in text  # not asked for
    text = report.across_tasks(rows, {"synthetic": Synthetic, "tweets": Tweets, "friends": Friends})
    assert "Left out, no frozen reference or no adapter yet: tweets." in text
    assert "| method | synthetic | friends |" in text


def test_results_md_compares_across_tasks_only_when_it_holds_several(tmp_path: Path) -> None:
    rows = _two_tasks()
    report.write_markdown(tmp_path / "one.md", [r for r in rows if r["task"] == "friends"], {"friends": Friends})
    report.write_markdown(tmp_path / "two.md", rows, {"synthetic": Synthetic, "friends": Friends})
    assert "## Across tasks" not in (tmp_path / "one.md").read_text()
    assert "## Across tasks" in (tmp_path / "two.md").read_text()


def _folder(path: Path, rows: list[dict[str, str]]) -> Path:
    path.mkdir()
    with (path / report.RESULTS).open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_compare_folders_joins_one_task_per_folder_and_refuses_bad_input(tmp_path: Path) -> None:
    rows = _two_tasks()
    tasks = {"synthetic": Synthetic, "friends": Friends}
    a = _folder(tmp_path / "a", [r for r in rows if r["task"] == "synthetic"])
    b = _folder(tmp_path / "b", [r for r in rows if r["task"] == "friends"])
    assert report.compare_folders([a, b], tasks) == report.across_tasks(rows, tasks)
    with pytest.raises(ValueError, match="task 'synthetic' is in both"):
        report.compare_folders([a, a], tasks)
    with pytest.raises(ValueError, match=r"holds no results\.csv"):
        report.compare_folders([tmp_path], tasks)
    with pytest.raises(ValueError, match=r"task 'friends' is not registered \(known: \['synthetic'\]\)"):
        report.compare_folders([a, b], {"synthetic": Synthetic})
    lone = _folder(tmp_path / "c", [r for r in rows if r["task"] == "friends" and r["method"] != "frozen"])
    with pytest.raises(ValueError, match="has both the frozen reference and an adapter"):
        report.compare_folders([lone], tasks)
