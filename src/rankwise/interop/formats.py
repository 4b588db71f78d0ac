"""The table of formats: how each rankwise config type maps onto one PEFT adapter type.

Every method PEFT and rankwise share with one-to-one parameters is one :class:`PeftFormat` entry;
:mod:`.convert` reads the table and names no method. To add a method: its PEFT type, the fields
that select it within that type, the layer kinds PEFT supports for it (and the attributes of
theirs its layer leaves out), its config fields both ways, its tensors (PEFT's name, our
parameter, PEFT's shape) and the per-layer fields PEFT writes as ``*_pattern`` dicts. Field by
field, and what is refused and why: ``docs/interop.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from ..adapters import BatConfig, BoneConfig, C3AConfig, DoRAConfig, GraLoRAConfig, LoRAConfig
from ..core.adapted import Adapted
from ..core.config import AdapterConfig
from ..core.geometry import layer_weight

# PEFT options of every type, and the values rankwise models; any other value changes the maths.
_ANY_TYPE = {
    "bias": ("none",),
    "layers_to_transform": (None,),
    "exclude_modules": (None,),
    "trainable_token_indices": (None,),
    "target_parameters": (None,),
}
# How PEFT matches a ``*_pattern`` key ("{}") against a layer path.
_LORA_KEY = r"(.*\.)?({})$"  # peft.utils.other.get_pattern_key
_C3A_KEY = r".*\.{}$"  # peft.tuners.c3a.model: a dot must precede the key, else only the exact path

Tensors = dict[str, tuple[Tensor, tuple[int, ...]]]  # PEFT's name -> (our parameter, its shape in PEFT's file)


@dataclass(frozen=True)
class Pattern:
    """A per-layer field that PEFT writes as a default plus ``{key: value}`` overrides."""

    field: str  # the rankwise config field, e.g. "rank"
    peft_field: str  # PEFT's default, e.g. "r"
    peft_pattern: str  # PEFT's overrides, e.g. "rank_pattern"
    key_regex: str  # _LORA_KEY or _C3A_KEY
    value: Callable[[Adapted], Any]  # the value a layer actually uses
    cast: Callable[[Any], Any] = int


@dataclass(frozen=True)
class PeftFormat:
    """How one rankwise config type maps onto one PEFT adapter type."""

    config_class: type[AdapterConfig]
    peft_type: str
    variant: dict[str, tuple[Any, ...]]  # PEFT fields that pick this method among its type's (DoRA in LORA)
    bases: frozenset[str]  # the layer kinds PEFT supports for it
    write: Callable[[Any, bool], dict[str, Any]]  # (config, any Conv1D layer) -> PEFT fields
    read: Callable[[dict[str, Any]], dict[str, Any]]  # PEFT fields -> config fields (targets aside)
    tensors: Callable[[Adapted], Tensors]
    patterns: tuple[Pattern, ...] = ()
    refused: dict[str, tuple[Any, ...]] = field(default_factory=dict)  # as _ANY_TYPE, for this type
    # The base layer's attributes PEFT's layer for this method does not apply, {name: value}: a
    # layer of a supported kind that PEFT would still compute differently. Empty where they agree.
    unapplied: Callable[[nn.Module], dict[str, Any]] = lambda base: {}


def _as_is(**tensors: Tensor) -> Tensors:
    return {name: (t, tuple(t.shape)) for name, t in tensors.items()}


def _param(layer: Adapted, name: str) -> Tensor:
    """The adapter's parameter ``name``, typed (attribute access on a module is ``Tensor | Module``)."""
    return layer.delta.get_parameter(name)


def _lora_tensors(layer: Adapted) -> Tensors:
    A, B = _param(layer, "A"), _param(layer, "B")
    if layer.kind == "conv2d":  # PEFT keeps A as a convolution kernel and B as a 1 x 1 one
        kernel = tuple(layer_weight(layer.base).shape[1:])  # (in, kh, kw)
        return {"lora_A.weight": (A, (A.shape[0], *kernel)), "lora_B.weight": (B, (*B.shape, 1, 1))}
    if layer.kind == "embedding":  # PEFT's own parameters, A (r, num_embeddings) and B (dim, r), as ours
        return _as_is(lora_embedding_A=A, lora_embedding_B=B)
    return _as_is(**{"lora_A.weight": A, "lora_B.weight": B})


def _gralora_tensors(layer: Adapted) -> Tensors:
    tensors = _as_is(gralora_A=_param(layer, "A"), gralora_B=_param(layer, "B"))
    if layer.delta.hybrid_rank:
        tensors |= _as_is(
            **{
                "gralora_A_general.weight": _param(layer, "hybrid_A"),
                "gralora_B_general.weight": _param(layer, "hybrid_B"),
            }
        )
    return tensors


def _lora_unapplied(base: nn.Module) -> dict[str, Any]:
    """PEFT's LoRA conv layer builds ``lora_A`` as ``Conv2d(in, r, kernel_size, stride, padding)``, so
    it leaves out the base's dilation, which rankwise's patches (``geometry.to_features``) take.
    Dilation changes nothing along an axis whose kernel is 1 wide. ``lora_A`` leaves out groups and
    padding_mode too, but rankwise adapts only ``groups=1``, ``padding_mode="zeros"`` convolutions
    (``geometry.check_supported``), which are PEFT's defaults; ``lora_B`` is 1 x 1, stride 1, as ours.
    """
    if not isinstance(base, nn.Conv2d):
        return {}
    if any(k > 1 and d != 1 for k, d in zip(base.kernel_size, base.dilation, strict=True)):
        return {"dilation": base.dilation}
    return {}


def _lora_write(config: LoRAConfig, conv1d: bool) -> dict[str, Any]:
    return {
        "lora_dropout": config.dropout,
        "use_rslora": config.rslora,
        "use_dora": isinstance(config, DoRAConfig),
        "fan_in_fan_out": conv1d,
        "init_lora_weights": True if config.init == "kaiming" else "gaussian",
    }


def _lora_read(meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "rank": meta["r"],
        "alpha": float(meta["lora_alpha"]),
        "dropout": float(meta.get("lora_dropout", 0.0)),
        "rslora": bool(meta.get("use_rslora", False)),
        "init": "gaussian" if meta.get("init_lora_weights") == "gaussian" else "kaiming",
    }


_LINEAR = frozenset({"linear"})
_LORA_PATTERNS = (
    Pattern("rank", "r", "rank_pattern", _LORA_KEY, lambda layer: layer.delta.config.rank),
    Pattern("alpha", "lora_alpha", "alpha_pattern", _LORA_KEY, lambda layer: layer.delta.config.alpha, float),
)
# LoRA variants PEFT switches on by a field; and the inits that rewrite the base weights as PEFT
# loads the adapter (PiSSA, OLoRA, CorDA, LoftQ, MiCA), so that W0 + ΔW would not be PEFT's model.
_LORA_REFUSED = {
    "lora_bias": (False,),
    "layer_replication": (None,),
    "use_qalora": (False,),
    "alora_invocation_tokens": (None,),
    "use_bdlora": (None,),
    "velora_config": (None,),
    "monteclora_config": (None,),
    "arrow_config": (None,),
    "kasa_config": (None,),
    "init_lora_weights": (True, False, "gaussian", "eva", "orthogonal"),
}

FORMATS: dict[type[AdapterConfig], PeftFormat] = {
    f.config_class: f
    for f in (
        PeftFormat(
            LoRAConfig,
            "LORA",
            {"use_dora": (False, None)},
            frozenset({"linear", "conv1d", "conv2d", "embedding"}),
            write=_lora_write,
            read=_lora_read,
            tensors=_lora_tensors,
            patterns=_LORA_PATTERNS,
            refused=_LORA_REFUSED,
            unapplied=_lora_unapplied,
        ),
        PeftFormat(
            DoRAConfig,
            "LORA",
            {"use_dora": (True,)},
            frozenset({"linear", "conv1d", "embedding"}),
            write=_lora_write,
            read=_lora_read,
            patterns=_LORA_PATTERNS,
            refused=_LORA_REFUSED,
            tensors=lambda layer: _lora_tensors(layer) | _as_is(lora_magnitude_vector=_param(layer, "magnitude")),
        ),
        PeftFormat(
            C3AConfig,
            "C3A",
            {},
            _LINEAR,
            write=lambda config, _: {"init_weights": True if config.init == "zeros" else "xavier_uniform"},
            # PEFT's other inits (gaussian, kaiming_uniform) only start a kernel that the file replaces.
            read=lambda meta: {
                "block_size": meta["block_size"],
                "init": "zeros" if meta.get("init_weights") is True else "xavier_uniform",
            },
            tensors=lambda layer: _as_is(c3a_kernel=_param(layer, "kernel")),
            # block_size=None (gcd per layer) becomes the commonest block size plus a pattern.
            patterns=(
                Pattern(
                    "block_size", "block_size", "block_size_pattern", _C3A_KEY, lambda layer: layer.delta.block_size
                ),
            ),
        ),
        PeftFormat(
            GraLoRAConfig,
            "GRALORA",
            {},
            frozenset({"linear", "conv1d"}),
            write=lambda config, conv1d: {
                "r": config.rank,
                "alpha": config.alpha,
                "gralora_k": config.k,
                "hybrid_r": config.hybrid_rank,
                "gralora_dropout": config.dropout,
                "fan_in_fan_out": conv1d,
                "init_weights": True,
            },
            read=lambda meta: {
                "rank": meta["r"],
                "alpha": float(meta["alpha"]),
                "k": meta.get("gralora_k", 2),
                "hybrid_rank": meta.get("hybrid_r", 0),
                "dropout": float(meta.get("gralora_dropout", 0.0)),
            },
            tensors=_gralora_tensors,
        ),
        PeftFormat(
            BoneConfig,
            "MISS",
            {"init_weights": (True, False, None)},
            _LINEAR,
            write=lambda config, _: {"r": config.rank, "miss_dropout": config.dropout, "init_weights": True},
            read=lambda meta: {"rank": meta["r"], "dropout": float(meta.get("miss_dropout", 0.0))},
            tensors=lambda layer: _as_is(miss_block=_param(layer, "D")),
        ),
        PeftFormat(
            BatConfig,
            "MISS",
            {"init_weights": ("bat",)},
            _LINEAR,
            write=lambda config, _: {"r": config.rank, "init_weights": "bat"},
            read=lambda meta: {"rank": meta["r"]},  # PEFT's Bat never applies miss_dropout
            tensors=lambda layer: _as_is(miss_block=_param(layer, "D")),
        ),
    )
}
