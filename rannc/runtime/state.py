"""Global model state dicts: full tensors gathered from the ranks that own them, and loading a full
state dict into whichever tensors this rank holds."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.distributed as dist

from rannc import dist as rdist
from rannc.runtime.placement import Placement


def gather_state_dict(placement: Placement, keys: list[str], sync_all_ranks: bool) -> "OrderedDict[str, torch.Tensor]":
    """Collective: the model's state dict with full CPU tensors on rank 0 (on every rank when
    `sync_all_ranks`); other ranks get an empty dict otherwise."""
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
        shape, dtype = placement.meta[name]
        if rdist.get_world_size() == 1 or (owner == 0 and not sync_all_ranks):
            value = t.detach().to("cpu", copy=True) if rank == 0 else None
        else:
            buf = (t.detach().to(comm) if rank == owner else torch.empty(shape, dtype=dtype, device=comm))
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


def load_into_local(placement: Placement, state_dict: dict, strict: bool = True) -> None:
    """Copy the entries of a full state dict into the tensors this rank holds."""
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


def fetch_tensor(placement: Placement, name: str, grad: bool = False) -> torch.Tensor | None:
    """Collective: the full value (or gradient) of tensor `name` as a CPU copy on every rank, sent by its
    owner. A gradient the owner does not have is None everywhere."""
    t = placement.named[name]
    shape, dtype = placement.meta[name]
    owner = placement.owner(t)
    source = t.grad if grad else t
    if rdist.get_world_size() == 1:
        return None if source is None else source.detach().to("cpu", copy=True)
    comm = rdist.comm_device()
    flag = torch.tensor([1 if placement.rank == owner and source is not None else 0], device=comm)
    dist.broadcast(flag, owner)
    if not flag.item():
        return None
    buf = source.detach().to(comm).contiguous() if placement.rank == owner else torch.empty(shape, dtype=dtype,
                                                                                           device=comm)
    dist.broadcast(buf, owner)
    return buf.cpu()


def restore_all(placement: Placement, full_state: dict, device: torch.device | None = None) -> None:
    """Give every tensor of the model its full value again (after a deployment freed the ones other ranks
    held): `full_state` is the full state dict; tensors go to `device`, or stay where they are."""
    with torch.no_grad():
        for name, t in placement.named.items():
            if name not in full_state:
                continue
            value = full_state[name]
            target = device if device is not None else t.device
            t.data = value.to(target, t.dtype).clone()
            if not placement.is_local(t):
                t.grad = None
