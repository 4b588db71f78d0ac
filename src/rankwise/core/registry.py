"""Method name -> (config class, module class). Registering a method is all it takes to adapt,
save, load, benchmark and contract-test it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from .config import AdapterConfig
from .delta import Adapter


@dataclass(frozen=True)
class Method:
    name: str
    config_class: type[AdapterConfig]
    module_class: type[Adapter]
    summary: str  # one line for listings: the first line of the module's docstring


_METHODS: dict[str, Method] = {}
_BY_CONFIG: dict[type[AdapterConfig], Method] = {}

AdapterT = TypeVar("AdapterT", bound=type[Adapter])


def register(name: str, config_class: type[AdapterConfig]) -> Callable[[AdapterT], AdapterT]:
    """Class decorator: make ``module_class`` the implementation of ``name`` / ``config_class``."""

    def decorate(module_class: AdapterT) -> AdapterT:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is already registered")
        if config_class in _BY_CONFIG:
            raise ValueError(f"{config_class.__name__} is already registered as {_BY_CONFIG[config_class].name!r}")
        config_class.method = name
        module_class.config_class = config_class
        summary = (module_class.__doc__ or name).strip().splitlines()[0]
        method = Method(name, config_class, module_class, summary)
        _METHODS[name] = method
        _BY_CONFIG[config_class] = method
        return module_class

    return decorate


def methods() -> list[str]:
    """The registered method names, in registration order."""
    return list(_METHODS)


def get(name: str) -> Method:
    """The method registered as ``name``; ``ValueError`` listing the known names otherwise."""
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; registered: {methods()}") from None


def for_config(config: AdapterConfig) -> Method:
    """The method whose config type is exactly ``type(config)`` (a subclass is another method)."""
    try:
        return _BY_CONFIG[type(config)]
    except KeyError:
        raise TypeError(f"{type(config).__name__} is not a registered method config") from None


def make_config(name: str, **kwargs: Any) -> AdapterConfig:
    """Build the config of method ``name`` with the paper's defaults, overridden by ``kwargs``."""
    return get(name).config_class(**kwargs)
