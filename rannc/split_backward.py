"""Split backward of one pipeline stage for the zero-bubble schedules (Qi et al., "Zero Bubble Pipeline
Parallelism", ICLR'24): BI computes the gradients of the stage's received inputs, which the previous stage
waits for; BW accumulates the parameters' gradients later, in what would otherwise be a bubble.

How. The stage's autograd graph has an *input part*, the nodes from which a received input is reachable,
and a *weight part*, the other nodes from which a parameter is reachable. ``torch.autograd.grad`` towards
the inputs runs only the input part, and a node there that also feeds the weight part (``MmBackward`` of
``x @ w``) then computes only its input-side outputs. BI keeps the gradients arriving at each such
*boundary* node (a node pre-hook). BW reruns each boundary node alone on those gradients, so that it
computes only its weight-side outputs, then runs one backward from them through the weight part with
``inputs=params``: each parameter's ``AccumulateGrad`` runs once, on the same sum as in a plain backward.
Where a boundary node cannot be rerun alone, BW is one backward from all boundary nodes instead
(`backward_input` says when), still exact.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Sequence

import torch
import torch.utils.checkpoint
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge

__all__ = ["WeightGradient", "backward_input"]


class _Boundary:
    """A node of the input part that feeds the weight part: which of its outputs (next edges) go to the
    weight part, and the gradients that arrived at it in BI."""

    __slots__ = ("node", "weight_slots", "arrived")

    def __init__(self, node: Node, weight_slots: list[int]):
        self.node = node
        self.weight_slots = weight_slots
        self.arrived: tuple[torch.Tensor | None, ...] = ()

    def seeds(self) -> tuple[list[GradientEdge], list[torch.Tensor]]:
        """The edges into the node that got a gradient in BI, with those gradients."""
        slots = [slot for slot, grad in enumerate(self.arrived) if grad is not None]
        return [GradientEdge(self.node, slot) for slot in slots], [self.arrived[slot] for slot in slots]

    def replay(self):
        """Register a pre-hook feeding the node what arrived in BI, whatever arrives in BW: tensor hooks on
        its inputs run again on the seeds, and in the one-backward fallback the nodes above it send it
        gradients again."""
        arrived = self.arrived

        def pin(grads):
            return arrived if arrived else (None,) * len(grads)

        return self.node.register_prehook(pin)


class WeightGradient:
    """The BW half of one micro-batch's backward on one stage, returned by `backward_input`.

    It holds the stage's graph (not its output tensors) and the gradients kept at the boundary nodes until
    `run`, which accumulates every parameter's gradient exactly as ``torch.autograd.backward(outputs,
    grads)`` would, then drops all of it. Each micro-batch has its own, so BWs may run in any order.
    """

    def __init__(self, graph_owners: list[GradientEdge], boundaries: list[_Boundary], split: bool,
                 root_edges: list[GradientEdge], root_grads: list[torch.Tensor], params: list[torch.nn.Parameter]):
        self._graph_owners = graph_owners  # nodes implemented in Python live only as long as their graph
        self._boundaries = boundaries
        self._split = split
        self._root_edges = root_edges  # outputs whose node is in the weight part, with their gradients
        self._root_grads = root_grads
        self._params = params
        self._ran = False

    def run(self) -> None:
        """BW: accumulate the parameters' gradients into ``.grad`` (created where None), then free the graph
        and the kept gradients. Runs once: a second call is a schedule bug, so it raises."""
        if self._ran:
            raise RuntimeError("WeightGradient.run() called twice: the weight gradients of this micro-batch "
                               "were already accumulated (each BI must be followed by exactly one BW)")
        self._ran = True
        owners, boundaries, split = self._graph_owners, self._boundaries, self._split
        edges, grads, params = self._root_edges, self._root_grads, self._params
        self._graph_owners, self._boundaries, self._root_edges, self._root_grads, self._params = [], [], [], [], []
        # Checkpointed regions recompute once for all of BW's backward calls, not once per call.
        group = getattr(torch.utils.checkpoint, "GraphExecGroup", contextlib.nullcontext)
        with group():
            if split:
                for boundary in boundaries:
                    for slot, grad in zip(boundary.weight_slots, _weight_side_outputs(boundary)):
                        if grad is not None:
                            edges.append(GradientEdge(*boundary.node.next_functions[slot]))
                            grads.append(grad)
                    boundary.arrived = ()
                if edges:
                    # The engine sums the gradients of a repeated edge, as it sums a node's inputs.
                    torch.autograd.backward(edges, grads, inputs=params)
            else:
                handles = [boundary.replay() for boundary in boundaries]
                try:
                    for boundary in boundaries:
                        seed_edges, seed_grads = boundary.seeds()
                        edges += seed_edges
                        grads += seed_grads
                    if edges:
                        torch.autograd.backward(edges, grads, inputs=params)
                finally:
                    for handle in handles:
                        handle.remove()
        boundaries.clear()
        owners.clear()  # the graph goes with the caller's last reference to it


def backward_input(outputs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor],
                   params: Sequence[torch.nn.Parameter]) -> tuple[list[torch.Tensor | None], WeightGradient]:
    """BI: the gradients of `inputs` given `grads` for `outputs`, without the parameters' gradients, which
    the returned `WeightGradient` accumulates when run (BW).

    `outputs` are the stage's outputs that require grad and `grads` their gradients; `inputs` the received
    leaf tensors. The result has one entry per input, None where the input got no gradient (or does not
    require grad). Nothing is accumulated into any ``.grad`` here.

    Graph shapes that split less, all still exact:

    * With no input requiring grad (the first stage), BI computes nothing and BW is one
      ``torch.autograd.backward`` over the parameters.
    * When a boundary node could reach its own weight-side targets through another node (a weight used
      twice, one use on the input path of the other: ``(x @ w) @ w``, or layers sharing a LayerNorm),
      rerunning it alone would run that other node too. BW then runs one backward from all boundary nodes
      instead, their inputs pinned to what BI saw: the input part between boundary nodes is recomputed.
    * A custom ``autograd.Function`` at a boundary computes all its outputs in both BI and BW (its
      ``needs_input_grad`` is fixed in forward); BW keeps only the weight-side ones.
    * Hooks on tensors that feed a boundary node, and on parameters, may run again in BW on a partial
      gradient; what they return there is discarded.
    * Non-reentrant checkpoints recompute once in BI and once in BW: BW's backward calls share one
      ``torch.utils.checkpoint.GraphExecGroup`` (on a torch without it, each call recomputes). Reentrant
      ones (``use_reentrant=True``) refuse ``torch.autograd.grad``, so BI raises.
    """
    if len(outputs) != len(grads):
        raise ValueError(f"backward_input: {len(outputs)} outputs but {len(grads)} gradients")
    for position, value in enumerate(inputs):
        if value.requires_grad and value.grad_fn is not None:
            raise ValueError(f"backward_input: input {position} is not a leaf tensor; the split needs the "
                             "received inputs as leaves (detached, requires_grad=True)")
    wanted = [position for position, value in enumerate(inputs) if value.requires_grad]
    output_edges = [get_gradient_edge(output) for output in outputs]
    consumers = _consumers([edge.node for edge in output_edges])
    input_part = _reaching([get_gradient_edge(inputs[i]).node for i in wanted], consumers)
    param_nodes = {get_gradient_edge(p).node: p for p in params if p.requires_grad}
    weight_part = _reaching(list(param_nodes), consumers, excluded=input_part)

    boundaries = []
    for node in consumers:  # graph order, so that BW adds up gradients in the same order every time
        if node in input_part:
            slots = [slot for slot, (next_node, _) in enumerate(node.next_functions) if next_node in weight_part]
            if slots:
                boundaries.append(_Boundary(node, slots))
    split = _rerun_alone(boundaries, consumers)
    root_edges = [edge for edge in output_edges if edge.node in weight_part]
    root_grads = [grad for edge, grad in zip(output_edges, grads) if edge.node in weight_part]
    reached = [param for node, param in param_nodes.items() if node in weight_part]

    input_grads: list[torch.Tensor | None] = [None] * len(inputs)
    if wanted and outputs:
        handles = [boundary.node.register_prehook(_keeper(boundary)) for boundary in boundaries]
        try:
            computed = torch.autograd.grad(outputs, [inputs[i] for i in wanted], grads,
                                           retain_graph=bool(boundaries), allow_unused=True)
        finally:
            for handle in handles:
                handle.remove()
        for position, grad in zip(wanted, computed):
            input_grads[position] = grad
    owners = output_edges if boundaries or root_edges else []
    return input_grads, WeightGradient(owners, boundaries, split, root_edges, root_grads, reached)


def _keeper(boundary: _Boundary):
    """A node pre-hook keeping what arrives at the boundary node in BI (after any tensor hooks)."""

    def keep(arrived):
        boundary.arrived = tuple(arrived)

    return keep


def _weight_side_outputs(boundary: _Boundary) -> list[torch.Tensor | None]:
    """Rerun the boundary node alone on what arrived at it in BI. Its weight-side next nodes are the only
    targets, so it computes just those outputs; a post-hook takes them as the node produced them. Nothing
    else runs (`_rerun_alone`), so the node's saved tensors can go. A built-in node is called directly
    instead (`_called_directly`): one autograd engine call costs about 0.5 ms on CUDA, more than most nodes."""
    seed_edges, seed_grads = boundary.seeds()
    if not seed_edges:  # no gradient arrived: the node's built-in formulas give none either
        return [None] * len(boundary.weight_slots)
    direct = _called_directly(boundary)
    if direct is not None:
        return direct
    node = boundary.node
    targets = list(dict.fromkeys(node.next_functions[slot] for slot in boundary.weight_slots))
    produced: list[tuple[torch.Tensor | None, ...]] = []
    handles = [boundary.replay(),
               node.register_hook(lambda grad_inputs, _grad_outputs: produced.append(tuple(grad_inputs)))]
    try:
        torch.autograd.grad(seed_edges, [GradientEdge(*target) for target in targets], seed_grads, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    return [produced[0][slot] for slot in boundary.weight_slots]


def _called_directly(boundary: _Boundary) -> list[torch.Tensor | None] | None:
    """The boundary node's weight-side outputs from calling the node itself on what arrived in BI (it also
    recomputes its input-side outputs, which are dropped), shaped and typed as the engine would hand them on
    (summed to the next node's input shape, cast to its dtype). None where that cannot be done exactly: a
    node implemented in Python, or a torch without the nodes' input metadata."""
    node = boundary.node
    if isinstance(node, torch.autograd.function.BackwardCFunction) or not callable(node):
        return None
    targets = [node.next_functions[slot] for slot in boundary.weight_slots]
    metadata = [getattr(target, "_input_metadata", None) for target, _ in targets]
    if any(meta is None for meta in metadata):
        return None
    with torch.no_grad():
        produced = node(*boundary.arrived)
    out = []
    for slot, meta, (_, input_nr) in zip(boundary.weight_slots, metadata, targets):
        grad = produced[slot]
        if grad is not None:
            expected = meta[input_nr]
            if tuple(grad.shape) != tuple(expected.shape):
                grad = grad.sum_to_size(tuple(expected.shape))
            if grad.dtype != expected.dtype:
                grad = grad.to(expected.dtype)
        out.append(grad)
    return out


def _rerun_alone(boundaries: list[_Boundary], consumers: dict[Node, list[Node]]) -> bool:
    """Whether each boundary node can be rerun alone: none of its next nodes reaches (by one edge or more)
    one of its weight-side targets, which would make the engine run that next node as well."""
    above: dict[Node, set[Node]] = {}  # target -> the nodes it is reachable from, itself excluded
    for boundary in boundaries:
        node = boundary.node
        next_nodes = {next_node for next_node, _ in node.next_functions if next_node is not None}
        for slot in boundary.weight_slots:
            target = node.next_functions[slot][0]
            if all(consumer is node for consumer in consumers[target]):
                continue  # fed by this node only
            if target not in above:
                above[target] = _reaching([target], consumers) - {target}
            if next_nodes & above[target]:
                return False
    return True


def _consumers(roots: Sequence[Node]) -> dict[Node, list[Node]]:
    """Every node reachable from `roots`, in breadth-first order, with the nodes that have an edge to it."""
    consumers: dict[Node, list[Node]] = {root: [] for root in roots}
    pending = deque(consumers)
    while pending:
        node = pending.popleft()
        for next_node, _ in node.next_functions:
            if next_node is None:
                continue
            if next_node not in consumers:
                consumers[next_node] = []
                pending.append(next_node)
            consumers[next_node].append(node)
    return consumers


def _reaching(targets: Sequence[Node], consumers: dict[Node, list[Node]],
              excluded: set[Node] | frozenset[Node] = frozenset()) -> set[Node]:
    """The nodes of the graph (`consumers`) from which one of `targets` is reachable, targets included,
    leaving out `excluded` (a set closed under consumers, so walking around it loses nothing)."""
    found = {node for node in targets if node in consumers and node not in excluded}
    pending = deque(found)
    while pending:
        for consumer in consumers[pending.popleft()]:
            if consumer not in found and consumer not in excluded:
                found.add(consumer)
                pending.append(consumer)
    return found
