"""Repeated layers of a stage as shared compile regions, so that torch.compile compiles a layer once.

torch.compile of a stage traces and compiles every operation of it: a stage of the seed's 4.9B model (96
layers, 2246 operations) did not finish compiling within 400 s on an H200 host, and compile time grows with
the layer count. The captured graph remembers which module each operation came from (`nn_module_stack`);
the layers of a `ModuleList` (`model.encoder.layers.3`) are spans of the graph with the same operations on
other parameters. Here each whole layer of the stage becomes a call of a function of (its parameters, its
inputs), one function per distinct layer code, marked with `torch.compiler.nested_compile_region`: torch.compile
traces and compiles it at its first call and stamps the compiled code out at every other one with inputs of the
same shapes and dtypes. Outside torch.compile the mark does nothing: the operations are the stage's own, a
layer's run where its last operation stood (only operations free to move may sit between a layer's own).

A layer is left inline (and compiled with the rest) where an operation of no layer between its own reads it,
writes anything or draws random numbers; where it writes a value it did not make (an input, a parameter, a view
that may be one, a statistics buffer); where it has fewer than MIN_OPERATIONS operations; or where the stage holds
fewer than MIN_LAYERS whole layers of its code.
"""

from __future__ import annotations

import operator
import re
import types
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.fx as fx

from rannc.graph import dropout as switches
from rannc.graph.capture import mutated_args

_INDEXED = re.compile(r"^(.*)\.(\d+)$")
# Fewer or smaller layers compile faster inline: on the CPU a region's machinery cost about as much as three
# small transformer layers compiled inline (tiny BERT, 2 layers: 45 s with regions, 34 s inline; 8 layers: 41 s
# and 53 s).
MIN_LAYERS = 4
MIN_OPERATIONS = 8


@dataclass
class Regions:
    """What `with_regions` did: how many layer spans became calls, and of how many distinct functions."""

    calls: int
    functions: int


def _indexed(node: fx.Node) -> list[tuple[str, int]]:
    """Every (ModuleList path, index) the node came from, outermost first (`model.inner.0.blocks.3` gives
    (model.inner, 0) and (model.inner.0.blocks, 3))."""
    levels = []
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        parts = path.split(".")
        for end in range(1, len(parts) + 1):
            match = _INDEXED.match(".".join(parts[:end]))
            if match and (match.group(1), int(match.group(2))) not in levels:
                levels.append((match.group(1), int(match.group(2))))
    return levels


def _spans(graph: fx.Graph) -> list[list[fx.Node]]:
    """The stage's whole layers of its outermost repeated ModuleList (at any depth: a model wrapped in a
    Sequential or a container of its own still has its layers), each as its run of consecutive nodes."""
    levels = {node: _indexed(node) for node in graph.nodes}
    counts: dict[str, set[int]] = {}
    for node_levels in levels.values():
        for path, index in node_levels:
            counts.setdefault(path, set()).add(index)
    # the outermost lists of two or more layers (a list inside another's layer, e.g. each layer's experts or
    # sublayers, is part of those layers), then the one with the most layers
    lists = [p for p in counts if len(counts[p]) >= 2]
    outer = [p for p in lists if not any(p.startswith(q + ".") for q in lists)]
    if not outer:
        return []
    prefix = max(outer, key=lambda p: len(counts[p]))
    spans: dict[int, list[fx.Node]] = {}
    broken: set[int] = set()
    last: int | None = None
    for node in graph.nodes:
        index = next((i for path, i in levels[node] if path == prefix), None) \
            if node.op == "call_function" else None
        if index is None:
            continue   # parameters, inputs, and operations of no layer (a stage copies sizes where first needed)
        if index != last and index in spans:
            broken.add(index)    # a layer in two pieces, another layer between them: not a region
        spans.setdefault(index, []).append(node)
        last = index
    return [span for index, span in spans.items() if index not in broken]


def _written(node: fx.Node) -> list:
    """The arguments the operation writes (its schema's mutable ones); a statistics update writes buffers."""
    if node.target in (switches.batch_norm, switches.count_batch):
        return [None]   # its buffers: never a span's own values
    return mutated_args(node)


def _is_view(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return schema is not None and any(r.alias_info is not None for r in schema.returns)


def _writes_outside(node: fx.Node, inside: set[fx.Node]) -> bool:
    """Whether the node writes a value that is not the span's own (an input or parameter, a view that may be
    one, a buffer): a region's inputs must not be written, while values it made itself may be."""
    return any(not (isinstance(t, fx.Node) and t in inside and not _is_view(t)) for t in _written(node))


def _quiet(node: fx.Node) -> bool:
    """Whether moving the node before or after a span cannot change anything: an operation that writes nothing
    and draws no random numbers (rannc's mode switches, dropout among them, are not)."""
    if node.op != "call_function":
        return True
    if node.target is operator.getitem:
        return True
    tags = getattr(node.target, "tags", None)
    if tags is None:
        return False
    return not _written(node) and torch.Tag.nondeterministic_seeded not in tags


class _Layer(NamedTuple):
    span: list[fx.Node]          # the layer's operations in the stage, in order
    module: fx.GraphModule       # the same as a module of `inputs` returning `outputs`
    inputs: list[fx.Node]
    outputs: list[fx.Node]


def _region_graph(span: list[fx.Node]) -> _Layer | None:
    """The span as a module of its inputs (parameters and buffers included) returning its values used later;
    None where it cannot be one."""
    inside = set(span)
    if len(span) < MIN_OPERATIONS or any(_writes_outside(n, inside) for n in span):
        return None
    if any(n.target in switches.EAGER_OPS for n in span):
        return None   # an op that runs eagerly inside compiled code would break the region's graph: an error
    inputs: list[fx.Node] = []
    for node in span:
        for arg in node.all_input_nodes:
            if arg not in inside and arg not in inputs:
                inputs.append(arg)
    outputs = [n for n in span if any(user not in inside for user in n.users)]
    if not outputs:
        return None
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i, node in enumerate(inputs):
        env[node] = graph.placeholder(f"in_{i}")
        env[node].meta = dict(node.meta)
    for i, node in enumerate(span):   # names by position: layers of one code get the same code
        env[node] = graph.create_node(node.op, node.target, fx.map_arg(node.args, env.__getitem__),
                                      fx.map_arg(node.kwargs, env.__getitem__), name=f"v_{i}", type_expr=node.type)
        env[node].meta = dict(node.meta)
    graph.output(tuple(env[n] for n in outputs))
    for node in graph.nodes:   # the code must not depend on where the layer sits in the model
        node.meta.pop("nn_module_stack", None)
        node.meta.pop("stack_trace", None)
    return _Layer(span, fx.GraphModule(torch.nn.Module(), graph, class_name="Layer"), inputs, outputs)


def _shared(module: fx.GraphModule, index: int):
    """The function of one layer code, marked for nested_compile_region. torch.compile keys the traces it reuses
    by the marked function's code object, so each layer code gets a code object of its own (a closure of one
    `def` would share it, and a second code with inputs of the same shapes would run the first one's trace).
    The marked function is called from a function of this module, which the stage's generated code can name
    (fx names a callable from torch by its import path, and the mark's wrapper claims one that does not exist)."""
    def region(*args):
        return module(*args)

    name = f"rannc_layer_code_{index}"
    code = region.__code__.replace(co_name=name, **({"co_qualname": name} if hasattr(region.__code__, "co_qualname")
                                                    else {}))
    distinct = types.FunctionType(code, region.__globals__, name, None, region.__closure__)
    marked = torch.compiler.nested_compile_region(distinct)

    def layer(*args):
        return marked(*args)

    return layer


def with_regions(module: fx.GraphModule) -> tuple[fx.GraphModule, Regions]:
    """`module` (a stage's) with its whole repeated layers as calls of shared compile regions; the module itself
    where no MIN_LAYERS layers of one code are whole in it."""
    layers = [layer for layer in map(_region_graph, _spans(module.graph)) if layer is not None]
    nodes = list(module.graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}

    def interleaved(layer: _Layer) -> bool:
        """Whether an operation between the layer's own, of no layer, reads one of them or is not free to move:
        the call stands where the layer's last operation stood, so the layer's operations run after it."""
        inside = set(layer.span)
        between = [n for n in nodes[position[layer.span[0]]:position[layer.span[-1]]] if n not in inside]
        return any(any(a in inside for a in n.all_input_nodes) or not _quiet(n) for n in between)

    by_code: dict[str, list[_Layer]] = {}
    for layer in layers:
        if not interleaved(layer):
            by_code.setdefault(layer.module.code, []).append(layer)
    groups = [group for group in by_code.values() if len(group) >= MIN_LAYERS]
    if not groups:
        return module, Regions(0, 0)
    function_of = {group[0].module.code: _shared(group[0].module, k) for k, group in enumerate(groups)}
    ending_at = {layer.span[-1]: layer for group in groups for layer in group}
    replaced = {n for group in groups for layer in group for n in layer.span}

    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    # parameters first (after the inputs): a layer's call needs all of its own, some read only inside its span
    ordered = ([n for n in nodes if n.op == "placeholder"] + [n for n in nodes if n.op == "get_attr"]
               + [n for n in nodes if n.op not in ("placeholder", "get_attr")])
    for node in ordered:
        if node in ending_at:
            layer = ending_at[node]
            call = graph.call_function(function_of[layer.module.code], tuple(env[n] for n in layer.inputs))
            for i, out in enumerate(layer.outputs):
                env[out] = graph.call_function(operator.getitem, (call, i))
                env[out].meta = dict(out.meta)
        elif node not in replaced:
            env[node] = graph.node_copy(node, lambda n: env[n])
    regioned = fx.GraphModule(module, graph, class_name=type(module).__name__)
    return regioned, Regions(calls=len(ending_at), functions=len(groups))
