"""Process launch and communication: rank discovery (torchrun, mpirun, SLURM, single process), the process
group with a timeout, device assignment, and the few collectives the rest of rannc uses.

NCCL with one GPU per process when CUDA is present, gloo on the CPU otherwise. Every collective runs
under the group's timeout, so a rank that died leaves the others with an error instead of a hang.
"""

from __future__ import annotations

import datetime
import os
import pickle
from typing import Any

import torch
import torch.distributed as dist

_LAUNCHERS = (
    # (rank, world size, local rank) variables of each launcher, most specific first.
    ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
)


def launch_env(env: dict[str, str] | None = None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from whichever launcher started this process; (0, 1, 0) if none."""
    env = os.environ if env is None else env
    for rank_var, size_var, local_var in _LAUNCHERS:
        if rank_var in env and size_var in env:
            rank, size = int(env[rank_var]), int(env[size_var])
            local = int(env.get(local_var, rank))
            return rank, size, local
    return 0, 1, 0


def _default_master_addr(env: dict[str, str]) -> str:
    """Where rank 0 listens when the launcher did not say: only knowable on a single node."""
    nodes = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if nodes and "," not in nodes and "[" not in nodes:
        return nodes
    local_size = env.get("OMPI_COMM_WORLD_LOCAL_SIZE") or env.get("SLURM_NTASKS_PER_NODE")
    world = env.get("OMPI_COMM_WORLD_SIZE") or env.get("SLURM_NTASKS")
    if local_size and world and int(local_size) < int(world):
        raise RuntimeError("rannc runs on several nodes but MASTER_ADDR is not set: export MASTER_ADDR (the host of "
                           "rank 0) and MASTER_PORT to every process, e.g. mpirun -x MASTER_ADDR=host0")
    return "127.0.0.1"


def init(timeout_s: float = 600.0) -> None:
    """Join (or create) the default process group. Idempotent; a no-op when it already exists."""
    if dist.is_initialized():
        return
    rank, world, local = launch_env()
    os.environ.setdefault("MASTER_ADDR", _default_master_addr(os.environ))
    os.environ.setdefault("MASTER_PORT", "29500")
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world)
    os.environ.setdefault("LOCAL_RANK", str(local))
    use_cuda = torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    # rannc's stage-to-stage transfers are point-to-point by design; NCCL's serialization notice is noise
    os.environ.setdefault("TORCH_NCCL_SHOW_EAGER_INIT_P2P_SERIALIZATION_WARNING", "false")
    if use_cuda:
        torch.cuda.set_device(local % torch.cuda.device_count())
    kwargs: dict[str, Any] = {}
    if use_cuda:
        kwargs["device_id"] = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group(backend=backend, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s), **kwargs)


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else launch_env()[0]


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else launch_env()[1]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def device() -> torch.device:
    """The device this process computes on."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def uses_nccl() -> bool:
    return dist.is_initialized() and dist.get_backend() == "nccl"


def comm_device() -> torch.device:
    """Where tensors must live to be sent: the GPU under NCCL, the CPU under gloo."""
    return device() if uses_nccl() else torch.device("cpu")


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` from rank `src` on every rank."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=comm_device() if uses_nccl() else None)
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    if get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def agree_or_raise(error: BaseException | None, what: str) -> None:
    """Collective: if any rank hit an error, every rank raises one naming the first failing rank.

    Used around steps whose failure on one rank would otherwise leave the others waiting in the next
    collective (checking inputs, loading a deployment)."""
    if get_world_size() == 1:
        if error is not None:
            raise error
        return
    messages = all_gather_objects(None if error is None else f"{type(error).__name__}: {error}")
    for rank, message in enumerate(messages):
        if message is not None:
            if error is not None and rank == get_rank():
                raise error
            raise RuntimeError(f"{what} failed on rank {rank}: {message}")


def pickled_size(obj: Any) -> int:
    return len(pickle.dumps(obj))
