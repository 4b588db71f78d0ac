"""Low-rank compression and low-rank training: layers are replaced, not adapted.

``lord`` compresses a trained model in one shot (one rank ratio, or ranks allocated under one
parameter budget) and ``heal`` fine-tunes it briefly at those ranks; ``TRP`` and ``Cuttlefish``
train a model into low rank; ``LoRAE`` learns a low-rank latent (``lorae_eval`` measures it as its
paper does). Compressed layers are :class:`LowRankLinear` and :class:`LowRankConv2d`, whose factors
are plain ``nn.Linear``/``nn.Conv2d`` children.
"""

from . import lorae_eval
from .checkpoint import from_pretrained, load_compressed, save_compressed, save_pretrained
from .cuttlefish import Cuttlefish, stable_rank
from .heal import heal
from .layers import LowRankConv2d, LowRankLinear
from .lorae import Autoencoder, LoRAE, train_autoencoder
from .lord import Calibration, calibrate, lord
from .report import CompressionReport, LayerReport
from .trp import TRP

__all__ = [
    "Autoencoder",
    "Calibration",
    "CompressionReport",
    "Cuttlefish",
    "LayerReport",
    "LoRAE",
    "LowRankConv2d",
    "LowRankLinear",
    "TRP",
    "calibrate",
    "from_pretrained",
    "heal",
    "load_compressed",
    "lord",
    "lorae_eval",
    "save_compressed",
    "save_pretrained",
    "stable_rank",
    "train_autoencoder",
]
