"""Plan without running: capture a model (real or on the meta device), estimate its profiles for a
device type, and plan for any number of such devices. What `partitioning_dry_run_np` does for a live
run, available as a function for models and machines one does not have at hand."""

from __future__ import annotations

import time

import torch
import torch.nn as nn

from rannc.config import RannConfig
from rannc.graph.blocks import linearize, make_blocks
from rannc.graph.capture import capture
from rannc.plan.deployment import Deployment
from rannc.plan.planner import plan
from rannc.profile.estimate import DeviceSpec, estimate_profiles


def plan_dry_run(model: nn.Module, example_inputs: tuple[torch.Tensor, ...], world_size: int, batch_size: int,
                 device: DeviceSpec, config: RannConfig | None = None, activation_bytes_per_element: float = 2.0,
                 log=print) -> Deployment:
    """The deployment rannc would choose for `world_size` devices of type `device` and this global batch."""
    config = config or RannConfig()
    t0 = time.perf_counter()
    captured = capture(model, example_inputs, dynamic_batch=False)
    lin = linearize(captured)
    blocks = make_blocks(lin, config.max_blocks)
    log(f"captured {lin.size} operations into {blocks.count} blocks in {time.perf_counter() - t0:.1f} s")
    t1 = time.perf_counter()
    profile = estimate_profiles(captured, lin, blocks, device, activation_bytes_per_element)
    deployment = plan(profile, blocks, world_size, batch_size, config, captured.fingerprint)
    log(f"estimated profiles and planned for {world_size} x {device.name} in {time.perf_counter() - t1:.1f} s")
    return deployment
