"""Evaluating an autoencoder as the LoRAE paper does: reconstruction error, the latent's effective
rank, and how well a Gaussian mixture fitted to the latent generates.

Mazumder et al., "Learning Low-Rank Latent Spaces with Simple Deterministic Autoencoder: Theoretical
and Empirical Insights", WACV 2024, https://arxiv.org/abs/2310.16194. Evaluation follows the official
code, with one substitute: FID needs Inception weights that cannot be downloaded, so generation
quality is a Fréchet distance in a feature space the caller supplies (e.g. :func:`pixel_pca`), named
as such. These are measurements of a trained model, apart from the method in
:mod:`rankwise.compress.lorae`; the mixture is ours so that rankwise needs no scikit-learn.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.checks import check_number
from .lorae import Autoencoder


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


@torch.no_grad()
def evaluate_autoencoder(
    model: Autoencoder,
    train_images: Tensor,
    test_images: Tensor,
    *,
    features: Callable[[Tensor], Tensor],
    components: int = 4,
    samples: int = 10_000,
    batch_size: int = 500,
    seed: int = 0,
) -> AutoencoderEval:
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
        return torch.cat([fn(data[i : i + batch_size].to(device)).cpu() for i in range(0, len(data), batch_size)])

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
    def fit(
        cls,
        data: Tensor,
        components: int,
        *,
        iterations: int = 100,
        tol: float = 1e-6,
        reg: float = 1e-6,
        seed: int = 0,
    ) -> GaussianMixture:
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
