"""Dropout switches: the captured graph's dropout ops call these functions, which drop only while the
owning RaNNCModule is in train mode with dropout enabled (`enable_dropout`)."""

from __future__ import annotations

import contextlib

import torch
import torch.fx as fx

_active = True


@contextlib.contextmanager
def dropout_active(on: bool):
    """Set whether dropout draws masks while stages run (train mode and dropout enabled)."""
    global _active
    before, _active = _active, on
    try:
        yield
    finally:
        _active = before


def dropout(x: torch.Tensor, p: float, train: bool) -> torch.Tensor:
    return torch.ops.aten.dropout.default(x, p, train and _active)


def feature_dropout(x: torch.Tensor, p: float, train: bool) -> torch.Tensor:
    return torch.ops.aten.feature_dropout.default(x, p, train and _active)


def sdpa(*args, **kwargs) -> torch.Tensor:
    if not _active:
        if len(args) > 4:
            args = args[:4] + (0.0,) + args[5:]
        if "dropout_p" in kwargs:
            kwargs["dropout_p"] = 0.0
    return torch.ops.aten.scaled_dot_product_attention.default(*args, **kwargs)


_ROUTES = {
    torch.ops.aten.dropout.default: dropout,
    torch.ops.aten.feature_dropout.default: feature_dropout,
    torch.ops.aten.scaled_dot_product_attention.default: sdpa,
}


def route_dropout(gm: fx.GraphModule) -> None:
    """Point every dropout-drawing op of the graph at its switch."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _ROUTES:
            node.target = _ROUTES[node.target]
    gm.recompile()
