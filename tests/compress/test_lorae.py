"""LoRAE: the nuclear penalty and its gradient against an SVD computed here, a lower-rank latent
than a plain autoencoder's after a few steps, and the evaluation pieces against closed forms."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rankwise.compress import (
    Autoencoder,
    GaussianMixture,
    LoRAE,
    evaluate_autoencoder,
    frechet_distance,
    pixel_pca,
    train_autoencoder,
)


def _networks(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    decoder = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 64), nn.Unflatten(1, (1, 8, 8)))
    return encoder, decoder


def _images(count: int = 400) -> torch.Tensor:
    """8 x 8 images on a 6-dimensional manifold."""
    generator = torch.Generator().manual_seed(0)
    basis = torch.randn(6, 64, generator=generator)
    return torch.sigmoid(torch.randn(count, 6, generator=generator) @ basis).reshape(count, 1, 8, 8)


def test_penalty_is_lambda_times_the_nuclear_norm_with_gradient_lambda_u_vt() -> None:
    model = LoRAE(*_networks(), latent_dim=16, nuclear_weight=0.3)
    U, S, Vh = torch.linalg.svd(model.M.weight.detach())
    penalty = model.penalty()
    assert penalty.item() == pytest.approx(0.3 * S.sum().item(), rel=1e-5)
    penalty.backward()
    torch.testing.assert_close(model.M.weight.grad, 0.3 * U @ Vh, rtol=0, atol=1e-5)


def test_latent_passes_through_m_and_the_plain_autoencoder_has_none() -> None:
    encoder, decoder = _networks()
    model = LoRAE(encoder, decoder, latent_dim=16)
    x = _images(3)
    torch.testing.assert_close(model.latent(x), encoder(x) @ model.M.weight.T)
    torch.testing.assert_close(model(x), decoder(encoder(x) @ model.M.weight.T))
    plain = Autoencoder(*_networks())
    assert plain.penalty().item() == 0 and torch.equal(plain.latent(x), plain.encode(x))


def test_lorae_latent_has_a_lower_effective_rank_than_a_plain_autoencoder() -> None:
    images = _images()
    train, test = images[:300], images[300:]
    features = pixel_pca(train, components=8)
    results = {}
    for name, model in (("plain", Autoencoder(*_networks())),
                        ("lorae", LoRAE(*_networks(), latent_dim=16, nuclear_weight=1e-2))):
        losses = train_autoencoder(model, train, steps=60, batch_size=50, lr=1e-3)
        assert losses[-1] < 0.5 * losses[0]
        results[name] = evaluate_autoencoder(model, train, test, features=features, samples=200)
    assert results["lorae"].effective_rank < 0.8 * results["plain"].effective_rank
    for result in results.values():
        assert 1 <= result.effective_rank <= 16 and result.frechet_distance >= 0
        assert result.singular_values.shape == (16,)


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
    images = _images(100)
    project = pixel_pca(images, components=5)
    features = project(images)
    assert features.shape == (100, 5)
    torch.testing.assert_close(features.mean(0), torch.zeros(5, dtype=torch.float64), atol=1e-10, rtol=0)
    variances = features.var(0)
    assert torch.all(variances[:-1] >= variances[1:])


def test_bad_values_name_the_field() -> None:
    with pytest.raises(ValueError, match="nuclear_weight=-1 must be >= 0"):
        LoRAE(*_networks(), latent_dim=16, nuclear_weight=-1)
    with pytest.raises(ValueError, match="steps=0"):
        train_autoencoder(Autoencoder(*_networks()), _images(10), steps=0)
