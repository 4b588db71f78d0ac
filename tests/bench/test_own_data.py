"""``rankwise bench --model DIR --data FILE --task classification|lm`` and ``task_from_files``, on a
tiny BERT and a tiny Llama the tests build and save, with tokenizers trained on the test text."""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from rankwise import cli
from rankwise.bench import PRESETS, Preset, Sizes, register_task, run_bench, runner, task_from_files
from rankwise.bench.tasks import TASKS, AssetMissing, Synthetic

CLASSIFICATION = Sizes(train=48, val=16, test=24, length=16, steps=6, batch_size=8, eval_batch_size=16, probe=32)
LM = Sizes(train=12, val=3, test=4, length=16, steps=4, batch_size=3, eval_batch_size=4)


@pytest.fixture
def small(monkeypatch: pytest.MonkeyPatch) -> Preset:
    """The quick preset with sizes small enough for the tiny models, and a copy of the task table."""
    preset = Preset(
        "quick",
        tasks=("tweets",),
        seeds=(0,),
        lr_factors=(1.0,),
        sizes=dict(PRESETS["quick"].sizes),
        kinds={"classification": CLASSIFICATION, "lm": LM},
    )
    monkeypatch.setitem(runner.PRESETS, "quick", preset)
    monkeypatch.setattr(runner, "TASKS", dict(TASKS))
    monkeypatch.setattr("rankwise.bench.tasks.TASKS", runner.TASKS)
    return preset


def _bench(*args: object) -> int:
    return cli.main(["bench", "--no-progress", "--threads", "1", *map(str, args)])


def _results(folder: Path) -> list[dict[str, str]]:
    with (folder / "results.csv").open(newline="") as file:
        return list(csv.DictReader(file))


def test_classification_runs_end_to_end_from_the_cli_and_resumes(
    bert: Path,
    reviews: Path,
    tmp_path: Path,
    small: Preset,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    command = ("--model", bert, "--data", reviews, "--task", "classification", "--methods", "lora", "frozen", "full")
    assert _bench(*command, "--out", out) == 0
    printed = capsys.readouterr().out
    assert "reviews: targets (default: every square linear layer outside the head" in printed
    assert "9 layers named dense, key, query, value" in printed  # 2 × (query, key, value, output) + the pooler
    drawn = "reviews: no 'split' column: split drawn with data seed 0 from 160 rows; used: test 24, val 16, probe 32"
    assert drawn + ", train 48" in printed
    rows = {row["method"]: row for row in _results(out)}
    head = 16 * 2 + 2
    lora = 9 * 8 * (16 + 16)  # rank 8 on nine 16 x 16 layers: the default budget
    assert (rows["lora"]["adapter_params"], rows["lora"]["trainable_params"]) == (str(lora), str(lora + head))
    assert (rows["frozen"]["adapter_params"], rows["frozen"]["trainable_params"]) == ("0", str(head))
    for row in rows.values():
        assert (row["task"], row["status"], row["steps"], row["selected"]) == ("reviews", "ok", "6", "yes")
        assert 0 <= float(row["test_accuracy"]) <= 1
    report = (out / "results.md").read_text()
    assert "## reviews: reviews.csv (160 rows, 2 classes); model bert" in report and "| full |" in report
    settings = json.loads((out / "settings.json").read_text())["tasks"]["reviews"]
    assert settings["columns"] == {"text": "text", "label": "label"} and settings["sizes"]["length"] == 16

    calls = []
    monkeypatch.setattr(runner, "train", lambda *args, **kwargs: calls.append(args))
    assert _bench(*command, "--out", out) == 0
    assert calls == [] and len(_results(out)) == 3

    reviews.write_text(reviews.read_text() + "999,the sun,warm\n")
    assert (
        _bench("--model", bert, "--data", reviews, "--task", "classification", "--methods", "lora", "--out", out) == 2
    )
    assert "other settings (['tasks.reviews.data_sha256'])" in capsys.readouterr().err


def test_the_probe_fits_the_head_of_a_decoder_classifier_without_bias(llama: Path, reviews: Path) -> None:
    task_type = task_from_files(llama, reviews, "classification")
    assert (task_type.head, task_type.probe_path) == (("score",), "score")
    task = task_type(CLASSIFICATION)
    task.check()
    task.prepare()
    score = task.pretrained.score
    assert score.bias is None and score.weight.abs().sum() > 0
    # Fitted on the probe split, the head classifies it better than chance.
    probe = [task.batch("probe", torch.arange(CLASSIFICATION.probe))][0]
    with torch.no_grad():
        predicted = task.logits(task.pretrained, probe).argmax(-1)
    assert (predicted == probe["labels"]).float().mean() > 0.6


def test_a_language_model_runs_end_to_end_on_a_text_file(
    llama: Path, story: Path, tmp_path: Path, small: Preset, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert (
        _bench(
            "--model",
            llama,
            "--data",
            story,
            "--task",
            "lm",
            "--targets",
            r"re:model\.layers\.[23]\..*q_proj",
            "--methods",
            "lora",
            "frozen",
            "--out",
            out,
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert r"story: targets: re:model\.layers\.[23]\..*q_proj" in printed
    assert "story: no 'split' column: whole documents held out, drawn with data seed 0" in printed
    rows = {row["method"]: row for row in _results(out)}
    assert rows["lora"]["adapter_params"] == str(2 * 8 * (16 + 16))
    assert rows["lora"]["steps"] == "4" and rows["frozen"]["steps"] == "0"
    task = task_from_files(llama, story, "lm")(LM)
    task.prepare()
    before = task.evaluate(task.pretrained, "test")["perplexity"]
    assert float(rows["frozen"]["test_perplexity"]) == pytest.approx(before, rel=1e-5)  # 6 digits in the CSV
    assert 1 < float(rows["lora"]["test_perplexity"]) < task.pretrained.config.vocab_size


def test_held_out_documents_are_whole_documents(llama: Path, story: Path) -> None:
    task = task_from_files(llama, story, "lm")(LM)
    tokenizer = task._tokenizer()
    documents, counts = task._draw(tokenizer)
    assert sum(counts.values()) == 120
    held_out = set(documents["val"]) | set(documents["test"])
    assert held_out and not held_out & set(documents["train"])
    task.check()
    task.prepare()
    # The test blocks are the test documents' tokens from their start, joined by the end token.
    ids = [t for text in documents["test"] for t in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]]
    assert task.batch("test", torch.arange(LM.test))["input_ids"].flatten().tolist() == ids[: LM.test * LM.length]
    train_words = {
        word
        for block in task.batch("train", torch.arange(LM.train))["input_ids"]
        for word in tokenizer.decode(block).split()
        if word.startswith("doc")
    }
    assert train_words and not train_words & {text.split()[0] for text in held_out}


def test_a_split_column_chooses_the_splits_and_labels_of_any_type_count(
    bert: Path, tmp_path: Path, labelled_texts: Callable[..., list[tuple[str, str]]]
) -> None:
    path = tmp_path / "tagged.jsonl"
    rows = []
    for i, (text, label) in enumerate(labelled_texts(200, seed=3)):
        split = "test" if i < 30 else "validation" if i < 50 else "train"
        rows.append({"body": f"{split} {text}", "y": label == "warm", "split": split})
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    task = task_from_files(bert, path, "classification", text_column="body", label_column="y")(CLASSIFICATION)
    assert task.check() == (
        "tagged: 'split' column: train 150 rows, validation 20 rows, test 30 rows; "
        "used: probe 32, train 48, val 16, test 24"
    )
    texts = task._texts()
    for split, prefix in (("train", "train"), ("probe", "train"), ("val", "validation"), ("test", "test")):
        assert all(text.split()[0] == prefix for text in texts[split][0]), split
    assert set(texts["train"][1]) == {"true", "false"}


def test_tsv_and_jsonl_tables_are_read_with_their_columns(tmp_path: Path) -> None:
    from rankwise.bench.tasks.files import read_table

    tsv = tmp_path / "a.tsv"
    tsv.write_text('text\tlabel\n"a, quoted\ttab"\t1\nplain\t2\n')
    assert read_table(tsv) == (
        ["text", "label"],
        [{"text": "a, quoted\ttab", "label": "1"}, {"text": "plain", "label": "2"}],
    )
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"text": "x", "label": 1}\n\n{"text": "y", "label": [1, 2], "extra": null}\n')
    assert read_table(jsonl) == (
        ["text", "label", "extra"],
        [{"text": "x", "label": 1}, {"text": "y", "label": [1, 2], "extra": None}],
    )


def test_a_json_number_is_one_label_whether_written_as_an_integer_or_a_float(bert: Path, tmp_path: Path) -> None:
    path = tmp_path / "numbers.jsonl"
    rows = [{"text": f"t{i}", "label": value} for i, value in enumerate([1, 0, 1.0, 0.0, "1", 2.5])]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    task = task_from_files(bert, path, "classification")
    assert task.labels == ("1", "0", "1", "0", "1", "2.5")


def test_the_python_api_registers_a_task_type_and_runs_it(
    bert: Path, reviews: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner, "TASKS", dict(TASKS))
    monkeypatch.setattr("rankwise.bench.tasks.TASKS", runner.TASKS)
    task = register_task(task_from_files(bert, reviews, "classification", targets=["query", "value"], length=12))
    preset = Preset("mine", tasks=(), seeds=(0,), lr_factors=(1.0,), sizes={}, kinds={"classification": CLASSIFICATION})
    run_bench(tmp_path, preset, tasks=[task.name], methods=["lora"], progress=False)
    (row,) = _results(tmp_path)
    assert (row["task"], row["adapter_params"]) == ("reviews", str(4 * 8 * (16 + 16)))
    assert json.loads((tmp_path / "settings.json").read_text())["tasks"]["reviews"]["sizes"]["length"] == 12
    again = register_task(task_from_files(bert, reviews, "classification"))
    assert runner.TASKS["reviews"] is again
    tweets = reviews.rename(reviews.with_name("tweets.csv"))
    with pytest.raises(ValueError, match="'tweets' is a built-in task's name; give yours another"):
        register_task(task_from_files(bert, tweets, "classification"))

    class Scored(Synthetic):
        name = "scored"
        metrics = ("accuracy", "auc")

    with pytest.raises(ValueError, match=r"no column for the metrics \['auc'\]"):
        register_task(Scored)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _folder(path: Path, files: dict[str, str]) -> Path:
    """A folder holding ``files`` (name -> text; Latin-1 round-trips any bytes)."""
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text, encoding="latin-1")
    return path


def _own(model: Path, data: Path, kind: str = "classification", *options: object) -> list[object]:
    return ["--model", model, "--data", data, "--task", kind, *options]


BAD = [  # (case, args from (tmp_path, bert, llama, reviews) as (t, b, m, d), the message)
    ("no model folder", lambda t, b, m, d: _own(t / "absent", d), "model folder .*absent does not exist"),
    ("no data file", lambda t, b, m, d: _own(b, t / "absent.csv"), "data file .*absent.csv does not exist"),
    (
        "unknown column",
        lambda t, b, m, d: _own(b, d, "classification", "--text-column", "body"),
        r"no text column 'body'; its columns: \['id', 'text', 'label'\]",
    ),
    (
        "one label",
        lambda t, b, m, d: _own(b, _write(t / "one.csv", "text,label\na,x\nb,x\n")),
        r"column 'label' holds 1 distinct label \(\['x'\]\); classification needs at least 2",
    ),
    (
        "split too small",
        lambda t, b, m, d: _own(b, _write(t / "few.csv", "text,label\na,x\nb,y\n")),
        r"few: the splits \{'test': 24, 'val': 16, 'probe': 32, 'train': 48\} need 120 examples, the data has 2",
    ),
    (
        "too few tokens",
        lambda t, b, m, d: _own(m, _write(t / "short.txt", "doc0 the sun\n\nday"), "lm"),
        "short: train needs 12 blocks of 16 tokens, has 0",
    ),
    (
        "no config.json",
        lambda t, b, m, d: _own(_folder(t / "not-a-model", {"weights.bin": ""}), d),
        "not-a-model is not a transformers model folder: it has no config.json",
    ),
    (
        "no weights",
        lambda t, b, m, d: _own(_folder(t / "no-weights", {"config.json": "{}"}), d),
        r"no-weights is not a transformers model folder: it has a config.json but no weights \(one of ",
    ),
    (
        "unknown architecture",
        lambda t, b, m, d: _own(
            _folder(t / "bad-config", {"config.json": '{"model_type": "no-such-model"}', "model.safetensors": ""}), d
        ),
        "bad-config is not a transformers model folder: ",
    ),
    (
        "no tokenizer",
        lambda t, b, m, d: _own(
            _folder(
                t / "untokenized",
                {name: (b / name).read_text(encoding="latin-1") for name in ("config.json", "model.safetensors")},
            ),
            d,
        ),
        r"untokenized: no tokenizer in it \(none of \['tokenizer_config.json', 'tokenizer.json'\]\)",
    ),
    (
        "target matching nothing",
        lambda t, b, m, d: _own(b, d, "classification", "--targets", "re:.*q_proj"),
        r"target 're:.\*q_proj' matches no module; some module names: \[.*'query'.*\]",
    ),
    (
        "txt for classification",
        lambda t, b, m, d: _own(b, _write(t / "a.txt", "x")),
        r"a .txt file holds documents, not labels",
    ),
    (
        "longer than the model",
        lambda t, b, m, d: _own(b, d, "classification", "--length", 65),
        "reviews: sequences of 65 tokens are longer than the model's 64 positions",
    ),
    (
        "a NaN label",  # Python's json writes NaN for a missing float: a missing label, not a class
        lambda t, b, m, d: _own(b, _write(t / "nan.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": NaN}\n')),
        r"nan.jsonl, row 2: no label \('label' is nan\)",
    ),
    ("model without data", lambda t, b, m, d: ["--model", b, "--task", "lm"], "go together; add --data"),
    ("column without data", lambda t, b, m, d: ["--text-column", "body"], "--text-column apply to your own data"),
]


@pytest.mark.parametrize(("case", "args", "message"), BAD, ids=[case for case, _, _ in BAD])
def test_bad_input_is_one_line_and_exit_2_before_any_training(
    case: str,
    args: Callable[..., list[object]],
    message: str,
    bert: Path,
    llama: Path,
    reviews: Path,
    tmp_path: Path,
    small: Preset,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    calls = []
    monkeypatch.setattr(runner, "train", lambda *a, **k: calls.append(a))
    out = tmp_path / "out"
    assert _bench(*args(tmp_path, bert, llama, reviews), "--out", out) == 2
    error = capsys.readouterr().err
    assert error.startswith("rankwise bench: ") and error.count("\n") == 1, error
    assert re.search(message, error), error
    assert calls == [] and not (out / "results.csv").exists()


def test_when_every_task_is_skipped_the_command_fails_and_says_what_to_install(
    tmp_path: Path, small: Preset, capsys: pytest.CaptureFixture[str]
) -> None:
    class Missing(Synthetic):
        name = "missing"

        def _load(self):
            raise AssetMissing("the model is not installed: pip install the-model")

    register_task(Missing)
    small.sizes["missing"] = CLASSIFICATION
    assert _bench("--tasks", "missing", "--methods", "lora", "--out", tmp_path) == 1
    assert (
        "no task could run; install what they need: missing: the model is not installed: pip install the-model"
        in capsys.readouterr().err
    )
    assert not (tmp_path / "results.csv").exists()
