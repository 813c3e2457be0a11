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


def _links(rank, world, cache_dir):
    """The link speeds cached_links gives this rank, and (rank 0, which writes it) the cache files' contents."""
    import json
    from pathlib import Path

    import torch

    import rannc
    from rannc.profile import profiler

    rannc.dist.init()
    links = profiler.cached_links(torch.device("cpu"), cache_dir)
    if rank:
        return links, None   # rank 0 writes the cache
    return links, [json.loads(f.read_text()) for f in sorted(Path(cache_dir).glob("links_*.json"))]


def test_links_include_the_hop_under_load_and_an_older_cache_is_measured_again(tmp_path):
    """Two gloo ranks: the links measured once include p2p_hop_ms (a send's delivery while both ranks compute:
    0.2-4 ms on two cores against 0.1 ms idle, not asserted, since it depends on the machine); a cache kept
    without it (an earlier version's) is measured anew and rewritten, and both ranks plan with the same numbers."""
    import json

    from rannc.profile import profiler

    cache = tmp_path / "links"
    first = run_ranks(_links, 2, str(cache))
    links, files = first[0]
    assert first[1][0] == links and set(links) == set(profiler.LINK_KEYS)
    assert links["p2p_hop_ms"] > 0 and files == [links]
    (path,) = cache.glob("links_*.json")
    older = {k: v for k, v in links.items() if k != "p2p_hop_ms"}
    path.write_text(json.dumps(older))
    again = run_ranks(_links, 2, str(cache))
    assert set(again[0][0]) == set(profiler.LINK_KEYS) and again[0][0] == again[1][0]
    assert set(json.loads(path.read_text())) == set(profiler.LINK_KEYS)
