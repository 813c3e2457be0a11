"""Dynamic loss scaling for fp16 training: detect overflowed grads, agree on it across processes, adjust the scale.

torch's GradScaler couples scaling to optimizer.step(); NVIDIA's recipe unscales after its own all-reduce instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

__all__ = ["DynamicLossScaler", "unscale_"]


def _grads(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [p.grad for p in params if p.grad is not None]


def unscale_(params: Iterable[torch.Tensor], factor: float) -> None:
    """Multiply every grad in place by ``factor`` (e.g. ``1 / scale``), one foreach call per device and dtype."""
    buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for grad in _grads(params):
        buckets.setdefault((grad.device, grad.dtype), []).append(grad)
    for grads in buckets.values():
        torch._foreach_mul_(grads, factor)


class DynamicLossScaler:
    """Halve the scale on overflow, double it after ``growth_interval`` overflow-free steps.

    The caller multiplies the loss by :attr:`scale`, calls :meth:`has_overflow` on the scaled grads, skips
    the optimizer step if it returns True, and calls :meth:`update` with the result either way. Every rank
    must skip together or replicas diverge, hence ``reduce_fn`` in :meth:`has_overflow`.
    """

    def __init__(
        self,
        init_scale: float = 2.0**20,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        min_scale: float = 1.0,
    ) -> None:
        if growth_factor <= 1.0:
            raise ValueError(f"DynamicLossScaler needs growth_factor > 1 (got {growth_factor})")
        if not 0.0 < backoff_factor < 1.0:
            raise ValueError(f"DynamicLossScaler needs backoff_factor in (0, 1) (got {backoff_factor})")
        if growth_interval < 1:
            raise ValueError(f"DynamicLossScaler needs growth_interval >= 1 (got {growth_interval})")
        if not 0.0 < min_scale <= init_scale:
            raise ValueError(
                f"DynamicLossScaler needs 0 < min_scale <= init_scale (got {min_scale}, {init_scale})"
            )
        self._scale = float(init_scale)
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.min_scale = float(min_scale)
        # Overflow-free steps since the scale last changed.
        self.good_steps = 0

    @property
    def scale(self) -> float:
        return self._scale

    def has_overflow(
        self,
        params: Iterable[torch.Tensor],
        reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        device: torch.device | str | None = None,
    ) -> bool:
        """Whether any grad holds inf or nan, on this process or, with ``reduce_fn``, on any process.

        ``reduce_fn`` takes a float32 one-element flag (1.0 = overflow) and returns its all-reduced MAX, e.g.
        ``lambda t: (dist.all_reduce(t, op=dist.ReduceOp.MAX), t)[1]``. The flag lives on the first grad's
        device; ``device`` places it when this process holds no grads (NCCL needs a CUDA tensor).
        """
        grads = _grads(params)
        flag_device = torch.device(device) if device is not None else (grads[0].device if grads else "cpu")
        flag = torch.zeros(1, dtype=torch.float32, device=flag_device)
        buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for grad in grads:
            buckets.setdefault((grad.device, grad.dtype), []).append(grad)
        for bucket in buckets.values():
            # The max-abs norm is inf for any inf and nan for any nan, and unlike the 2-norm cannot overflow
            # on large finite values.
            max_abs = torch.stack(torch._foreach_norm(bucket, ord=float("inf"))).to(flag_device)
            flag = torch.maximum(flag, (~torch.isfinite(max_abs)).any().to(torch.float32).reshape(1))
        if reduce_fn is not None:
            flag = reduce_fn(flag)
        return bool(flag.item() > 0)

    def update(self, overflow: bool) -> None:
        if overflow:
            self._scale = max(self._scale * self.backoff_factor, self.min_scale)
            self.good_steps = 0
            return
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self._scale *= self.growth_factor
            self.good_steps = 0

    def unscale_(self, params: Iterable[torch.Tensor], factor: float | None = None) -> None:
        """Multiply grads in place by ``factor``, by default ``1 / scale``."""
        unscale_(params, 1.0 / self._scale if factor is None else factor)

    def state_dict(self) -> dict:
        return {
            "scale": self._scale,
            "growth_factor": self.growth_factor,
            "backoff_factor": self.backoff_factor,
            "growth_interval": self.growth_interval,
            "min_scale": self.min_scale,
            "good_steps": self.good_steps,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self._scale = float(state_dict["scale"])
        self.growth_factor = state_dict["growth_factor"]
        self.backoff_factor = state_dict["backoff_factor"]
        self.growth_interval = state_dict["growth_interval"]
        self.min_scale = float(state_dict["min_scale"])
        self.good_steps = state_dict["good_steps"]
