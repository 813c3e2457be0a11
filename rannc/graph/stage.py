"""Build the module of one stage: the compute nodes of a contiguous range of the graph, fed by the
values crossing its first cut and the model inputs it reads, returning the values crossing its last cut
(or the model's outputs, for the last stage)."""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass

import sympy
import torch
import torch.fx as fx
import torch.nn as nn

from rannc.graph.blocks import Linearized
from rannc.graph.capture import CapturedGraph, is_replicable, written_attrs


@dataclass
class StageGraph:
    """A runnable piece of the model and its interface, by value name."""

    module: fx.GraphModule
    received: list[str]       # crossing values in, in order (the previous stage sends these)
    inputs: list[int]         # indices of the model inputs this stage reads, in order
    sent: list[str]           # crossing values out, in order (or the model's flat outputs, if last)
    is_last: bool
    received_rows: list[int] = dataclasses.field(default_factory=list)   # per received value: ROWS_* or k,
    sent_rows: list[int] = dataclasses.field(default_factory=list)       # its first dim is k x the batch

    def parameters(self) -> list[nn.Parameter]:
        return list(self.module.parameters())

    def tensors(self) -> list:
        """Parameters and buffers this stage reads (shared ones appear in every stage that reads them)."""
        return list(self.module.parameters()) + list(self.module.buffers())

    def mutated_buffers(self) -> list:
        """Buffers the stage writes while it runs (BatchNorm's running statistics and batch counter, any in-place
        write to a buffer, also inside a `torch.no_grad()` block)."""
        found = []
        for node in written_attrs(self.module):
            t = self.module.get_buffer(node.target) if _is_buffer(self.module, node.target) else None
            if t is not None and all(t is not f for f in found):
                found.append(t)
        return found

    def named_tensors(self) -> list[tuple[str, object]]:
        """(attribute path, tensor) of `tensors()`; a plain tensor attribute of the model is a buffer here."""
        return list(self.module.named_parameters()) + list(self.module.named_buffers())


ROWS_NONE = 0        # the value does not depend on the batch size: every replica holds all of it
ROWS_OTHER = -1      # the batch size is in another dimension: the value cannot be cut by rows


def row_factors(nodes: list, batch_exprs: list) -> list[int]:
    """For each value, how its first dimension relates to the batch: k when it is k x the batch size (the
    value's rows can be cut by sample), ROWS_NONE, or ROWS_OTHER (read from the traced symbolic shapes)."""
    out = []
    for node in nodes:
        value = node.meta.get("val") if isinstance(node, fx.Node) else None
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            out.append(ROWS_NONE)
            continue
        exprs = [d.node.expr if isinstance(d, torch.SymInt) else sympy.Integer(d) for d in value.shape]
        batch_in = [any(b in e.free_symbols for b in batch_exprs) for e in exprs]
        factor = ROWS_NONE if not any(batch_in) else ROWS_OTHER
        if batch_in[0]:
            for b in batch_exprs:
                ratio = sympy.simplify(exprs[0] / b)
                if ratio.is_Integer and int(ratio) > 0 and not any(batch_in[1:]):
                    factor = int(ratio)
        out.append(factor)
    return out


def batch_symbols(captured: CapturedGraph) -> list:
    """The symbols of the batch dimension in the captured graph (one per batched input, often one in all)."""
    placeholders = [n for n in captured.gm.graph.nodes if n.op == "placeholder"]
    found = []
    for node, batched in zip(placeholders, captured.batched_inputs):
        value = node.meta.get("val")
        if batched and isinstance(value, torch.Tensor) and isinstance(value.shape[0], torch.SymInt):
            expr = value.shape[0].node.expr
            if expr.is_Symbol and expr not in found:
                found.append(expr)
    return found


def row_cuts(captured: CapturedGraph, lin: Linearized, bounds: list[int]) -> list[bool]:
    """For each block boundary, whether every value crossing it can be cut by rows (one row per sample in
    its first dimension, or independent of the batch): where stages of different replica counts may meet."""
    symbols = batch_symbols(captured)
    return [all(f in (ROWS_NONE, 1) for f in row_factors(lin.crossing[b], symbols)) if b < lin.size else True
            for b in bounds]


def _is_buffer(module: nn.Module, target: str) -> bool:
    owner, _, name = target.rpartition(".")
    return name in (module.get_submodule(owner) if owner else module)._buffers


def _flat_module(root: nn.Module, graph: fx.Graph, class_name: str) -> fx.GraphModule:
    """The stage's module, every parameter and buffer it reads a direct attribute of it (the same tensors
    as the model's): its generated code then reads each with one attribute lookup, where the model's module
    path (`getattr(self.model.encoder.layers, "0").attention.query.weight`) costs one nn.Module lookup per
    level on every call, about 2600 per BERT-large forward, milliseconds of host time on a GPU's hot path."""
    if any(node.op == "call_module" for node in graph.nodes):
        return fx.GraphModule(root, graph, class_name=class_name)
    attrs: dict[str, object] = {}
    flat_names: dict[str, str] = {}
    for node in graph.nodes:
        if node.op != "get_attr":
            continue
        if node.target not in flat_names:
            flat = re.sub(r"\W", "_", node.target)
            while flat in attrs:
                flat += "_"
            flat_names[node.target] = flat
            attrs[flat] = functools.reduce(getattr, node.target.split("."), root)
        node.target = flat_names[node.target]
    return fx.GraphModule(attrs, graph, class_name=class_name)


def build_stage(captured: CapturedGraph, lin: Linearized, start: int, end: int) -> StageGraph:
    """The stage of compute positions [start, end)."""
    memo: dict[fx.Node, bool] = {}
    owned = lin.compute_nodes[start:end]
    owned_set = set(owned)
    is_last = end == lin.size
    received_nodes = lin.crossing[start]
    sent_nodes = captured.output_nodes() if is_last else lin.crossing[end]
    received_set = set(received_nodes)

    placeholders = [n for n in captured.gm.graph.nodes if n.op == "placeholder"]
    needed_inputs: set[fx.Node] = set()

    def scan(node: fx.Node) -> None:
        if node in owned_set or node in received_set:
            return
        if node.op == "placeholder":
            needed_inputs.add(node)
        elif is_replicable(node, memo):
            for n in node.all_input_nodes:
                scan(n)

    for node in owned:
        for n in node.all_input_nodes:
            scan(n)
    for leaf in sent_nodes:
        if isinstance(leaf, fx.Node):
            scan(leaf)

    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in received_nodes:
        env[node] = graph.placeholder(f"recv_{node.name}")
        env[node].meta = dict(node.meta)
    input_indices = [i for i, p in enumerate(placeholders) if p in needed_inputs]
    for i in input_indices:
        env[placeholders[i]] = graph.placeholder(placeholders[i].name)
        env[placeholders[i]].meta = dict(placeholders[i].meta)

    def lookup(node: fx.Node) -> fx.Node:
        if node not in env:
            if node.op == "get_attr" or is_replicable(node, memo):
                env[node] = graph.node_copy(node, lookup)
            else:
                raise RuntimeError(f"stage [{start}, {end}) needs value '{node.name}' that no earlier stage "
                                   f"sends; this is a rannc bug")
        return env[node]

    for node in owned:
        env[node] = graph.node_copy(node, lookup)
    outputs = tuple(lookup(n) if isinstance(n, fx.Node) else n for n in sent_nodes)
    graph.output(outputs)
    module = _flat_module(captured.gm, graph, f"Stage_{start}_{end}")
    symbols = batch_symbols(captured)
    return StageGraph(module=module, received=[n.name for n in received_nodes], inputs=input_indices,
                      sent=[n.name if isinstance(n, fx.Node) else repr(n) for n in sent_nodes], is_last=is_last,
                      received_rows=row_factors(received_nodes, symbols),
                      sent_rows=row_factors([] if is_last else sent_nodes, symbols))
