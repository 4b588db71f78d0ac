"""``plot`` writes a PNG of the ranks over steps; ``rank_summary`` tabulates the final ranks."""

from __future__ import annotations

import pytest

from rankwise.allocate import History, plot, rank_summary

matplotlib_image = pytest.importorskip("matplotlib.image")


def _history() -> History:
    history = History(("layers.0.q", "layers.1.q", "layers.2.q"))
    for step in range(20):
        moved = min(step // 5, 3)  # rank moves from layer 0 to layer 2 over the run
        history.record(step, {"layers.0.q": 4 - moved, "layers.1.q": 4, "layers.2.q": 4 + moved}, 12, 12)
    return history


def test_plot_writes_a_png_of_the_ranks(tmp_path) -> None:
    path = plot(_history(), tmp_path / "ranks.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib_image.imread(path)
    assert image.shape[0] > 200 and image.shape[1] > 400
    assert image[..., :3].std() > 0.05  # something was drawn, not a blank canvas


def test_rank_summary_shows_first_and_final_ranks_and_the_budget() -> None:
    lines = rank_summary(_history()).splitlines()
    assert lines[0].split() == ["layer", "rank", "at", "step", "0", "rank", "at", "step", "19"]
    assert lines[1].split() == ["layers.0.q", "4", "1"]
    assert lines[3].split() == ["layers.2.q", "4", "7"]
    assert lines[-1] == "total (rank): 12; budget: 12"


def test_an_empty_history_raises() -> None:
    with pytest.raises(ValueError, match="empty"):
        rank_summary(History(("a",)))
    with pytest.raises(ValueError, match="empty"):
        plot(History(("a",)), "unused.png")
