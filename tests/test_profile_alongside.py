"""Every rank profiles at once: rank 0's profile plans, the others run the same profile alongside so that rank
0 measures under the load training puts on a shared host. Not when rank 0 loads a cached profile; a failure
alongside is raised on every rank, naming the rank."""

from __future__ import annotations

import models
from distributed import run_ranks


def _first_call(rank, world, cache_dir, fail_on):
    """Deploy the MLP on `world` ranks; returns (blocks profiled on this rank, what this rank raised)."""
    import torch

    import rannc
    from rannc.profile import profiler

    runs = []
    real = profiler.profile_blocks

    def counted(*args, **kwargs):
        if rank == fail_on:
            raise MemoryError("injected profiling failure")
        runs.append(1)
        return real(*args, **kwargs)

    profiler.profile_blocks = counted
    torch.manual_seed(0)
    model = models.make("mlp")
    wrapped = rannc.RaNNCModule(model, torch.optim.SGD(model.parameters(), lr=0.01), partition_num=2,
                                profile_cache_dir=cache_dir)
    try:
        wrapped(*models.global_batch("mlp", 8, 0)).backward()
    except Exception as exc:
        return len(runs), f"{type(exc).__name__}: {exc}"
    return len(runs), None


def test_every_rank_profiles_unless_rank_0_has_the_profile_cached(tmp_path):
    cache = str(tmp_path / "cache")
    assert run_ranks(_first_call, 2, cache, None) == [(1, None), (1, None)]
    assert run_ranks(_first_call, 2, cache, None) == [(0, None), (0, None)]   # rank 0 loads it, nobody profiles


def test_a_failure_alongside_is_raised_on_every_rank_naming_it():
    results = run_ranks(_first_call, 3, "", 2)
    for rank, (_, raised) in enumerate(results):
        if rank == 2:
            assert raised == "MemoryError: injected profiling failure"
        else:
            assert raised == ("RuntimeError: profiling alongside rank 0 failed on rank 2: MemoryError: injected "
                              "profiling failure"), (rank, raised)
