"""``rankwise list | inspect | merge | bench`` on tiny models."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import safetensors
import torch
import transformers
from torch import nn

import rankwise as rw
from rankwise import cli
from rankwise.core import registry

from _models import tiny_gpt2


def test_list_prints_every_method_with_its_summary(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == rw.methods()
    assert all(line.endswith(registry.get(line.split()[0]).summary) for line in lines)


def test_inspect_shows_method_config_modules_and_parameter_count(
    tmp_path: Path, mlp: nn.Module, capsys: pytest.CaptureFixture[str]
) -> None:
    model = rw.adapt(mlp, rw.LoRAConfig(rank=4, targets=("layers.0", "layers.2"), trainable=("head",)))
    rw.save_adapter(model, tmp_path)
    assert cli.main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "method: lora" in out and "  rank: 4" in out and "modules: 2" in out
    assert "layers.0" in out and "16 -> 32" in out and "layers.2" in out and "24 -> 8" in out
    head = 8 * 3 + 3
    assert f"adapter parameters: {rw.summary(model).trainable - head:,}" in out
    assert f"trainable module head: {head:,} values saved" in out


def test_inspect_lists_every_adapter_of_a_folder_saved_from_a_model_with_several(
    tmp_path: Path, mlp: nn.Module, capsys: pytest.CaptureFixture[str]
) -> None:
    model = rw.adapt(mlp, rw.LoRAConfig(rank=4, targets=("layers.0",)), name="a")
    rw.adapt(model, rw.C3AConfig(block_size=8, targets=("layers.1", "layers.2")), name="b")
    rw.save_adapter(model, tmp_path)
    assert cli.main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("adapters: 2 (a, b)\n")
    a, b = out.split("adapter a (a/):\n")[1].split("adapter b (b/):\n")
    assert "method: lora" in a and "modules: 1" in a and f"adapter parameters: {4 * (16 + 32):,}" in a
    assert "method: c3a" in b and "modules: 2" in b and f"adapter parameters: {32 * 24 // 8 + 24 * 8 // 8:,}" in b


def test_inspect_of_a_folder_without_an_adapter_fails_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["inspect", str(tmp_path)]) == 2
    assert "adapter_config.json does not exist" in capsys.readouterr().err


def test_merge_writes_a_plain_transformers_model_with_the_adapted_outputs(tmp_path: Path) -> None:
    base = tiny_gpt2().eval()
    base.save_pretrained(tmp_path / "base")
    model = rw.adapt(
        transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base").eval(),
        rw.LoRAConfig(rank=2, targets=("c_attn", "c_fc")),
    )
    for name, parameter in model.named_parameters():
        if name.endswith(".B"):  # B starts at zero; give the adapter something to merge
            nn.init.normal_(parameter, std=0.1)
    rw.save_adapter(model, tmp_path / "adapter")
    ids = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        expected = model(ids).logits
        unchanged = base(ids).logits

    assert (
        cli.main(
            [
                "merge",
                "--model",
                str(tmp_path / "base"),
                "--adapter",
                str(tmp_path / "adapter"),
                "--out",
                str(tmp_path / "merged"),
            ]
        )
        == 0
    )

    with safetensors.safe_open(tmp_path / "merged" / "model.safetensors", framework="pt") as file:
        merged_keys = set(file.keys())
    with safetensors.safe_open(tmp_path / "base" / "model.safetensors", framework="pt") as file:
        assert merged_keys == set(file.keys())
    merged = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        logits = merged(ids).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits, unchanged)


def test_bench_runs_the_quick_preset_machinery_on_the_synthetic_task(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = cli.main(
        [
            "bench",
            "--preset",
            "quick",
            "--tasks",
            "synthetic",
            "--methods",
            "lora",
            "frozen",
            "--out",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert status == 0
    assert "## synthetic" in capsys.readouterr().out
    with (tmp_path / "results.csv").open(newline="") as file:
        assert [row["method"] for row in csv.DictReader(file)] == ["lora", "frozen"]

    assert cli.main(["compare", str(tmp_path), "--out", str(tmp_path / "across.md")]) == 0
    across = (tmp_path / "across.md").read_text()
    assert across.startswith("## Across tasks") and "| lora | 100 ★ | 100 | 1 of 1 |" in across
    assert re.search(r"\| synthetic \| accuracy \| .* \| lora .* \| .* SD \| lora .* \| 0.0 SD \|", across)


def test_bench_refuses_an_unknown_method(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = cli.main(["bench", "--tasks", "synthetic", "--methods", "nope", "--out", str(tmp_path), "--no-progress"])
    assert status == 2
    assert "unknown ['nope']" in capsys.readouterr().err


def _adapter(folder: Path) -> Path:
    rw.save_adapter(rw.adapt(nn.Sequential(nn.Linear(4, 4)), rw.LoRAConfig(rank=2, targets="0")), folder)
    return folder


def _edit_config(folder: Path, change) -> Path:
    path = folder / "adapter_config.json"
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))
    return folder


# (id, setup(tmp_path) -> argv, what the one-line message says)
BAD_ARGUMENTS = [
    (
        "merge --out a file",
        lambda t: ["merge", "--model", str(t), "--adapter", str(_adapter(t / "a")), "--out", str(_file(t / "out.txt"))],
        "--out .*out.txt is a file, not a folder",
    ),
    (
        "merge --model missing",
        lambda t: [
            "merge",
            "--model",
            str(t / "nowhere"),
            "--adapter",
            str(_adapter(t / "a")),
            "--out",
            str(t / "merged"),
        ],
        "--model .*nowhere is not a transformers model folder",
    ),
    (
        "bench --out a file",
        lambda t: [
            "bench",
            "--tasks",
            "synthetic",
            "--methods",
            "lora",
            "--no-progress",
            "--out",
            str(_file(t / "results.txt")),
        ],
        "--out .*results.txt is a file",
    ),
    (
        "bench --device bogus",
        lambda t: [
            "bench",
            "--tasks",
            "synthetic",
            "--methods",
            "lora",
            "--no-progress",
            "--device",
            "bogus",
            "--out",
            str(t / "bench"),
        ],
        "--device 'bogus' cannot be used here",
    ),
    (
        "compare a folder without results",
        lambda t: ["compare", str(t)],
        "holds no results.csv",
    ),
    (
        "inspect without the tensor file",
        lambda t: ["inspect", str(_without_tensors(_adapter(t / "a")))],
        "adapter.safetensors does not exist",
    ),
    (
        "inspect of modules as a list",
        lambda t: ["inspect", str(_edit_config(_adapter(t / "a"), lambda m: m.update(modules=[])))],
        "'modules' must be an object, not \\[\\]",
    ),
]


def _file(path: Path) -> Path:
    path.write_text("keep me")
    return path


def _without_tensors(folder: Path) -> Path:
    (folder / "adapter.safetensors").unlink()
    return folder


def _tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize(
    ("setup", "message"), [case[1:] for case in BAD_ARGUMENTS], ids=[case[0] for case in BAD_ARGUMENTS]
)
def test_bad_arguments_give_one_line_exit_2_and_write_nothing(
    setup, message, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = setup(tmp_path)
    before = _tree(tmp_path)
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(f"rankwise {argv[0]}: "), err
    assert re.search(message, err), err
    assert _tree(tmp_path) == before


def test_inspect_reads_a_layer_entry_without_its_own_config_as_load_adapter_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _edit_config(_adapter(tmp_path), lambda meta: meta["modules"]["0"].pop("config"))
    loaded = rw.load_adapter(nn.Sequential(nn.Linear(4, 4)), folder)
    assert loaded[0].delta.A.shape == (2, 4)
    assert cli.main(["inspect", str(folder)]) == 0
    assert "  0       linear  4 -> 4     16" in capsys.readouterr().out


def test_inspect_reads_checkpoints_with_and_without_weight_shapes_alike(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["inspect", str(_adapter(tmp_path / "new"))]) == 0
    new = capsys.readouterr().out
    old = _edit_config(_adapter(tmp_path / "old"), lambda meta: meta["modules"]["0"].pop("weight_shape"))
    assert cli.main(["inspect", str(old)]) == 0  # as written before weight shapes were recorded
    assert capsys.readouterr().out == new and "  0       linear  4 -> 4     16" in new
