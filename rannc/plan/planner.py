"""The planner: the search over plans, and the one owner of the space it searches (stage counts, replicas,
micro-batch counts, recomputation, and so the micro-batch sizes the profiler must measure).

For every micro-batch count M and replica count r it finds, for every stage count S with S x r <= devices,
the split of the blocks into S contiguous stages that minimises the cost model's step
(M + S - 1) x slowest slot + longest tail (`rannc/plan/cost.py`), exactly: a dynamic program over the blocks
from the last one backwards gives the smallest slowest slot for every S at once (a stage's held activations
depend only on its distance from the pipeline's end), and a walk over thresholds on the tail makes the sum of
the two maxima exact. Micro-batch counts and stage counts whose lower bound cannot beat the best plan found
are skipped. Among all candidates the simplest plan (fewer stages, fewer recomputing stages, fewer
micro-batches) wins unless another is predicted at least `SIMPLER_PLAN_MARGIN` faster, so that profile noise
does not flip plans.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time

import numpy as np

from rannc.config import RannConfig
from rannc.graph.blocks import Blocks
from rannc.plan.cost import MIN_STAGE_FRACTION, CostModel, RangeTable, StageCost, step_ms
from rannc.plan.deployment import Deployment, StagePlan
from rannc.profile.profiles import ProfileSet
from rannc.schedule import get as get_schedule
from rannc.schedule import in_flight, simulate

logger = logging.getLogger("rannc.planner")

SIMPLER_PLAN_MARGIN = 0.03
SCHEDULE_ORDER = ("gpipe", "1f1b", "zb_h1", "interleaved_1f1b")   # simplest first: ties go to the earlier
CLOSED_FORM = ("gpipe", "1f1b")   # schedules whose step the cost model's formula gives (equal slots: exactly)
SPLIT_BACKWARD = {"BI": 0.8, "BW": 1.0}   # a split backward's parts as shares of the whole backward where the
                                         # profile has none (Calibration.split_backward): measured on one H200
                                         # for BERT-large layers (0.80 / 1.12 at 8 rows, 0.81 / 1.00 at 64;
                                         # benchmarks/split_backward_speed.py)
MAX_TAIL_THRESHOLDS = 256      # per (replicas, micro-batches): far above what real profiles need


class PlanningError(RuntimeError):
    """No partition fits the devices' memory."""


@dataclasses.dataclass
class Candidate:
    """The best split for one (stage count, replicas, micro-batch count)."""

    step_ms: float
    stage_count: int               # ranks a micro-batch passes (physical stages)
    replicas: int
    microbatches: int
    samples: int
    ranges: list[tuple[int, int]]  # stage_count x virtual_stages pieces, in model order
    costs: list[StageCost]
    virtual_stages: int = 1
    schedule: str = "gpipe"
    stage_replicas: tuple[int, ...] | None = None   # per stage, when they differ (else `replicas` each)

    @property
    def simplicity(self) -> tuple[int, int, int, int, int]:
        return (self.stage_count, SCHEDULE_ORDER.index(self.schedule), self.virtual_stages,
                sum(c.recompute for c in self.costs), self.microbatches)


# ---- the space ---------------------------------------------------------------------------------------------

def microbatch_candidates(config: RannConfig, batch_size: int, replicas: int) -> list[int]:
    """Powers of two between min_pipeline and max_pipeline (and the bounds), at most the samples per
    replica (every micro-batch of every replica gets at least one row)."""
    top = min(config.max_pipeline, batch_size // replicas)
    values = {m for m in (2**e for e in range(0, 16)) if config.min_pipeline <= m <= top}
    values.update(m for m in (config.min_pipeline, top) if config.min_pipeline <= m <= top)
    return sorted(values)


def stage_counts(config: RannConfig, world_size: int, block_count: int) -> list[int]:
    """Physical stage counts searched. With virtual_stages = v > 1 every rank runs v pieces, so the model's
    blocks must give S x v pieces; one stage runs without virtual stages."""
    v = config.virtual_stages
    if config.partition_num:
        if config.partition_num > min(world_size, block_count // v):
            raise PlanningError(f"partition_num={config.partition_num} exceeds the {world_size} processes or "
                                f"the {block_count} blocks of the model" + (f" split into {v} pieces per stage"
                                                                            if v > 1 else ""))
        return [config.partition_num]
    return list(range(1, max(1, min(world_size, block_count // v)) + 1))


BatchRange = tuple[int, "int | None"]   # the micro-batch rows a captured graph holds for (upper None: no bound)


def space(config: RannConfig, world_size: int, block_count: int, batch_size: int,
          batch_range: BatchRange = (1, None)) -> dict[tuple[int, int], list[int]]:
    """(replicas, micro-batches) -> the stage counts searched with them; only those whose micro-batches all
    have a row count within `batch_range` (a model that branches on its batch size was captured for those)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for s in stage_counts(config, world_size, block_count):
        r = world_size // s
        for m in microbatch_candidates(config, batch_size, r):
            if rows_within(batch_size, r, m, batch_range):
                groups.setdefault((r, m), []).append(s)
    return groups


def rows_within(batch_size: int, replicas: int, microbatches: int, batch_range: BatchRange) -> bool:
    """Whether every micro-batch of every replica (near-equal slices: floor or ceil of the share) has a row
    count within batch_range."""
    low, high = batch_range
    parts = replicas * microbatches
    smallest, largest = batch_size // parts, math.ceil(batch_size / parts)
    return smallest >= low and (high is None or largest <= high)


def microbatch_size(batch_size: int, replicas: int, microbatches: int) -> int:
    """Rows of the largest micro-batch a replica runs."""
    return max(1, math.ceil(batch_size / (microbatches * replicas)))


def profile_sizes(config: RannConfig, world_size: int, block_count: int, batch_size: int,
                  batch_range: BatchRange = (1, None)) -> list[int]:
    """The micro-batch sizes to profile: the smallest and the largest the search can ask about (the two
    smallest under profile_by_acc, which never runs the large ones and extends the fitted line)."""
    groups = space(config, world_size, block_count, batch_size, batch_range)
    if not groups:
        raise PlanningError(_empty_space(config, world_size, block_count, batch_size, batch_range))
    sizes = sorted({microbatch_size(batch_size, r, m) for (r, m) in groups})
    return sizes[:2] if config.profile_by_acc else sorted({sizes[0], sizes[-1]})


def _empty_space(config: RannConfig, world_size: int, block_count: int, batch_size: int,
                 batch_range: BatchRange = (1, None)) -> str:
    if space(config, world_size, block_count, batch_size):   # only the batch range left nothing
        low, high = batch_range
        return (f"the model's captured graph holds for {low} to {'any number of' if high is None else high} rows "
                f"only (it branches on its batch size, or fixed it: see the warning at capture), and no plan's "
                f"micro-batches of a global "
                f"batch of {batch_size} rows on {world_size} processes fall in that range (min_pipeline="
                f"{config.min_pipeline}, max_pipeline={config.max_pipeline}); change the batch size or the "
                f"micro-batch bounds, or make forward independent of the batch size")
    return (f"no plan gives every micro-batch of every replica a row: a global batch of {batch_size} rows, "
            f"{world_size} processes, at most {min(world_size, block_count)} stages, min_pipeline="
            f"{config.min_pipeline} micro-batches; use a larger batch or a smaller min_pipeline")


def memory_cap(profile: ProfileSet, config: RannConfig) -> int:
    return int((config.mem_limit_gb * 1e9 if config.mem_limit_gb else profile.device_memory_bytes)
               * (1.0 - config.mem_margin))


# ---- the search --------------------------------------------------------------------------------------------

def search(costs: CostModel, world_size: int, batch_size: int, config: RannConfig, cap: int,
           batch_range: BatchRange = (1, None), in_call_ok: bool = True,
           row_cuts: list[bool] | None = None) -> tuple[list[Candidate], float]:
    """The best candidate of every (stage count, replicas, micro-batches) that may still win, and the smallest
    memory a stage needed where nothing fitted."""
    found: list[Candidate] = []
    best = math.inf
    smallest_need = math.inf

    def keep(results: list[Candidate], need: float) -> None:
        nonlocal best, smallest_need
        smallest_need = min(smallest_need, need)
        found.extend(results)
        best = min([best] + [c.step_ms for c in results])

    options = schedule_options(config, in_call_ok)
    for schedule, v in ([] if config.stage_replicas else options):
        groups = space(config.replace(virtual_stages=v), world_size, costs.n, batch_size, batch_range)
        if schedule != SCHEDULE_ORDER[0]:   # one stage runs every schedule alike: priced once, as GPipe
            groups = {key: [s for s in counts if s > 1] for key, counts in groups.items()}
            groups = {key: counts for key, counts in groups.items() if counts}
        # cheap bounds first, so that the best plan is found early and most groups are cut off
        bounds = {key: _group_bound(costs, key, counts, batch_size, v) for key, counts in groups.items()}
        for replicas, microbatches in sorted(groups, key=bounds.get):
            if bounds[(replicas, microbatches)] >= best * (1.0 + SIMPLER_PLAN_MARGIN):
                continue
            table = costs.table(replicas, microbatch_size(batch_size, replicas, microbatches))
            counts = groups[(replicas, microbatches)]
            # where a stage's held activations depend on the stage count: one search per count
            for searched in ([counts] if schedule not in DEPTH_DEPENDENT else [[s] for s in counts]):
                keep(*_best_splits(costs, [table], searched, microbatches, cap, best, schedule,
                                   v if searched[0] > 1 else 1))
    # unequal replica counts per stage, after the equal ones so that their bound can skip most
    cut_ok = None if row_cuts is None else np.asarray(row_cuts, dtype=bool)
    for schedule, v in options:
        if v > 1:
            continue
        for vector in replica_vectors(config, world_size, costs.n):
            # a stage starting where the replica count changes must start at a boundary cut by rows
            starts = [None if k == 0 or vector[k - 1] == vector[k] else cut_ok for k in reversed(range(len(vector)))]
            for microbatches in microbatch_candidates(config, batch_size, max(vector)):
                if not all(rows_within(batch_size, r, microbatches, batch_range) for r in set(vector)):
                    continue
                # the most replicas run the smallest micro-batches: a bound for every stage
                bound = _group_bound(costs, (max(vector), microbatches), [len(vector)], batch_size)
                if bound >= best * (1.0 + SIMPLER_PLAN_MARGIN):
                    continue
                tables = [costs.table(r, microbatch_size(batch_size, r, microbatches)) for r in reversed(vector)]
                keep(*_best_splits(costs, tables, [len(vector)], microbatches, cap, best, schedule, starts=starts))
    return found, smallest_need


UNEQUAL_SPLITS_SEARCHED = 4    # per stage count: which stages get the extra replica, at most this many ways


def replica_vectors(config: RannConfig, world_size: int, block_count: int) -> list[tuple[int, ...]]:
    """Unequal replica counts per stage searched besides the equal ones: those given by `stage_replicas`, or
    for every stage count that does not divide the devices, every rank given work (stages of q and q + 1
    replicas; which stages get q + 1: every way if there are at most UNEQUAL_SPLITS_SEARCHED, else the first
    stages or the last ones)."""
    if config.stage_replicas:
        vector = parse_stage_replicas(config.stage_replicas)
        if sum(vector) > world_size or len(vector) > block_count:
            raise PlanningError(f"stage_replicas={config.stage_replicas} needs {sum(vector)} processes and "
                                f"{len(vector)} blocks; this run has {world_size} processes and the model "
                                f"{block_count} blocks")
        return [vector]
    vectors = []
    for s in stage_counts(config, world_size, block_count):
        q, extra = divmod(world_size, s)
        if s < 2 or extra == 0 or config.virtual_stages > 1:
            continue
        if math.comb(s, extra) <= UNEQUAL_SPLITS_SEARCHED:
            ways = itertools.combinations(range(s), extra)
        else:
            ways = [tuple(range(extra)), tuple(range(s - extra, s))]
        for larger in ways:
            vectors.append(tuple(q + 1 if k in larger else q for k in range(s)))
    return vectors


def parse_stage_replicas(text: str) -> tuple[int, ...]:
    """'1,2' -> (1, 2)."""
    try:
        vector = tuple(int(part) for part in text.split(","))
    except ValueError:
        vector = ()
    if not vector or min(vector) < 1:
        raise PlanningError(f"stage_replicas must list one replica count >= 1 per stage, e.g. '1,2' (got {text!r})")
    return vector


def schedule_options(config: RannConfig, in_call_ok: bool = True) -> list[tuple[str, int]]:
    """(schedule, virtual stages) searched: the configured one, or under schedule='auto' the schedules
    whose costs the profile measures (those running backwards inside the call only for a model returning
    one scalar loss). zb_h1 is left out of 'auto': its split backward's host cost is not profiled yet, and
    on 2 x H200 (BERT-large, 8-row micro-batches) it measured 2.6x its prediction."""
    if config.schedule != "auto":
        return [(config.schedule, config.virtual_stages)]
    options = [("gpipe", 1)]
    if in_call_ok:
        options += [("1f1b", 1), ("interleaved_1f1b", max(2, config.virtual_stages))]
    return options


def _group_bound(costs: CostModel, key: tuple[int, int], counts: list[int], batch_size: int,
                 virtual_stages: int = 1) -> float:
    """A lower bound on any plan of the group: the work of one replica spread evenly over S stages (the
    whole model's range subtracts the most launch overheads, so no split's stages sum to less), no stage
    faster than its slowest block, and the optimizer step and clipping spread evenly as the longest tail."""
    replicas, microbatches = key
    samples = microbatch_size(batch_size, replicas, microbatches)
    table = costs.table(replicas, samples)
    n = costs.n
    total = float(table.fwd[0, n] + table.bwd[0, n])
    slowest = max(b.fwd_ms(samples) + b.bwd_ms(samples) for b in costs.profile.blocks) * MIN_STAGE_FRACTION
    update = float(table.optimizer[0, n] + table.clip[0, n])

    def bound(s: int) -> float:
        v = virtual_stages if s > 1 else 1
        return step_ms(max(total / (s * v), slowest), update / s, s, microbatches, v)
    return min(bound(s) for s in counts)


DEPTH_DEPENDENT = ("zb_h1", "interleaved_1f1b")   # what a stage holds depends on the stage count


def _held(schedule: str, distance_from_end: int, microbatches: int, stage_count: int = 0,
          virtual_stages: int = 1) -> int:
    """Micro-batches a piece holds, by its distance from the model's last piece. For GPipe and 1F1B this is
    independent of the stage count (checked in tests); for the others it is read for `stage_count`. With
    virtual stages a piece holds at most what its rank holds in all (micro-batch, piece) pairs: an
    over-estimate by up to v."""
    if schedule not in DEPTH_DEPENDENT:
        return in_flight(schedule, 0, distance_from_end + 1, microbatches)
    physical = (stage_count * virtual_stages - 1 - distance_from_end) % stage_count
    return in_flight(schedule, physical, stage_count, microbatches, virtual_stages)


def _best_splits(costs: CostModel, tables: list[RangeTable], counts: list[int], microbatches: int, cap: int,
                 best_so_far: float, schedule: str, virtual: int = 1,
                 starts: list[np.ndarray | None] | None = None) -> tuple[list[Candidate], float]:
    """The best split for each stage count in `counts` (one count when `virtual` > 1: then the model is cut
    into count x virtual pieces, each priced against its share cap / virtual of the device). `tables[e]`
    prices the piece at distance e from the model's end (one table for all but with unequal replicas)."""
    n = costs.n
    hop_ms = costs.profile.p2p_hop_ms
    if len(tables) == 1:
        tables = tables * (max(counts) * virtual)
    stage_of = {s * virtual: s for s in counts}
    counts = list(stage_of)                       # in pieces from here on
    levels = max(counts)
    physical = counts[0] // virtual
    held = [_held(schedule, e, microbatches, physical, virtual) for e in range(levels)]
    cap = cap // virtual
    choices = [tables[e].choose(h, cap) for e, h in enumerate(held)]
    if starts is not None:      # starts[e]: the block boundaries the piece at distance e may start at
        choices = [(np.where(ok[:, None], c[0], math.inf), c[1], c[2]) if ok is not None else c
                   for c, ok in zip(choices, starts)]
    invalid = tables[0].invalid
    need = math.inf
    for slot, _, memory in choices:
        over = ~invalid & ~np.isfinite(slot)
        if over.any():
            need = min(need, float(memory[over].min()))
    tails = [t.tail for t in tables[:levels]]
    # the smallest longest-tail any S-split can have (a floor for the walk below)
    tail_floor = _bottleneck_dp([np.where(np.isfinite(c[0]), tails[e], math.inf) for e, c in enumerate(choices)],
                                n)[0]
    best: dict[int, tuple[float, list[tuple[int, int]]]] = {}
    alive = {s for s in counts if math.isfinite(tail_floor[s - 1][0])}
    limit = best_so_far * (1.0 + SIMPLER_PLAN_MARGIN)   # beyond this no candidate can be chosen
    threshold = math.inf
    distinct = np.unique(np.concatenate([t[~invalid] for t in tails]))
    for _ in range(MAX_TAIL_THRESHOLDS):
        if not alive:
            break
        masked = [np.where(tails[e] > threshold, math.inf, c[0]) for e, c in enumerate(choices[:max(alive)])]
        values, cuts = _bottleneck_dp(masked, n)
        highest_tail = -math.inf
        for s in sorted(alive):
            bottleneck = values[s - 1][0]
            if not math.isfinite(bottleneck):
                alive.discard(s)
                continue
            ranges = _ranges(cuts, s, n)
            longest_tail = max(float(tails[s - 1 - k][i, j]) for k, (i, j) in enumerate(ranges))
            value = step_ms(bottleneck, longest_tail * virtual, stage_of[s], microbatches, virtual)
            if value < best.get(s, (math.inf,))[0]:
                best[s] = (value, ranges)
            bound = step_ms(bottleneck, tail_floor[s - 1][0] * virtual, stage_of[s], microbatches, virtual)
            if bound >= best[s][0]:          # no smaller tail threshold can beat this split: it is exact
                alive.discard(s)
            elif bound >= limit:             # nor can it come close enough to the best plan to be chosen
                alive.discard(s)
                del best[s]
            else:
                highest_tail = max(highest_tail, longest_tail)
        below = distinct[distinct < highest_tail]
        if not alive or below.size == 0:
            break
        threshold = float(below[-1])
    else:
        logger.debug("tail-threshold walk stopped after %d steps (replicas %d, micro-batches %d)",
                     MAX_TAIL_THRESHOLDS, tables[0].replicas, microbatches)
    results = []
    for s, (value, ranges) in sorted(best.items()):
        stage_costs = [tables[s - 1 - k].stage(i, j, held[s - 1 - k], cap) for k, (i, j) in enumerate(ranges)]
        per_stage = tuple(tables[s - 1 - k].replicas for k in range(len(ranges)))
        cand = Candidate(value, stage_of[s], tables[0].replicas, microbatches, tables[0].samples, ranges,
                         stage_costs, virtual, schedule if stage_of[s] > 1 else SCHEDULE_ORDER[0],
                         per_stage if len(set(per_stage)) > 1 else None)
        if cand.stage_count > 1 and (schedule not in CLOSED_FORM or hop_ms > 0):
            if _busiest_rank_ms(cand) >= limit:
                continue      # even without a bubble it could not be chosen: not worth simulating
            cand.step_ms = simulated_step(cand, schedule, hop_ms, costs.profile.calibration.split_backward)
        results.append(cand)
    return results, need


def _bottleneck_dp(slots: list[np.ndarray], n: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """values[e][i]: the smallest slowest slot over splits of blocks [i, n) into e + 1 stages, where the
    stage at distance d from the end uses slots[d]; cuts[e][i]: where the first of those stages ends."""
    values = [slots[0][:, n].copy()]
    cuts = [np.full(n + 1, n)]
    for e in range(1, len(slots)):
        candidates = np.maximum(slots[e], values[-1][None, :])
        cut = np.argmin(candidates, axis=1)
        values.append(candidates[np.arange(n + 1), cut])
        cuts.append(cut)
    return values, cuts


def _ranges(cuts: list[np.ndarray], stage_count: int, n: int) -> list[tuple[int, int]]:
    ranges, i = [], 0
    for e in range(stage_count - 1, 0, -1):
        j = int(cuts[e][i])
        ranges.append((i, j))
        i = j
    ranges.append((i, n))
    return ranges


def action_costs(fwd_ms: list[float], bwd_ms: list[float], depth: int, split_shares: dict | None = None):
    """Per-action durations for the simulator from each piece's forward (with its send) and backward (with
    its gradients' send; BI and BW take their shares of it: `split_shares` as the profile measured them, else
    SPLIT_BACKWARD)."""
    shares = split_shares or SPLIT_BACKWARD

    def cost(stage: int, action) -> float:
        piece = action.stage * depth + stage
        if action.kind == "F":
            return fwd_ms[piece]
        if action.kind == "B":
            return bwd_ms[piece]
        return shares[action.kind] * bwd_ms[piece]
    return cost


def _rank_tails(cand: Candidate) -> list[float]:
    depth, v = cand.stage_count, cand.virtual_stages
    return [sum(cand.costs[p].tail_ms for p in range(s, depth * v, depth)) for s in range(depth)]


def _busiest_rank_ms(cand: Candidate) -> float:
    """A lower bound on the simulated step: the busiest rank's work with no bubble, plus the longest tail."""
    depth = cand.stage_count
    busy = [sum(c.slot_ms for c in cand.costs[s::depth]) * cand.microbatches for s in range(depth)]
    return max(busy) + max(_rank_tails(cand))


def simulated_step(cand: Candidate, schedule: str, hop_ms: float = 0.0, split_shares: dict | None = None) -> float:
    """The candidate's step by simulating its schedule (each hop of a micro-batch between ranks waiting
    `hop_ms`, a split backward's parts priced at `split_shares`), plus the longest rank's tail (a rank's
    pieces' optimizer, clipping and exposed all-reduce, one after another)."""
    depth, v = cand.stage_count, cand.virtual_stages
    lists = get_schedule(schedule)(depth, cand.microbatches, v)
    fwd = [c.fwd_ms + c.send_ms for c in cand.costs]
    bwd = [c.bwd_ms + c.grad_send_ms for c in cand.costs]
    return simulate(lists, action_costs(fwd, bwd, depth, split_shares), hop_ms).step_ms + max(_rank_tails(cand))


def choose(candidates: list[Candidate]) -> Candidate:
    """The simplest candidate within SIMPLER_PLAN_MARGIN of the fastest (ties broken by prediction, then
    by the order of the space, so the same candidates always give the same plan)."""
    fastest = min(c.step_ms for c in candidates)
    close = [c for c in candidates if c.step_ms <= fastest * (1.0 + SIMPLER_PLAN_MARGIN)]
    return min(close, key=lambda c: (c.simplicity, c.step_ms, c.replicas))


# ---- the plan ----------------------------------------------------------------------------------------------

def plan(profile: ProfileSet, blocks: Blocks, world_size: int, batch_size: int, config: RannConfig,
         fingerprint: str, batch_range: BatchRange = (1, None), in_call_ok: bool = True,
         row_cuts: list[bool] | None = None) -> Deployment:
    """The deployment of the fastest plan (the simplest within SIMPLER_PLAN_MARGIN). `in_call_ok`: the model
    returns one scalar loss, so schedules that run the backwards inside the call may be chosen. `row_cuts`:
    per block boundary, whether its values can be cut by rows (where stages of different replica counts
    may meet; all of them when not given)."""
    started = time.perf_counter()
    cap = memory_cap(profile, config)
    costs = CostModel(profile, config.opt_param_factor, config.recompute, config.schedule,
                      count_clipping=config.plan_grad_clipping, accumulate_grads=config.accumulate_grads)
    if not space(config, world_size, costs.n, batch_size, batch_range):
        raise PlanningError(_empty_space(config, world_size, costs.n, batch_size, batch_range))
    found, smallest_need = search(costs, world_size, batch_size, config, cap, batch_range, in_call_ok, row_cuts)
    if not found:
        raise PlanningError(
            f"no partition of the model fits {cap / 2**30:.2f} GiB per device (device memory minus "
            f"mem_margin={config.mem_margin}); the smallest stage found needs {smallest_need / 2**30:.2f} GiB. "
            f"Use more devices, a smaller batch, a larger max_pipeline, or raise mem_limit_gb.")
    chosen = choose(found)
    deployment = to_deployment(chosen, blocks, world_size, batch_size, cap, fingerprint, chosen.schedule,
                               profile.p2p_hop_ms, profile.calibration.split_backward)
    deployment.planning_s = time.perf_counter() - started
    deployment.candidates_considered = len(found)
    return deployment


def to_deployment(chosen: Candidate, blocks: Blocks, world_size: int, batch_size: int, cap: int,
                  fingerprint: str, schedule: str, hop_ms: float = 0.0,
                  split_shares: dict | None = None) -> Deployment:
    depth = chosen.stage_count
    counts = chosen.stage_replicas or (chosen.replicas,) * depth
    first = [sum(counts[:k]) for k in range(depth)]
    ranks = [list(range(first[k], first[k] + counts[k])) for k in range(depth)]
    stages = [StagePlan(first_block=i, end_block=j, start=blocks.bounds[i], end=blocks.bounds[j],
                        ranks=ranks[s % depth], recompute=c.recompute, fwd_ms=c.fwd_ms,
                        bwd_ms=c.bwd_ms, allreduce_ms=c.allreduce_ms, param_bytes=c.param_bytes,
                        activation_bytes=c.activation_bytes, memory_bytes=c.memory_bytes, send_ms=c.send_ms,
                        exposed_allreduce_ms=c.exposed_allreduce_ms, optimizer_ms=c.optimizer_ms,
                        clip_ms=c.clip_ms, grad_send_ms=c.grad_send_ms)
              for s, ((i, j), c) in enumerate(zip(chosen.ranges, chosen.costs))]
    deployment = Deployment(fingerprint=fingerprint, world_size=world_size, batch_size=batch_size,
                            microbatch_count=chosen.microbatches, stages=stages, block_bounds=list(blocks.bounds),
                            predicted_step_ms=chosen.step_ms, memory_limit_bytes=cap, schedule=schedule,
                            virtual_stages=chosen.virtual_stages, p2p_hop_ms=hop_ms,
                            split_backward=dict(split_shares or {}))
    deployment.bubble_fraction = simulated_bubble(deployment)
    return deployment


def simulate_deployment(deployment: Deployment):
    """One step of the deployment's schedule simulated with its stages' predicted forward (plus send) and
    backward (plus the gradients' send) times, the tail excluded; shared by the report's bubble and the
    picture's timeline."""
    depth = deployment.pipeline_depth
    lists = get_schedule(deployment.schedule if depth > 1 else "gpipe")(depth, deployment.microbatch_count,
                                                                       deployment.virtual_stages)
    fwd = [st.fwd_ms + st.send_ms for st in deployment.stages]
    bwd = [st.bwd_ms + st.grad_send_ms for st in deployment.stages]
    return simulate(lists, action_costs(fwd, bwd, depth, deployment.split_backward), deployment.p2p_hop_ms)


def simulated_bubble(deployment: Deployment) -> float:
    """The share of the pipeline's stage time spent idle in one step (0 for one stage)."""
    return simulate_deployment(deployment).bubble_fraction if deployment.pipeline_depth > 1 else 0.0
