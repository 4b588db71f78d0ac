"""A compressed transformers model as a folder of its own: ``save_pretrained`` → ``from_pretrained``,
and ``rankwise compress`` / ``rankwise inspect`` on a tiny model folder."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import rankwise as rw
from rankwise import cli
from rankwise.compress import LowRankLinear, calibrate, from_pretrained, lord, save_pretrained

from _models import tiny_llama, word_tokenizer

transformers = pytest.importorskip("transformers")

_WORDS = [
    "the",
    "king",
    "had",
    "a",
    "daughter",
    "who",
    "was",
    "fair",
    "and",
    "the",
    "frog",
    "sat",
    "by",
    "the",
    "well",
    "in",
    "the",
    "wood",
]
_TEXT = " ".join(_WORDS[i % len(_WORDS)] for i in range(7 * 200))


def _llama() -> torch.nn.Module:
    return tiny_llama(32, max_position_embeddings=64, tie_word_embeddings=True).eval()


def _model_folder(folder: Path) -> Path:
    """A tiny Llama and a word-level tokenizer, as save_pretrained writes them."""
    word_tokenizer(_WORDS, unk="[UNK]").save_pretrained(folder)
    _llama().save_pretrained(folder)
    return folder


def _tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def test_save_then_from_pretrained_is_bit_exact_without_the_base_model(tmp_path: Path) -> None:
    model = _llama()
    batches = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 32, (3, 2, 16))]
    lord(model, params=0.5, calibration=calibrate(model, batches))
    save_pretrained(model, tmp_path)
    loaded = from_pretrained(tmp_path)
    assert type(loaded) is type(model) and not loaded.training
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ranks = {path: m.rank for path, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert ranks and ranks == {path: m.rank for path, m in loaded.named_modules() if isinstance(m, LowRankLinear)}
    state, reloaded = model.state_dict(), loaded.state_dict()
    assert state.keys() == reloaded.keys() and all(torch.equal(state[k], reloaded[k]) for k in state)
    ids = torch.randint(0, 32, (1, 10))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert torch.equal(
        loaded.generate(ids, max_new_tokens=5, do_sample=False), model.generate(ids, max_new_tokens=5, do_sample=False)
    )


def test_the_cli_compresses_heals_and_saves_a_model_that_loads_and_generates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_folder = _model_folder(tmp_path / "model")
    (tmp_path / "tales.txt").write_text(_TEXT)
    out = tmp_path / "small"
    argv = [
        "compress",
        "--model",
        str(model_folder),
        "--params",
        "0.6",
        "--calibration",
        str(tmp_path / "tales.txt"),
        "--heal-steps",
        "3",
        "--block-size",
        "64",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "compressed model in" in printed and "rank" in printed
    loaded = from_pretrained(out)
    layers = {path: m.rank for path, m in loaded.named_modules() if isinstance(m, LowRankLinear)}
    assert layers and sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in _llama().parameters())
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ids = tokenizer("the king had", return_tensors="pt")["input_ids"]
    assert loaded.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, ids.shape[1] + 4)
    assert cli.main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert f"{len(layers)} low-rank layers" in shown
    for path, rank in layers.items():
        assert any(line.split()[0] == path and line.split()[-1] == str(rank) for line in shown.splitlines()[2:])


BAD = [
    ("--params above 1", {"--params": "1.5"}, r"--params=1.5 must be in \(0, 1\]"),
    ("--params 0", {"--params": "0"}, r"--params=0.0 must be in \(0, 1\]"),
    ("empty calibration", {"--calibration": "empty.txt"}, "--calibration .*empty.txt is empty"),
    ("not a transformers folder", {"--model": "plain"}, "--model .*plain is not a transformers model folder"),
]


@pytest.mark.parametrize(("change", "message"), [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_compress_input_gives_one_line_and_writes_nothing(
    change, message, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _model_folder(tmp_path / "model")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "weights.bin").write_bytes(b"not a model")
    (tmp_path / "tales.txt").write_text(_TEXT)
    (tmp_path / "empty.txt").write_text("  \n")
    options = {"--model": "model", "--params": "0.6", "--calibration": "tales.txt", **change}
    argv = ["compress", "--out", str(tmp_path / "out"), "--no-progress"]
    for option, value in options.items():
        argv += [option, value if option == "--params" else str(tmp_path / value)]
    before = _tree(tmp_path)
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("rankwise compress: "), err
    assert re.search(message, err), err
    assert _tree(tmp_path) == before


def test_inspect_of_an_adapter_folder_is_unchanged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rw.save_adapter(rw.adapt(torch.nn.Sequential(torch.nn.Linear(4, 4)), rw.LoRAConfig(rank=2, targets="0")), tmp_path)
    assert cli.main(["inspect", str(tmp_path)]) == 0
    assert "method: lora" in capsys.readouterr().out
