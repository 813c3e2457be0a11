"""Global model state dicts: full tensors gathered from the ranks that own them, and loading a full
state dict into whichever tensors this rank holds."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.distributed as dist

from rannc import dist as rdist
from rannc.precision import MasterWeights
from rannc.runtime.placement import Placement


def _source(placement: Placement, masters: MasterWeights | None, name: str) -> tuple[torch.Tensor, torch.dtype]:
    """What a state dict holds for tensor `name` and its dtype, the same on every rank: the fp32 master of a
    parameter the model computes in bfloat16 (this rank's, where it holds one), else the tensor as it is."""
    t = placement.named[name]
    if masters is not None and masters.has(t):
        return masters.of(t), torch.float32
    return t, placement.meta[name][1]


def gather_state_dict(placement: Placement, keys: list[str], sync_all_ranks: bool,
                      masters: MasterWeights | None = None) -> "OrderedDict[str, torch.Tensor]":
    """Collective: the model's state dict with full CPU tensors on rank 0 (on every rank when
    `sync_all_ranks`); other ranks get an empty dict otherwise. Parameters with fp32 masters give those."""
    rank = placement.rank
    comm = rdist.comm_device()
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    done: dict[int, torch.Tensor] = {}
    for name in keys:
        t = placement.named[name]
        if id(t) in done:
            if done[id(t)] is not None:
                out[name] = done[id(t)]
            continue
        owner = placement.owner(t)
        shape = placement.meta[name][0]
        source, dtype = _source(placement, masters, name)
        if rdist.get_world_size() == 1 or (owner == 0 and not sync_all_ranks):
            value = source.detach().to("cpu", copy=True) if rank == 0 else None
        else:
            buf = (source.detach().to(comm, copy=True) if rank == owner   # a copy: on CPUs .to() is no copy
                   else torch.empty(shape, dtype=dtype, device=comm))
            if sync_all_ranks:
                dist.broadcast(buf, owner)
                value = buf.cpu()
            else:
                if rank == owner:
                    dist.send(buf.contiguous(), 0)
                    value = None
                elif rank == 0:
                    dist.recv(buf, owner)
                    value = buf.cpu()
                else:
                    value = None
        done[id(t)] = value
        if value is not None:
            out[name] = value
    return out


def load_into_local(placement: Placement, state_dict: dict, strict: bool = True,
                    masters: MasterWeights | None = None) -> None:
    """Copy the entries of a full state dict into the tensors this rank holds (and their fp32 masters)."""
    missing = [k for k in placement.named if k not in state_dict]
    unexpected = [k for k in state_dict if k not in placement.named]
    if strict and (missing or unexpected):
        raise KeyError(f"state dict does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, value in state_dict.items():
            t = placement.named.get(name)
            if t is None:
                continue
            if placement.is_local(t) or id(t) not in placement.holders:
                if tuple(value.shape) != tuple(t.shape):
                    raise ValueError(f"state dict entry {name} has shape {tuple(value.shape)}, the model's is "
                                     f"{tuple(t.shape)}")
                t.copy_(value.to(t.device, t.dtype))
                if masters is not None and masters.of(t) is not t:
                    masters.of(t).copy_(value.to(t.device, torch.float32))


def fetch_tensor(placement: Placement, name: str, grad: bool = False, masters: MasterWeights | None = None
                 ) -> torch.Tensor | None:
    """Collective: the full value (or gradient) of tensor `name` as a CPU copy on every rank, sent by its
    owner. A gradient the owner does not have is None everywhere. With `masters`: a parameter computed in
    bfloat16 gives its fp32 master (or its gradient in fp32, the value the master gets at the next step)."""
    t = placement.named[name]
    shape, dtype = placement.meta[name]
    owner = placement.owner(t)
    source = t.grad if grad else t
    if masters is not None and masters.has(t):
        dtype = torch.float32
        source = None if source is None else (source.float() if grad else masters.of(t))
    if rdist.get_world_size() == 1:
        return None if source is None else source.detach().to("cpu", copy=True)
    comm = rdist.comm_device()
    flag = torch.tensor([1 if placement.rank == owner and source is not None else 0], device=comm)
    dist.broadcast(flag, owner)
    if not flag.item():
        return None
    buf = (source.detach().to(comm, copy=True).contiguous() if placement.rank == owner
           else torch.empty(shape, dtype=dtype, device=comm))
    dist.broadcast(buf, owner)
    return buf.cpu()


def restore_all(placement: Placement, full_state: dict, device: torch.device | None = None,
                masters: MasterWeights | None = None) -> None:
    """Give every tensor of the model its full value again (after a deployment freed the ones other ranks
    held): `full_state` is the full state dict; tensors go to `device`, or stay where they are. Parameters
    computed in bfloat16 become fp32 again, their masters' values."""
    with torch.no_grad():
        for name, t in placement.named.items():
            if name not in full_state:
                continue
            value = full_state[name]
            target = device if device is not None else t.device
            dtype = torch.float32 if masters is not None and masters.has(t) else t.dtype
            if dtype != t.dtype:
                t.grad = None   # a bfloat16 gradient cannot stay on an fp32 parameter
            t.data = value.to(target, dtype).clone()
            if not placement.is_local(t):
                t.grad = None
