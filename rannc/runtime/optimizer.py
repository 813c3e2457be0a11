"""Patching the user's optimizer: after deployment its param groups hold only this rank's parameters;
`state_dict()` gathers every parameter's state (the same global dict on every rank) and
`load_state_dict()` takes such a global dict and keeps this rank's part.

Global indices are the positions of the parameters in the original param groups, so a global state dict
is the one a single-process run would save.

RaNNC's patched methods take `from_global` (`state_dict(from_global=False, **kw)`,
`load_state_dict(sd, from_global=False)`): there, False means the rank's local optimizer dict. Here both
values mean the global dict, because a local dict is indexed by the rank's share of one particular plan
and could not be loaded by a run with another partition or world size (see `state_dict`)."""

from __future__ import annotations

import copy
import functools
import types
from typing import Any

import torch

from rannc import dist as rdist
from rannc import faults
from rannc.runtime.placement import Placement


def _reported_step(step):
    """The optimizer's step (as it stands: maybe an LR scheduler's wrapper) with its failures reported to the
    other ranks. A method again, so that an LR scheduler made later can wrap it as it wraps any step."""
    @faults.guarded("optimizer step")
    @functools.wraps(step)
    def reported_step(optimizer, *args, **kwargs):
        return step(*args, **kwargs)
    return reported_step


class OptimizerPatch:
    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.full_groups = [list(g["params"]) for g in optimizer.param_groups]
        self.placement: Placement | None = None
        self.pending_state: dict | None = None
        self._orig_state_dict = optimizer.state_dict
        self._orig_load = optimizer.load_state_dict
        optimizer.state_dict = types.MethodType(
            lambda opt, from_global=False, **kwargs: self.state_dict(from_global, **kwargs), optimizer)
        optimizer.load_state_dict = types.MethodType(
            lambda opt, state_dict, from_global=False: self.load_state_dict(state_dict, from_global), optimizer)
        optimizer.step = types.MethodType(_reported_step(optimizer.step), optimizer)

    def deploy(self, placement: Placement) -> None:
        """Keep only local parameters in the param groups; apply a state dict loaded before deployment."""
        self.placement = placement
        for group, full in zip(self.optimizer.param_groups, self.full_groups):
            group["params"] = [p for p in full if placement.is_local(p)]
        for p in list(self.optimizer.state):
            if not placement.is_local(p):
                del self.optimizer.state[p]
        if self.pending_state is not None:
            state, self.pending_state = self.pending_state, None
            self.load_state_dict(state)

    def undeploy(self) -> None:
        """Give the param groups all of their parameters back (state: load a global state dict after)."""
        self.placement = None
        for group, full in zip(self.optimizer.param_groups, self.full_groups):
            group["params"] = list(full)
        self.optimizer.state.clear()

    def _global_index(self) -> list[torch.nn.Parameter]:
        return [p for full in self.full_groups for p in full]

    def state_dict(self, from_global: bool = False, to_cpu: bool = True, root: int = 0) -> dict[str, Any]:
        """Collective once deployed: every parameter's state, indexed as the unpartitioned optimizer would
        index it; the same dict on every rank, tensors on the CPU. (Before deployment: the plain optimizer's
        own dict, which is global too.)

        `from_global`, `to_cpu` and `root` are RaNNC's arguments and change nothing. RaNNC returns the global
        dict with from_global=True on rank `root` only (None elsewhere); here every rank gets it. With
        from_global=False RaNNC returns the rank's local optimizer dict; here it is the global one as well: a
        local dict holds only the parameters of this rank's stage, indexed by their position in this plan's
        local param groups, so it could not be loaded by a run with another partition or world size, nor by
        a fresh optimizer before its first forward call (when the partition is not known yet)."""
        del from_global, to_cpu, root
        if self.placement is None:
            return self._orig_state_dict()
        order = self._global_index()
        mine = {}
        for index, p in enumerate(order):
            if self.placement.is_local(p) and self.placement.owner(p) == self.placement.rank and \
                    p in self.optimizer.state:
                mine[index] = {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else copy.deepcopy(v))
                               for k, v in self.optimizer.state[p].items()}
        state: dict[int, Any] = {}
        for part in rdist.all_gather_objects(mine):
            state.update(part)
        groups = []
        start = 0
        for group, full in zip(self.optimizer.param_groups, self.full_groups):
            g = {k: copy.deepcopy(v) for k, v in group.items() if k != "params"}
            g["params"] = list(range(start, start + len(full)))
            start += len(full)
            groups.append(g)
        return {"state": dict(sorted(state.items())), "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any], from_global: bool = False) -> None:
        """Load a global state dict (as `state_dict` returns, with either `from_global`); before deployment
        it is kept and applied at deployment. `from_global` is RaNNC's argument: the dict is global either
        way (a single-process optimizer's dict is global too)."""
        del from_global
        if self.placement is None:
            self.pending_state = state_dict
            return
        order = self._global_index()
        if len(state_dict["param_groups"]) != len(self.full_groups):
            raise ValueError(f"optimizer state dict has {len(state_dict['param_groups'])} param groups, the "
                             f"optimizer has {len(self.full_groups)}")
        local_state, local_groups, local_index = {}, [], 0
        for saved_group, full in zip(state_dict["param_groups"], self.full_groups):
            if len(saved_group["params"]) != len(full):
                raise ValueError(f"a param group of the optimizer state dict has {len(saved_group['params'])} "
                                 f"parameters, the optimizer's has {len(full)}")
            params = []
            for global_id in saved_group["params"]:
                p = order[global_id]
                if self.placement.is_local(p):
                    if global_id in state_dict["state"]:
                        local_state[local_index] = state_dict["state"][global_id]
                    params.append(local_index)
                    local_index += 1
            g = dict(saved_group)
            g["params"] = params
            local_groups.append(g)
        self._orig_load({"state": local_state, "param_groups": local_groups})
