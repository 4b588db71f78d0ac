"""rankwise: low-rank and structured adaptation and compression of neural networks.

import rankwise as rw
model = rw.adapt(model, rw.LoRAConfig(rank=8, targets=("q_proj", "v_proj")))
"""

from types import ModuleType

from . import adapters, allocate, compress, decompose, interop, optim
from .adapters import *  # noqa: F403  (every method config, e.g. rw.LoRAConfig)
from .core.adapted import Adapted
from .core.checkpoint import CheckpointError, adapter_state_dict, load_adapter, read_adapter_config, save_adapter
from .core.combine import combine
from .core.config import AdapterConfig
from .core.inject import (
    active_adapters,
    adapt,
    adapter_names,
    delete_adapter,
    disabled,
    merge,
    per_example,
    set_active,
    unmerge,
    unwrap,
)
from .core.quantized import prepare_for_quantized_training
from .core.registry import make_config, methods, register
from .core.steps import step, step_with
from .core.summary import Summary, summary
from .version import __version__

__all__ = [
    *adapters.__all__,
    "adapters",
    "allocate",
    "compress",
    "decompose",
    "interop",
    "optim",
    "Adapted",
    "AdapterConfig",
    "CheckpointError",
    "Summary",
    "__version__",
    "active_adapters",
    "adapt",
    "adapter_names",
    "adapter_state_dict",
    "combine",
    "delete_adapter",
    "disabled",
    "load_adapter",
    "make_config",
    "merge",
    "methods",
    "per_example",
    "prepare_for_quantized_training",
    "read_adapter_config",
    "register",
    "save_adapter",
    "set_active",
    "step",
    "step_with",
    "summary",
    "unmerge",
    "unwrap",
]


def __getattr__(name: str) -> ModuleType:
    # rw.integrations imports transformers, which takes seconds: loaded on first use only.
    if name == "integrations":
        import importlib

        return importlib.import_module(".integrations", __name__)
    raise AttributeError(f"module 'rankwise' has no attribute {name!r}")
