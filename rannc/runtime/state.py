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
