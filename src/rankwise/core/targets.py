"""Which layers of a model a list of targets selects: one rule for ``rw.adapt`` and every compressor.

A target is a module name, a ``"re:"`` pattern or ``"all-linear"`` (see :class:`.config.AdapterConfig`).
The selection is refused, before anything changes, where replacing a layer could not mean what the
caller asked: a layer already adapted, a layer reachable at two paths, a target inside or around a
module trained in full.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from torch import nn

from . import geometry, quantized
from .adapted import Adapted
from .config import ALL_LINEAR, check_entry, matches

_EXAMPLES = 12  # module names shown when a target matches nothing


def select(
    model: nn.Module,
    targets: Iterable[str],
    *,
    trainable: Iterable[str] = (),
    skip: tuple[type[nn.Module], ...] = (),
    owner: str = "",
    embedding: bool = False,
    adapted: bool = False,
) -> list[str]:
    """Paths of the layers ``targets`` selects, in module order.

    ``"all-linear"`` is every ``nn.Linear`` and transformers ``Conv1D`` except the model's output
    embedding and the ``trainable`` modules with everything inside them.

    Args:
        trainable: entries (as in ``targets``) of modules trained in full, which no target may be,
            hold or lie in.
        skip: module types left out with everything inside them (a compressor's low-rank layers).
        owner: who selects, first in every message (``"lord"``); empty for ``rw.adapt``.
        embedding: whether an ``nn.Embedding`` may be selected (by name or pattern only, never by
            ``"all-linear"``): adapters take them, compressors do not.
        adapted: whether an adapted layer may be selected (a named adapter added beside others);
            its base is then the layer checked.

    Raises:
        ValueError: a target matches no module or is an invalid regular expression; a selected
            layer is adapted, is the same module as another path, or overlaps a trainable module.
        TypeError: a selected module is not a Linear, Conv1D or Conv2d with groups 1 (or, with
            ``embedding``, an Embedding without max_norm), holds a quantized weight of a layout
            rankwise cannot read, or (for a compressor) any quantized weight.
    """
    prefix = f"{owner}: " if owner else ""
    targets = tuple(targets)
    for entry in targets:
        try:
            check_entry(entry)
        except ValueError as error:
            raise ValueError(f"{prefix}target {error}") from None
    modules = dict(outer_modules(model, skip))
    trained = outermost_matches(modules, trainable)  # trained in full: no target may overlap them
    selected: set[str] = set()
    for entry in targets:
        hits = (
            _all_linear(model, modules, trained) if entry == ALL_LINEAR else {p for p in modules if matches(p, entry)}
        )
        if not hits:
            raise ValueError(f"{prefix}target {entry!r} matches no module; some module names: {examples(modules)}")
        selected |= hits
    if not selected:
        raise ValueError(f"{prefix}targets {targets} select no layer; some module names: {examples(modules)}")
    paths = [path for path in modules if path in selected]
    _check_layers(model, modules, paths, trained, prefix, owner=owner, embedding=embedding, adapted=adapted)
    return paths


def check_paths(
    model: nn.Module, paths: Iterable[str], *, trainable: Iterable[str] = (), adapted: bool = False
) -> None:
    """Refuse the layers at ``paths`` (given by path, as a checkpoint records them) where
    :func:`select` would refuse them for an adapter: the same checks and messages, so a loaded
    adapter cannot wrap what ``rw.adapt`` refuses. Embeddings are accepted, as adapters take them.

    Args:
        trainable: entries of the modules trained in full, which no layer may be, hold or lie in.
        adapted: whether an adapted layer may be given (an adapter added beside others).

    Raises:
        ValueError: a path names no module outside the adapted layers; a layer is adapted, is the
            same module as another path, or overlaps a trainable module.
        TypeError: a module is not a layer adapters support (see :func:`select`).
    """
    paths = list(paths)
    # Every path a module is registered at: a checkpoint may name a shared layer by any of them,
    # and it is refused as shared (below), not as absent.
    modules = dict(outer_modules(model, every_path=True))
    absent = [path for path in paths if path not in modules]
    if absent:
        # A path inside an adapted layer ('x.base') would nest one wrapper in another.
        raise ValueError(f"{absent} name no module of the model outside its adapted layers")
    trained = outermost_matches(modules, trainable)
    _check_layers(model, modules, paths, trained, "", owner="", embedding=True, adapted=adapted)


def _check_layers(
    model: nn.Module,
    modules: dict[str, nn.Module],
    paths: list[str],
    trained: list[str],
    prefix: str,
    *,
    owner: str,
    embedding: bool,
    adapted: bool,
) -> None:
    """The refusals of :func:`select` for the layers it (or a checkpoint) gives, ``trained`` the
    outermost trainable paths among ``modules``."""
    for path in paths:
        module = modules[path]
        if isinstance(module, Adapted):
            if not adapted:
                methods = sorted({c.method for c in module.configs.values()})
                raise ValueError(f"{prefix}'{path}' is already adapted ({', '.join(methods)}); unwrap the model first")
            module = module.base
        geometry.check_supported(module, path, embedding=embedding)
        if owner and quantized.is_quantized(module):
            # A compressor rewrites or trains the weight itself, which a packed weight cannot take.
            raise TypeError(
                f"{prefix}'{path}' has a quantized weight ({quantized.scheme(module, path)}); compress the float "
                "model, then quantize the result"
            )
    _check_overlap(paths, trained, prefix)
    _check_shared(model, paths, prefix)


def outer_modules(
    model: nn.Module, skip: tuple[type[nn.Module], ...] = (), *, every_path: bool = False
) -> Iterator[tuple[str, nn.Module]]:
    """Named modules, not descending into ``Adapted`` wrappers (their base is not a target) and
    leaving out modules of the ``skip`` types with everything inside them; a module registered at
    several paths under its first only, or under each with ``every_path``."""
    closed: list[str] = []
    for path, module in model.named_modules(remove_duplicate=not every_path):
        if any(path.startswith(prefix) for prefix in closed):
            continue
        if isinstance(module, (Adapted, *skip)):
            closed.append(path + "." if path else "")
        if not isinstance(module, skip):
            yield path, module


def outermost_matches(modules: dict[str, nn.Module], trainable: Iterable[str]) -> list[str]:
    """The paths ``trainable`` entries select among ``modules`` (never the root), outermost only."""
    entries = tuple(trainable)
    hits = [path for path in modules if path and any(matches(path, entry) for entry in entries)]
    return [path for path in hits if not any(_inside(path, outer) for outer in hits)]


def examples(modules: dict[str, nn.Module]) -> list[str]:
    """A few layer names of ``modules``, for an error message (module names if it has no layers)."""
    names = sorted({path.rsplit(".", 1)[-1] for path, m in modules.items() if path and geometry.base_kind(m)})
    return names[:_EXAMPLES] or sorted(p for p in modules if p)[:_EXAMPLES]


def _all_linear(model: nn.Module, modules: dict[str, nn.Module], trainable: list[str]) -> set[str]:
    get_head: Callable[[], nn.Module | None] | None = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    # An adapted Linear is still one of the model's linear layers: selecting it makes the
    # "already adapted" error fire instead of silently skipping it.
    kinds = {path: m.kind if isinstance(m, Adapted) else geometry.base_kind(m) for path, m in modules.items()}
    return {
        path
        for path, module in modules.items()
        if kinds[path] in ("linear", "conv1d")
        and module is not head
        and not any(path == t or _inside(path, t) for t in trainable)
    }


def _check_overlap(paths: list[str], trainable: list[str], prefix: str) -> None:
    # A trainable module around a target would train the frozen base weight in full (and its
    # saved copy could not be loaded back); one inside a target would be wrapped with it.
    pairs = [
        f"target '{path}' {'is' if path == t else 'is inside' if _inside(path, t) else 'contains'} trainable '{t}'"
        for path in paths
        for t in trainable
        if path == t or _inside(path, t) or _inside(t, path)
    ]
    if pairs:
        raise ValueError(f"{prefix}modules are both targets and trainable ({'; '.join(pairs)}); choose one")


def _check_shared(model: nn.Module, paths: list[str], prefix: str) -> None:
    # named_modules() lists a module once, under its first path: a wrapper installed there would
    # leave every other use of the module bare, and merging would then change those uses too.
    every_path: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        every_path.setdefault(id(module), []).append(path)
    for path in paths:
        others = [p for p in every_path[id(model.get_submodule(path))] if p != path]
        if others:
            raise ValueError(
                f"{prefix}'{path}' is the same module as {others}; replacing it at one path would leave the "
                "others unchanged. Give each use its own module, or select none of them"
            )


def _inside(path: str, outer: str) -> bool:
    """Whether ``path`` lies strictly inside the module at ``outer`` (the root holds every path)."""
    return path != outer and (not outer or path.startswith(outer + "."))
