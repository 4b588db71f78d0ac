"""``summary(model)``: trainable and total parameters, and one row per adapted layer."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from . import quantized
from .inject import adapted_modules


@dataclass(frozen=True)
class LayerRow:
    path: str
    method: str
    base: str
    shape: tuple[int, int]  # (out_features, in_features)
    params: int  # of this adapter's parameters, those that require grad
    merged: bool
    adapter: str  # its name
    active: bool


@dataclass(frozen=True)
class Summary:
    """What an adapted model trains. ``str()`` gives a table."""

    trainable: int
    total: int
    layers: tuple[LayerRow, ...]

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        header = ("layer", "adapter", "method", "base", "out x in", "params", "active", "merged")
        rows = [
            (
                r.path or "<root>",
                r.adapter,
                r.method,
                r.base,
                f"{r.shape[0]} x {r.shape[1]}",
                f"{r.params:,}",
                str(r.active),
                str(r.merged),
            )
            for r in self.layers
        ]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        lines = [
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]
        ]
        lines.append(f"trainable: {self.trainable:,} of {self.total:,} parameters ({100 * self.fraction:.4f}%)")
        return "\n".join(lines)


def summary(model: nn.Module) -> Summary:
    """Count parameters (shared ones once) and list the adapted layers, one row per adapter."""
    params = {id(p): p for p in model.parameters()}.values()
    # A packed quantized weight (bitsandbytes 4-bit: two values a byte) counts the values it stands for.
    counts = {
        id(m.weight): out_features * in_features
        for m in model.modules()
        if isinstance(m, nn.Linear) and quantized.is_quantized(m)
        for out_features, in_features in [quantized.shape(m)]
    }
    rows = tuple(
        LayerRow(
            path=path,
            method=layer.configs[name].method,
            base=layer.kind,
            shape=(adapter.out_features, adapter.in_features),
            params=sum(p.numel() for p in adapter.parameters() if p.requires_grad),
            merged=name in layer.merged_names,
            adapter=name,
            active=name in layer.active,
        )
        for path, layer in adapted_modules(model)
        for name, adapter in ((n, layer.adapter(n)) for n in layer.adapters)
    )
    return Summary(
        trainable=sum(p.numel() for p in params if p.requires_grad),
        total=sum(counts.get(id(p), p.numel()) for p in params),
        layers=rows,
    )
