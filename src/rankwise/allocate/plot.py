"""Reading a rank history: ``rank_summary`` (a table of final ranks) and ``plot`` (a PNG over steps)."""

from __future__ import annotations

import os
from pathlib import Path

from .base import History


def rank_summary(history: History) -> str:
    """A table of each layer's rank at the first and the last recorded step, then the total."""
    if not history.ranks:
        raise ValueError("the history is empty: no allocator step has run")
    first, last = history.ranks[0], history.ranks[-1]
    rows = [(path, _fmt(start), _fmt(end)) for path, start, end in zip(history.paths, first, last, strict=True)]
    header = ("layer", f"rank at step {history.steps[0]}", f"rank at step {history.steps[-1]}")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    budget = history.budgets[-1]
    budget_text = "none" if budget is None else _fmt(budget)
    lines.append(f"total ({history.unit}): {_fmt(history.totals[-1])}; budget: {budget_text}")
    return "\n".join(lines)


def plot(history: History, path: str | os.PathLike) -> Path:
    """Draw the ranks per layer over the steps (a heat map, one row per layer) above the total
    against the budget, and save it as a PNG at ``path``; returns the path.

    Raises:
        ValueError: the history is empty.
        ImportError: matplotlib is not installed (``pip install matplotlib``).
    """
    if not history.ranks:
        raise ValueError("the history is empty: no allocator step has run")
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: never open a window
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("rankwise.allocate.plot needs matplotlib: pip install matplotlib") from error

    columns = list(zip(*history.ranks, strict=True))  # one row per layer
    height = max(2.0, 0.25 * len(history.paths))  # a readable row per layer
    figure, (top, bottom) = plt.subplots(
        2, 1, figsize=(9, height + 2.5), height_ratios=(height, 2), sharex=True, constrained_layout=True
    )
    first, last = history.steps[0], history.steps[-1]
    image = top.imshow(
        columns,
        aspect="auto",
        interpolation="nearest",
        cmap="viridis",
        extent=(first - 0.5, last + 0.5, len(history.paths) - 0.5, -0.5),
    )
    top.set_yticks(range(len(history.paths)), [p or "<root>" for p in history.paths], fontsize=7)
    top.set_title("rank per layer")
    figure.colorbar(image, ax=top, label="rank")
    bottom.plot(history.steps, history.totals, label="total")
    if any(b is not None for b in history.budgets):
        bottom.plot(history.steps, [float("nan") if b is None else b for b in history.budgets], "--", label="budget")
    bottom.set_xlabel("optimizer step")
    bottom.set_ylabel(history.unit)
    bottom.legend(loc="best")
    path = Path(path)
    figure.savefig(path, format="png", dpi=100)
    plt.close(figure)
    return path


def _fmt(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
