"""Models built around a low-rank structure rather than adapted: the LoRAE autoencoder and its
plain-autoencoder baseline (implemented in :mod:`rankwise.compress.lorae`)."""

from .compress.lorae import Autoencoder, LoRAE, evaluate_autoencoder, train_autoencoder

__all__ = ["Autoencoder", "LoRAE", "evaluate_autoencoder", "train_autoencoder"]
