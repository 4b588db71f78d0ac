"""No pickle anywhere, and checkpoints cannot name code or paths."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from torch import nn

import rankwise as rw

SOURCE = Path(rw.__file__).parent


def test_the_package_never_unpickles() -> None:
    offenders = []
    for path in SOURCE.rglob("*.py"):
        text = path.read_text()
        if re.search(r"^\s*(import pickle|from pickle|import dill)", text, re.M):
            offenders.append(f"{path.name}: imports pickle")
        for call in re.findall(r"(?<![\w.])torch\.load\([^)]*\)", text):
            if "weights_only=True" not in call:
                offenders.append(f"{path.name}: {call}")
    assert offenders == []


def test_a_checkpoint_path_cannot_point_outside_the_model(tmp_path) -> None:
    model = rw.adapt(nn.Sequential(nn.Linear(4, 4)), rw.LoRAConfig(rank=1, targets="0"))
    rw.save_adapter(model, tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    meta["modules"] = {"../../etc/passwd": meta["modules"]["0"]}
    (tmp_path / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(rw.CheckpointError, match="is not in the model"):
        rw.load_adapter(nn.Sequential(nn.Linear(4, 4)), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors", "adapter_config.json"]


def test_a_method_name_is_looked_up_never_imported(tmp_path) -> None:
    model = rw.adapt(nn.Sequential(nn.Linear(4, 4)), rw.LoRAConfig(rank=1, targets="0"))
    rw.save_adapter(model, tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    meta["method"] = "os:system"
    (tmp_path / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(rw.CheckpointError, match="unknown method 'os:system'"):
        rw.load_adapter(nn.Sequential(nn.Linear(4, 4)), tmp_path)
