"""Cuttlefish: train full-rank until every layer's stable rank settles, then switch to low rank.

Wang et al., "Cuttlefish: Low-Rank Model Training without All the Tuning", MLSys 2023,
https://arxiv.org/abs/2305.02538. Each candidate layer's stable rank ``⌊Σ σ_i² / σ_max²⌋`` is
tracked every epoch; once all curves flatten, each layer is factorized by truncated SVD at its
scaled stable rank

    r_l = min(full_l, ⌈srank_l · ξ_l⌉),   ξ_l = full_l / srank_l at initialization,

and training continues low-rank with a fresh optimizer and Frobenius decay ``(λ/2)‖U V‖_F²``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import cast

import numpy as np
import torch
from torch import Tensor, nn

from ..core.checks import check_number
from ..core.distributed import from_rank_zero
from ..core.geometry import BaseKind, check_supported, layer_weight
from .layers import LowRankLayer, scheme_matrix
from .replace import replace_at_ranks, select_layers, spatial_conv_targets
from .report import CompressionReport, saves_parameters


def stable_rank(matrix: Tensor) -> int:
    """``⌊‖M‖_F² / ‖M‖_2²⌋ = ⌊Σ σ_i² / σ_max²⌋`` (the official code floors it).

    Raises:
        ValueError: for a zero matrix, whose stable rank is undefined.
    """
    sigma = torch.linalg.svdvals(matrix.detach().double())
    if sigma[0] == 0:
        raise ValueError("stable rank of a zero matrix is undefined")
    # A relative margin of float32's precision keeps a ratio that is an integer in exact arithmetic
    # (k equal singular values) from rounding to just below it and flooring to k − 1.
    return int((sigma.square().sum() / sigma[0].square()).item() * (1 + 1e-6))


class Cuttlefish:
    """The Cuttlefish schedule for one model. Call :meth:`epoch_start` at the start of every epoch::

        cf = Cuttlefish(model)                      # records ξ_l before any training
        optimizer = SGD(cf.param_groups(1e-4), lr=0.1, momentum=0.9)
        for epoch in range(epochs):
            if cf.epoch_start() is not None:        # the switch: layers were factorized
                optimizer = SGD(cf.param_groups(1e-4), lr=0.1, momentum=0.9)  # fresh momentum
            for x, y in batches:
                loss_fn(model(x), y).backward()
                cf.apply_frobenius_decay()           # after backward; a no-op before the switch
                optimizer.step(); optimizer.zero_grad()

    Detector (official code): the EMA of a layer's stable-rank series, weight ``2/(window+1)``; its
    central-difference slope ``d``; the layer is stable once ``epoch >= window`` and
    ``mean(|d|[-average:]) <= tolerance · scale``, ``scale`` from ``relax`` by how many layers are
    still unstable. Stability is monotone; when every layer is stable, the next epoch switches.

    Args:
        model: the full-rank network; a CNN or a transformers model.
        targets: layer names or ``"re:"`` patterns; ``None``: every k × k Conv2d but the first (the
            stem, 1 × 1 shortcuts and the classifier stay full-rank, as in the paper).
        keep_leading: K, how many of the leading targets also stay full-rank. The paper picks K
            by timing each block full- and low-rank on the target hardware (its ResNet-18 keeps
            conv1, layer1 and layer2.0); 0 factorizes every target.
        window: w, EMA span and minimum epochs before a layer can be stable (CIFAR: 15).
        average: L, slopes averaged (CIFAR: 11).
        tolerance: ε on the mean slope, in ranks per epoch (CIFAR: 0.1).
        relax: (n, factor) pairs: when at most n layers remain unstable, ε is multiplied by factor
            (the largest that applies). CIFAR: ×2.5 at 2 remaining, ×5 at 1.
        frobenius_decay: λ >= 0 of the Frobenius decay on each factor pair after the switch
            (CIFAR: the weight decay, 1e-4); 0 turns it off and the factors then take plain
            weight decay in :meth:`param_groups`.

    Raises:
        ValueError: a value out of range or no target layer. TypeError: an unsupported target.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        targets: str | Iterable[str] | None = None,
        keep_leading: int = 0,
        window: int = 15,
        average: int = 11,
        tolerance: float = 0.1,
        relax: tuple[tuple[int, float], ...] = ((2, 2.5), (1, 5.0)),
        frobenius_decay: float = 1e-4,
    ) -> None:
        for name, value, low in (("keep_leading", keep_leading, 0), ("window", window, 1), ("average", average, 1)):
            check_number("Cuttlefish", name, value, low, integer=True)
        check_number("Cuttlefish", "tolerance", tolerance, 0)
        check_number("Cuttlefish", "frobenius_decay", frobenius_decay, 0)
        for count, factor in relax:
            check_number("Cuttlefish", "relax count", count, 0, integer=True)
            check_number("Cuttlefish", "relax factor", factor, 0, low_open=True)
        names = spatial_conv_targets(model) if targets is None else targets
        layers = select_layers(model, names, "Cuttlefish")[keep_leading:] if names else []
        if not layers:
            raise ValueError(f"Cuttlefish: no layer to factorize (targets={targets}, keep_leading={keep_leading})")
        self.model = model
        self.layers: list[tuple[str, nn.Module, BaseKind]] = [(p, m, check_supported(m, p)) for p, m in layers]
        self.window, self.average, self.tolerance, self.relax = window, average, tolerance, relax
        self.frobenius_decay = frobenius_decay
        self.full_ranks = {p: min(scheme_matrix(m, k, "channel").shape) for p, m, k in self.layers}
        # ξ_l from the initial weights, before any training step.
        self.scales = {p: self.full_ranks[p] / stable_rank(scheme_matrix(m, k, "channel")) for p, m, k in self.layers}
        self.history: dict[str, list[int]] = {p: [] for p, _, _ in self.layers}
        self.stable: dict[str, bool] = {p: False for p, _, _ in self.layers}
        self.epoch = 0  # full-rank epochs observed
        self.report: CompressionReport | None = None  # set at the switch
        self._switch_next = False

    def epoch_start(self) -> CompressionReport | None:
        """Record this epoch's stable ranks and run the detector; at the switch epoch, factorize.

        Returns:
            The compression report at the switch (build a fresh optimizer then: the factor
            parameters are new objects), else ``None``.
        """
        if self.report is not None:
            return None
        if self._switch_next:
            return self.factorize()
        unstable = sum(not s for s in self.stable.values())
        threshold = self.tolerance * max([f for n, f in self.relax if unstable <= n], default=1.0)
        for path, layer, kind in self.layers:
            self.history[path].append(stable_rank(scheme_matrix(layer, kind, "channel")))
            if not self.stable[path]:
                self.stable[path] = self._flat(self.history[path], threshold)
        self._switch_next = bool(self._agree(int(all(self.stable.values()))))
        self.epoch += 1
        return None

    def ranks(self) -> dict[str, int]:
        """The scaled stable ranks ``min(full, ⌈srank · ξ⌉)`` of the current weights."""
        return {
            path: min(
                self.full_ranks[path], math.ceil(stable_rank(scheme_matrix(layer, kind, "channel")) * self.scales[path])
            )
            for path, layer, kind in self.layers
        }

    def factorize(self) -> CompressionReport:
        """Switch now: replace every layer by its truncated-SVD pair at :meth:`ranks` (computed from
        one snapshot of the weights). Layers where that rank saves no parameters stay full-rank."""
        ranks = {path: self._agree(rank) for path, rank in self.ranks().items()}
        chosen, kept = {}, []
        for path, layer, kind in self.layers:
            if saves_parameters(layer, kind, "channel", ranks[path]):
                chosen[path] = ranks[path]
            else:
                kept.append(path)
        self.report = replace_at_ranks(self.model, chosen, "channel", kept)
        return self.report

    def apply_frobenius_decay(self) -> None:
        """Add ``∇(λ/2)‖U V‖_F²`` to each factor pair's gradients: ``λ (UV) Vᵀ`` and ``λ Uᵀ (UV)``.

        Call after backward, before the optimizer step; before the switch it does nothing.
        """
        if self.report is None or self.frobenius_decay == 0:
            return
        for layer in self._factorized():
            params = [layer.U.weight, layer.V.weight]
            with torch.enable_grad():
                left, right = layer.factor_matrices()
                penalty = 0.5 * self.frobenius_decay * (left @ right).square().sum()
                grads = torch.autograd.grad(penalty, params)
            for param, grad in zip(params, grads, strict=True):
                if param.grad is None:
                    param.grad = grad
                else:
                    param.grad.add_(grad)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Optimizer groups as the official code builds them: plain weight decay on every ≥ 2-D
        parameter except the factors (which take Frobenius decay instead, when it is on); none on
        1-D parameters (biases, norms)."""
        factors = {id(p) for layer in self._factorized() for p in (layer.U.weight, layer.V.weight)}
        decayed: list[nn.Parameter] = []
        free: list[nn.Parameter] = []
        for param in self.model.parameters():
            if not param.requires_grad:
                continue
            exempt = param.dim() < 2 or (self.frobenius_decay > 0 and id(param) in factors)
            (free if exempt else decayed).append(param)
        return [{"params": decayed, "weight_decay": weight_decay}, {"params": free, "weight_decay": 0.0}]

    def _factorized(self) -> list[LowRankLayer]:
        if self.report is None:
            return []
        # The report lists the layers this switch replaced, each by a LowRankLinear or LowRankConv2d.
        return [cast(LowRankLayer, self.model.get_submodule(layer.path)) for layer in self.report.layers]

    def _agree(self, value: int) -> int:
        """Rank 0's value on every replica (SVDs may round differently across devices)."""
        tensor = torch.tensor(value, dtype=torch.int64, device=layer_weight(self.layers[0][1]).device)
        return int(from_rank_zero(tensor).item())

    def _flat(self, series: list[int], threshold: float) -> bool:
        if self.epoch < self.window:
            return False
        weight = 2 / (self.window + 1)
        ema = [float(series[0])]
        for value in series[1:]:
            ema.append(weight * value + (1 - weight) * ema[-1])
        slopes = np.abs(np.gradient(np.array(ema)))  # central differences, one-sided at the ends
        return float(slopes[-self.average :].mean()) <= threshold
