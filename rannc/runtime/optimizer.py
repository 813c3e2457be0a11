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
from rannc.precision import MasterWeights
from rannc.runtime.placement import Placement


def _reported_step(step, patch: OptimizerPatch):
    """The optimizer's step (as it stands: maybe an LR scheduler's wrapper) with its failures reported to the
    other ranks, over the fp32 masters where the model computes in bfloat16. A method again, so that an LR
    scheduler made later can wrap it as it wraps any step."""
    @faults.guarded("optimizer step")
    @functools.wraps(step)
    def reported_step(optimizer, *args, **kwargs):
        if patch.masters is not None:
            return patch.masters.step(lambda: step(*args, **kwargs), optimizer)
        return step(*args, **kwargs)
    return reported_step


def _zeroing_compute_grads(zero_grad, patch: OptimizerPatch):
    """The optimizer's zero_grad, which also clears the bfloat16 parameters' gradients under param_dtype (the
    optimizer holds their fp32 masters, whose own gradients are never set)."""
    @functools.wraps(zero_grad)
    def zeroing(optimizer, set_to_none: bool = True):
        zero_grad(set_to_none)
        if patch.masters is not None:
            patch.masters.zero_grad(set_to_none)
    return zeroing


class OptimizerPatch:
    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.full_groups = [list(g["params"]) for g in optimizer.param_groups]
        self.placement: Placement | None = None
        self.masters: MasterWeights | None = None
        self.pending_state: dict | None = None
        self._orig_state_dict = optimizer.state_dict
        self._orig_load = optimizer.load_state_dict
        optimizer.state_dict = types.MethodType(
            lambda opt, from_global=False, **kwargs: self.state_dict(from_global, **kwargs), optimizer)
        optimizer.load_state_dict = types.MethodType(
            lambda opt, state_dict, from_global=False: self.load_state_dict(state_dict, from_global), optimizer)
        optimizer.step = types.MethodType(_reported_step(optimizer.step, self), optimizer)
        optimizer.zero_grad = types.MethodType(_zeroing_compute_grads(optimizer.zero_grad, self), optimizer)

    def deploy(self, placement: Placement, masters: MasterWeights | None = None) -> None:
        """Keep only local parameters in the param groups (their fp32 masters where the model computes in
        bfloat16); apply a state dict loaded before deployment."""
        self.placement, self.masters = placement, masters
        for group, full in zip(self.optimizer.param_groups, self.full_groups):
            group["params"] = [self._stepped(p) for p in full if placement.is_local(p)]
        for p in list(self.optimizer.state):
            if not placement.is_local(p):
                del self.optimizer.state[p]
            elif self._stepped(p) is not p:
                self.optimizer.state[self._stepped(p)] = self.optimizer.state.pop(p)
        if self.pending_state is not None:
            state, self.pending_state = self.pending_state, None
            self.load_state_dict(state)

    def undeploy(self) -> None:
        """Give the param groups all of their parameters back (state: load a global state dict after)."""
        self.placement = self.masters = None
        for group, full in zip(self.optimizer.param_groups, self.full_groups):
            group["params"] = list(full)
        self.optimizer.state.clear()

    def _stepped(self, p: torch.Tensor) -> torch.Tensor:
        """The tensor the optimizer steps for model parameter `p`: its master, or `p` itself."""
        return self.masters.of(p) if self.masters is not None else p

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
            stepped = self._stepped(p)
            if self.placement.is_local(p) and self.placement.owner(p) == self.placement.rank and \
                    stepped in self.optimizer.state:
                mine[index] = {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else copy.deepcopy(v))
                               for k, v in self.optimizer.state[stepped].items()}
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
