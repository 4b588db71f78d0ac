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
    adapter: int = 1024,
    peak: int = 300,
) -> dict[str, str]:
    """A run at the budget 1024 with ``adapter`` adapter parameters and a head of 132; ``matched``
    is the ``budget_matched`` flag as the file records it (rows written before the runner judged the
    measured count could say ``yes`` for a count off the budget)."""
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
        adapter_params=str(adapter),
        trainable_params=str(adapter + 132),
        budget_matched=matched,
        train_time_s="2.0",
        peak_memory_mb=str(peak),
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
        _row("loldu", 0, {"perplexity": 25.0}, task="friends", matched="no", adapter=64),
    ]
    table = report.task_table(rows, Friends)
    assert "**20.00**" in next(line for line in table.splitlines() if line.startswith("| lora "))
    assert "| 64 † | 196 |" in next(line for line in table.splitlines() if line.startswith("| loldu "))


def _line(table: str, method: str) -> str:
    return next(line for line in table.splitlines() if line.startswith(f"| {method} "))


def test_counts_that_differ_by_seed_show_their_range_and_one_seed_off_the_budget_marks_the_row() -> None:
    accuracy = {"accuracy": 0.8, "macro_f1": 0.8}
    # GoRA's allocation gives each seed its own count; seed 2's 900 is 12% under the budget of 1024.
    # The file says "yes" for all three, as rows written from the budget search's count did.
    gora = [_row("gora", seed, accuracy, adapter=count) for seed, count in enumerate((1000, 1024, 900))]
    lora = [_row("lora", seed, accuracy, adapter=count) for seed, count in enumerate((1000, 1024))]  # within 10%
    stale = [_row("bone", 0, accuracy, matched="no")]  # a flag that the counts contradict
    frozen = [_row("frozen", seed, accuracy, matched="n/a", adapter=0) for seed in (0, 1)]  # a reference
    table = report.task_table([*gora, *lora, *stale, *frozen], Synthetic)
    assert "| gora | rank=8 | 900–1,024 † | 1,032–1,156 | 0.001 | 3 |" in _line(table, "gora")
    assert "| lora | rank=8 | 1,000–1,024 | 1,132–1,156 | 0.001 | 2 |" in _line(table, "lora")
    assert "| bone | rank=8 | 1,024 | 1,156 |" in _line(table, "bone")
    assert "| frozen | rank=8 | 0 | 132 |" in _line(table, "frozen")
    rows, _ = report.aggregate([*gora, *frozen], Synthetic)
    assert [(row.method, row.matched, row.trainable_mean) for row in rows] == [
        ("gora", "no", (1132 + 1156 + 1032) / 3),
        ("frozen", "n/a", 132.0),
    ]


def test_the_metric_plot_places_a_row_at_its_mean_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    placed = {}

    def savefig(self: Figure, path: Path, **_: object) -> None:
        placed.update({c.get_label(): c.lines[0].get_xdata()[0] for c in self.axes[0].containers})

    monkeypatch.setattr(Figure, "savefig", savefig)
    accuracy = {"accuracy": 0.8, "macro_f1": 0.8}
    rows = [_row("gora", seed, accuracy, adapter=count) for seed, count in enumerate((868, 892, 1024))]
    report.plot_metric_vs_params(tmp_path / "plot.png", [*rows, _row("full", 0, accuracy, adapter=90000)], Synthetic)
    assert placed == {"gora": 1060.0, "full": 90132.0}  # (1000 + 1024 + 1156) / 3: a lone point stays put


def test_peak_memory_is_the_smallest_over_the_seeds() -> None:
    # Rows written while the runner kept earlier models alive: later seeds carried them in their peak.
    rows = [
        _row("lora", seed, {"accuracy": 0.8, "macro_f1": 0.8}, peak=mb) for seed, mb in enumerate((1650, 1823, 1912))
    ]
    assert _line(report.task_table(rows, Synthetic), "lora").endswith("| 2.0 | 1650 |")


def test_two_selected_runs_of_one_seed_or_of_two_rates_are_refused(tmp_path: Path) -> None:
    accuracy = {"accuracy": 0.8, "macro_f1": 0.8}
    rows = [_row("lora", seed, accuracy) for seed in (0, 1, 2)]
    again = {**_row("lora", 1, accuracy), "lr_factor": "3.162"}  # seed 1 again, at another rate
    with pytest.raises(
        ValueError,
        match=r"^task 'synthetic', method 'lora': more than one selected run for seed 1 \(lr_factor 1, 3\.162\); "
        r"the runner writes one per seed: delete the extra rows from results\.csv$",
    ):
        report.aggregate([*rows, again], Synthetic)
    later = [{**_row("lora", seed, accuracy), "lr_factor": "3.162"} for seed in (3, 4)]
    with pytest.raises(
        ValueError,
        match=r"^task 'synthetic', method 'lora': the selected runs are at several learning rates \(lr_factor 1 "
        r"for seed 0, 1, 2; lr_factor 3\.162 for seed 3, 4\); a row averages the seeds of one rate: delete the "
        r"rows of the other rates from results\.csv and run those seeds again$",
    ):
        report.task_table([*rows, *later], Synthetic)
    (tmp_path / report.REPORT).write_text("the report before")
    with pytest.raises(ValueError, match="more than one selected run for seed 1"):
        report.write(tmp_path, [*rows, again], {"synthetic": Synthetic})
    assert [path.name for path in tmp_path.iterdir()] == [report.REPORT]  # no plot written
    assert (tmp_path / report.REPORT).read_text() == "the report before"


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


def test_a_task_where_no_adapter_beats_frozen_says_so_and_still_counts_for_the_top_group() -> None:
    rows = _two_tasks()
    # tweets: frozen 0.90; dora 0.85 is the best adapter and below it, so there is no gain to share.
    accuracy = {"frozen": (0.90, 0.90), "lora": (0.80, 0.82), "dora": (0.84, 0.86)}
    for method, values in accuracy.items():
        rows += [_row(method, seed, {"accuracy": v, "macro_f1": v}, task="tweets") for seed, v in enumerate(values)]
    text = report.across_tasks(rows, {"synthetic": Synthetic, "friends": Friends, "tweets": Tweets})
    table = [[cell.strip() for cell in row.strip("|").split("|")] for row in text.splitlines() if row.startswith("| ")]
    line = {cells[0]: cells[1:] for cells in table}
    assert line["method"] == ["synthetic", "friends", "tweets", "mean share", "top group"]
    # The means leave tweets out; dora leads it (★), lora trails by 0.04, more than 2 sd (0.028).
    assert line["lora"] == ["100 ★", "89", "n/a", "94", "1 of 3"]
    assert line["dora"] == ["93 ★", "100 ★", "n/a ★", "96", "3 of 3"]
    assert line["frozen"] == ["0", "0", "n/a", "0", "–"]
    assert line["full"] == ["–", "135", "–", "135", "–"]
    assert (
        "n/a: no adapter beats the frozen model on tweets, so there is no gain to share;\n"
        "the mean share leaves the task out, the top group counts it." in text
    )


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
