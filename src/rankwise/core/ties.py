"""Tied weights: parameters and buffers that share memory, however the model ties them.

A transformers model ties its output head to its input embedding by giving both one
``Parameter``; a model may also register one module under two paths, or hold two views of one
storage. All of these are found the same way, from the bytes each tensor spans, so a merge that
writes one weight in place knows every other module that write would reach.
"""

from __future__ import annotations

from collections import defaultdict
from itertools import chain

import torch
from torch import nn


def shared_tensors(model: nn.Module) -> dict[str, set[str]]:
    """For every parameter or buffer path whose memory overlaps another's, the other paths.

    Every path a tensor is reachable by counts (a module registered twice gives two). Tensors are
    grouped when the byte ranges they span overlap, so two interleaved views of one storage count
    as shared although no element is: a caller refuses more than it must, never less.
    """
    spans: dict[torch.device, list[tuple[int, int, str]]] = defaultdict(list)
    for path, tensor in chain(
        model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False)
    ):
        if tensor.numel() == 0 or tensor.device.type == "meta":
            continue  # no memory to share
        start = tensor.data_ptr()
        elements = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True))
        spans[tensor.device].append((start, start + elements * tensor.element_size(), path))
    shared: dict[str, set[str]] = {}
    for device_spans in spans.values():
        groups: list[list[str]] = []
        end = -1
        for start, stop, path in sorted(device_spans):
            if start >= end:
                groups.append([path])
            else:
                groups[-1].append(path)
            end = max(end, stop)
        for group in groups:
            if len(group) > 1:
                shared.update({path: set(group) - {path} for path in group})
    return shared
