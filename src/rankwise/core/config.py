"""The base of every method's config: what a target entry is, validation, JSON round trip."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from .checks import check_number

ALL_LINEAR = "all-linear"


@dataclass(frozen=True, kw_only=True)
class AdapterConfig:
    """Fields every method shares.

    Args:
        targets: which layers to adapt. Each entry is a module name matched against the end of
            module paths at a dot boundary (``"q_proj"``, ``"attn.c_attn"``), a regular expression
            matched against the whole path when prefixed with ``"re:"``
            (``"re:.*layers\\.[0-3]\\..*proj"``), or ``"all-linear"``: every ``nn.Linear`` and
            transformers ``Conv1D`` except the model's output embedding and the ``trainable``
            modules and the layers inside them. A single string is accepted and stored as a
            one-element tuple. A ``"re:"`` entry that does not compile is refused here.
        trainable: names (matched like ``targets``) of modules left trainable in full and saved
            with the adapter, such as a new classifier head (PEFT's ``modules_to_save``). A
            trainable module may not be, hold or lie inside a target (``adapt`` refuses it).
    """

    method: ClassVar[str] = ""  # set by the registry
    # The integer field that sets the method's size (``"rank"``, ``"block_size"``), which the
    # benchmark turns to match a parameter budget; ``None`` when the size is fixed by the layer.
    size_knob: ClassVar[str | None] = None
    # The learning rate the method's paper recommends (the benchmark's starting point).
    recommended_lr: ClassVar[float] = 1e-3

    targets: tuple[str, ...] = (ALL_LINEAR,)
    trainable: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("targets", "trainable"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, (value,))
            elif isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        owner = type(self).__name__
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            _check_type(owner, field.name, value, hints[field.name])
            if isinstance(value, float):
                # A NaN or infinite alpha or dropout passes every range check and poisons the
                # outputs (and the saved JSON), whether or not the method checks the field itself.
                check_number(owner, field.name, value)
        if not self.targets:
            raise ValueError(f"{owner}: targets must name at least one module, got ()")
        for name in ("targets", "trainable"):
            for entry in getattr(self, name):
                if not entry:
                    raise ValueError(f"{owner}: {name} contains an empty name")
                try:
                    check_entry(entry)
                except ValueError as error:
                    raise ValueError(f"{owner}: {name}: {error}") from None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (tuples become lists)."""
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in dataclasses.fields(self)
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: for keys this config does not have (all of them are named), or a bad value.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown config keys {unknown}; allowed: {sorted(known)}")
        hints = typing.get_type_hints(cls)
        kwargs = {k: tuple(v) if isinstance(v, list) and _is_tuple_type(hints[k]) else v for k, v in data.items()}
        return cls(**kwargs)


def check_range(
    config: AdapterConfig,
    name: str,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise ``ValueError`` naming the config and the field unless its value is a finite number
    within the bounds (each optional, inclusive unless open); see :func:`.checks.check_number`."""
    check_number(type(config).__name__, name, getattr(config, name), low, high, low_open=low_open, high_open=high_open)


def matches(path: str, entry: str) -> bool:
    """Whether a module path is selected by one ``targets``/``trainable`` entry (not ``"all-linear"``).

    Raises:
        ValueError: a ``"re:"`` entry that is not a valid regular expression (quoted).
    """
    if entry.startswith("re:"):
        return _compile(entry).fullmatch(path) is not None
    return path == entry or path.endswith("." + entry)


def check_entry(entry: str) -> None:
    """Raise ``ValueError`` quoting ``entry`` if it is a ``"re:"`` entry that does not compile."""
    if entry.startswith("re:"):
        _compile(entry)


def _compile(entry: str) -> re.Pattern[str]:
    # re keeps its own cache of compiled patterns, so matching every module path stays cheap.
    try:
        return re.compile(entry[3:])
    except re.error as error:
        raise ValueError(f"{entry!r} is not a valid regular expression ({error})") from None


def _is_tuple_type(hint: Any) -> bool:
    return typing.get_origin(hint) is tuple or any(typing.get_origin(h) is tuple for h in typing.get_args(hint))


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(args) == len(value) and all(_matches(v, h) for v, h in zip(value, args, strict=True))
    if hint is type(None):
        return value is None
    if hint is float:  # an int is a fine float; a bool is not a number here
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _check_type(owner: str, name: str, value: Any, hint: Any) -> None:
    if not _matches(value, hint):
        allowed = typing.get_args(hint) if typing.get_origin(hint) is Literal else hint
        raise ValueError(f"{owner}: {name}={value!r} is not allowed; expected {allowed}")
