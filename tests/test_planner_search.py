"""The planner's search against brute force: on small random instances, enumerating every split of every
(stage count, replicas, micro-batch count) under the same cost model finds nothing better than the planner;
plans are the same for the same profiles, and the simpler plan wins within the margin."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from rannc.config import RannConfig
from rannc.graph.blocks import Blocks
from rannc.plan import planner
from rannc.plan.cost import CostModel, step_ms
from rannc.profile.profiles import BlockProfile, Calibration, Linear, ProfileSet, UpdateProfile
from rannc.schedule import in_flight

GB = 10**9


def _random_profile(rng: random.Random, blocks: int, memory: float) -> ProfileSet:
    profiles = []
    sizes, trainable = {}, {}
    for k in range(blocks):
        names = [f"w{k}", f"b{k}"]
        sizes[f"w{k}"] = int(rng.uniform(0.2, 3.0) * GB)
        sizes[f"b{k}"] = int(rng.uniform(0.001, 0.01) * GB)
        if k in (0, blocks - 1):
            names.append("tied")              # a tensor used by the first and the last block
        profiles.append(BlockProfile(
            fwd_ms=Linear(rng.uniform(0.0, 0.5), rng.uniform(0.05, 0.5)),
            bwd_ms=Linear(rng.uniform(0.0, 1.0), rng.uniform(0.1, 1.0)),
            activation_bytes=Linear(0, rng.uniform(0.01, 0.4) * GB), out_bytes=Linear(0, rng.uniform(1e5, 1e7)),
            tensors=names))
    sizes["tied"] = int(rng.uniform(0.5, 2.0) * GB)
    trainable = {name: not name.startswith("b") or rng.random() < 0.8 for name in sizes}
    return ProfileSet(blocks=profiles, tensor_bytes=sizes, trainable=trainable, device_name="test",
                      device_memory_bytes=int(memory), p2p_bytes_per_ms=rng.uniform(1e6, 1e8),
                      allreduce_bytes_per_ms=rng.uniform(1e6, 1e8),
                      update=UpdateProfile(optimizer_ms_per_tensor=rng.uniform(0, 0.1),
                                           optimizer_ms_per_byte=rng.uniform(0, 3e-9),
                                           clip_ms_per_tensor=rng.uniform(0, 0.05),
                                           clip_ms_per_byte=rng.uniform(0, 1e-9)),
                      calibration=Calibration(fwd_overhead_ms=Linear(rng.uniform(0, 0.05), 0.0),
                                              bwd_overhead_ms=Linear(rng.uniform(0, 0.1), 0.0),
                                              workspace_bytes=rng.uniform(0, 0.5) * GB))


def _brute_force(profile: ProfileSet, world: int, batch: int, config: RannConfig) -> list[planner.Candidate]:
    """Every split of every (stage count, replicas, micro-batch count), and of every unequal replica vector the
    planner searches, priced by the same cost model."""
    costs = CostModel(profile, config.opt_param_factor, config.recompute, config.schedule,
                      accumulate_grads=config.accumulate_grads)
    cap = planner.memory_cap(profile, config)
    n = len(profile.blocks)
    shapes = [((replicas,) * s, m) for (replicas, m), counts in planner.space(config, world, n, batch).items()
              for s in counts]
    shapes += [(vector, m) for vector in planner.replica_vectors(config, world, n)
               for m in planner.microbatch_candidates(config, batch, max(vector))]
    found = []
    for vector, m in shapes:
        s = len(vector)
        tables = [costs.table(r, planner.microbatch_size(batch, r, m)) for r in vector]
        best = None
        for cuts in itertools.combinations(range(1, n), s - 1):
            bounds = (0, *cuts, n)
            ranges = list(zip(bounds, bounds[1:]))
            slots = [tables[k].choose(in_flight(config.schedule, k, s, m), cap)[0][i, j]
                     for k, (i, j) in enumerate(ranges)]
            if not all(np.isfinite(slots)):
                continue
            value = step_ms(max(slots), max(tables[k].tail[i, j] for k, (i, j) in enumerate(ranges)), s, m)
            if best is None or value < best[0]:
                best = (value, ranges)
        if best is not None:
            stage_costs = [tables[k].stage(i, j, in_flight(config.schedule, k, s, m), cap)
                           for k, (i, j) in enumerate(best[1])]
            unequal = vector if len(set(vector)) > 1 else None
            found.append(planner.Candidate(best[0], s, vector[-1], m, tables[-1].samples, best[1], stage_costs,
                                           stage_replicas=unequal))
    return found


CASES = [(seed, blocks, world, schedule, recompute, accumulate)
         for seed, (blocks, world) in enumerate([(4, 2), (5, 3), (6, 4), (7, 6), (8, 5), (9, 6), (10, 6), (6, 6),
                                                 (8, 4), (10, 3)])
         for schedule, recompute, accumulate in [("gpipe", "auto", True), ("1f1b", "auto", True),
                                                 ("gpipe", "never", True), ("1f1b", "auto", False)]]


@pytest.mark.parametrize("seed,blocks,world,schedule,recompute,accumulate", CASES)
def test_brute_force_finds_nothing_better(seed, blocks, world, schedule, recompute, accumulate):
    rng = random.Random(seed * 7 + len(schedule) + len(recompute) + accumulate)
    memory = rng.uniform(8, 40) * GB
    profile = _random_profile(rng, blocks, memory)
    config = RannConfig(schedule=schedule, recompute=recompute, max_pipeline=8, mem_margin=0.0,
                        accumulate_grads=accumulate)
    batch = rng.choice([8, 16, 64])
    exhaustive = _brute_force(profile, world, batch, config)
    if not exhaustive:
        with pytest.raises(planner.PlanningError):
            planner.plan(profile, Blocks(list(range(blocks + 1))), world, batch, config, "f")
        return
    deployment = planner.plan(profile, Blocks(list(range(blocks + 1))), world, batch, config, "f")
    expected = planner.choose(exhaustive)
    fastest = min(c.step_ms for c in exhaustive)
    assert deployment.predicted_step_ms <= fastest * (1 + planner.SIMPLER_PLAN_MARGIN) + 1e-9
    assert deployment.predicted_step_ms == pytest.approx(expected.step_ms, rel=1e-12)
    assert ([s.replicas for s in deployment.stages], deployment.microbatch_count) == (
        list(expected.stage_replicas or (expected.replicas,) * expected.stage_count), expected.microbatches)
    # every candidate the planner priced is the best split of its (stages, replicas, micro-batches)
    costs = CostModel(profile, config.opt_param_factor, config.recompute, config.schedule,
                      accumulate_grads=config.accumulate_grads)
    found, _ = planner.search(costs, world, batch, config, planner.memory_cap(profile, config))
    def key(c):
        return c.stage_replicas or (c.replicas,) * c.stage_count, c.microbatches
    by_key = {key(c): c.step_ms for c in exhaustive}
    for c in found:
        assert c.step_ms == pytest.approx(by_key[key(c)], rel=1e-12)


def test_held_activations_depend_only_on_the_distance_from_the_end():
    for schedule in ("gpipe", "1f1b"):
        for stages in range(1, 7):
            for m in (1, 2, 3, 8):
                for s in range(stages):
                    assert in_flight(schedule, s, stages, m) == in_flight(schedule, 0, stages - s, m)


def test_same_profiles_same_plan_and_the_simpler_plan_wins_within_the_margin():
    rng = random.Random(3)
    profile = _random_profile(rng, 8, 200 * GB)
    bounds = Blocks(list(range(9)))
    plans = {planner.plan(profile, bounds, 4, 32, RannConfig(), "f").to_json().split('"planning_s"')[0]
             for _ in range(3)}
    assert len(plans) == 1
    a = planner.Candidate(100.0, 1, 4, 1, 8, [(0, 8)], [])
    b = planner.Candidate(97.5, 2, 2, 2, 8, [(0, 4), (4, 8)], [])
    c = planner.Candidate(96.0, 2, 2, 4, 4, [(0, 4), (4, 8)], [])
    assert planner.choose([b, a]) is a            # 2.5% faster is not enough for two stages
    assert planner.choose([a, c]) is c            # 4% faster is
    assert planner.choose([a, b, c]) is b         # and b is simpler than c (fewer micro-batches), within 3% of it
