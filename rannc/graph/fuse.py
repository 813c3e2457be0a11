"""Sibling linears fused: the linear layers of a captured graph that read the same input become one product.

Attention's query, key and value projections (a gated MLP's gate and up projections) each multiply the same
activations by a weight of their own. One product against those weights stacked row-wise computes the same dot
products as one wider GEMM: it fills the device better, and the backward's input gradient becomes one product
where it was three products and two sums. torch.compile does not do this for a plain model. On one H200 (torch
2.11, bf16 autocast) BERT-large under torch.compile stepped in 42.4 against 44.3 ms at batch 64, and in 145.5
against 148.7 ms at batch 256, with its query, key and value fused.

The parameters stay the user's: the stacked weight is a `cat` of them inside the graph, so their gradients reach
them through cat's backward (each a contiguous slice of the stacked gradient), and the optimizer, clipping and
state dicts see the same tensors as before. Each linear's result becomes a piece of one split of the wide one
(split's backward is one cat of the pieces' gradients; separate slices would each scatter theirs into zeros of
the wide shape and sum those). A piece along the last dimension is not contiguous, so a group is fused only
where every view op reading the results (and views of those views) still accepts the piece, checked on the
graph's fake tensors, where nothing writes into them in place or assumes their layout (`_readers_accept`), and
where no result is returned by the graph as it is.

Without autocast the fused product saves the stacked weight for its backward where a plain linear saves the
parameter itself: a group's weights once more per micro-batch in flight (the profiler measures it). Under autocast
both save a cast copy, of the same size.
"""

from __future__ import annotations

import hashlib
import operator

import torch
import torch.fx as fx

LINEAR = torch.ops.aten.linear.default
CAT = torch.ops.aten.cat.default
SPLIT = torch.ops.aten.split_with_sizes.default
AS_STRIDED = torch.ops.aten.as_strided.default
# Siblings more than this many operations apart stay as they are: fusing would compute the later one early and
# keep its result alive (and maybe sent between stages) across everything in between, as in a model that reads
# its input once at the start and once near the end. Attention's projections are two ops apart (a view and a
# transpose of each result), a gated MLP's one (the activation).
NEAR = 4
# The members' gradients are pieces of the stacked weight's (and bias's) gradient, one storage: each piece must
# start on a 16-byte boundary, as the multi-tensor kernels' vector loads need (rannc.kernels.multi_tensor), so
# every width but the last is a multiple of ALIGN bytes, counted at 2 bytes an element at most (param_dtype
# turns fp32 weights into bf16 ones after the capture).
ALIGN = 16


def fuse_sibling_linears(gm: fx.GraphModule) -> list[tuple[str, ...]]:
    """Fuse every group of two or more linears that read the same input node, near each other, with weights (and
    biases, all or none) of one dtype and input width; returns the weights' attribute names of each group fused."""
    fused = []
    for members in _sibling_groups(gm.graph):
        names = tuple(m.args[1].target for m in members)
        if _fuse(gm.graph, members):
            fused.append(names)
    if fused:
        gm.graph.lint()
        gm.recompile()
    return fused


def fingerprint_after(fingerprint: str, fused: list[tuple[str, ...]]) -> str:
    """The captured graph's fingerprint once these groups are fused: profiles cached and deployments saved for
    the unfused graph (which differ in operations and timing) are not taken for it."""
    return hashlib.sha256(f"{fingerprint}|fused:{fused}".encode()).hexdigest()[:16]


def _bias(node: fx.Node):
    return node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")


def _is_attr(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr" and isinstance(node.meta.get("val"), torch.Tensor)


def _sibling_groups(graph: fx.Graph) -> list[list[fx.Node]]:
    """The linears of one input, weight dtype and device, input width and bias presence, in graph order, each
    at most NEAR operations after the one before it."""
    groups: dict[tuple, list[fx.Node]] = {}
    position: dict[fx.Node, int] = {}
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        position[node] = len(position)
        if node.target is not LINEAR or not isinstance(node.args[0], fx.Node):
            continue
        weight, bias = node.args[1], _bias(node)
        if not (_is_attr(weight) and weight.meta["val"].dim() == 2 and (bias is None or _is_attr(bias))):
            continue
        value = weight.meta["val"]
        groups.setdefault((node.args[0], value.dtype, value.device, int(value.shape[1]), bias is None),
                          []).append(node)
    runs = []
    for members in groups.values():
        run = members[:1]
        for node in members[1:]:
            if position[node] - position[run[-1]] > NEAR + 1:
                runs.append(run)
                run = []
            run.append(node)
        runs.append(run)
    return [run for run in runs if len(run) > 1]


def _fuse(graph: fx.Graph, members: list[fx.Node]) -> bool:
    """Replace `members` by one linear over their stacked weights and one split of its result; False (the
    graph untouched) where a reader of their results could not take a piece."""
    first, source = members[0], members[0].args[0]
    weights = [m.args[1] for m in members]
    biases = [_bias(m) for m in members] if _bias(first) is not None else []
    widths = [int(w.meta["val"].shape[0]) for w in weights]
    element_bytes = min(2, weights[0].meta["val"].element_size())
    if any(width * element_bytes % ALIGN for width in widths[:-1]):
        return False
    try:
        weight_value = CAT([w.meta["val"] for w in weights], 0)
        bias_value = CAT([b.meta["val"] for b in biases], 0) if biases else None
        wide_value = LINEAR(source.meta["val"], weight_value, bias_value)
        dim = wide_value.dim() - 1
        pieces = SPLIT(wide_value, widths, dim)
    except Exception:   # a shape the fake tensors refuse: leave the group as it is
        return False
    if not all(_readers_accept(m, piece) for m, piece in zip(members, pieces)):
        return False
    later = set()                          # attributes read first by a later member: they lie within the group
    node = first.next
    while node is not members[-1]:
        later.add(node)
        node = node.next
    for attr in weights + biases:          # the stacked weight is read where the first linear was
        if attr in later:
            first.prepend(attr)
    with graph.inserting_before(first):
        weight = graph.call_function(CAT, (weights, 0))
        bias = graph.call_function(CAT, (biases, 0)) if biases else None
        wide = graph.call_function(LINEAR, (source, weight, bias) if biases else (source, weight))
        for node, value in ((weight, weight_value), (bias, bias_value), (wide, wide_value)):
            if node is not None:
                _describe(node, first, value)
        split = graph.call_function(SPLIT, (wide, widths, dim))
        _describe(split, first, list(pieces))
        pieces_nodes = []
        for k, (member, piece) in enumerate(zip(members, pieces)):
            piece_node = graph.call_function(operator.getitem, (split, k))
            _describe(piece_node, member, piece)
            pieces_nodes.append(piece_node)
    for member, piece_node in zip(members, pieces_nodes):
        member.replace_all_uses_with(piece_node)
        graph.erase_node(member)
    return True


def _describe(node: fx.Node, like: fx.Node, value) -> None:
    """The metadata the rest of rannc reads: the fake value, and the module the replaced node came from (blocks,
    compile regions and profile labels go by it)."""
    node.meta["val"] = value
    for key in ("nn_module_stack", "stack_trace"):
        if key in like.meta:
            node.meta[key] = like.meta[key]


def _readers_accept(node: fx.Node, value: torch.Tensor) -> bool:
    """Whether every op reading `node` still works when it yields `value` (a piece with the wide result's
    strides) and computes the same: view ops are rerun on the fake tensors, through views of views and the
    elements of views that return several (chunk, split, unbind). Refused: an op writing in place, as_strided
    (its strides are baked in), an op outside aten (a custom op may assume a contiguous input), and a piece or a
    view of it returned by the graph (the caller would get a non-contiguous tensor where it got a contiguous one)."""
    pending = [(node, value)]
    while pending:
        current, current_value = pending.pop()
        for user in current.users:
            op = user.target
            if user.op == "output":
                return False
            if op is operator.getitem and isinstance(current_value, (list, tuple)):
                pending.append((user, current_value[user.args[1]]))
                continue
            if not isinstance(op, torch._ops.OpOverload):
                continue        # rannc's own wrappers (dropout, attention): any layout
            if op._schema.is_mutable or op.namespace != "aten" or op is AS_STRIDED:
                return False
            if not op.is_view:
                continue        # aten's computing ops read any strides
            args, kwargs = fx.node.map_arg((user.args, user.kwargs), lambda a, c=current, v=current_value:
                                           v if a is c else a.meta.get("val"))
            try:
                pending.append((user, op(*args, **kwargs)))
            except Exception:   # e.g. view() across the piece's stride
                return False
    return True
