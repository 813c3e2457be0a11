"""Which ranks hold each parameter and buffer, the process groups that connect the holders, and moving
tensors onto this rank's device (freeing the ones other ranks hold).

A tensor read by several stages (a tied embedding) is held by the ranks of all of them; its gradient is
summed over that whole set, and its owner (the lowest holder) speaks for it in state dicts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from rannc import dist as rdist
from rannc.graph.stage import StageGraph
from rannc.plan.deployment import Deployment


class Placement:
    def __init__(self, stages: list[StageGraph], deployment: Deployment, rank: int, named_tensors: dict):
        """`named_tensors`: name -> tensor for every parameter and buffer of the model (tied names included)."""
        self.rank = rank
        self.holders: dict[int, tuple[int, ...]] = {}
        for stage_graph, plan in zip(stages, deployment.stages):
            for t in stage_graph.tensors():
                self.holders[id(t)] = tuple(sorted(set(self.holders.get(id(t), ())) | set(plan.ranks)))
        self.named = named_tensors
        self.meta = {name: (tuple(t.shape), t.dtype) for name, t in named_tensors.items()}
        unique: dict[int, torch.Tensor] = {}
        for t in named_tensors.values():
            unique.setdefault(id(t), t)
        self.tensors = unique
        self._local: list | None = None
        self._owned: list | None = None
        self.groups: dict[tuple[int, ...], object] = {}
        for ranks in sorted(set(self.holders.values())):
            if len(ranks) > 1:
                self.groups[ranks] = (None if len(ranks) == rdist.get_world_size()
                                      else dist.new_group(list(ranks)))

    def holders_of(self, t: torch.Tensor) -> tuple[int, ...]:
        return self.holders.get(id(t), ())

    def owner(self, t: torch.Tensor) -> int:
        holders = self.holders.get(id(t))
        return holders[0] if holders else 0

    def is_local(self, t: torch.Tensor) -> bool:
        return self.rank in self.holders.get(id(t), ())

    def local_parameters(self) -> list[torch.nn.Parameter]:
        """This rank's parameters (a fixed list: the placement does not change once made)."""
        if self._local is None:
            self._local = [t for t in self.tensors.values() if isinstance(t, torch.nn.Parameter) and self.is_local(t)]
        return self._local

    def owned_parameters(self) -> list[torch.nn.Parameter]:
        """The local parameters this rank speaks for (the lowest holder): each parameter counted once."""
        if self._owned is None:
            self._owned = [p for p in self.local_parameters() if self.owner(p) == self.rank]
        return self._owned

    def place(self, device: torch.device) -> None:
        """Move this rank's tensors to its device; free those only other ranks hold."""
        for t in self.tensors.values():
            if self.is_local(t):
                if t.device != device:
                    t.data = t.data.to(device)
            elif id(t) in self.holders:
                t.data = torch.empty(0, dtype=t.dtype, device=t.device)
                t.grad = None
