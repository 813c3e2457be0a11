"""The planner: dynamic programming over contiguous block ranges.

For every number of stages S (each with N // S data-parallel replicas) and every micro-batch count M,
it splits the blocks into S contiguous stages minimising the slowest stage's time per micro-batch,
choosing recomputation per stage only where activations would not fit, under the device memory minus
the margin. The predicted step time of a GPipe step, (M + S - 1) x slowest stage + the slowest gradient
all-reduce, picks the winner. With enough memory this is plain data parallelism (S = 1, M = 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rannc.config import RannConfig
from rannc.graph.blocks import Blocks
from rannc.plan.deployment import Deployment, StagePlan
from rannc.profile.profiles import ProfileSet
from rannc.schedule import in_flight


class PlanningError(RuntimeError):
    """No partition fits the devices' memory."""


@dataclass
class _StageCost:
    time_ms: float
    fwd_ms: float
    bwd_ms: float
    allreduce_ms: float
    param_bytes: int
    activation_bytes: int
    memory_bytes: int
    recompute: bool


class _RangeCosts:
    """O(1) sums over block ranges, with tensors used by several blocks counted once per range."""

    def __init__(self, profile: ProfileSet, opt_param_factor: int, recompute: str = "auto",
                 schedule: str = "gpipe"):
        self.profile = profile
        self.profile_opt_factor = opt_param_factor
        self.recompute = recompute
        self.schedule = schedule
        blocks = profile.blocks
        users: dict[str, list[int]] = {}
        for k, block in enumerate(blocks):
            for name in dict.fromkeys(block.tensors):
                users.setdefault(name, []).append(k)
        self.shared = [(name, ks) for name, ks in users.items() if len(ks) > 1]
        single_bytes = [0] * len(blocks)
        single_grad = [0] * len(blocks)
        for name, ks in users.items():
            if len(ks) == 1:
                single_bytes[ks[0]] += profile.tensor_bytes[name]
                if profile.trainable.get(name, False):
                    single_grad[ks[0]] += profile.tensor_bytes[name]
        self.prefix_bytes = _prefix(single_bytes)
        self.prefix_grad = _prefix(single_grad)

    def tensor_bytes(self, i: int, j: int) -> tuple[int, int]:
        total = self.prefix_bytes[j] - self.prefix_bytes[i]
        grad = self.prefix_grad[j] - self.prefix_grad[i]
        for name, ks in self.shared:
            if any(i <= k < j for k in ks):
                total += self.profile.tensor_bytes[name]
                if self.profile.trainable.get(name, False):
                    grad += self.profile.tensor_bytes[name]
        return total, grad


def _prefix(values: list[float]) -> list[float]:
    out = [0]
    for v in values:
        out.append(out[-1] + v)
    return out


def microbatch_candidates(config: RannConfig, batch_size: int, replicas: int) -> list[int]:
    """Powers of two between min_pipeline and max_pipeline (and the bounds), at most the samples per
    replica."""
    top = min(config.max_pipeline, max(1, batch_size // replicas))
    values = {m for m in (2**e for e in range(0, 16)) if config.min_pipeline <= m <= top}
    values.update(m for m in (config.min_pipeline, top) if config.min_pipeline <= m <= top)
    return sorted(values)


def plan(profile: ProfileSet, blocks: Blocks, world_size: int, batch_size: int, config: RannConfig,
         fingerprint: str) -> Deployment:
    memory_cap = int((config.mem_limit_gb * 1e9 if config.mem_limit_gb else profile.device_memory_bytes)
                     * (1.0 - config.mem_margin))
    nblocks = len(profile.blocks)
    costs = _RangeCosts(profile, config.opt_param_factor, config.recompute, config.schedule)
    if config.partition_num:
        if config.partition_num > min(world_size, nblocks):
            raise PlanningError(f"partition_num={config.partition_num} exceeds the {world_size} processes or "
                                f"the {nblocks} blocks of the model")
        stage_counts = [config.partition_num]
    else:
        stage_counts = list(range(1, min(world_size, nblocks) + 1))
    best: tuple[float, Deployment] | None = None
    smallest_need = math.inf
    for stage_count in stage_counts:
        replicas = world_size // stage_count
        for microbatches in microbatch_candidates(config, batch_size, replicas):
            per_replica = batch_size / (microbatches * replicas)
            samples = math.ceil(per_replica)
            result = _split(costs, profile, stage_count, replicas, microbatches, samples, memory_cap)
            if isinstance(result, float):
                smallest_need = min(smallest_need, result)
                continue
            bottleneck, ranges, stage_costs = result
            step_ms = (microbatches + stage_count - 1) * bottleneck + max(c.allreduce_ms for c in stage_costs)
            if best is None or step_ms < best[0] * 0.999:
                stages = [StagePlan(first_block=i, end_block=j, start=blocks.bounds[i], end=blocks.bounds[j],
                                    ranks=list(range(s * replicas, (s + 1) * replicas)), recompute=c.recompute,
                                    fwd_ms=c.fwd_ms, bwd_ms=c.bwd_ms, allreduce_ms=c.allreduce_ms,
                                    param_bytes=c.param_bytes, activation_bytes=c.activation_bytes,
                                    memory_bytes=c.memory_bytes)
                          for s, ((i, j), c) in enumerate(zip(ranges, stage_costs))]
                best = (step_ms, Deployment(fingerprint=fingerprint, world_size=world_size, batch_size=batch_size,
                                            microbatch_count=microbatches, stages=stages,
                                            block_bounds=list(blocks.bounds), predicted_step_ms=step_ms,
                                            memory_limit_bytes=memory_cap,
                                            schedule=config.schedule if stage_count > 1 else "gpipe"))
    if best is None:
        raise PlanningError(
            f"no partition of the model fits {memory_cap / 2**30:.2f} GiB per device (device memory minus "
            f"mem_margin={config.mem_margin}); the smallest stage found needs {smallest_need / 2**30:.2f} GiB. "
            f"Use more devices, a smaller batch, a larger max_pipeline, or raise mem_limit_gb.")
    return best[1]


def _stage_cost(costs: _RangeCosts, profile: ProfileSet, i: int, j: int, replicas: int, microbatches: int,
                samples: int, memory_cap: int, is_last: bool, held: int) -> _StageCost:
    """Cost of blocks [i, j) as one stage that holds `held` micro-batches' activations at once."""
    blocks = profile.blocks[i:j]
    fwd = sum(b.fwd_ms(samples) for b in blocks)
    bwd = sum(b.bwd_ms(samples) for b in blocks)
    act = int(sum(b.activation_bytes(samples) for b in blocks))
    in_bytes = int(profile.blocks[i - 1].out_bytes(samples)) if i > 0 else 0
    out_bytes = 0 if is_last else int(profile.blocks[j - 1].out_bytes(samples))
    send_ms = (profile.p2p_latency_ms + out_bytes / profile.p2p_bytes_per_ms) if out_bytes else 0.0
    tensor_bytes, grad_bytes = costs.tensor_bytes(i, j)
    state_bytes = tensor_bytes + grad_bytes + grad_bytes * costs.profile_opt_factor
    allreduce_ms = 0.0
    if replicas > 1 and grad_bytes:
        allreduce_ms = (profile.allreduce_latency_ms
                        + 2.0 * (replicas - 1) / replicas * grad_bytes / profile.allreduce_bytes_per_ms)
    plain_memory = state_bytes + held * act + 2 * (in_bytes + out_bytes)
    if costs.recompute == "never" or (costs.recompute == "auto" and plain_memory <= memory_cap):
        return _StageCost(fwd + bwd + send_ms, fwd, bwd, allreduce_ms, tensor_bytes, act, plain_memory, False)
    recompute_memory = state_bytes + held * in_bytes + act + 2 * (in_bytes + out_bytes)
    return _StageCost(2 * fwd + bwd + send_ms, fwd, bwd + fwd, allreduce_ms, tensor_bytes, act,
                      recompute_memory, True)


def _split(costs: _RangeCosts, profile: ProfileSet, stage_count: int, replicas: int, microbatches: int,
           samples: int, memory_cap: int):
    """Best contiguous split into `stage_count` stages by bottleneck time; the smallest memory need
    (float) when nothing fits."""
    n = len(profile.blocks)
    inf = math.inf
    # best[s][j]: (bottleneck, previous cut) for the first j blocks in s stages
    best = [[(inf, -1)] * (n + 1) for _ in range(stage_count + 1)]
    best[0][0] = (0.0, -1)
    cache: dict[tuple[int, int], _StageCost] = {}
    smallest_need = inf

    def cost(i: int, j: int, stage: int) -> _StageCost:
        held = in_flight(costs.schedule, stage, stage_count, microbatches)
        key = (i, j, held)
        if key not in cache:
            cache[key] = _stage_cost(costs, profile, i, j, replicas, microbatches, samples, memory_cap, j == n, held)
        return cache[key]

    for s in range(1, stage_count + 1):
        lo_j = s
        hi_j = n - (stage_count - s)
        for j in range(lo_j, hi_j + 1):
            if s == stage_count and j != n:
                continue
            best_here = (inf, -1)
            for i in range(s - 1, j):
                prev = best[s - 1][i][0]
                if prev >= best_here[0]:
                    continue
                c = cost(i, j, s - 1)
                if c.memory_bytes > memory_cap:
                    smallest_need = min(smallest_need, c.memory_bytes)
                    continue
                value = max(prev, c.time_ms)
                if value < best_here[0]:
                    best_here = (value, i)
            best[s][j] = best_here
    if best[stage_count][n][0] == inf:
        return float(smallest_need)
    ranges = []
    j = n
    for s in range(stage_count, 0, -1):
        i = best[s][j][1]
        ranges.append((i, j))
        j = i
    ranges.reverse()
    stage_costs = [cost(i, j, s) for s, (i, j) in enumerate(ranges)]
    return best[stage_count][n][0], ranges, stage_costs
