"""Repeated layers of a stage as shared compile regions, so that torch.compile compiles a layer once.

torch.compile of a stage traces and compiles every operation of it: a stage of the seed's 4.9B model (96
layers, 2246 operations) did not finish compiling within 400 s on an H200 host, and compile time grows with
the layer count. The captured graph remembers which module each operation came from (`nn_module_stack`);
the layers of a `ModuleList` (`model.encoder.layers.3`) are spans of the graph with the same operations on
other parameters. Here each whole layer of the stage becomes a call of a function of (its parameters, its
inputs), one function per distinct layer code, marked with `torch.compiler.nested_compile_region`: torch.compile
traces and compiles it at its first call and stamps the compiled code out at every other one. Outside
torch.compile the mark does nothing, and the operations are the stage's own, in its order.

A layer is left inline (and compiled with the rest) where its span holds an operation of another module that
reads it, an in-place operation or a statistics update (a region's inputs are not written), where it has fewer
than MIN_OPERATIONS operations, or where the stage holds fewer than MIN_LAYERS whole layers of its code.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

import torch
import torch.fx as fx

from rannc.graph import dropout as switches

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


def _layer_of(node: fx.Node, prefix: str | None = None) -> tuple[str, int] | None:
    """(ModuleList path, index) of the outermost indexed module the node came from (the index within `prefix`
    where one is given)."""
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        parts = path.split(".")
        for end in range(1, len(parts) + 1):
            match = _INDEXED.match(".".join(parts[:end]))
            if match and (prefix is None or match.group(1) == prefix):
                return match.group(1), int(match.group(2))
    return None


def _spans(graph: fx.Graph) -> list[list[fx.Node]]:
    """The stage's whole layers of its most repeated ModuleList, each as its run of consecutive nodes."""
    counts: dict[str, set[int]] = {}
    for node in graph.nodes:
        layer = _layer_of(node)
        if layer is not None:
            counts.setdefault(layer[0], set()).add(layer[1])
    if not counts:
        return []
    prefix = max(counts, key=lambda p: len(counts[p]))
    spans: dict[int, list[fx.Node]] = {}
    broken: set[int] = set()
    last: int | None = None
    for node in graph.nodes:
        layer = _layer_of(node, prefix) if node.op == "call_function" else None
        if layer is None:
            continue   # parameters, inputs, and operations of no layer (a stage copies sizes where first needed)
        index = layer[1]
        if index != last and index in spans:
            broken.add(index)    # a layer in two pieces, another layer between them: not a region
        spans.setdefault(index, []).append(node)
        last = index
    return [span for index, span in spans.items() if index not in broken]


def _writes_outside(node: fx.Node, inside: set[fx.Node]) -> bool:
    """Whether the node writes a value from outside the span (an in-place operation on an input or parameter, a
    statistics update): a region's inputs must not be written, while its own values may be."""
    if node.target in (switches.batch_norm, switches.count_batch):
        return True
    packet = getattr(node.target, "overloadpacket", None)
    name = getattr(packet, "__name__", "")
    if not (name.endswith("_") and not name.startswith("_")):
        return False
    return not (node.args and isinstance(node.args[0], fx.Node) and node.args[0] in inside)


def _region_graph(span: list[fx.Node]) -> tuple[fx.GraphModule, list[fx.Node], list[fx.Node]] | None:
    """The span as a module of its inputs (parameters and buffers included) returning its values used later;
    None where it cannot be one."""
    inside = set(span)
    if len(span) < MIN_OPERATIONS or any(_writes_outside(n, inside) for n in span):
        return None
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
    return fx.GraphModule(torch.nn.Module(), graph, class_name="Layer"), inputs, outputs


def _shared(module: fx.GraphModule):
    """One function per distinct layer code: what nested_compile_region compiles once. The marked function is
    called from one of this module, which the stage's generated code can name (fx writes a callable from torch
    by its import path, and the mark's wrapper claims one that does not exist)."""
    def region(*args):
        return module(*args)

    marked = torch.compiler.nested_compile_region(region)

    def layer(*args):
        return marked(*args)

    return layer


def with_regions(module: fx.GraphModule) -> tuple[fx.GraphModule, Regions]:
    """`module` (a stage's) with its whole repeated layers as calls of shared compile regions; the module itself
    where no MIN_LAYERS layers of one code are whole in it."""
    candidates = []
    for span in _spans(module.graph):
        built = _region_graph(span)
        if built is not None:
            candidates.append((span, *built))
    nodes = list(module.graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}

    def foreign_reads_it(span: list[fx.Node]) -> bool:
        """Whether an operation between the span's nodes, of no layer, reads one of them: the call stands where
        the span's last node stood, after that operation."""
        inside = set(span)
        between = nodes[position[span[0]]:position[span[-1]]]
        return any(n not in inside and any(a in inside for a in n.all_input_nodes) for n in between)

    candidates = [c for c in candidates if not foreign_reads_it(c[0])]
    by_code: dict[str, list] = {}
    for candidate in candidates:
        by_code.setdefault(candidate[1].code, []).append(candidate)
    chosen = [c for group in by_code.values() if len(group) >= MIN_LAYERS for c in group]
    if not chosen:
        return module, Regions(0, 0)
    functions = {code: _shared(group[0][1]) for code, group in by_code.items() if len(group) >= MIN_LAYERS}
    end_of = {c[0][-1]: c for c in chosen}
    skipped = {n for c in chosen for n in c[0]}

    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    # parameters first (after the inputs): a layer's call needs all of its own, some read only inside its span
    ordered = ([n for n in nodes if n.op == "placeholder"] + [n for n in nodes if n.op == "get_attr"]
               + [n for n in nodes if n.op not in ("placeholder", "get_attr")])
    for node in ordered:
        if node in end_of:
            span, region_module, inputs, outputs = end_of[node]
            call = graph.call_function(functions[region_module.code], tuple(env[n] for n in inputs))
            for i, out in enumerate(outputs):
                env[out] = graph.call_function(operator.getitem, (call, i))
                env[out].meta = dict(out.meta)
        elif node not in skipped:
            env[node] = graph.node_copy(node, lambda n: env[n])
    regioned = fx.GraphModule(module, graph, class_name=type(module).__name__)
    return regioned, Regions(calls=len(chosen), functions=len(functions))
