"""A task on a user's own transformers model folder and data file: ``rankwise bench --model DIR
--data FILE --task classification|lm``, or :func:`task_from_files` from Python.

Everything that can be checked without loading the weights is checked when the task type is made
(folder, files, columns, labels, targets: the model is built on PyTorch's ``meta`` device, which
allocates nothing); what depends on a preset's sizes (is each split large enough?) is checked by
:meth:`Task.check`, which the runner calls on every task before it trains anything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from ...core import geometry
from ..budget import default_budget
from .base import DATA_SEED, Batch, Sizes, Task, _split
from .files import DOCUMENTS, TABLES, read_documents, read_table
from .lm import LanguageModelling
from .text import TextClassification

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

KINDS = ("classification", "lm")
SPLIT_COLUMN = "split"
SPLIT_NAMES = {"train": "train", "validation": "val", "test": "test"}  # the file's names -> the harness's
# What tokenizer.save_pretrained writes: always the config, and tokenizer.json for a fast tokenizer.
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


class OwnTask(Task):
    """What a task on a user's model folder and data file is, whatever its kind: the files, and how
    it reports them.

    Class variables (set by :func:`task_from_files`):
        folder: the model folder.
        data_file: the data file.
        columns: ``{"text": name}``, and ``"label"`` for classification.
        texts: every row's (document's) text.
        splits: every row's split (``"train"``, ``"val"``, ``"test"``) from the file's ``split``
            column; ``None`` when it has none and the split is drawn with ``DATA_SEED``.
        length: tokens per sequence, replacing the preset's; ``None`` keeps the preset's.
        max_length: the model's longest sequence (``max_position_embeddings``), if it says.
        targets_note: how the targets were chosen, for the log.
    """

    folder: ClassVar[Path]
    data_file: ClassVar[Path]
    columns: ClassVar[dict[str, str]]
    texts: ClassVar[tuple[str, ...]]
    splits: ClassVar[tuple[str, ...] | None]
    length: ClassVar[int | None]
    max_length: ClassVar[int | None]
    targets_note: ClassVar[str]

    def __init__(self, sizes: Sizes) -> None:
        super().__init__(sizes if self.length is None else dataclasses.replace(sizes, length=self.length))

    def settings(self) -> dict[str, object]:
        digest = hashlib.sha256(self.data_file.read_bytes()).hexdigest()
        return {
            "kind": type(self).kind,
            "model": str(self.folder.resolve()),
            "data": str(self.data_file.resolve()),
            "data_sha256": digest,
            "columns": self.columns,
            "targets": list(self.targets),
        }

    def _check_length(self) -> None:
        if self.max_length is not None and self.sizes.length > self.max_length:
            raise ValueError(
                f"{self.name}: sequences of {self.sizes.length} tokens are longer than the model's "
                f"{self.max_length} positions; choose a smaller length"
            )

    def _tokenizer(self) -> PreTrainedTokenizerBase:
        tokenizer = _load_tokenizer(self.folder)
        # Right padding: a batch is trimmed to its longest text by cutting columns on the right.
        tokenizer.padding_side = "right"
        if tokenizer.pad_token is None:
            # The padding is masked out of attention and never a label, so which token it is does
            # not matter; task_from_files refused a tokenizer that has neither.
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer


class OwnClassification(OwnTask, TextClassification):
    """A user's transformers model (``AutoModelForSequenceClassification``: the pretrained body and
    a new head) on a table of texts and labels; the head is fitted as a linear probe first, as on
    the built-in tasks.

    Class variables beyond :class:`OwnTask`: ``labels`` (every row's label, as text) and
    ``probe_path`` (the head's layer that outputs the logits).
    """

    labels: ClassVar[tuple[str, ...]]
    probe_path: ClassVar[str]

    def __init__(self, sizes: Sizes) -> None:
        super().__init__(sizes)
        self._index: dict[str, np.ndarray] | None = None

    def check(self) -> str:
        self._index, how = self._draw()
        used = ", ".join(f"{split} {len(index)}" for split, index in self._index.items())
        return f"{self.name}: {how}; used: {used}"

    def _draw(self) -> tuple[dict[str, np.ndarray], str]:
        """The rows of each split, and how they were chosen."""
        self._check_length()
        s, rng = self.sizes, np.random.default_rng(DATA_SEED)
        if self.splits is None:
            order = rng.permutation(len(self.texts))
            index = _split(order, {"test": s.test, "val": s.val, "probe": s.probe, "train": s.train}, self.name)
            return index, f"no {SPLIT_COLUMN!r} column: split drawn with data seed {DATA_SEED} from {len(order)} rows"
        rows = {split: np.flatnonzero(np.array(self.splits) == split) for split in SPLIT_NAMES.values()}
        named = {v: k for k, v in SPLIT_NAMES.items()}
        index = _split(
            rng.permutation(rows["train"]),
            {"probe": s.probe, "train": s.train},
            f"{self.name} (its {named['train']!r} rows)",
        )
        for split in ("val", "test"):
            index[split] = _split(
                rng.permutation(rows[split]), {split: getattr(s, split)}, f"{self.name} (its {named[split]!r} rows)"
            )[split]
        return index, f"{SPLIT_COLUMN!r} column: " + ", ".join(f"{named[k]} {len(v)} rows" for k, v in rows.items())

    def _texts(self) -> dict[str, tuple[list[str], list[str]]]:
        index = self._index if self._index is not None else self._draw()[0]
        return {split: ([self.texts[i] for i in rows], [self.labels[i] for i in rows]) for split, rows in index.items()}

    def _classifier(self, classes: int) -> tuple[nn.Module, PreTrainedTokenizerBase]:
        from transformers import AutoModelForSequenceClassification

        tokenizer = self._tokenizer()
        model = AutoModelForSequenceClassification.from_pretrained(
            self.folder, num_labels=classes, dtype=torch.float32, local_files_only=True
        )
        # A decoder classifies from the last token that is not padding, found through this id.
        model.config.pad_token_id = tokenizer.pad_token_id
        return model, tokenizer

    def probe_layer(self) -> str:
        return self.probe_path

    def logits(self, model: nn.Module, batch: Batch) -> Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


class OwnLanguageModel(OwnTask, LanguageModelling):
    """A user's causal language model (``AutoModelForCausalLM``) on their documents, scored by
    held-out perplexity. Without a ``split`` column, whole documents are held out: drawn with
    ``DATA_SEED`` until the test, then the validation blocks are filled; the rest train."""

    head = ()
    full_lr = 5e-5  # a usual full fine-tuning rate for a small causal LM, as on the built-in task

    def __init__(self, sizes: Sizes) -> None:
        super().__init__(sizes)
        self._blocks_by_split: dict[str, Batch] | None = None

    def check(self) -> str:
        self._blocks_by_split, how = self._split()
        s = self.sizes
        return f"{self.name}: {how}; blocks of {s.length} tokens: train {s.train}, val {s.val}, test {s.test}"

    def _split(self) -> tuple[dict[str, Batch], str]:
        """The blocks of each split, and how the documents were split."""
        self._check_length()
        tokenizer = self._tokenizer()
        if self.splits is None:
            documents, drawn = self._draw(tokenizer)
            how = (
                f"no {SPLIT_COLUMN!r} column: whole documents held out, drawn with data seed {DATA_SEED}: "
                + ", ".join(f"{split} {count}" for split, count in drawn.items())
                + " documents"
            )
        else:
            documents = {
                split: [t for t, s in zip(self.texts, self.splits, strict=True) if s == split]
                for split in ("train", "val", "test")
            }
            how = f"{SPLIT_COLUMN!r} column: " + ", ".join(f"{k} {len(v)}" for k, v in documents.items()) + " documents"
        return self._blocks(tokenizer, documents), how

    def _draw(self, tokenizer: PreTrainedTokenizerBase) -> tuple[dict[str, list[str]], dict[str, int]]:
        """Whole documents for test, then validation, in a seeded order until each holds its blocks'
        tokens; the rest for training."""
        separator = 0 if tokenizer.eos_token_id is None else 1
        order = list(np.random.default_rng(DATA_SEED).permutation(len(self.texts)))
        held_out: dict[str, list[str]] = {}
        for split in ("test", "val"):
            needed, held_out[split] = getattr(self.sizes, split) * self.sizes.length, []
            while needed > 0 and order:
                text = self.texts[order.pop(0)]
                held_out[split].append(text)
                needed -= len(tokenizer(text)["input_ids"]) + separator
        documents = {"train": [self.texts[i] for i in order], "val": held_out["val"], "test": held_out["test"]}
        return documents, {split: len(texts) for split, texts in documents.items()}

    def _load(self) -> tuple[nn.Module, dict[str, Batch]]:
        from transformers import AutoModelForCausalLM

        blocks = self._blocks_by_split if self._blocks_by_split is not None else self._split()[0]
        model = AutoModelForCausalLM.from_pretrained(self.folder, dtype=torch.float32, local_files_only=True)
        return model, blocks


def task_from_files(
    model: str | Path,
    data: str | Path,
    kind: str,
    *,
    text_column: str = "text",
    label_column: str = "label",
    targets: Sequence[str] | None = None,
    length: int | None = None,
) -> type[OwnTask]:
    """The benchmark task type for a transformers model folder and a data file.

    Register it (:func:`rankwise.bench.register_task`) and run it by its name, which is the data
    file's name without suffix::

        task = task_from_files("my-model", "reviews.csv", "classification")
        register_task(task)
        run_bench("bench-out/reviews", PRESETS["quick"], tasks=[task.name])

    Args:
        model: a folder that ``save_pretrained`` wrote: ``config.json``, the weights and the
            tokenizer's files.
        data: ``.csv``, ``.tsv`` or ``.jsonl`` (a text column; a label column for classification;
            optionally a ``split`` column of ``train``, ``validation``, ``test``); for ``"lm"`` also
            ``.txt``, documents separated by blank lines.
        kind: ``"classification"`` (``AutoModelForSequenceClassification``, a new head fitted as a
            linear probe; accuracy and macro-F1) or ``"lm"`` (``AutoModelForCausalLM``; held-out
            perplexity).
        text_column: the column holding the text (tables only).
        label_column: the column holding the label (classification); any JSON value is a label.
        targets: the layers every method adapts: module names or ``re:`` patterns, as in
            ``AdapterConfig.targets``. Default: every square linear layer (``in_features ==
            out_features``) outside the head, so that the methods which need square layers run too.
        length: tokens per sequence; default: the preset's.

    Raises:
        ValueError: a missing folder or file, a folder that is not a transformers model (or has no
            model class or tokenizer for ``kind``), an unknown column (the message lists those
            found), fewer than two labels, a ``split`` value other than the three, or a target that
            matches no module (the message lists module names).
    """
    if kind not in KINDS:
        raise ValueError(f"task kind {kind!r} is not one of {list(KINDS)}")
    if length is not None and length < 1:
        raise ValueError(f"length={length} must be >= 1")
    folder, data = Path(model), Path(data)
    _check_folder(folder)
    if not data.is_file():
        raise ValueError(f"data file {data} does not exist" if not data.exists() else f"data {data} is not a file")
    columns = {"text": text_column} | ({"label": label_column} if kind == "classification" else {})
    texts, labels, splits = _read(data, kind, columns)
    attributes: dict[str, Any] = {}
    if kind == "classification":
        classes = sorted(set(labels))
        if len(classes) < 2:
            labels_found = f"{len(classes)} distinct label{'s' * (len(classes) != 1)} ({classes})"
            raise ValueError(f"{data}: column {label_column!r} holds {labels_found}; classification needs at least 2")
        attributes.update(labels=tuple(labels))
    skeleton, config = _skeleton(folder, kind, len(set(labels)))
    tokenizer = _load_tokenizer(folder)
    if kind == "classification" and tokenizer.pad_token is None and tokenizer.eos_token is None:
        raise ValueError(
            f"{folder}: the tokenizer has no padding token (nor an end-of-sequence token to pad with); "
            "set one and save it again"
        )
    head = _head(skeleton) if kind == "classification" else ()
    if kind == "classification":
        attributes.update(probe_path=_probe_path(skeleton, head, len(set(labels)), folder))
    if targets:
        chosen, note = tuple(targets), "targets: " + ", ".join(targets)
    else:
        chosen = _square_layers(skeleton, head, folder)
        names = sorted({path.rsplit(".", 1)[-1] for path in chosen})
        note = (
            f"targets (default: every square linear layer outside the head; --targets to choose): "
            f"{len(chosen)} layers named {', '.join(names)}"
        )
    try:
        default_budget(skeleton, chosen, head)  # matches every target, as adapting will
    except TypeError as error:  # a target that is no layer an adapter can wrap
        raise ValueError(str(error)) from None
    base = OwnClassification if kind == "classification" else OwnLanguageModel
    rows = f"{len(texts):,} {'rows' if kind == 'classification' or data.suffix in TABLES else 'documents'}"
    what = f"{len(set(labels))} classes" if kind == "classification" else "perplexity"
    attributes.update(
        name=data.stem,
        description=f"{data.name} ({rows}, {what}); model {folder.name}",
        targets=chosen,
        head=head,
        folder=folder,
        data_file=data,
        columns=columns,
        texts=tuple(texts),
        splits=splits,
        length=length,
        max_length=getattr(config, "max_position_embeddings", None),
        targets_note=note,
        __module__=__name__,
    )
    return type(f"{base.__name__}[{data.name}]", (base,), attributes)


def _check_folder(folder: Path) -> None:
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

    if not folder.is_dir():
        raise ValueError(
            f"model folder {folder} does not exist"
            if not folder.exists()
            else f"model {folder} is a file; give the folder save_pretrained wrote"
        )
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"{folder} is not a transformers model folder: it has no config.json (save the model with save_pretrained)"
        )
    weights = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
    if not any((folder / name).is_file() for name in weights):
        raise ValueError(
            f"{folder} is not a transformers model folder: it has a config.json but no weights (one of {list(weights)})"
        )


def _read(data: Path, kind: str, columns: dict[str, str]) -> tuple[list[str], list[str], tuple[str, ...] | None]:
    """Every row's text, label (as text; empty for a language model) and split (``None`` without
    a split column)."""
    if data.suffix in DOCUMENTS:
        if kind == "classification":
            raise ValueError(
                f"{data}: a {data.suffix} file holds documents, not labels; classification needs one of {list(TABLES)}"
            )
        return read_documents(data), [], None
    if data.suffix not in TABLES:
        allowed = [*TABLES, *DOCUMENTS] if kind == "lm" else list(TABLES)
        raise ValueError(f"{data}: the data must be one of {allowed}, not {data.suffix or 'a file without suffix'!r}")
    found, rows = read_table(data)
    for role, column in columns.items():
        if column not in found:
            raise ValueError(f"{data}: no {role} column {column!r}; its columns: {found}")
    texts, labels = [], []
    for number, row in enumerate(rows, 1):
        text = row.get(columns["text"])
        if not isinstance(text, str):
            raise ValueError(f"{data}, row {number}: the text ({columns['text']!r}) is {text!r}, not a string")
        texts.append(text)
        if kind == "classification":
            label = row.get(columns["label"])
            if label is None or label == "" or (isinstance(label, float) and not math.isfinite(label)):
                raise ValueError(f"{data}, row {number}: no label ({columns['label']!r} is {label!r})")
            if isinstance(label, float) and label.is_integer():
                label = int(label)  # JSON has one number type: 1.0 and 1 are one class
            # Labels are compared as text: a JSON file's 1, true or [1, 2] are labels too.
            labels.append(label if isinstance(label, str) else json.dumps(label, sort_keys=True))
    if SPLIT_COLUMN not in found:
        return texts, labels, None
    values = [row.get(SPLIT_COLUMN) for row in rows]
    unknown = sorted({str(v) for v in values if v not in SPLIT_NAMES})
    if unknown:
        raise ValueError(f"{data}: column {SPLIT_COLUMN!r} holds {unknown}; allowed: {list(SPLIT_NAMES)}")
    return texts, labels, tuple(SPLIT_NAMES[str(v)] for v in values)


def _skeleton(folder: Path, kind: str, classes: int) -> tuple[PreTrainedModel, PretrainedConfig]:
    """The model of ``kind`` built from the folder's config on the meta device (no weights, no memory),
    and the config: module names and shapes without loading anything."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    try:
        options = {"num_labels": classes} if kind == "classification" else {}
        config = AutoConfig.from_pretrained(folder, local_files_only=True, **options)
    except (OSError, ValueError) as error:
        raise ValueError(f"{folder} is not a transformers model folder: {str(error).splitlines()[0]}") from None
    auto = AutoModelForSequenceClassification if kind == "classification" else AutoModelForCausalLM
    try:
        with torch.device("meta"):
            return auto.from_config(config), config
    except ValueError as error:  # no class of this kind for the architecture
        raise ValueError(
            f"{folder}: transformers has no {auto.__name__} for a {config.model_type!r} model "
            f"({str(error).splitlines()[0]})"
        ) from None


def _load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    # Without these files transformers 5 builds a tokenizer of the model type's special tokens
    # only, which would read every word as unknown.
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(
            f"{folder}: no tokenizer in it (none of {list(TOKENIZER_FILES)}); save the tokenizer "
            "with save_pretrained into the same folder"
        )
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(
            f"{folder}: no tokenizer could be loaded from it (save the tokenizer with save_pretrained "
            f"into the same folder): {str(error).splitlines()[0]}"
        ) from None


def _head(model: PreTrainedModel) -> tuple[str, ...]:
    """The new head of a transformers classifier: its children with parameters outside the
    pretrained body (``base_model``), such as BERT's ``classifier`` or Llama's ``score``."""
    return tuple(
        name
        for name, child in model.named_children()
        if child is not model.base_model and any(True for _ in child.parameters())
    )


def _probe_path(model: PreTrainedModel, head: tuple[str, ...], classes: int, folder: Path) -> str:
    """The head's linear layer that outputs the ``classes`` logits."""
    found = [
        path
        for path, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and module.out_features == classes
        and any(path == name or path.startswith(name + ".") for name in head)
    ]
    if len(found) != 1:
        raise ValueError(
            f"{folder}: the classifier head {list(head)} has {len(found)} linear layers with {classes} "
            "outputs; the linear probe needs exactly one"
        )
    return found[0]


def _square_layers(model: PreTrainedModel, head: tuple[str, ...], folder: Path) -> tuple[str, ...]:
    """Every linear layer with ``in_features == out_features`` outside the head and the output
    embedding: the built-in tasks' choice of square layers, so that every method can run."""
    output = model.get_output_embeddings()
    paths = []
    for path, module in model.named_modules():
        kind = geometry.base_kind(module)
        inside_head = any(path == h or path.startswith(h + ".") for h in head)
        if kind not in ("linear", "conv1d") or module is output or inside_head:
            continue
        out_features, in_features = geometry.weight_matrix(module, kind).shape
        if in_features == out_features:
            paths.append(path)
    if not paths:
        raise ValueError(f"{folder}: the model has no square linear layer to adapt by default; give the targets")
    return tuple(paths)
