"""Bad input beyond adapters and checkpoints (those are in tests/core/test_errors.py): allocator
budgets, compression ratios and CLI arguments. Each raises the documented error naming the
problem and leaves the model and files as they were."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.cli import main as cli


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))


def _adalora() -> nn.Module:
    return rw.adapt(_mlp(), rw.AdaLoRAConfig(rank=4, targets=("0", "2")))


def _conv() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.LazyLinear(2))


def _lora() -> nn.Module:
    return rw.adapt(_mlp(), rw.LoRAConfig(rank=2, targets=("0",)))


def _ard_lora() -> nn.Module:
    return rw.adapt(_mlp(), rw.ARDLoRAConfig(rank=2, targets=("0", "2")))


CASES: list[tuple[str, Callable[[], nn.Module], Callable[[nn.Module], object], str]] = [
    (
        "allocator on a model without adapters",
        _mlp,
        lambda m: rw.allocate.AdaLoRAAllocator(m, total_steps=10),
        "no rankwise adapters",
    ),
    ("allocator total_steps 0", _adalora, lambda m: rw.allocate.AdaLoRAAllocator(m, total_steps=0), "total_steps=0"),
    (
        "AdaLoRA budget above the starting rank",
        _adalora,
        lambda m: rw.allocate.AdaLoRAAllocator(m, total_steps=10, budget=100),
        "budget=100",
    ),
    (
        "ElaLoRA moment fill",
        lambda: rw.adapt(_mlp(), rw.ElaLoRAConfig(targets=("0", "2"))),
        lambda m: rw.allocate.ElaLoRAAllocator(m, total_steps=10, moment_fill="median"),
        "moment_fill='median'",
    ),
    (
        "GoRA with no batches",
        lambda: rw.adapt(_mlp(), rw.GoRAConfig(rank=2, targets=("0", "2"))),
        lambda m: rw.allocate.gora(m, []),
        "batches is empty",
    ),
    (
        "GoRA sign",
        lambda: rw.adapt(_mlp(), rw.GoRAConfig(rank=2, targets=("0", "2"))),
        lambda m: rw.allocate.gora(m, [torch.randn(2, 8)], sign=0),
        "sign=0",
    ),
    ("LoRD rank ratio 0", _mlp, lambda m: rw.compress.lord(m, targets=("0",), rank_ratio=0.0), "rank_ratio=0.0"),
    ("LoRD rank ratio above 1", _mlp, lambda m: rw.compress.lord(m, targets=("0",), rank_ratio=1.5), "rank_ratio=1.5"),
    (
        "LoRD energy and ratio both",
        _mlp,
        lambda m: rw.compress.lord(m, targets=("0",), rank_ratio=0.5, energy=0.9),
        "rank_ratio",
    ),
    ("LoRD target missing", _mlp, lambda m: rw.compress.lord(m, targets=("q_proj",), rank_ratio=0.5), "q_proj"),
    ("TRP energy 0", _conv, lambda m: rw.compress.TRP(m, energy=0.0), "energy=0.0"),
    ("TRP period 0", _conv, lambda m: rw.compress.TRP(m, period=0), "period=0"),
    (
        "LoRD on an adapted model",
        _lora,
        lambda m: rw.compress.lord(m, rank_ratio=0.5),
        "lord: '0' is already adapted \\(lora\\); unwrap",
    ),
    (
        "LoRD on an adapted layer",
        _lora,
        lambda m: rw.compress.lord(m, targets=("0",), rank_ratio=0.5),
        "lord: '0' is already adapted",
    ),
    (
        "LoRD calibration on an adapted layer",
        _lora,
        lambda m: rw.compress.calibrate(m, [torch.randn(2, 8)], targets=("0",)),
        "calibrate: '0' is already adapted",
    ),
    ("TRP on an adapted layer", _lora, lambda m: rw.compress.TRP(m, targets=("0",)), "TRP: '0' is already adapted"),
    (
        "Cuttlefish on an adapted layer",
        _lora,
        lambda m: rw.compress.Cuttlefish(m, targets=("0",)),
        "Cuttlefish: '0' is already adapted",
    ),
    (
        "LoRD invalid regex target",
        _mlp,
        lambda m: rw.compress.lord(m, targets=("re:[0-",), rank_ratio=0.5),
        "lord: target 're:\\[0-' is not a valid regular expression",
    ),
    (
        "LoRD energy NaN",
        _mlp,
        lambda m: rw.compress.lord(m, energy=float("nan")),
        "lord: energy=nan must be a finite number",
    ),
    (
        "TRP nuclear weight NaN",
        _conv,
        lambda m: rw.compress.TRP(m, nuclear_weight=float("nan")),
        "TRP: nuclear_weight=nan must be a finite number",
    ),
    (
        "TRP energy NaN",
        _conv,
        lambda m: rw.compress.TRP(m, energy=float("nan")),
        "TRP: energy=nan must be a finite number",
    ),
    (
        "Cuttlefish tolerance NaN",
        _conv,
        lambda m: rw.compress.Cuttlefish(m, tolerance=float("nan")),
        "Cuttlefish: tolerance=nan must be a finite number",
    ),
    (
        "Cuttlefish Frobenius decay inf",
        _conv,
        lambda m: rw.compress.Cuttlefish(m, frobenius_decay=float("inf")),
        "Cuttlefish: frobenius_decay=inf must be a finite number",
    ),
    (
        "Cuttlefish relax factor NaN",
        _conv,
        lambda m: rw.compress.Cuttlefish(m, relax=((1, float("nan")),)),
        "relax factor=nan must be a finite number",
    ),
    (
        "LoRAE nuclear weight NaN",
        _mlp,
        lambda m: rw.compress.LoRAE(m, m, 8, nuclear_weight=float("nan")),
        "LoRAE: nuclear_weight=nan must be a finite number",
    ),
    (
        "AdaLoRA orthogonality weight NaN",
        _adalora,
        lambda m: rw.allocate.AdaLoRAAllocator(m, total_steps=10, orth_weight=float("nan")),
        "AdaLoRAAllocator: orth_weight=nan must be a finite number",
    ),
    (
        "AdaLoRA beta1 NaN",
        _adalora,
        lambda m: rw.allocate.AdaLoRAAllocator(m, total_steps=10, beta1=float("nan")),
        "AdaLoRAAllocator: beta1=nan must be a finite number",
    ),
    (
        "ARD-LoRA l1 inf",
        _ard_lora,
        lambda m: rw.allocate.ARDLoRAAllocator(m, total_steps=10, l1=float("inf")),
        "ARDLoRAAllocator: l1=inf must be a finite number",
    ),
    (
        "GoRA step size inf",
        lambda: rw.adapt(_mlp(), rw.GoRAConfig(rank=2, targets=("0", "2"))),
        lambda m: rw.allocate.gora(m, [torch.randn(2, 8)], step_size=float("inf")),
        "gora: step_size=inf must be a finite number",
    ),
]


@pytest.mark.parametrize(("build", "call", "match"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_values_raise_and_change_nothing(build, call, match) -> None:
    model = build()
    before = {
        k: v.detach().clone()
        for k, v in model.state_dict().items()
        if not isinstance(v, nn.parameter.UninitializedParameter)
    }
    modules = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=match):
        call(model)
    assert [type(m) for m in model.modules()] == modules
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_cli_errors_name_the_problem(tmp_path: Path, capsys) -> None:
    model = rw.adapt(_mlp(), rw.LoRAConfig(rank=2, targets="0"))
    rw.save_adapter(model, tmp_path / "adapter")
    keep = tmp_path / "out"
    keep.mkdir()
    (keep / "precious.txt").write_text("keep me")

    assert cli(["inspect", str(tmp_path / "nowhere")]) == 2
    assert "nowhere/adapter_config.json does not exist" in capsys.readouterr().err
    assert cli(["merge", "--model", str(tmp_path), "--adapter", str(tmp_path / "adapter"), "--out", str(keep)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert (keep / "precious.txt").read_text() == "keep me" and len(list(keep.iterdir())) == 1
    assert cli(["bench", "--methods", "lorax", "--tasks", "synthetic", "--out", str(tmp_path / "b")]) == 2
    assert "lorax" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli(["bench", "--preset", "huge"])
    assert exit_info.value.code == 2 and "huge" in capsys.readouterr().err
