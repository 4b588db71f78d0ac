"""The checkpoint format: contents, per-layer configs, atomic writes."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

import rankwise as rw
from rankwise.compress import checkpoint as compressed_checkpoint
from rankwise.compress import load_compressed, lord, save_compressed
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
    assert meta["modules"]["2"] == {
        "base": "linear",
        "in_features": 5,
        "out_features": 4,
        "weight_shape": [4, 5],
        "config": {},
    }
    tensors = safetensors.torch.load_file(tmp_path / "adapter.safetensors")
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        "0.delta.A": (3, 6),
        "0.delta.B": (5, 3),
        "0.delta.magnitude": (5,),
        "2.delta.A": (3, 5),
        "2.delta.B": (4, 3),
        "2.delta.magnitude": (4,),
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


def _lora(rank: int) -> nn.Module:
    model = rw.adapt(_model(), rw.LoRAConfig(rank=rank, targets=("0", "2")))
    nn.init.normal_(model[0].delta.B)
    return model


def _lord(*targets: str) -> nn.Module:
    model = _model()
    lord(model, targets=targets, rank_ratio=0.5)
    return model


@dataclasses.dataclass
class Format:
    """A checkpoint format: how to save, and what a fresh model loads from a folder."""

    id: str
    save: Callable[[nn.Module, Path], object]
    load: Callable[[Path], dict[str, torch.Tensor]]
    first: Callable[[], nn.Module]
    second: Callable[[], nn.Module]  # saved over the first
    files: tuple[str, str]  # (written first, the commit)
    mixed: str  # the error for a pair from two saves


FORMATS = [
    Format(
        "adapter",
        rw.save_adapter,
        lambda f: rw.adapter_state_dict(rw.load_adapter(_model(), f)),
        lambda: _lora(2),
        lambda: _lora(4),
        ("adapter.safetensors", "adapter_config.json"),
        "checksum differs",
    ),
    Format(
        "compressed",
        save_compressed,
        lambda f: load_compressed(_model(), f).state_dict(),
        lambda: _lord("0", "2"),
        lambda: _lord("2"),
        ("model.safetensors", "compression.json"),
        "come from two different saves",
    ),
]

# Every file-system call the savers make, directly or through tempfile and pathlib; safetensors'
# save_file writes a whole file in Rust, so it counts as one call.
_CALLS = [(os, name) for name in ("open", "write", "fsync", "close", "replace", "unlink", "mkdir")]
_CALLS += [(tempfile, "mkstemp"), (compressed_checkpoint, "save_file")]


class _Faults:
    """Records the file-system calls made while installed; the ``fail_at``-th (1-based) raises ENOSPC."""

    def __init__(self, patch: pytest.MonkeyPatch, fail_at: int | None = None) -> None:
        self.calls: list[str] = []
        self.fail_at = fail_at
        for module, name in _CALLS:
            patch.setattr(module, name, self._wrap(name, getattr(module, name)))

    def _wrap(self, name: str, real: Callable) -> Callable:
        def call(*args, **kwargs):
            self.calls.append(name)
            if len(self.calls) == self.fail_at:
                raise OSError(errno.ENOSPC, f"injected failure of {name}")
            return real(*args, **kwargs)

        return call


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("fmt", FORMATS, ids=[f.id for f in FORMATS])
def test_a_failure_at_any_file_system_call_of_a_save_keeps_the_previous_checkpoint(fmt, tmp_path, monkeypatch) -> None:
    first, second = fmt.first(), fmt.second()

    def previous(name: str) -> Path:
        fmt.save(first, tmp_path / name)
        return tmp_path / name

    old = fmt.load(previous("first"))
    folder = previous("counted")
    with monkeypatch.context() as patch:
        calls = _Faults(patch).calls
        fmt.save(second, folder)
    new = fmt.load(folder)
    assert {"mkstemp", "fsync", "replace"} <= set(calls)
    assert not _same(old, new)

    for index, name in enumerate(calls, start=1):
        folder = previous(f"fail-{index}")
        before = _files(folder)
        with monkeypatch.context() as patch:
            _Faults(patch, fail_at=index)
            try:
                fmt.save(second, folder)
                error = None
            except OSError as raised:
                error = raised
        where = f"failure of call {index} ({name})"
        if error is None:  # only making the existing folder may fail unnoticed
            assert name == "mkdir", where
            assert sorted(_files(folder)) == sorted(before), where
            assert _same(fmt.load(folder), new), where
        elif "new files are in place" in str(error):  # after the commit: an old version is left over
            leftovers = sorted(set(_files(folder)) - set(before))
            assert len(leftovers) == 1 and leftovers[0].endswith(".old") and leftovers[0] in str(error), where
            assert _same(fmt.load(folder), new), where
        else:
            assert _files(folder) == before, where  # the old bytes, and no temporary file
            assert _same(fmt.load(folder), old), where


@pytest.mark.parametrize("fmt", FORMATS, ids=[f.id for f in FORMATS])
def test_files_from_two_saves_refuse_to_load(fmt, tmp_path) -> None:
    """What a crash between a save's two renames leaves: one new file beside one old one."""
    fmt.save(fmt.first(), tmp_path / "old")
    fmt.save(fmt.second(), tmp_path / "new")
    for renamed in fmt.files:
        mixed = tmp_path / f"mixed-{renamed}"
        mixed.mkdir()
        for name in fmt.files:
            (mixed / name).write_bytes((tmp_path / ("new" if name == renamed else "old") / name).read_bytes())
        with pytest.raises(rw.CheckpointError, match=fmt.mixed):
            fmt.load(mixed)


def test_a_compiled_model_saves_and_loads_the_paths_of_the_plain_model(tmp_path) -> None:
    model = _lora(2)
    rw.save_adapter(torch.compile(model, backend="eager"), tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(meta["modules"]) == ["0", "2"]
    assert set(safetensors.torch.load_file(tmp_path / "adapter.safetensors")) == {
        "0.delta.A",
        "0.delta.B",
        "2.delta.A",
        "2.delta.B",
    }
    x = torch.randn(3, 6)
    assert torch.equal(rw.load_adapter(_model(), tmp_path)(x), model(x))

    compiled = rw.load_adapter(torch.compile(_model(), backend="eager"), tmp_path)
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)
    torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=1e-6)


def _headed() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))


def _headed_pair(generator: torch.Generator) -> nn.Module:
    """ "default" (which names the trainable head) and "b" on layer 0; the adapters and the head
    perturbed, the frozen base not."""
    model = rw.adapt(_headed(), rw.LoRAConfig(rank=2, targets=("0",), trainable=("2",)))
    rw.adapt(model, rw.LoRAConfig(rank=2, targets=("0",)), name="b")
    rw.set_active(model, "b")
    with torch.no_grad():
        for key, p in model.named_parameters():
            if not key.startswith("0.base."):
                p.add_(torch.randn(p.shape, generator=generator))
    return model


def test_each_named_adapter_saves_the_models_trainable_head_it_trained_with(tmp_path) -> None:
    # The head is the model's, trained with every adapter: an adapter saved without it would load
    # onto the untrained head and compute something else, silently.
    generator = torch.Generator().manual_seed(1)
    model = _headed_pair(generator)
    model.eval()
    x = torch.randn(3, 8, generator=generator)
    outputs = {}
    for name in ("default", "b"):
        rw.set_active(model, name)
        outputs[name] = model(x)
    rw.save_adapter(model, tmp_path / "b", name="b")
    alone = rw.load_adapter(_headed(), tmp_path / "b").eval()
    assert torch.equal(alone(x), outputs["b"])
    assert alone[2].weight.requires_grad  # a one-adapter model trains the head, as the first adapter did

    rw.save_adapter(model, tmp_path / "all")
    both = rw.load_adapter(_headed(), tmp_path / "all" / "default")
    rw.load_adapter(both, tmp_path / "all" / "b", name="b")  # the same head: checked, not written
    both.eval()
    for name in ("default", "b"):
        rw.set_active(both, name)
        assert torch.equal(both(x), outputs[name])

    other = rw.load_adapter(_headed(), tmp_path / "all" / "default")
    with torch.no_grad():
        other[2].bias.add_(1.0)
    state = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(rw.CheckpointError, match=r"other values for the trainable modules \['2'\] \(\['2.bias'\]\)"):
        rw.load_adapter(other, tmp_path / "all" / "b", name="b")
    assert rw.adapter_names(other) == ["default"]
    assert all(torch.equal(v, state[k]) for k, v in other.state_dict().items())


def test_deleting_the_adapter_that_named_the_head_keeps_the_head_in_the_next_save(tmp_path) -> None:
    # The head is recorded on the first adapter's config; deleting that adapter once made a later
    # save of the remaining one leave the trained head out, and the load computed something else.
    generator = torch.Generator().manual_seed(2)
    model = _headed_pair(generator)
    rw.delete_adapter(model, "default")
    model.eval()
    x = torch.randn(3, 8, generator=generator)
    rw.save_adapter(model, tmp_path)
    loaded = rw.load_adapter(_headed(), tmp_path).eval()
    assert torch.equal(loaded(x), model(x))
    assert loaded[2].weight.requires_grad and rw.summary(loaded).trainable == rw.summary(model).trainable


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_folder_holds_one_layout_saves_refuse_the_other_and_loads_refuse_both(tmp_path) -> None:
    # A several-adapter save once left an older one-adapter checkpoint beside its subfolders, and
    # loading the folder silently gave the old adapter.
    one = _lora(2)
    two = _lora(4)
    rw.adapt(two, rw.LoRAConfig(rank=2, targets=("2",)), name="b")
    rw.save_adapter(one, tmp_path / "one")
    before = _tree(tmp_path / "one")
    with pytest.raises(
        rw.CheckpointError,
        match=r"one holds a one-adapter checkpoint \(adapter_config.json, adapter.safetensors\); the adapters "
        r"\['default', 'b'\] would be written beside it",
    ):
        rw.save_adapter(two, tmp_path / "one")
    assert _tree(tmp_path / "one") == before

    rw.save_adapter(two, tmp_path / "two")
    before = _tree(tmp_path / "two")
    files = ("adapter.safetensors", "adapter_config.json")
    assert sorted(before) == [f"{n}/{f}" for n in ("b", "default") for f in files]
    for name in (None, "b"):
        with pytest.raises(
            rw.CheckpointError,
            match=r"two holds adapters in the subfolders \['b', 'default'\]; one adapter's files would be written",
        ):
            rw.save_adapter(one if name is None else two, tmp_path / "two", name=name)
    assert _tree(tmp_path / "two") == before

    # Both layouts, as saves from before the refusal left them: loading either way is refused.
    for name in files:
        (tmp_path / "two" / name).write_bytes((tmp_path / "one" / name).read_bytes())
    model = _model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    both = r"holds both a one-adapter checkpoint \(adapter_config.json, adapter.safetensors\) and adapters in the "
    with pytest.raises(rw.CheckpointError, match=both + r"subfolders \['b', 'default'\], from two saves"):
        rw.load_adapter(model, tmp_path / "two")
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not list(adapted_modules(model))
    with pytest.raises(rw.CheckpointError, match=both):
        checkpoint.saved_adapters(tmp_path / "two")
    x = torch.randn(3, 6)
    rw.set_active(two, "default")
    loaded = rw.load_adapter(_model(), tmp_path / "two" / "default")  # each subfolder still loads
    assert torch.equal(loaded(x), two(x))


def _conv(*shape: int | tuple[int, int]) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(*shape))


def _conv_checkpoint(folder: Path) -> nn.Module:
    """LoRA on a 3 × 3 Conv2d(4 -> 8), saved in ``folder``: a (8, 36) matrix, like a 1 × 1 on 36 channels."""
    model = rw.adapt(_conv(4, 8, 3), rw.LoRAConfig(rank=2, targets="0"))
    nn.init.normal_(model[0].delta.B)
    rw.save_adapter(model, folder)
    return model


@pytest.mark.parametrize(
    ("shape", "found"), [((36, 8, 1), "(8, 36, 1, 1)"), ((4, 8, (1, 9)), "(8, 4, 1, 9)")], ids=["1x1", "1x9"]
)
def test_a_conv_checkpoint_refuses_another_kernel_with_the_same_flattened_size(shape, found, tmp_path) -> None:
    _conv_checkpoint(tmp_path)
    entry = json.loads((tmp_path / "adapter_config.json").read_text())["modules"]["0"]
    assert entry == {"base": "conv2d", "in_features": 36, "out_features": 8, "weight_shape": [8, 4, 3, 3], "config": {}}
    files, model = _files(tmp_path), _conv(*shape)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    message = (
        rf"layer '0' has a weight of shape {re.escape(found)}, the checkpoint expects \(8, 4, 3, 3\): "
        "the same 36 -> 8 flattened, but another kernel"
    )
    with pytest.raises(rw.CheckpointError, match=message):
        rw.load_adapter(model, tmp_path)
    assert [type(m) for m in model.modules()] == [nn.Sequential, nn.Conv2d]
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())
    assert _files(tmp_path) == files


def test_a_checkpoint_written_before_weight_shapes_were_recorded_still_loads(tmp_path) -> None:
    source = _conv_checkpoint(tmp_path)
    path = tmp_path / "adapter_config.json"
    meta = json.loads(path.read_text())
    del meta["modules"]["0"]["weight_shape"]  # the JSON is not in the checksum, which covers the tensors
    path.write_text(json.dumps(meta))
    loaded = rw.load_adapter(_conv(4, 8, 3), tmp_path)
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(loaded(x), source(x))
    with pytest.raises(rw.CheckpointError, match=r"layer '0' is 36 -> 4, the checkpoint expects 36 -> 8"):
        rw.load_adapter(_conv(36, 4, 1), tmp_path)  # in and out still checked
