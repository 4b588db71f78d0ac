"""Compressed checkpoints (save_compressed / load_compressed): the tensor file's digest, and the
refusals of files that would load wrong into the model given: corrupted tensors, two values for one
tied tensor, a layer registered at two paths. Each refusal leaves the model and the files as they
were."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from _checkpoints import edit_json
from torch import nn

import rankwise as rw
from rankwise.compress import LowRankLinear, load_compressed, lord, save_compressed


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


class TwoBlocks(nn.Module):
    """``a`` and ``b``, or one block registered at both paths (``shared``)."""

    def __init__(self, shared: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = Block()
        self.b = self.a if shared else Block()
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.b(torch.tanh(self.a(x))))


class TinyLM(nn.Module):
    """An embedding, a body layer and a head, the head tied to the embedding (``tied``) or not."""

    def __init__(self, tied: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, 16)
        self.body = nn.Linear(16, 16)
        self.head = nn.Linear(16, 20, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(self.embed(ids))))


def _blocks(*targets: str) -> Callable[[], nn.Module]:
    def compressed() -> nn.Module:
        model = TwoBlocks()
        lord(model, targets=targets, rank_ratio=0.25)
        return model

    return compressed


def _untied_lm() -> nn.Module:
    """Head and embedding of equal shape but trained apart, so their values differ."""
    model = TinyLM(tied=False)
    with torch.no_grad():
        model.head.weight.add_(0.5)
    lord(model, targets=("body",), rank_ratio=0.5)
    return model


def _flip_bit(folder: Path) -> None:
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40  # in the last tensor's bytes: the header still reads
    path.write_bytes(bytes(data))


@dataclass
class Case:
    id: str
    saved: Callable[[], nn.Module]  # the compressed model saved
    model: Callable[[], nn.Module]  # the model loaded into
    match: str
    corrupt: Callable[[Path], None] | None = None  # damage applied to the files first


CASES = [
    Case(
        "one bit of the tensor file flipped",
        _blocks("a.lin"),
        TwoBlocks,
        r"model.safetensors is truncated or corrupted: its checksum differs from the one in compression.json",
        corrupt=_flip_bit,
    ),
    Case(
        "digest not a string",
        _blocks("a.lin"),
        TwoBlocks,
        r"compression.json: 'tensors_sha256' must be a string, not 5",
        corrupt=edit_json("compression.json", lambda layout: layout.update(tensors_sha256=5)),
    ),
    Case(
        "two values for a tied head and embedding",
        _untied_lm,
        lambda: TinyLM(tied=True),
        r"model.safetensors holds different values for 'embed.weight' and 'head.weight', which this model ties "
        r"to one tensor: loading would keep one of them. Load it into a model that holds them apart",
    ),
    Case(
        "two values for an uncompressed module registered at two paths",
        _blocks("out"),
        lambda: TwoBlocks(shared=True),
        r"holds different values for 'a.lin.bias' and 'b.lin.bias', 'a.lin.weight' and 'b.lin.weight', which "
        r"this model ties to one tensor",
    ),
    Case(
        "a compressed layer registered at both paths the file names",
        _blocks("a.lin", "b.lin"),
        lambda: TwoBlocks(shared=True),
        r"does not fit the model: 'a.lin' is the same module as \['b.lin'\]; replacing it at one path would leave "
        r"the others unchanged",
    ),
    Case(
        "a compressed layer registered at a second path the file does not name",
        _blocks("a.lin"),
        lambda: TwoBlocks(shared=True),
        r"does not fit the model: 'a.lin' is the same module as \['b.lin'\]",
    ),
    Case(
        "a compressed layer named by its second path",
        _blocks("b.lin"),
        lambda: TwoBlocks(shared=True),
        r"does not fit the model: 'b.lin' is the same module as \['a.lin'\]",
    ),
]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_checkpoint_that_would_load_wrong_is_refused_and_changes_nothing(case: Case, tmp_path: Path) -> None:
    save_compressed(case.saved(), tmp_path)
    if case.corrupt:
        case.corrupt(tmp_path)
    files = _files(tmp_path)
    model = case.model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [(path, type(m)) for path, m in model.named_modules(remove_duplicate=False)]
    grads = {k: p.requires_grad for k, p in model.named_parameters()}

    with pytest.raises(rw.CheckpointError, match=case.match):
        load_compressed(model, tmp_path)

    assert [(path, type(m)) for path, m in model.named_modules(remove_duplicate=False)] == modules
    assert {k: p.requires_grad for k, p in model.named_parameters()} == grads
    after = model.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], v) for k, v in state.items())
    assert _files(tmp_path) == files


def test_the_layout_records_the_digest_of_the_tensor_file(tmp_path: Path) -> None:
    save_compressed(_blocks("a.lin")(), tmp_path)
    layout = json.loads((tmp_path / "compression.json").read_text())
    assert layout["tensors_sha256"] == hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()


def test_a_checkpoint_saved_before_the_digest_was_recorded_still_loads(tmp_path: Path) -> None:
    saved = _blocks("a.lin")()
    save_compressed(saved, tmp_path)
    edit_json("compression.json", lambda layout: layout.pop("tensors_sha256"))(tmp_path)
    model = load_compressed(TwoBlocks(), tmp_path)
    assert isinstance(model.a.lin, LowRankLinear) and isinstance(model.b.lin, nn.Linear)
    x = torch.randn(3, 16)
    assert torch.equal(model(x), saved(x))


def test_a_tie_saved_from_a_tied_model_loads_and_stays_tied(tmp_path: Path) -> None:
    saved = TinyLM(tied=True)
    with torch.no_grad():
        saved.head.weight.add_(0.5)  # the embedding too: they are one parameter
    lord(saved, targets=("body",), rank_ratio=0.5)
    save_compressed(saved, tmp_path)
    model = load_compressed(TinyLM(tied=True), tmp_path)
    assert model.head.weight is model.embed.weight
    assert torch.equal(model.embed.weight, saved.embed.weight)
    ids = torch.arange(10)
    assert torch.equal(model(ids), saved(ids))


def test_an_uncompressed_module_registered_at_two_paths_loads_equal_values(tmp_path: Path) -> None:
    saved = TwoBlocks(shared=True)
    lord(saved, targets=("out",), rank_ratio=0.25)
    save_compressed(saved, tmp_path)
    model = load_compressed(TwoBlocks(shared=True), tmp_path)
    assert model.a is model.b and isinstance(model.out, LowRankLinear)
    x = torch.randn(3, 16)
    assert torch.equal(model(x), saved(x))
