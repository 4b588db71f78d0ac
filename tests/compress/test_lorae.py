"""LoRAE: the nuclear penalty and its gradient against an SVD computed here, and a lower-rank latent
than a plain autoencoder's after a few steps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rankwise.compress import Autoencoder, LoRAE, train_autoencoder
from rankwise.compress.lorae_eval import evaluate_autoencoder, pixel_pca


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
    for name, model in (
        ("plain", Autoencoder(*_networks())),
        ("lorae", LoRAE(*_networks(), latent_dim=16, nuclear_weight=1e-2)),
    ):
        losses = train_autoencoder(model, train, steps=60, batch_size=50, lr=1e-3)
        assert losses[-1] < 0.5 * losses[0]
        results[name] = evaluate_autoencoder(model, train, test, features=features, samples=200)
    assert results["lorae"].effective_rank < 0.8 * results["plain"].effective_rank
    for result in results.values():
        assert 1 <= result.effective_rank <= 16 and result.frechet_distance >= 0
        assert result.singular_values.shape == (16,)


def test_bad_values_name_the_field() -> None:
    with pytest.raises(ValueError, match="nuclear_weight=-1 must be >= 0"):
        LoRAE(*_networks(), latent_dim=16, nuclear_weight=-1)
    with pytest.raises(ValueError, match="steps=0"):
        train_autoencoder(Autoencoder(*_networks()), _images(10), steps=0)
