"""Measure what every stage does once per step after its pipeline drains: the user's optimizer step and the
gradient clipping, on this device, over stand-in parameters (never the model's own, which must not change).

Both are memory-bound loops over the parameters with a fixed cost per call (the optimizer's Python, its
handful of multi-tensor launches) and a per-tensor cost, so each is fitted as
`fixed + per_tensor x tensors + per_byte x bytes` from three measurements: few and many small tensors
(launch-bound) and a few large ones (bandwidth-bound). The optimizer is a copy of the user's own (its class,
attributes and first group's settings) over stand-in parameters.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import hashlib
import logging
import time
import types

import torch

from rannc.precision import MasterWeights
from rannc.profile import json_cache
from rannc.profile.profiler import device_name, sync_device
from rannc.profile.profiles import UpdateProfile
from rannc.version import __version__

logger = logging.getLogger("rannc.profile")

FEW_TENSORS = 8
SMALL_TENSORS = 128
SMALL_NUMEL = 1024
LARGE_TENSORS = 4


def _stand_ins(count: int, numel: int, dtype: torch.dtype, device: torch.device) -> list[torch.nn.Parameter]:
    params = []
    for _ in range(count):
        p = torch.nn.Parameter(torch.randn(numel, dtype=dtype, device=device) * 0.02)
        p.grad = torch.randn_like(p) * 1e-3
        params.append(p)
    return params


def _median_ms(fn, device: torch.device, repeats: int) -> float:
    fn()   # warm-up: creates the optimizer state
    times = []
    for _ in range(repeats):
        sync_device(device)
        t0 = time.perf_counter()
        fn()
        sync_device(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def _fit(few: float, small: float, large: float, element: int, large_numel: int) -> tuple[float, float, float]:
    """(fixed, per tensor, per byte) through the three measurements, none below zero."""
    per_tensor = max(0.0, (small - few) / (SMALL_TENSORS - FEW_TENSORS))
    fixed = max(0.0, few - FEW_TENSORS * per_tensor)
    large_bytes = LARGE_TENSORS * large_numel * element
    per_byte = max(0.0, (large - fixed - LARGE_TENSORS * per_tensor) / large_bytes)
    return fixed, per_tensor, per_byte


def _bound_to(optimizer: torch.optim.Optimizer, value) -> bool:
    """Whether an instance attribute is a method of this very optimizer (rannc's own patches of step and the
    state dicts, an LR scheduler's step counter): on the copy it would step the user's optimizer and leave the
    copy without state. Other callables (a fused kernel kept as an attribute) belong to the copy too."""
    return ((isinstance(value, types.MethodType) and value.__self__ is optimizer)
            or bool(getattr(value, "_wrapped_by_lr_sched", False)))


def _copy_of(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The user's optimizer over `params`: its class and attributes (settings kept outside the groups, such as
    a built-in clipping norm), its first group's settings, no state."""
    clone = copy.copy(optimizer)
    clone.__dict__ = {k: v for k, v in optimizer.__dict__.items() if not _bound_to(optimizer, v)}
    clone.state = collections.defaultdict(dict)
    clone.param_groups = []
    settings = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"} if optimizer.param_groups else {}
    settings.pop("step", None)
    clone.add_param_group({"params": params, **settings})
    return clone


def _with_masters(sets: dict[str, list[torch.nn.Parameter]], device: torch.device) -> dict[str, MasterWeights]:
    """fp32 masters of bf16 stand-ins (their gradients bf16 too), as a deployment with param_dtype keeps them."""
    out = {}
    for key, params in sets.items():
        for p in params:
            p.grad = None
            p.data = p.data.float()
        out[key] = MasterWeights(params, torch.bfloat16)
        out[key].keep(params, device)
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
    return out


def measure_update(optimizer: torch.optim.Optimizer | None, dtype: torch.dtype, device: torch.device,
                   large_bytes: int | None = None, repeats: int = 5, master_weights: bool = False) -> UpdateProfile:
    """The optimizer step and clipping by the global norm (`torch.nn.utils.clip_grad_norm_`, which rannc's
    clipping matches per device) over stand-in parameters of `dtype`; an optimizer that cannot be copied
    that way is left out with a warning. With `master_weights` the optimizer steps fp32 masters of the
    (bfloat16) stand-ins with the copies in and out around it (or the optimizer's own, `steps_compute_copies`);
    the masters count as its state, their gradients (made for the step only) as its temporary memory: every
    figure is per byte of the parameters the model computes with."""
    if large_bytes is None:
        large_bytes = 256 * 2**20 if device.type == "cuda" else 16 * 2**20
    element = torch.empty((), dtype=dtype).element_size()
    large_numel = max(SMALL_NUMEL, large_bytes // element // LARGE_TENSORS)
    large_total = LARGE_TENSORS * large_numel * element
    sets = {"few": _stand_ins(FEW_TENSORS, SMALL_NUMEL, dtype, device),
            "small": _stand_ins(SMALL_TENSORS, SMALL_NUMEL, dtype, device),
            "large": _stand_ins(LARGE_TENSORS, large_numel, dtype, device)}
    clip = {name: _median_ms(lambda ps=ps: torch.nn.utils.clip_grad_norm_(ps, 1e9, foreach=True), device, repeats)
            for name, ps in sets.items()}
    profile = UpdateProfile(source=f"clipping on {device}")
    profile.clip_ms_fixed, profile.clip_ms_per_tensor, profile.clip_ms_per_byte = _fit(
        clip["few"], clip["small"], clip["large"], element, large_numel)
    if optimizer is None:
        return profile
    name = type(optimizer).__name__
    masters = _with_masters(sets, device) if master_weights else None
    try:
        if masters is None:
            optimizers = {key: _copy_of(optimizer, ps) for key, ps in sets.items()}
            steps = {key: opt.step for key, opt in optimizers.items()}
        else:
            optimizers = {key: _copy_of(optimizer, [masters[key].of(p) for p in ps]) for key, ps in sets.items()}
            steps = {key: (lambda opt=opt, m=masters[key]: m.step(opt.step, opt)) for key, opt in optimizers.items()}
        times = {key: _median_ms(step, device, repeats) for key, step in steps.items()}
    except Exception as exc:  # any optimizer class may refuse; planning goes on without its cost
        logger.warning("could not time a copy of the optimizer %s (%s: %s); the planner leaves the optimizer "
                       "step out of its step time", name, type(exc).__name__, exc)
        return profile
    temp = 0.0
    if device.type == "cuda":
        sync_device(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        steps["large"]()
        sync_device(device)
        temp = (torch.cuda.max_memory_allocated(device) - before) / large_total
    state = sum(t.numel() * t.element_size() for st in optimizers["large"].state.values() for t in st.values()
                if torch.is_tensor(t) and t.dim() > 0)
    if masters is not None:   # the masters (their gradients live through the step only: the temp above)
        state += sum(p.numel() * 4 for p in sets["large"])
    profile.optimizer_ms_fixed, profile.optimizer_ms_per_tensor, profile.optimizer_ms_per_byte = _fit(
        times["few"], times["small"], times["large"], element, large_numel)
    profile.optimizer_temp_bytes_per_byte = temp
    profile.state_bytes_per_byte = state / large_total
    profile.source = f"{name} step and clipping on {device}"
    return profile


def estimate_update(memory_bytes_per_ms: float, per_tensor_ms: float = 0.005) -> UpdateProfile:
    """For dry runs: a fused optimizer moving 7 bytes per parameter byte (read p, g, two states; write p, two
    states) at 1.5x the memory-bandwidth floor, clipping 3 (norm, then scale in place)."""
    return UpdateProfile(optimizer_ms_fixed=0.1, clip_ms_fixed=0.05, optimizer_ms_per_tensor=per_tensor_ms,
                         optimizer_ms_per_byte=1.5 * 7 / memory_bytes_per_ms,
                         clip_ms_per_tensor=per_tensor_ms / 2, clip_ms_per_byte=3 / memory_bytes_per_ms,
                         source="estimate from the datasheet's memory bandwidth")


_UPDATES: dict[str, UpdateProfile] = {}
_SIMPLE = (bool, int, float, str, type(None))


def _settings(optimizer: torch.optim.Optimizer | None) -> str:
    """What the timing of a copy of this optimizer depends on: its class, its first group's settings (what the
    copy steps with, see _copy_of) and its public plain attributes (a built-in clipping norm, a fused switch).
    Tensors, tables, the groups' parameters and step counters, learning rates (an LR scheduler moves them, and
    they do not change the step's time) and private bookkeeping (a scheduler's mark of a step taken) are not
    settings: a job deployed again mid-training keeps its timing."""
    if optimizer is None:
        return "no optimizer"
    group = optimizer.param_groups[0] if optimizer.param_groups else {}
    settings = {k: v for k, v in group.items() if isinstance(v, (*_SIMPLE, tuple))
                and k not in ("params", "step") and not (k == "lr" or k.endswith("_lr"))}
    attributes = {k: v for k, v in vars(optimizer).items() if not k.startswith("_") and isinstance(v, _SIMPLE)}
    kind = type(optimizer)
    return repr((f"{kind.__module__}.{kind.__qualname__}", sorted(settings.items()), sorted(attributes.items())))


def cached_update(optimizer: torch.optim.Optimizer | None, dtype: torch.dtype, device: torch.device,
                  master_weights: bool = False, cache_dir: str = "", log=print) -> UpdateProfile:
    """measure_update's profile, measured once per optimizer settings, dtype and device and kept (in this process,
    and on disk under `cache_dir` beside the block profiles), so that every deployment of a job plans with the
    same numbers. A fresh measurement at each deployment moved the planner's cuts between deployments of one
    model (each stage's optimizer step is part of its cost), and with a cut moved, which rank sums which part of
    the gradient norm: a run and the same run stopped and resumed parted in the last bit."""
    digest = hashlib.sha256(repr((_settings(optimizer), str(dtype), device_name(device), master_weights,
                                  torch.__version__, __version__)).encode()).hexdigest()[:20]
    if digest in _UPDATES:
        return dataclasses.replace(_UPDATES[digest])
    path = json_cache.cache_file(cache_dir, "update", digest)
    kept, profile = json_cache.read(path, "optimizer timing", log), None
    if kept is not None:
        try:
            profile = UpdateProfile(**kept)
            log(f"Loaded the optimizer step's timing from {path}")
        except TypeError as exc:
            log(f"Ignoring unreadable optimizer timing {path} ({exc})")
    if profile is None:
        profile = measure_update(optimizer, dtype, device, master_weights=master_weights)
        json_cache.write(path, dataclasses.asdict(profile), "optimizer timing", log)
    _UPDATES[digest] = profile
    return dataclasses.replace(profile)
