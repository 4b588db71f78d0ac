"""The LoRAE evaluation pieces against closed forms: the effective rank of a known spectrum, the
Fréchet distance, the Gaussian mixture on separated clusters, the pixel-PCA features."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rankwise.compress.lorae import Autoencoder
from rankwise.compress.lorae_eval import GaussianMixture, evaluate_autoencoder, frechet_distance, pixel_pca


def test_effective_rank_of_a_known_spectrum() -> None:
    # Latents spread equally over 3 orthogonal directions (σ = 1, 1, 1, then 0): exp(entropy) = 3.
    class Fixed(Autoencoder):
        def latent(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1)[:, :4]

    basis = torch.eye(4)[:3]
    latents = torch.cat([basis, -basis]).repeat(2, 1)  # centred, equal energy per direction
    images = torch.zeros(len(latents), 1, 8, 8)
    images.view(len(latents), -1)[:, :4] = latents
    model = Fixed(nn.Identity(), nn.Sequential(nn.Linear(4, 64), nn.Unflatten(1, (1, 8, 8))))
    result = evaluate_autoencoder(model, images, images, features=pixel_pca(images, 2), components=1, samples=20)
    assert result.effective_rank == pytest.approx(3.0, rel=1e-6)


def test_frechet_distance_closed_forms() -> None:
    x = torch.randn(500, 3, dtype=torch.float64)
    shift = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    # Equal covariances: only the means differ.
    assert frechet_distance(x, x + shift) == pytest.approx(shift.square().sum().item(), rel=1e-9)
    # One dimension, b = 2a: mean², plus var + 4 var − 2·2 var = var.
    a = x[:, :1]
    assert frechet_distance(a, 2 * a) == pytest.approx((a.mean().square() + a.var()).item(), rel=1e-9)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)


def test_gaussian_mixture_finds_separated_clusters() -> None:
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]], dtype=torch.float64)
    data = torch.cat([c + 0.5 * torch.randn(200, 2, generator=generator, dtype=torch.float64) for c in centres])
    mixture = GaussianMixture.fit(data, 4, seed=1)
    found = sorted(mixture.means.tolist())
    expected = torch.tensor(sorted(centres.tolist()), dtype=torch.float64)
    torch.testing.assert_close(torch.tensor(found, dtype=torch.float64), expected, atol=0.15, rtol=0)
    torch.testing.assert_close(mixture.weights, torch.full((4,), 0.25, dtype=torch.float64), atol=1e-3, rtol=0)
    assert mixture.sample(50).shape == (50, 2)


def test_pixel_pca_projects_onto_the_leading_components() -> None:
    # Any images will do: PCA features are centred and ordered by variance.
    images = torch.rand(100, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    project = pixel_pca(images, components=5)
    features = project(images)
    assert features.shape == (100, 5)
    torch.testing.assert_close(features.mean(0), torch.zeros(5, dtype=torch.float64), atol=1e-10, rtol=0)
    variances = features.var(0)
    assert torch.all(variances[:-1] >= variances[1:])
