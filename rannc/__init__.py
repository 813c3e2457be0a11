"""rannc: automatic hybrid parallelism (pipeline stages x data-parallel replicas x micro-batches x
recomputation) for unmodified PyTorch models. The public API lives here and only here."""

from __future__ import annotations

from rannc.config import ConfigError, RannConfig, load_config  # noqa: E402
from rannc.deploy import plan_dry_run  # noqa: E402
from rannc.dist import get_rank, get_world_size  # noqa: E402
from rannc.faults import RankFailure, barrier  # noqa: E402
from rannc.graph.capture import CaptureError  # noqa: E402
from rannc.module import FLAGS, RaNNCModule  # noqa: E402
from rannc.plan.deployment import Deployment, DeploymentError, show_deployment  # noqa: E402
from rannc.plan.planner import PlanningError  # noqa: E402
from rannc.profile.estimate import DEVICES, DeviceSpec  # noqa: E402
from rannc.version import __version__  # noqa: E402,F401


def delay_grad_allreduce(delay: bool) -> None:
    """Skip the gradient all-reduce after backward (call RaNNCModule.allreduce_grads() yourself), for
    gradient accumulation."""
    FLAGS.delay_grad_allreduce = bool(delay)


def keep_graph(keep: bool) -> None:
    """Keep the autograd graph after backward, so backward can run again on the same forward. Calls made while
    it is on run the stages eagerly, also where they are compiled: torch.compile's backward refuses a second
    run (donated buffers), and compiled without those, its second run gave wrong gradients (torch 2.13)."""
    FLAGS.keep_graph = bool(keep)


def sync_params_on_init(sync: bool) -> None:
    """Broadcast rank 0's parameters to all ranks at deployment (on by default)."""
    FLAGS.sync_params_on_init = bool(sync)


def allreduce_grads(rmodel: RaNNCModule, optimizer=None, prescale: float = 1.0) -> bool:
    """RaNNC v0.6-v0.7.4's module-level all-reduce, for gradient accumulation under delay_grad_allreduce(True):
    multiply every local gradient by `prescale` (e.g. 1 / accumulation steps), then sum each gradient over
    the ranks that hold its parameter, as `rmodel.allreduce_grads()` does. Collective. `optimizer` is
    accepted for RaNNC's signature (it was used for apex amp only). Returns had_overflow, always False
    (no apex loss scaling here), as RaNNC does without amp."""
    del optimizer
    if not rmodel.ready:
        raise RuntimeError("allreduce_grads() needs the deployment, which the first forward call creates")
    if prescale != 1.0:
        import torch
        with torch.no_grad():
            for p in rmodel.parameters():
                if p.grad is not None:
                    p.grad.mul_(prescale)
    rmodel.allreduce_grads()
    return False


def clear() -> None:
    """RaNNC's `clear`: wrapped modules may be dropped and new ones wrapped; the process group stays up (as
    upstream keeps MPI up), so that the usual `clear(); barrier()` between models synchronises every rank
    instead of racing a re-created group."""
    barrier()


__all__ = [
    "RaNNCModule", "RannConfig", "load_config", "ConfigError", "CaptureError", "Deployment", "DeploymentError",
    "PlanningError", "RankFailure", "show_deployment", "plan_dry_run", "DeviceSpec", "DEVICES",
    "delay_grad_allreduce", "keep_graph", "sync_params_on_init", "allreduce_grads",
    "get_rank", "get_world_size", "barrier", "clear",
]
