"""LoRAE: an autoencoder whose latent passes through one square linear layer with a nuclear-norm penalty.

Mazumder et al., "Learning Low-Rank Latent Spaces with Simple Deterministic Autoencoder: Theoretical
and Empirical Insights", WACV 2024, https://arxiv.org/abs/2310.16194:

    L = MSE(D(M E(x)), x) + λ ‖M‖_*,   M ∈ R^{n×n}, bias-free

Low rank in M bounds the rank of the latent ``z̄ = M z``, so a simple density (a 4-component
Gaussian mixture) fitted to ``z̄`` generates well. Evaluation here follows the official code, with
one substitute: FID needs Inception weights that cannot be downloaded, so generation quality is a
Fréchet distance in a feature space the caller supplies (e.g. :func:`pixel_pca`), named as such.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass(frozen=True)
class AutoencoderEval:
    """What :func:`evaluate_autoencoder` measures.

    Args:
        reconstruction_mse: mean squared error on the test images.
        effective_rank: Roy & Vetterli's ``exp(−Σ p_i log p_i)``, ``p = σ / Σσ`` over the singular
            values of the centred training latents ``z̄``; between 1 and n.
        singular_values: those singular values, descending (the spectrum the paper plots).
        frechet_distance: between the test images' features and the features of images decoded
            from latents sampled from a Gaussian mixture fitted to ``z̄``; in the caller's
            feature space (not FID unless that space is Inception's).
    """

    reconstruction_mse: float
    effective_rank: float
    singular_values: Tensor
    frechet_distance: float


def train_autoencoder(model: Autoencoder, images: Tensor, *, steps: int, batch_size: int = 100, lr: float = 1e-4,
                      seed: int = 0, progress: bool = False) -> list[float]:
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


@torch.no_grad()
def evaluate_autoencoder(model: Autoencoder, train_images: Tensor, test_images: Tensor, *,
                         features: Callable[[Tensor], Tensor], components: int = 4, samples: int = 10_000,
                         batch_size: int = 500, seed: int = 0) -> AutoencoderEval:
    """Reconstruction error, the latent's effective rank and a Fréchet distance of generated images.

    Generation follows the official code: a full-covariance Gaussian mixture with ``components``
    (4) components is fitted to the training latents ``z̄``, ``samples`` latents are drawn and
    decoded (10k for MNIST/FMNIST), and their features are compared with the test images'. The
    model runs in eval mode; its previous mode is restored afterwards.

    Args:
        features: maps a batch of images to (batch, d) feature vectors.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device

    def batched(fn: Callable[[Tensor], Tensor], data: Tensor) -> Tensor:
        return torch.cat([fn(data[i:i + batch_size].to(device)).cpu() for i in range(0, len(data), batch_size)])

    reconstructions = batched(model, test_images)
    mse = F.mse_loss(reconstructions, test_images.cpu()).item()
    latents = batched(model.latent, train_images).double()
    sigma = torch.linalg.svdvals(latents - latents.mean(0))
    p = sigma / sigma.sum()
    effective = math.exp(-(p[p > 0] * p[p > 0].log()).sum().item())
    mixture = GaussianMixture.fit(latents, components, seed=seed)
    generated = batched(model.decode, mixture.sample(samples, seed=seed).float())
    distance = frechet_distance(batched(features, generated), batched(features, test_images))
    model.train(was_training)
    return AutoencoderEval(mse, effective, sigma.float(), distance)


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """``‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2 (Σ_a^½ Σ_b Σ_a^½)^½)`` between two feature sets (N, d).

    The Fréchet (2-Wasserstein) distance of the Gaussians fitted to each set; FID is this in
    Inception-v3's pool features. Computed in float64 with symmetric eigendecompositions.
    """
    a, b = a.double().flatten(1), b.double().flatten(1)
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    root_a = _sqrt_psd(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    return float((mean_a - mean_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def pixel_pca(reference: Tensor, components: int = 64) -> Callable[[Tensor], Tensor]:
    """A feature map onto the top principal components of ``reference`` images' pixels.

    A Fréchet distance in this space ("FD-PCA") is an offline stand-in for FID: it compares the
    first two moments of generated and real images along the directions real images vary most.
    """
    flat = reference.double().flatten(1)
    mean = flat.mean(0)
    _, _, Vh = torch.linalg.svd(flat - mean, full_matrices=False)
    basis = Vh[:components].T  # (pixels, components)

    def project(images: Tensor) -> Tensor:
        return (images.double().flatten(1).cpu() - mean) @ basis

    return project


@dataclass(frozen=True)
class GaussianMixture:
    """A full-covariance Gaussian mixture: weights (k,), means (k, d), covariances (k, d, d)."""

    weights: Tensor
    means: Tensor
    covariances: Tensor

    @classmethod
    def fit(cls, data: Tensor, components: int, *, iterations: int = 100, tol: float = 1e-6,
            reg: float = 1e-6, seed: int = 0) -> GaussianMixture:
        """Expectation–maximization from k-means++ seeds as means (Arthur & Vassilvitskii 2007: each
        next seed drawn with probability ∝ its squared distance to the nearest seed, so clusters
        are not left without one), the data covariance for every component and equal weights;
        ``reg`` is added to each covariance's diagonal (scikit-learn's ``reg_covar``)."""
        data = data.double()
        n, d = data.shape
        check_number("GaussianMixture", "components", components, 1, n, integer=True)
        generator = torch.Generator().manual_seed(seed)
        seeds = [int(torch.randint(n, (1,), generator=generator))]
        for _ in range(components - 1):
            nearest = torch.cdist(data, data[seeds]).min(1).values.square()
            seeds.append(int(torch.multinomial(nearest / nearest.sum(), 1, generator=generator)))
        means = data[seeds]
        eye = torch.eye(d, dtype=data.dtype)
        covariances = (torch.cov(data.T).reshape(d, d) + reg * eye).expand(components, d, d).clone()
        weights = torch.full((components,), 1 / components, dtype=data.dtype)
        previous = -math.inf
        for _ in range(iterations):
            gaussians = torch.distributions.MultivariateNormal(means, covariances)
            log_joint = gaussians.log_prob(data[:, None]) + weights.log()  # (n, k)
            log_likelihood = torch.logsumexp(log_joint, 1)
            responsibilities = (log_joint - log_likelihood[:, None]).exp()  # (n, k)
            mass = responsibilities.sum(0) + 1e-12  # a component that lost every point stays finite
            weights = mass / n
            means = responsibilities.T @ data / mass[:, None]
            centred = data[None] - means[:, None]  # (k, n, d)
            weighted = centred * responsibilities.T[:, :, None]
            covariances = weighted.transpose(1, 2) @ centred / mass[:, None, None]  # (k, d, d)
            covariances = covariances + reg * eye
            mean_log_likelihood = log_likelihood.mean().item()
            if abs(mean_log_likelihood - previous) < tol:
                break
            previous = mean_log_likelihood
        return cls(weights, means, covariances)

    def sample(self, count: int, *, seed: int = 0) -> Tensor:
        generator = torch.Generator().manual_seed(seed)
        which = torch.multinomial(self.weights, count, replacement=True, generator=generator)
        noise = torch.randn(count, self.means.shape[1], generator=generator, dtype=self.means.dtype)
        chol = torch.linalg.cholesky(self.covariances)
        return self.means[which] + torch.einsum("nij,nj->ni", chol[which], noise)


def _sqrt_psd(matrix: Tensor) -> Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def _progress(total: int, enabled: bool, description: str) -> Any:  # a tqdm bar, or None
    if not enabled:
        return None
    from tqdm.auto import tqdm  # installed with transformers; imported only when asked for

    return tqdm(total=total, desc=description)
