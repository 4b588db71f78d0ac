"""LoRAE: an autoencoder whose latent passes through one square linear layer with a nuclear-norm penalty.

Mazumder et al., "Learning Low-Rank Latent Spaces with Simple Deterministic Autoencoder: Theoretical
and Empirical Insights", WACV 2024, https://arxiv.org/abs/2310.16194:

    L = MSE(D(M E(x)), x) + λ ‖M‖_*,   M ∈ R^{n×n}, bias-free

Low rank in M bounds the rank of the latent ``z̄ = M z``, so a simple density (a 4-component
Gaussian mixture) fitted to ``z̄`` generates well. The paper's evaluation (that mixture, the latent's
effective rank, a Fréchet distance of generated images) is in :mod:`rankwise.compress.lorae_eval`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.checks import check_number


class Autoencoder(nn.Module):
    """The plain baseline ``x̂ = D(E(x))``; :class:`LoRAE` inserts ``M`` between the two.

    Args:
        encoder: maps images (batch, ...) to latents (batch, n).
        decoder: maps latents (batch, n) back to images.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def encode(self, x: Tensor) -> Tensor:
        """``z = E(x)``, the representation a downstream classifier reads (before M)."""
        return self.encoder(x)

    def latent(self, x: Tensor) -> Tensor:
        """The latent the decoder reads and a generator samples (``z̄``)."""
        return self.encode(x)

    def decode(self, latent: Tensor) -> Tensor:
        return self.decoder(latent)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.latent(x))

    def penalty(self) -> Tensor:
        """The regularizer added to the mean reconstruction MSE; none for the plain autoencoder."""
        return torch.zeros((), device=next(self.parameters()).device)


class LoRAE(Autoencoder):
    """LoRAE: ``x̂ = D(M E(x))`` with ``λ ‖M‖_*`` added to the loss.

    Args:
        encoder, decoder: as in :class:`Autoencoder`.
        latent_dim: n, the width of ``E``'s output and of ``M``.
        nuclear_weight: λ >= 0; 1e-5 is the official ``train.py`` default. It is tuned per data
            set: too large collapses the latent (blurry samples), too small gives a plain
            autoencoder. Its scale assumes a *mean* squared error.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, latent_dim: int, nuclear_weight: float = 1e-5) -> None:
        super().__init__(encoder, decoder)
        check_number("LoRAE", "latent_dim", latent_dim, 1, integer=True)
        check_number("LoRAE", "nuclear_weight", nuclear_weight, 0)
        # PyTorch's default (kaiming-uniform) init, as the official code: a zero M would leave the
        # SVD's gradient undefined (repeated zero singular values).
        self.M = nn.Linear(latent_dim, latent_dim, bias=False)
        self.nuclear_weight = nuclear_weight

    def latent(self, x: Tensor) -> Tensor:
        return self.M(self.encode(x))

    def penalty(self) -> Tensor:
        # The gradient of ‖M‖_* through the SVD is U Vᵀ.
        return self.nuclear_weight * torch.linalg.matrix_norm(self.M.weight, "nuc")


def train_autoencoder(
    model: Autoencoder,
    images: Tensor,
    *,
    steps: int,
    batch_size: int = 100,
    lr: float = 1e-4,
    seed: int = 0,
    progress: bool = False,
) -> list[float]:
    """Adam on ``MSE(x̂, x) + model.penalty()`` over random batches of ``images``.

    Args:
        images: (N, ...) training images in the decoder's range.
        steps: optimizer steps, >= 1. batch_size: 100 and lr: 1e-4 are the official defaults.
        seed: seeds the batch order.
        progress: show a tqdm bar.

    Returns:
        The loss of every step.
    """
    check_number("train_autoencoder", "steps", steps, 1, integer=True)
    check_number("train_autoencoder", "batch_size", batch_size, 1, integer=True)
    check_number("train_autoencoder", "lr", lr, 0, low_open=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    losses = []
    bar = _progress(steps, progress, "autoencoder")
    model.train()
    for _ in range(steps):
        index = torch.randint(len(images), (batch_size,), generator=generator)
        x = images[index].to(device)
        loss = F.mse_loss(model(x), x) + model.penalty()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    if bar is not None:
        bar.close()
    return losses


def _progress(total: int, enabled: bool, description: str) -> Any:  # a tqdm bar, or None
    if not enabled:
        return None
    from tqdm.auto import tqdm  # installed with transformers; imported only when asked for

    return tqdm(total=total, desc=description)
