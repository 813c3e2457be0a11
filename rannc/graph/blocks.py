"""Cut the captured graph into blocks: contiguous runs of compute nodes along the graph's order, such
that any contiguous range of blocks is a valid stage.

A cut between two positions is valid when every value crossing it is a tensor (it can be sent to the
next stage); the runs between valid cuts are the atomic units, and units are merged into blocks of
similar estimated cost so the planner works on a few hundred pieces at most.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx

from rannc.graph.capture import CapturedGraph, is_replicable, is_tensor_value, mutated_args


@dataclass
class Linearized:
    """The graph's compute nodes in order, and which values cross each cut."""

    compute_nodes: list[fx.Node]
    # crossing[c]: values produced before position c and used at or after it (c = len means the output)
    crossing: list[list[fx.Node]]
    valid_cuts: list[int]        # positions c (0 < c < len) where a stage boundary may go

    @property
    def size(self) -> int:
        return len(self.compute_nodes)


def linearize(captured: CapturedGraph) -> Linearized:
    memo: dict[fx.Node, bool] = {}
    nodes = [n for n in captured.gm.graph.nodes
             if n.op not in ("placeholder", "get_attr", "output") and not is_replicable(n, memo)]
    position = {n: i for i, n in enumerate(nodes)}
    end = len(nodes)
    last_use: dict[fx.Node, int] = {}
    for node in nodes:
        uses = [position.get(u, end) for u in node.users]  # the output node (or anything else) counts as end
        last_use[node] = max(uses) if uses else position[node]
    crossing: list[list[fx.Node]] = []
    live: list[fx.Node] = []
    for c in range(end + 1):
        if c > 0:
            live.append(nodes[c - 1])
        live = [v for v in live if last_use[v] >= c]
        crossing.append(list(live))
    # a value written in place must stay in the stage that produced it: the receiving stage would
    # otherwise mutate a tensor autograd treats as a leaf input
    blocked = [False] * (end + 1)
    for k, node in enumerate(nodes):
        for arg in mutated_args(node):
            if arg in position:
                for c in range(position[arg] + 1, k + 1):
                    blocked[c] = True
    valid = [c for c in range(1, end) if not blocked[c] and all(is_tensor_value(v) for v in crossing[c])]
    return Linearized(nodes, crossing, valid)


def node_flops(node: fx.Node) -> float:
    """A rough forward FLOP count: matrix products exactly, everything else one op per output element."""
    out = node.meta.get("val")
    if not isinstance(out, torch.Tensor):
        return 0.0
    numel = _numel(out)
    name = str(node.target)
    args = [a.meta.get("val") for a in node.args if isinstance(a, fx.Node)]
    if "linear" in name and args:
        return 2.0 * numel * _size(args[0], -1)
    if any(k in name for k in ("aten.mm", "aten.bmm", "aten.matmul", "addmm", "baddbmm", "einsum")) and args:
        return 2.0 * numel * _size(args[0], -1)
    if "scaled_dot_product" in name or name.endswith(".sdpa") or getattr(node.target, "__name__", "") == "sdpa":
        q, k = args[0], args[1]
        return 4.0 * _numel(q) * _size(k, -2)
    if "convolution" in name or "conv" in name:
        w = args[1] if len(args) > 1 else None
        return 2.0 * numel * (_numel(w) / max(1, _size(w, 0)) if w is not None else 1)
    return float(numel)


def _numel(t) -> int:
    if not isinstance(t, torch.Tensor):
        return 0
    return math.prod(_hint(s) for s in t.shape)


def _size(t, dim: int) -> int:
    return _hint(t.shape[dim]) if isinstance(t, torch.Tensor) and t.dim() else 1


def _hint(s) -> int:
    """A concrete value for a possibly symbolic size (its hint from the captured example)."""
    if isinstance(s, int):
        return s
    try:
        return int(s.node.hint)
    except Exception:
        return int(s)


@dataclass
class Blocks:
    """Block k holds compute positions [bounds[k], bounds[k+1])."""

    bounds: list[int]

    @property
    def count(self) -> int:
        return len(self.bounds) - 1

    def positions(self, first_block: int, end_block: int) -> tuple[int, int]:
        return self.bounds[first_block], self.bounds[end_block]


def make_blocks(lin: Linearized, max_blocks: int) -> Blocks:
    """Merge atomic units greedily into at most `max_blocks` blocks of similar FLOPs."""
    cuts = [0] + lin.valid_cuts + [lin.size]
    unit_cost = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        unit_cost.append(sum(node_flops(n) for n in lin.compute_nodes[a:b]) + 1.0)
    if len(unit_cost) <= max_blocks:
        return Blocks(cuts)
    target = sum(unit_cost) / max_blocks
    bounds, acc = [0], 0.0
    for i, cost in enumerate(unit_cost):
        acc += cost
        remaining_units = len(unit_cost) - i - 1
        remaining_blocks = max_blocks - len(bounds)
        if remaining_units and (acc >= target or remaining_units <= remaining_blocks) and \
                len(bounds) < max_blocks:
            bounds.append(cuts[i + 1])
            acc = 0.0
    bounds.append(lin.size)
    return Blocks(bounds)
