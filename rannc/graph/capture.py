"""Capture `model.forward` with the first call's inputs as an fx graph (torch.export, non-strict).

The graph keeps the user's parameter objects (so the user's optimizer still refers to them), has one
node per tensor operation, a symbolic batch dimension on every batched input (so any micro-batch size
runs through it), and dropout routed through switches that `enable_dropout` and `eval()` control.
"""

from __future__ import annotations

import contextlib
import hashlib
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.export import Dim

from rannc.graph import dropout as dropout_ops


class CaptureError(RuntimeError):
    """The model's forward cannot be turned into a graph."""


@dataclass
class CapturedGraph:
    """The model as one fx graph plus what the runtime needs to feed and read it."""

    gm: fx.GraphModule
    input_names: list[str]               # placeholders, in the order of the forward's arguments
    batched_inputs: list[bool]           # inputs split along dim 0 (0-dim tensors are broadcast)
    out_spec: Any                        # pytree spec of the forward's result
    fingerprint: str                     # identifies graph + parameter shapes + input shapes
    tensor_names: dict[int, str] = field(default_factory=dict)  # id(tensor) -> first state_dict name

    def output_nodes(self) -> list[Any]:
        return list(next(n for n in self.gm.graph.nodes if n.op == "output").args[0])


def _dynamic_shapes(args: tuple[torch.Tensor, ...]) -> tuple[Any, ...]:
    return tuple({0: Dim.AUTO} if a.dim() > 0 else {} for a in args)


@contextlib.contextmanager
def _capture_mode(model: nn.Module):
    """Trace in train mode with autograd on and autocast off: the graph must hold dropout ops and fp32
    ops; autocast is applied again when the stages run."""
    was_training = model.training
    model.train()
    try:
        with torch.enable_grad(), torch.autocast("cpu", enabled=False), (
                torch.autocast("cuda", enabled=False) if torch.cuda.is_available() else contextlib.nullcontext()):
            yield
    finally:
        model.train(was_training)


def capture(model: nn.Module, args: tuple[torch.Tensor, ...], dynamic_batch: bool = True) -> CapturedGraph:
    """Export `model.forward(*args)`; raise CaptureError naming the failing operation.

    `dynamic_batch=False` fixes the batch size (three times faster to export; enough for a dry-run plan,
    which only reads shapes)."""
    with _capture_mode(model):
        try:
            shapes = _dynamic_shapes(args) if dynamic_batch else None
            exported = torch.export.export(model, args, dynamic_shapes=shapes, strict=False)
        except Exception as exc:  # export raises many types; all mean "cannot capture"
            text = str(exc).strip()
            lines = text.splitlines()
            summary = "\n".join(lines[:25]) + ("\n..." if len(lines) > 25 else "")
            raise CaptureError(
                f"rannc could not capture {type(model).__name__}.forward with torch.export (non-strict): "
                f"{type(exc).__name__}: {summary}\nrannc needs a forward without data-dependent Python "
                f"control flow on tensor values; see the operation and source line named above.") from exc
    gm = exported.module()
    out_spec = gm._out_spec
    _clean(gm)
    dropout_ops.route_dropout(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(args):
        raise CaptureError(f"captured graph has {len(placeholders)} inputs but forward got {len(args)}")
    tensor_names: dict[int, str] = {}
    for name, tensor in list(model.named_parameters(remove_duplicate=False)) + list(
            model.named_buffers(remove_duplicate=False)):
        tensor_names.setdefault(id(tensor), name)
    return CapturedGraph(
        gm=gm,
        input_names=[n.name for n in placeholders],
        batched_inputs=[a.dim() > 0 for a in args],
        out_spec=out_spec,
        fingerprint=_fingerprint(gm, model, args),
        tensor_names=tensor_names,
    )


def _clean(gm: fx.GraphModule) -> None:
    """Drop export's guard call, its tensor-metadata assertions and unused attribute reads, and make every
    tensor one get_attr node (a tied weight is listed under each of its names)."""
    graph = gm.graph
    first_attr: dict[int, fx.Node] = {}
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            graph.erase_node(node)
        elif node.op == "call_function" and node.target is torch.ops.aten._assert_tensor_metadata.default:
            # dtype/device checks of the capture; autocast and the rank's device legitimately change both
            graph.erase_node(node)
        elif node.op == "get_attr":
            tensor = _attr(gm, node.target)
            keeper = first_attr.setdefault(id(tensor), node)
            if keeper is not node:
                node.replace_all_uses_with(keeper)
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    graph.lint()
    gm.recompile()


def _attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _fingerprint(gm: fx.GraphModule, model: nn.Module, args: tuple[torch.Tensor, ...]) -> str:
    digest = hashlib.sha256()
    digest.update(type(model).__qualname__.encode())
    for node in gm.graph.nodes:
        digest.update(f"{node.op}|{node.target}|{len(node.args)}".encode())
    for name, p in model.named_parameters():
        digest.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
    for a in args:
        digest.update(f"{tuple(a.shape[1:])}:{a.dtype}".encode())
    return digest.hexdigest()[:16]


def is_tensor_value(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor)


_SYM_OPS = {operator.getitem, operator.mul, operator.add, operator.sub, operator.floordiv, operator.truediv}


def is_replicable(node: fx.Node, memo: dict[fx.Node, bool]) -> bool:
    """True for values any stage can recompute for itself: inputs, attributes, and non-tensor values
    (symbolic sizes) derived only from those."""
    if node in memo:
        return memo[node]
    if node.op in ("placeholder", "get_attr"):
        result = True
    elif node.op == "call_function" and not is_tensor_value(node) and (
            node.target in _SYM_OPS or "sym_" in str(node.target)):
        result = all(is_replicable(n, memo) for n in node.all_input_nodes)
    else:
        result = False
    memo[node] = result
    return result


def retarget_device(gm: fx.GraphModule, device: torch.device) -> None:
    """Point the graph at this rank's device: factory ops (arange, zeros, ...) captured with the model on
    another device carry that device as a constant, and lifted tensor constants live there too."""
    changed = False
    for node in gm.graph.nodes:
        dev = node.kwargs.get("device")
        if isinstance(dev, torch.device) and dev != device:
            node.update_kwarg("device", device)
            changed = True
        elif node.op == "get_attr":
            owner_path, _, name = node.target.rpartition(".")
            owner = gm.get_submodule(owner_path) if owner_path else gm
            value = getattr(owner, name)
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and \
                    name not in owner._buffers and value.device != device:
                setattr(owner, name, value.to(device))
    if changed:
        gm.recompile()
