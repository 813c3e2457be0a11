"""What the equivalence tests measure of a RaNNCModule trained beside the plain model: relative differences of
gradients, of the whole state after training, and of an evaluation loss, each as the largest over tensors."""

from __future__ import annotations

import torch

import models


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest difference of a from b, relative to b's largest magnitude."""
    return (a - b).abs().max().item() / (b.abs().max().item() + 1e-3)


def grad_error(wrapped, reference: torch.nn.Module) -> float:
    """Every parameter's gradient as rannc's holders have it against the plain model's (collective)."""
    return max((relative(wrapped.get_param_grad(n), p.grad) for n, p in reference.named_parameters()), default=0.0)


def state_and_eval_errors(wrapped, reference: torch.nn.Module, name: str, batch_size: int, rank: int,
                          world: int) -> tuple[float, float]:
    """After training: the whole state (parameters and buffers) and a no_grad evaluation loss on a batch
    neither has seen, against the plain model's (collective)."""
    state = wrapped.state_dict(sync_all_ranks=True)
    param = max((relative(state[key], value) for key, value in reference.state_dict().items()), default=0.0)
    with torch.no_grad():
        batch = models.global_batch(name, batch_size, seed=99)
        loss, ref_loss = wrapped(*models.local_part(batch, rank, world)), reference(*batch)
    return param, abs(loss.item() - ref_loss.item()) / abs(ref_loss.item())
