"""TRP: train full-rank weights that become low-rank, then decompose them.

Xu et al., "TRP: Trained Rank Pruning for Efficient Deep Neural Networks", IJCAI 2020,
https://arxiv.org/abs/2004.14566. Every ``period`` steps each target weight is replaced by its
energy-truncated SVD, and the nuclear-norm sub-gradient ``λ U_k V_kᵀ`` is added to its gradient:

    W ← U_k Σ_k V_kᵀ,  k = min{k : Σ_{i≤k} σ_i² ≥ e · Σ_i σ_i²},   ∇W += λ U_k V_kᵀ

so the network ends inherently low-rank and :meth:`TRP.convert` decomposes it with little loss.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ..core.checks import check_number
from ..core.distributed import from_rank_zero
from ..core.geometry import BaseKind, check_supported, layer_weight
from ..decompose import truncated_svd
from .layers import SCHEMES, Scheme, from_scheme_matrix, scheme_matrix, write_scheme_matrix
from .replace import replace_at_ranks, select_layers, spatial_conv_targets
from .report import CompressionReport, saves_parameters


class TRP:
    """The TRP training helper for one model. Use it around an ordinary training loop::

        trp = TRP(model)
        for step, (x, y) in enumerate(batches):
            trp.truncate(step)                    # every `period` steps: W ← truncated SVD
            loss_fn(model(x), y).backward()
            trp.add_nuclear_gradient()            # ∇W += λ U_k V_kᵀ on those steps
            optimizer.step(); optimizer.zero_grad()
        trp.truncate()                            # once more, so the conversion is exact
        report = trp.convert()                    # low-rank layers at the ranks the rule gave

    Truncation writes the weights in place, so the optimizer and its momentum stay valid (the
    official code keeps SGD's momentum). Under torch.distributed every rank calls the same methods
    at the same steps; rank 0's truncated weights and sub-gradients are broadcast.

    Args:
        model: the network being trained; a CNN or a transformers model.
        targets: layer names or ``"re:"`` patterns; ``None`` selects the paper's layers: every
            Conv2d with a kernel other than 1 × 1, except the first (TRP keeps the stem, the 1 × 1
            shortcuts and the classifier whole). Linear and Conv1D targets are allowed.
        energy: e in (0, 1], the fraction of ``Σ σ²`` kept at each truncation; 0.9 as in the
            official CIFAR code (hard-coded there).
        period: m >= 1, truncate every m steps; 20 spreads the cost of the SVDs on large models
            (the CIFAR README uses 1).
        nuclear_weight: λ >= 0 of the nuclear-norm sub-gradient; 3e-4 (official README, CIFAR-10).
        scheme: how a conv kernel becomes a matrix: ``"channel"`` (N × C·kh·kw, a kh × kw conv to
            rank channels then 1 × 1) or ``"spatial"`` (C·kh × N·kw, a vertical kh × 1 conv then a
            horizontal 1 × kw one). Both truncation and the final decomposition use it.

    Raises:
        ValueError: a value out of range, or no target layer.
        TypeError: a target is not a Linear, Conv1D or Conv2d with groups 1.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        targets: str | Iterable[str] | None = None,
        energy: float = 0.9,
        period: int = 20,
        nuclear_weight: float = 3e-4,
        scheme: Scheme = "channel",
    ) -> None:
        check_number("TRP", "energy", energy, 0, 1, low_open=True)
        check_number("TRP", "period", period, 1, integer=True)
        check_number("TRP", "nuclear_weight", nuclear_weight, 0)
        if scheme not in SCHEMES:
            raise ValueError(f"TRP: scheme={scheme!r} is not allowed; expected one of {SCHEMES}")
        names = spatial_conv_targets(model) if targets is None else targets
        if not names:
            raise ValueError("TRP: no target layer (the model has no k x k convolution after the first); pass targets=")
        self.model = model
        self.layers: list[tuple[str, nn.Module, BaseKind]] = [
            (path, layer, check_supported(layer, path)) for path, layer in select_layers(model, names, "TRP")
        ]
        self.energy, self.period, self.nuclear_weight, self.scheme = energy, period, nuclear_weight, scheme
        self.ranks: dict[str, int] = {}  # each layer's rank at the last truncation
        self._subgradients: dict[str, Tensor] = {}

    def truncate(self, step: int | None = None) -> bool:
        """At steps divisible by ``period`` (or now, when ``step`` is ``None``), replace each target
        weight by its energy-truncated SVD and keep ``U_k V_kᵀ`` for :meth:`add_nuclear_gradient`.
        Returns whether it truncated."""
        if step is not None and step % self.period:
            return False
        for path, layer, kind in self.layers:
            matrix = scheme_matrix(layer, kind, self.scheme)
            svd = truncated_svd(matrix.detach().float(), energy=self.energy)
            truncated = from_rank_zero(svd.reconstruct().to(matrix.dtype))
            write_scheme_matrix(layer, kind, self.scheme, truncated)
            self.ranks[path] = int(from_rank_zero(torch.tensor(svd.rank, device=truncated.device)).item())
            if self.nuclear_weight > 0:
                self._subgradients[path] = from_rank_zero((svd.U @ svd.Vh).to(matrix.dtype))
        return True

    def add_nuclear_gradient(self) -> None:
        """After backward on a truncation step, add ``λ U_k V_kᵀ`` (a sub-gradient of ``λ‖W‖_*`` at
        the truncated W) to each target's gradient; on other steps it does nothing."""
        for path, layer, kind in self.layers:
            subgradient = self._subgradients.pop(path, None)
            if subgradient is None:
                continue
            weight = layer_weight(layer)
            if weight.grad is None:
                raise ValueError(f"TRP: '{path}' has no gradient; call add_nuclear_gradient() after backward()")
            with torch.no_grad():
                gradient = from_scheme_matrix(subgradient, kind, self.scheme, tuple(weight.shape))
                weight.grad.add_(gradient, alpha=self.nuclear_weight)

    def convert(self, *, threshold: float | None = None) -> CompressionReport:
        """Replace each target by its truncated-SVD pair of the current weights.

        By default each layer gets the rank the energy rule gave at the last truncation: the rank
        the network was trained at. (Applying the energy rule again to a truncated weight would cut
        it further, since its spectrum is the top of the old one.) Called right after a truncation,
        the converted model computes exactly what the truncated full model computes.

        Args:
            threshold: instead, keep every ``σ_i >= threshold`` of the current weights (the
                official code's rule for TRP-trained nets, 0.05).

        Layers whose rank would not save parameters stay full-rank (listed in the report). Build a
        new optimizer afterwards if training continues: the parameters are new objects.

        Raises:
            ValueError: no truncation has happened yet and no ``threshold`` is given.
        """
        if threshold is None and not self.ranks:
            raise ValueError("TRP.convert: no truncation has happened yet; call truncate() or pass threshold=")
        ranks, kept = {}, []
        for path, layer, kind in self.layers:
            if threshold is None:
                rank = self.ranks[path]
            else:
                rank = truncated_svd(scheme_matrix(layer, kind, self.scheme).detach().float(), threshold=threshold).rank
                rank = int(from_rank_zero(torch.tensor(rank, device=layer_weight(layer).device)).item())
            if saves_parameters(layer, kind, self.scheme, rank):
                ranks[path] = rank
            else:
                kept.append(path)
        return replace_at_ranks(self.model, ranks, self.scheme, kept)
