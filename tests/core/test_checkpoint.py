"""The checkpoint format: contents, per-layer configs, atomic writes."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import safetensors.torch
import torch
from torch import nn

import rankwise as rw
from rankwise.core import checkpoint
from rankwise.core.inject import adapted_modules, build


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))


def test_files_hold_the_documented_keys(tmp_path) -> None:
    model = rw.adapt(_model(), rw.DoRAConfig(rank=3, targets=("0", "2")))
    rw.save_adapter(model, tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["method"] == "dora" and meta["rankwise_version"] == rw.__version__
    assert meta["config"]["rank"] == 3 and meta["config"]["targets"] == ["0", "2"]
    assert meta["modules"]["2"] == {"base": "linear", "in_features": 5, "out_features": 4, "config": {}}
    tensors = safetensors.torch.load_file(tmp_path / "adapter.safetensors")
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        "0.delta.A": (3, 6), "0.delta.B": (5, 3), "0.delta.magnitude": (5,),
        "2.delta.A": (3, 5), "2.delta.B": (4, 3), "2.delta.magnitude": (4,),
    }
    assert sorted(os.listdir(tmp_path)) == ["adapter.safetensors", "adapter_config.json"]


def test_a_layer_with_its_own_rank_round_trips(tmp_path) -> None:
    """What a rank allocator leaves behind: one layer rebuilt at another rank."""
    model = rw.adapt(_model(), rw.LoRAConfig(rank=3, targets=("0", "2")))
    shared = model[2].config
    model[2] = build(_model(), "2", shared, dataclasses.replace(shared, rank=1))  # same base weights
    nn.init.normal_(model[2].delta.B)
    rw.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules"]["2"]["config"] == {"rank": 1}
    loaded = rw.load_adapter(_model(), tmp_path)
    assert loaded[2].delta.A.shape == (1, 5) and loaded[0].delta.A.shape == (3, 6)
    x = torch.randn(2, 6)
    assert torch.equal(loaded(x), model(x))


def test_an_interrupted_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch) -> None:
    first = rw.adapt(_model(), rw.LoRAConfig(rank=2, targets="0"))
    rw.save_adapter(first, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    second = rw.adapt(_model(), rw.LoRAConfig(rank=4, targets="0"))

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        rw.save_adapter(second, tmp_path)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporary left either
    loaded = rw.load_adapter(_model(), tmp_path)
    assert next(layer for _, layer in adapted_modules(loaded)).delta.A.shape == (2, 6)


def test_config_json_round_trip_and_string_targets() -> None:
    config = rw.LoRAConfig(rank=4, alpha=3.5, rslora=True, targets="q_proj", trainable=["score"])
    assert config.targets == ("q_proj",) and config.trainable == ("score",)
    assert rw.LoRAConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert rw.make_config("dora", rank=2) == rw.DoRAConfig(rank=2)
    assert rw.methods()[:2] == ["lora", "dora"]
