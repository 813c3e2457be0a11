"""NVIDIA BERT's learning-rate schedule: linear warm-up, then polynomial decay, driven by the optimizer's step.

The step comes from the optimizer's own counter, so steps skipped on fp16 overflow do not advance the schedule.
"""

from __future__ import annotations

import torch

__all__ = ["PolyWarmUpScheduler"]


class PolyWarmUpScheduler:
    """Set every group's lr to ``base·p/warmup`` while ``p < warmup``, then ``base·(1-p)^degree``.

    ``p = step / total_steps`` with ``step = param_groups[0]['step'] + 1`` (the counter :class:`bert.optim.Lamb`
    keeps; 0 when absent), as in NVIDIA's schedulers.py, because ``step()`` runs *before* the optimizer
    step that will bump that counter. ``warmup`` is a fraction of ``total_steps`` (0.2843 in phase 1).
    Beyond ``total_steps`` the lr stays 0.

    ``step()`` is a function of the optimizer's counter alone, so calling it twice, or after loading an
    optimizer checkpoint, gives the same lr. The base lr is each group's ``initial_lr`` (set from ``lr`` on
    first construction), so a scheduler built again after ``optimizer.load_state_dict`` keeps the right base.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, warmup: float, total_steps: int, degree: float = 0.5
    ):
        if total_steps <= 0:
            raise ValueError(f"PolyWarmUpScheduler needs total_steps > 0 (got {total_steps})")
        if not 0.0 <= warmup <= 1.0:
            raise ValueError(
                f"PolyWarmUpScheduler takes warmup as a fraction of total_steps in [0, 1] (got {warmup})"
            )
        self.optimizer = optimizer
        self.warmup = warmup
        self.total_steps = total_steps
        self.degree = degree
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        self.step()

    def current_step(self) -> int:
        """The step the next optimizer.step() will take, counted from 1."""
        return self.optimizer.param_groups[0].get("step", 0) + 1

    def lr_factor(self, step: int) -> float:
        """The multiplier of the base lr at ``step`` (NVIDIA's formula)."""
        progress = step / self.total_steps
        if progress < self.warmup:
            return progress / self.warmup
        return max(0.0, 1.0 - progress) ** self.degree

    def step(self) -> None:
        factor = self.lr_factor(self.current_step())
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base_lr * factor

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {
            "warmup": self.warmup,
            "total_steps": self.total_steps,
            "degree": self.degree,
            "base_lrs": list(self.base_lrs),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.warmup = state_dict["warmup"]
        self.total_steps = state_dict["total_steps"]
        self.degree = state_dict["degree"]
        self.base_lrs = list(state_dict["base_lrs"])
        self.step()
