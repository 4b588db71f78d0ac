"""Bad input: each case raises the documented error, with a message naming the problem, and leaves
the model and the files on disk exactly as they were."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from _checkpoints import edit_json
from torch import nn

import rankwise as rw
from rankwise.core import registry


class Net(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.proj = nn.Linear(8, width)
        self.norm = nn.LayerNorm(width)
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.proj(x)))


def _fresh(width: int = 16) -> Net:
    torch.manual_seed(0)
    return Net(width)


class RoundedLinear(nn.Linear):
    """A Linear whose class defines its own forward (a fake-quantized matmul)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.round(), self.bias)


def _own_forward() -> Net:
    model = _fresh()
    model.proj = RoundedLinear(8, 16)
    return model


def _adapted() -> Net:
    model = rw.adapt(_fresh(), rw.LoRAConfig(rank=2, targets=("proj", "head")))
    nn.init.normal_(model.proj.delta.B)
    return model


_edit_config = partial(edit_json, "adapter_config.json")  # the adapter checkpoint's metadata


@dataclass
class Case:
    id: str
    model: Callable[[], nn.Module]  # the model the call may touch
    call: Callable[[nn.Module, Path], object]  # (model, checkpoint folder) -> raises
    error: type[Exception]
    match: str
    corrupt: Callable[[Path], None] | None = None  # damage applied to the checkpoint first


def _truncate(folder: Path) -> None:
    path = folder / "adapter.safetensors"
    path.write_bytes(path.read_bytes()[:-10])


def _flip_byte(folder: Path) -> None:
    path = folder / "adapter.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))


def _rename_tensor(folder: Path) -> None:
    """A consistent checkpoint (checksum updated) whose tensor names do not fit the model."""
    tensors = safetensors.torch.load_file(folder / "adapter.safetensors")
    tensors["proj.delta.C"] = tensors.pop("proj.delta.B")
    data = safetensors.torch.save(tensors)
    (folder / "adapter.safetensors").write_bytes(data)
    _edit_config(lambda meta: meta.update(tensors_sha256=hashlib.sha256(data).hexdigest()))(folder)


def _poison(model: nn.Module) -> None:
    with torch.no_grad():
        model.head.delta.B.fill_(float("inf"))


def _tied() -> Net:
    """The adapted head's weight is also an embedding's, as an LM head tied to its input embedding."""
    model = _fresh()
    model.embed = nn.Embedding(2, 16)
    model.embed.weight = model.head.weight
    model = rw.adapt(model, rw.LoRAConfig(rank=2, targets="head"))
    nn.init.normal_(model.head.delta.B)
    return model


def _with_embedding(**options: float) -> Net:
    model = _fresh()
    model.embed = nn.Embedding(20, 16, padding_idx=0, **options)  # type: ignore[arg-type]
    return model


def _tied_embedding() -> Net:
    """The adapted embedding's weight is also the head's, as in a causal LM with tied embeddings."""
    model = _with_embedding()
    model.head = nn.Linear(2, 20, bias=False)
    model.head.weight = model.embed.weight
    model = rw.adapt(model, rw.LoRAConfig(rank=2, targets="embed"))
    nn.init.normal_(model.embed.delta.A)
    return model


def _merge_inside_disabled(model: nn.Module) -> None:
    with rw.disabled(model):
        rw.merge(model)


def _changed_while_merged() -> Net:
    model = rw.merge(_adapted())
    with torch.no_grad():
        model.proj.delta.B.mul_(2)
    return model


def _train_step(model: nn.Module) -> None:
    model(torch.randn(2, 8)).sum().backward()


class Shared(nn.Module):
    """One Linear used at two paths (``self.b = self.a``), and one block at two paths."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = self.a
        self.block1 = nn.Sequential(nn.Linear(8, 8))
        self.block2 = self.block1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block2(self.block1(self.b(self.a(x))))


def _shared() -> Shared:
    torch.manual_seed(0)
    return Shared()


def _attention() -> nn.Module:
    """A layer inside a module that could be made trainable, and a layer with a child module."""
    torch.manual_seed(0)
    model = nn.Module()
    model.self_attn = nn.Module()
    model.self_attn.q_proj = nn.Linear(8, 8)
    model.up_proj = nn.Linear(8, 8)
    model.up_proj.scale = nn.LayerNorm(8)
    return model


def _headed() -> Net:
    """Adapted on 'proj', with 'head' trainable: the model's head, shared by every adapter it gets."""
    return rw.adapt(_fresh(), rw.LoRAConfig(rank=2, targets="proj", trainable="head"))


def _proj_twice() -> Net:
    """'proj' registered at a second path too (one layer used twice), as the checkpoint's 'proj'."""
    model = _fresh()
    model.alias = model.proj
    return model


def _two_named() -> Net:
    model = rw.adapt(_fresh(), rw.LoRAConfig(rank=2, targets="proj"), name="a")
    return rw.adapt(model, rw.LoRAConfig(rank=2, targets="head"), name="b")


CASES = [
    Case(
        "unknown target",
        _fresh,
        lambda m, f: rw.adapt(m, rw.LoRAConfig(targets="q_proj")),
        ValueError,
        "'q_proj' matches no module.*proj",
    ),
    Case("adapt twice", _adapted, lambda m, f: rw.adapt(m, rw.LoRAConfig(targets="proj")), ValueError, "already"),
    Case("rank 0", _fresh, lambda m, f: rw.adapt(m, rw.LoRAConfig(rank=0, targets="proj")), ValueError, "rank=0"),
    Case("rank of wrong type", _fresh, lambda m, f: rw.LoRAConfig(rank="8"), ValueError, "rank='8'"),
    Case("dropout 1", _fresh, lambda m, f: rw.LoRAConfig(dropout=1.0), ValueError, "dropout=1.0"),
    Case("init unknown", _fresh, lambda m, f: rw.LoRAConfig(init="orthogonal"), ValueError, "init='orthogonal'"),
    Case("empty targets", _fresh, lambda m, f: rw.LoRAConfig(targets=()), ValueError, "targets"),
    Case("not a config", _fresh, lambda m, f: rw.adapt(m, {"rank": 8}), TypeError, "LoRAConfig"),
    Case(
        "unsupported base",
        _fresh,
        lambda m, f: rw.adapt(m, rw.LoRAConfig(targets="norm")),
        TypeError,
        "'norm' is a LayerNorm",
    ),
    Case(
        "method without that base",
        _fresh,
        lambda m, f: rw.adapt(m, rw.DoRAConfig(targets="conv")),
        TypeError,
        "dora does not support Conv2d.*'conv'",
    ),
    Case(
        "method that cannot adapt an embedding",
        _with_embedding,
        lambda m, f: rw.adapt(m, rw.SingLoRAConfig(targets=("proj", "embed"))),
        TypeError,
        r"singlora does not support Embedding \('embed'\).*methods that support embedding: \['lora'",
    ),
    Case(
        "embedding with max_norm",
        lambda: _with_embedding(max_norm=1.0),
        lambda m, f: rw.adapt(m, rw.LoRAConfig(targets=("proj", "embed"))),
        TypeError,
        "'embed': Embedding with max_norm=1.0",
    ),
    Case(
        "merge into a tied embedding",
        _tied_embedding,
        lambda m, f: rw.merge(m),
        ValueError,
        r"cannot merge 'embed': its weight is shared with \['head.weight'\]",
    ),
    Case(
        "reparameterizing a layer with its own forward",
        _own_forward,
        lambda m, f: rw.adapt(m, rw.DoRAConfig(targets="proj")),
        TypeError,
        "dora on 'proj': RoundedLinear defines its own forward",
    ),
    Case(
        "LoLDU on a meta model",
        lambda: _fresh().to("meta"),
        lambda m, f: rw.adapt(m, rw.LoLDUConfig(rank=4, targets="proj")),
        ValueError,
        "loldu on 'proj'.*meta device",
    ),
    Case(
        "trainable matches nothing",
        _fresh,
        lambda m, f: rw.adapt(m, rw.LoRAConfig(targets="proj", trainable="classifier")),
        ValueError,
        "classifier",
    ),
    Case(
        "target also trainable",
        _fresh,
        lambda m, f: rw.adapt(m, rw.LoRAConfig(targets="head", trainable="head")),
        ValueError,
        "both targets and trainable",
    ),
    Case(
        "target inside a trainable module",
        _attention,
        lambda m, f: rw.adapt(m, rw.LoRAConfig(targets="q_proj", trainable="self_attn")),
        ValueError,
        "target 'self_attn.q_proj' is inside trainable 'self_attn'",
    ),
    Case(
        "target holds a trainable module",
        _attention,
        lambda m, f: rw.adapt(m, rw.LoRAConfig(targets="up_proj", trainable="scale")),
        ValueError,
        "target 'up_proj' contains trainable 'up_proj.scale'",
    ),
    Case(
        "added adapter's target is the model's trainable head",
        _headed,
        lambda m, f: rw.adapt(m, rw.LoRAConfig(targets="head"), name="b"),
        ValueError,
        r"modules are both targets and trainable \(target 'head' is trainable 'head'\)",
    ),
    Case(
        "added adapter's target inside the model's trainable module",
        lambda: rw.adapt(_attention(), rw.LoRAConfig(targets="up_proj", trainable="self_attn")),
        lambda m, f: rw.adapt(m, rw.LoRAConfig(targets="q_proj"), name="b"),
        ValueError,
        "target 'self_attn.q_proj' is inside trainable 'self_attn'",
    ),
    Case(
        "added adapter's target holds the model's trainable module",
        lambda: rw.adapt(_attention(), rw.LoRAConfig(targets="q_proj", trainable="scale")),
        lambda m, f: rw.adapt(m, rw.LoRAConfig(targets="up_proj"), name="b"),
        ValueError,
        "target 'up_proj' contains trainable 'up_proj.scale'",
    ),
    Case(
        "loaded adapter added beside others on the model's trainable head",
        _headed,
        lambda m, f: rw.load_adapter(m, f, name="b"),
        rw.CheckpointError,
        r"modules are both targets and trainable \(target 'head' is trainable 'head'\)",
    ),
    Case(
        "loaded adapter whose layer is its own trainable module",
        _fresh,
        lambda m, f: rw.load_adapter(m, f),
        rw.CheckpointError,
        r"modules are both targets and trainable \(target 'head' is trainable 'head'\)",
        corrupt=_edit_config(lambda meta: meta["config"].update(trainable=["head"])),
    ),
    Case(
        "loaded adapter on a layer registered at two paths",
        _proj_twice,
        lambda m, f: rw.load_adapter(m, f),
        rw.CheckpointError,
        r"'proj' is the same module as \['alias'\]; replacing it at one path would leave the others unchanged",
    ),
    Case(
        "loaded adapter naming a layer by its second path",
        _proj_twice,
        lambda m, f: rw.load_adapter(m, f),
        rw.CheckpointError,
        r"'alias' is the same module as \['proj'\]; replacing it at one path would leave the others unchanged",
        corrupt=_edit_config(lambda meta: meta["modules"].update({"alias": meta["modules"].pop("proj")})),
    ),
    Case(
        "loaded adapter on a layer inside an adapted layer",
        lambda: rw.adapt(_fresh(), rw.LoRAConfig(rank=2, targets="proj")),
        lambda m, f: rw.load_adapter(m, f, name="b"),
        rw.CheckpointError,
        r"\['proj.base'\] name no module of the model outside its adapted layers",
        corrupt=_edit_config(lambda meta: meta["modules"].update({"proj.base": meta["modules"].pop("proj")})),
    ),
    Case(
        "several adapters saved over a one-adapter checkpoint",
        _two_named,
        lambda m, f: rw.save_adapter(m, f),
        rw.CheckpointError,
        r"holds a one-adapter checkpoint \(adapter_config.json, adapter.safetensors\); the adapters \['a', 'b'\]"
        r".*Save to another folder, or remove adapter_config.json, adapter.safetensors from it first",
    ),
    Case(
        "one layer at two paths, both targeted",
        _shared,
        lambda m, f: rw.adapt(m, rw.LoRAConfig(targets="re:a|b")),
        ValueError,
        "'a' is the same module as \\['b'\\]",
    ),
    Case(
        "target shared with an untargeted path",
        _shared,
        lambda m, f: rw.adapt(m, rw.LoRAConfig(targets="block1.0")),
        ValueError,
        "'block1.0' is the same module as \\['block2.0'\\]",
    ),
    Case(
        "invalid regex target",
        _fresh,
        lambda m, f: rw.LoRAConfig(targets="re:proj[0-"),
        ValueError,
        "targets: 're:proj\\[0-' is not a valid regular expression",
    ),
    Case(
        "invalid regex trainable",
        _fresh,
        lambda m, f: rw.LoRAConfig(targets="proj", trainable="re:(head"),
        ValueError,
        "trainable: 're:\\(head' is not a valid regular expression",
    ),
    Case(
        "NaN alpha",
        _fresh,
        lambda m, f: rw.LoRAConfig(alpha=float("nan")),
        ValueError,
        "LoRAConfig: alpha=nan must be a finite number",
    ),
    Case(
        "infinite alpha",
        _fresh,
        lambda m, f: rw.DoRAConfig(alpha=float("inf")),
        ValueError,
        "DoRAConfig: alpha=inf must be a finite number",
    ),
    Case(
        "NaN dropout",
        _fresh,
        lambda m, f: rw.LoRAConfig(dropout=float("nan")),
        ValueError,
        "LoRAConfig: dropout=nan must be a finite number",
    ),
    Case(
        "NaN alpha in JSON",
        _fresh,
        lambda m, f: rw.load_adapter(m, f),
        rw.CheckpointError,
        "alpha=nan must be a finite number",
        corrupt=_edit_config(lambda meta: meta["config"].update(alpha=float("nan"))),
    ),
    Case("unknown method name", _fresh, lambda m, f: rw.make_config("lorra"), ValueError, "unknown method 'lorra'"),
    Case(
        "non-finite merge",
        lambda: (m := _adapted(), _poison(m))[0],
        lambda m, f: rw.merge(m),
        ValueError,
        "'head'.*non-finite",
    ),
    Case(
        "disable a merged model",
        lambda: rw.merge(_adapted()),
        lambda m, f: rw.disabled(m).__enter__(),
        ValueError,
        "unmerge",
    ),
    Case(
        "merge a tied weight",
        _tied,
        lambda m, f: rw.merge(m),
        ValueError,
        r"cannot merge 'head': its weight is shared with \['embed.weight'\]",
    ),
    Case(
        "unwrap-merge a tied weight",
        _tied,
        lambda m, f: rw.unwrap(m, merge=True),
        ValueError,
        r"'head'.*shared with \['embed.weight'\]",
    ),
    Case(
        "merge inside disabled",
        _adapted,
        lambda m, f: _merge_inside_disabled(m),
        ValueError,
        r"cannot merge inside `with rankwise.disabled\(model\)`",
    ),
    Case(
        "unmerge after the adapter changed",
        _changed_while_merged,
        lambda m, f: rw.unmerge(m),
        ValueError,
        r"'proj': the adapter changed while merged \(delta.B\)",
    ),
    Case(
        "unwrap after the adapter changed",
        _changed_while_merged,
        lambda m, f: rw.unwrap(m, merge=False),
        ValueError,
        "'proj': the adapter changed while merged",
    ),
    Case(
        "train a merged model",
        lambda: rw.merge(_adapted()),
        lambda m, f: _train_step(m),
        RuntimeError,
        r"backward through a merged lora layer.*rankwise.unmerge\(model\) before training",
    ),
    Case("save without adapters", _fresh, lambda m, f: rw.save_adapter(m, f), ValueError, "no rankwise adapters"),
    Case(
        "load into an adapted model",
        _adapted,
        lambda m, f: rw.load_adapter(m, f),
        ValueError,
        "already has an adapter named .default.",
    ),
    Case(
        "missing config file",
        _fresh,
        lambda m, f: rw.load_adapter(m, f / "elsewhere"),
        rw.CheckpointError,
        "adapter_config.json does not exist",
    ),
    Case(
        "config file not JSON",
        _fresh,
        lambda m, f: rw.load_adapter(m, f),
        rw.CheckpointError,
        "not valid JSON",
        corrupt=lambda f: (f / "adapter_config.json").write_text("{rank: 8"),
    ),
    Case(
        "unknown config key in JSON",
        _fresh,
        lambda m, f: rw.load_adapter(m, f),
        rw.CheckpointError,
        "unknown config keys \\['ranks'\\]",
        corrupt=_edit_config(lambda meta: meta["config"].update(ranks=4)),
    ),
    Case(
        "unknown method in JSON",
        _fresh,
        lambda m, f: rw.load_adapter(m, f),
        rw.CheckpointError,
        "unknown method 'lorax'",
        corrupt=_edit_config(lambda meta: meta.update(method="lorax")),
    ),
    Case(
        "bad value in JSON",
        _fresh,
        lambda m, f: rw.load_adapter(m, f),
        rw.CheckpointError,
        "rank=-3",
        corrupt=_edit_config(lambda meta: meta["config"].update(rank=-3)),
    ),
    Case(
        "shape mismatch on load",
        _fresh,
        lambda m, f: rw.load_adapter(m, f),
        rw.CheckpointError,
        "(?s)mis-shaped keys.*proj.delta.A: file \\(2, 8\\), model \\(4, 8\\)",
        corrupt=_edit_config(lambda meta: meta["config"].update(rank=4)),
    ),
    Case(
        "another architecture",
        lambda: nn.Sequential(nn.Linear(8, 16)),
        lambda m, f: rw.load_adapter(m, f),
        rw.CheckpointError,
        "layer 'proj' is not in the model",
    ),
    Case(
        "same names, other widths",
        lambda: _fresh(width=32),
        lambda m, f: rw.load_adapter(m, f),
        rw.CheckpointError,
        "'proj' is 8 -> 32, the checkpoint expects 8 -> 16",
    ),
    Case(
        "truncated tensors",
        _fresh,
        lambda m, f: rw.load_adapter(m, f),
        rw.CheckpointError,
        "truncated or corrupted",
        corrupt=_truncate,
    ),
    Case(
        "corrupted tensors",
        _fresh,
        lambda m, f: rw.load_adapter(m, f),
        rw.CheckpointError,
        "truncated or corrupted",
        corrupt=_flip_byte,
    ),
    Case(
        "missing and unexpected keys",
        _fresh,
        lambda m, f: rw.load_adapter(m, f),
        rw.CheckpointError,
        "(?s)missing keys: \\['proj.delta.B'\\].*unexpected keys: \\['proj.delta.C'\\]",
        corrupt=_rename_tensor,
    ),
    Case(
        "missing tensor file",
        _fresh,
        lambda m, f: rw.load_adapter(m, f),
        rw.CheckpointError,
        "adapter.safetensors does not exist",
        corrupt=lambda f: (f / "adapter.safetensors").unlink(),
    ),
    Case(
        "not a rankwise file",
        _fresh,
        lambda m, f: rw.load_adapter(m, f),
        rw.CheckpointError,
        "lacks the fields",
        corrupt=lambda f: (f / "adapter_config.json").write_text('{"peft_type": "LORA"}'),
    ),
    Case(
        "config a list in JSON",
        _fresh,
        lambda m, f: rw.load_adapter(m, f),
        rw.CheckpointError,
        r"'config' must be an object, not \[8\]",
        corrupt=_edit_config(lambda meta: meta.update(config=[8])),
    ),
    Case(
        "modules a list in JSON",
        _fresh,
        lambda m, f: rw.load_adapter(m, f),
        rw.CheckpointError,
        r"'modules' must be an object, not \[\"proj\"\]",
        corrupt=_edit_config(lambda meta: meta.update(modules=["proj"])),
    ),
    Case(
        "a module entry a string in JSON",
        _fresh,
        lambda m, f: rw.load_adapter(m, f),
        rw.CheckpointError,
        r"modules\['proj'\] must be an object, not \"linear\"",
        corrupt=_edit_config(lambda meta: meta["modules"].update(proj="linear")),
    ),
    Case(
        "a width a string in JSON",
        _fresh,
        lambda m, f: rw.load_adapter(m, f),
        rw.CheckpointError,
        r"modules\['proj'\]\['in_features'\] must be an integer, not \"8\"",
        corrupt=_edit_config(lambda meta: meta["modules"]["proj"].update(in_features="8")),
    ),
    Case(
        "a weight shape a number in JSON",
        _fresh,
        lambda m, f: rw.load_adapter(m, f),
        rw.CheckpointError,
        r"modules\['proj'\]\['weight_shape'\] must be a list, not 16",
        corrupt=_edit_config(lambda meta: meta["modules"]["proj"].update(weight_shape=16)),
    ),
    Case(
        "a weight shape of strings in JSON",
        _fresh,
        lambda m, f: rw.load_adapter(m, f),
        rw.CheckpointError,
        r"modules\['proj'\]\['weight_shape'\]\[0\] must be an integer, not \"16\"",
        corrupt=_edit_config(lambda meta: meta["modules"]["proj"].update(weight_shape=["16", 8])),
    ),
    Case(
        "trainable modules a string in JSON",
        _fresh,
        lambda m, f: rw.load_adapter(m, f),
        rw.CheckpointError,
        "'trainable_modules' must be a list",
        corrupt=_edit_config(lambda meta: meta.update(trainable_modules="head")),
    ),
]


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.is_meta or b.is_meta:  # a meta tensor has no values, only a shape and a dtype
        return a.is_meta and b.is_meta and a.shape == b.shape and a.dtype == b.dtype
    return torch.equal(a, b)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_raises_and_changes_nothing(case: Case, tmp_path: Path) -> None:
    folder = tmp_path / "adapter"
    rw.save_adapter(_adapted(), folder)
    if case.corrupt:
        case.corrupt(folder)
    files = _files(folder)
    model = case.model()
    state = _snapshot(model)
    modules = [type(m) for m in model.modules()]
    grads = {k: p.requires_grad for k, p in model.named_parameters()}

    with pytest.raises(case.error, match=case.match):
        case.call(model, folder)

    assert [type(m) for m in model.modules()] == modules
    assert {k: p.requires_grad for k, p in model.named_parameters()} == grads
    after = _snapshot(model)
    assert after.keys() == state.keys()
    for key in state:
        assert _same(after[key], state[key]), key
    assert _files(folder) == files


def _float_fields() -> list[tuple[str, str]]:
    """(method, field) for every float field of every registered method's config."""
    pairs = []
    for name in rw.methods():
        config_class = registry.get(name).config_class
        hints = typing.get_type_hints(config_class)
        pairs += [
            (name, f.name)
            for f in dataclasses.fields(config_class)
            if float in (hints[f.name], *typing.get_args(hints[f.name]))
        ]
    return pairs


@pytest.mark.parametrize(("method", "field"), _float_fields(), ids=[f"{m}.{f}" for m, f in _float_fields()])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_every_float_field_refuses_non_finite_values(method: str, field: str, value: float) -> None:
    config_class = registry.get(method).config_class
    with pytest.raises(ValueError, match=f"{config_class.__name__}: {field}={value!r} must be a finite number"):
        config_class(**{field: value})
