"""Measure every block on this process's device: forward and backward time and the bytes autograd saves
for backward, at the micro-batch sizes the planner will ask about; runs of blocks timed whole (the
calibration), including the zero-bubble schedules' split backward; and the speed of p2p and all-reduce.

Blocks run one after another with real inputs (each block's outputs feed the next), moving only one
block's parameters to the device at a time, so a model larger than one device can still be profiled.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import logging
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from rannc import dist as rdist
from rannc.config import DEFAULT_COMPILE, CompileSettings
from rannc.graph import regions as layer_regions
from rannc.graph.blocks import Blocks, Linearized
from rannc.graph.capture import CapturedGraph, named_graph_tensors
from rannc.graph.compiled import CompiledModule
from rannc.graph.stage import build_stage
from rannc.profile import json_cache
from rannc.profile.profiles import BlockProfile, Calibration, Linear, ProfileSet, UpdateProfile
from rannc.split_backward import backward_input
from rannc.version import __version__


def device_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        import os
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 16 * 2**30


def graphed_functions(device: torch.device) -> int | None:
    """How many functions replaying CUDA graphs are alive on this host thread's CUDA devices, all of them
    (inductor's CUDA graph trees count them, one tree per device); None off CUDA or where this torch keeps no
    count. All devices, since resetting the trees resets every device's."""
    if device.type != "cuda":
        return None
    try:
        from torch._inductor import cudagraph_trees

        return sum(int(cudagraph_trees.get_container(index).live_cudagraphify_fns)
                   for index in range(torch.cuda.device_count()))
    except Exception:   # private to inductor: a torch without the count, or whose thread state is not set up
        return None


def release_profiler_memory(device: torch.device, graphed_before: int | None) -> None:
    """Hand back to the device what the profiler's runs leave behind, before the stages' first call needs it.
    The profiler's compiled runs of blocks replay CUDA graphs as the stages will, and their functions outlived
    every object of the profiler, garbage collection included (BERT-large at batch 256 on one H200: two
    functions still counted alive and 94.4 GiB reserved after profiling; inductor's graph trees or code they
    hold keep them), with their graphs and memory pool: the seed's 4.9B model on one H200 used 131 GiB of the
    device's 140 during the stage's first call (95 after it), where the planner had predicted 95.5 GiB. Where
    no graphed function was alive before profiling (`graphed_before` is 0) and some still are after a
    collection, the trees are reset, which frees them (2.1 GiB reserved); where graphed functions were alive
    before (another wrapped model's stages, the user's own code) they are left, and the profiler's with them.
    The blocks the allocator cached for the profiler's runs go back to the device either way. Also called before
    each of the profiler's runs that records graphs, which then find the memory of the runs before them."""
    if device.type != "cuda":
        return
    gc.collect()
    if graphed_before == 0 and graphed_functions(device):
        from torch._inductor import cudagraph_trees

        cudagraph_trees.reset_cudagraph_trees()
        logger.debug("rannc: the profiler's CUDA graphs outlived it: inductor's graph trees reset")
        gc.collect()
    torch.cuda.empty_cache()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# How the profiler runs the runs of blocks it times whole, as stages will run: "" eager, "inline" under
# torch.compile, "regions" under torch.compile with whole repeated layers as shared regions (rannc.graph.regions).
# The words are what the profile cache's key holds.
BLOCK_COMPILE = {"": "eager", "inline": "compiled", "regions": "compiled-regions"}


def block_compile(compile_on: bool, regions: bool) -> str:
    """The profiler's `compile_blocks` value for the compile and compile_regions items."""
    return ("regions" if regions else "inline") if compile_on else ""


def cache_key(captured: CapturedGraph, blocks: Blocks, sizes: list[int], device: torch.device,
              autocast_dtype, compile_blocks: str = "", compile_settings: CompileSettings = DEFAULT_COMPILE) -> str:
    """What the profile cache's file name holds: everything a cached profile's figures depend on, so that no
    profile taken under other terms is read back. With regions, their thresholds decide which layers compile as
    regions, and so the timed runs' code; the compiled runs' mode and options (whether they replay CUDA graphs,
    how inductor generates their kernels) decide their times."""
    how = BLOCK_COMPILE[compile_blocks]
    if compile_blocks == "regions":
        how += f" {layer_regions.MIN_LAYERS} {layer_regions.MIN_OPERATIONS}"
    if compile_blocks and compile_settings != DEFAULT_COMPILE:
        how += f" {compile_settings}"
    digest = hashlib.sha256()
    for part in (captured.fingerprint, str(blocks.bounds), str(sizes), device_name(device), str(autocast_dtype),
                 torch.__version__, __version__, how):
        digest.update(part.encode())
    return digest.hexdigest()[:20]


def _autocast(device: torch.device, dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


WINDOW_MEMORY_SHARE = 0.3   # a calibration window's parameters and gradients use at most this share of memory
WINDOW_REPEATS = 5          # timed runs of a calibration window (see _window_repeats)


def profile_blocks(captured: CapturedGraph, lin: Linearized, blocks: Blocks, inputs: list[torch.Tensor],
                   sizes: list[int], device: torch.device, repeats: int = 3, autocast_dtype=None,
                   show_progress: bool = True, compile_blocks: str = "",
                   compile_settings: CompileSettings = DEFAULT_COMPILE) -> tuple[list[BlockProfile], Calibration]:
    """Time and activation bytes of every block at each micro-batch size in `sizes`; then runs of consecutive
    blocks (the whole model when it fits) timed as one stage, for the calibration (see `Calibration`).

    With `compile_blocks` (the compile item: "inline" or "regions", see BLOCK_COMPILE) each run of blocks is also
    timed under torch.compile at the largest size, as stages will run, and every block's times and the
    calibration are scaled by what compile took against eager there (forward and backward apart;
    `compiled_scale`). Compiling every block at every size would take minutes to hours for large models; one
    static compile per run costs what the deployed stage's compile costs, and a one-stage plan at that size then
    finds it in inductor's cache.

    `compile_settings` are the stages' (mode and inductor options): under "reduce-overhead" the runs replay CUDA
    graphs, as those stages do. Timed without them, a run of small kernels is timed at the pace the host launches them,
    which the deployed stage does not pay (BERT-large at batch 64 on one H200: forward and backward predicted
    1.5-1.8x the measured ones; 1.05-1.13x with the runs replayed). Before each such run the profiler's memory is
    released (`release_profiler_memory`): the seed's 4.9B model on one H200 reached 131 GiB of 140 recording its
    graphs on top of the 76 GiB the eager runs had left cached, where its stage then ran in 93."""
    stages = [build_stage(captured, lin, *blocks.positions(k, k + 1)) for k in range(blocks.count)]
    windows = _windows(stages, device)
    graphed_before = graphed_functions(device)
    window_stages: dict[tuple[int, int], object] = {}
    measured: list[dict[str, list[tuple[float, float]]]] = [
        {"fwd": [], "bwd": [], "act": [], "out": []} for _ in stages]
    runs = []
    compiled_runs: list[tuple[float, float, float, float]] = []   # eager fwd, compiled fwd, eager bwd, compiled bwd
    split_at: tuple | None = None   # the values entering block 1 and the batch, at the largest size
    # Runs inside the caller's first forward, often under its own progress bar: leave=False removes this
    # inner bar when done, and disable=None turns it off when stderr is not a terminal, so redirected logs
    # get no carriage-return redraws (tqdm.notebook still shows it).
    bar = tqdm(total=len(sizes) * (len(stages) + len(windows)), desc="rannc: profiling blocks",
               disable=None if show_progress else True, leave=False)
    for size in sizes:
        batch = [x[:size].to(device) if batched else x.to(device)
                 for x, batched in zip(inputs, captured.batched_inputs)]
        values: dict[str, torch.Tensor] = {}
        at_start: dict[int, dict[str, torch.Tensor]] = {}
        for k, stage in enumerate(stages):
            if any(first == k for first, _ in windows):
                at_start[k] = dict(values)
            fwd_ms, bwd_ms, act, outs, _ = _profile_one(stage, stage.module, values, batch, device, repeats,
                                                        autocast_dtype)
            if size == max(sizes) and k == 1:
                split_at = (dict(values), batch)
            m = measured[k]
            m["fwd"].append((size, fwd_ms))
            m["bwd"].append((size, bwd_ms))
            m["act"].append((size, act))
            m["out"].append((size, sum(_bytes(o) for o in outs if isinstance(o, torch.Tensor)) if not
                                   stage.is_last else 0))
            for name, value in zip(stage.sent, outs):
                if isinstance(value, torch.Tensor):
                    values[name] = value.detach()
            needed = set(lin.crossing[blocks.bounds[k + 1]]) if k + 1 < blocks.count else set()
            needed_names = {n.name for n in needed}
            for name in list(values):
                if name not in needed_names:
                    del values[name]
            bar.update(1)
        for first, end in windows:
            if (first, end) not in window_stages:
                window_stages[first, end] = build_stage(captured, lin, blocks.bounds[first], blocks.bounds[end])
            whole = window_stages[first, end]
            start_values = at_start.pop(first)
            fwd_ms, bwd_ms, act, outs, (fresh, warm) = _profile_one(whole, whole.module, start_values, batch, device,
                                                                    _window_repeats(repeats), autocast_dtype)
            if compile_blocks and size == max(sizes):
                compiled = CompiledModule(whole.module, f"blocks {first}-{end - 1}", compile_settings,
                                          regions=compile_blocks == "regions")
                if compiled.cuda_graphs:
                    # graphs record into a pool of their own, which takes neither what the allocator cached for
                    # the eager runs nor what an earlier run's graphs hold: both go back first
                    release_profiler_memory(device, graphed_before)
                # replaying CUDA graphs, the first call runs the code and the second records the graphs
                c_fwd, c_bwd, *_ = _profile_one(whole, compiled, start_values, batch, device,
                                                _window_repeats(repeats), autocast_dtype,
                                                warmups=2 if compiled.cuda_graphs else 1)
                compiled_runs.append((fwd_ms, c_fwd, bwd_ms, c_bwd))
            sent = sum(_bytes(o) for o in outs if isinstance(o, torch.Tensor)) if not whole.is_last else 0
            grads = sum(_bytes(t) for t in whole.parameters() if t.requires_grad)
            # what the cost model does not count: beyond the activations with gradients already there, and
            # beyond the larger of activations and gradients when the gradients appear during backward
            workspace = max(0.0, warm - act - 2 * sent, fresh - max(act, grads) - 2 * sent)
            runs.append([size, end - first, sum(measured[k]["fwd"][-1][1] for k in range(first, end)), fwd_ms,
                         sum(measured[k]["bwd"][-1][1] for k in range(first, end)), bwd_ms, workspace])
            bar.update(1)
    bar.close()
    profiles = []
    for stage, m in zip(stages, measured):
        names = [captured.tensor_names.get(id(t), name) for name, t in stage.named_tensors()]
        profiles.append(BlockProfile(fwd_ms=Linear.fit(m["fwd"]), bwd_ms=Linear.fit(m["bwd"]),
                                     activation_bytes=Linear.fit(m["act"]), out_bytes=Linear.fit(m["out"]),
                                     tensors=names, label=_label(stage)))
    calibration = calibrate(runs)
    if split_at is not None:
        calibration.split_backward = _split_shares(captured, lin, blocks, windows, *split_at, device, repeats,
                                                   autocast_dtype)
    if compile_blocks:
        fwd, bwd = compiled_scale(profiles, calibration, compiled_runs)
        if compiled_runs:
            logger.info("compiled runs of blocks (%s) took %.2f of the eager forward and %.2f of the eager "
                        "backward at %d samples: every block's times scaled by these", compile_settings, fwd, bwd,
                        max(sizes))
        else:
            logger.warning("no run of two blocks or more fits the device: compile's gain is not in the profiles, "
                           "the plan prices eager stages")
    return profiles, calibration


def compiled_scale(profiles: list[BlockProfile], calibration: Calibration,
                   compiled_runs: list[tuple[float, float, float, float]]) -> tuple[float, float]:
    """Scale every block's forward and backward line, and the calibration's overheads with them, by the
    ratio of compiled to eager time of the runs of blocks (eager fwd, compiled fwd, eager bwd, compiled bwd),
    so that a stage is priced at its eager estimate times that ratio. Without runs (no run of two blocks or
    more fits the device) nothing is scaled: returns (1, 1) and the caller says so."""
    if not compiled_runs:
        return 1.0, 1.0
    fwd = sum(r[1] for r in compiled_runs) / max(sum(r[0] for r in compiled_runs), 1e-9)
    bwd = sum(r[3] for r in compiled_runs) / max(sum(r[2] for r in compiled_runs), 1e-9)
    for block in profiles:
        block.fwd_ms, block.bwd_ms = block.fwd_ms.scaled(fwd), block.bwd_ms.scaled(bwd)
    calibration.fwd_overhead_ms = calibration.fwd_overhead_ms.scaled(fwd)
    calibration.bwd_overhead_ms = calibration.bwd_overhead_ms.scaled(bwd)
    return fwd, bwd


def _window_repeats(repeats: int) -> int:
    """Runs of many blocks are few and set every stage's time: timed at least WINDOW_REPEATS times, unless
    profile_repeats=1 asks for the quickest profile (the test suite's)."""
    return repeats if repeats == 1 else max(repeats, WINDOW_REPEATS)


def _windows(stages, device: torch.device) -> list[tuple[int, int]]:
    """Runs of consecutive blocks [first, end) whose parameters and gradients fit WINDOW_MEMORY_SHARE of the
    device: the whole model when it fits; blocks of one block are left out (nothing to calibrate)."""
    budget = WINDOW_MEMORY_SHARE * device_memory_bytes(device)
    windows, first, used = [], 0, 0.0
    for k, stage in enumerate(stages):
        size = 2.0 * sum(_bytes(t) for t in stage.tensors())
        if k > first and used + size > budget:
            windows.append((first, k))
            first, used = k, 0.0
        used += size
    windows.append((first, len(stages)))
    return [(a, b) for a, b in windows if b - a > 1]


def calibrate(runs: list[list[float]]) -> Calibration:
    """Per block boundary, how much longer the blocks took one by one than as one run (a line in the
    micro-batch size over the sizes measured), and the largest workspace seen."""
    by_size: dict[float, list[float]] = {}
    for size, count, fwd_sum, fwd_whole, bwd_sum, bwd_whole, _ in runs:
        acc = by_size.setdefault(size, [0.0, 0.0, 0.0])
        acc[0] += fwd_sum - fwd_whole
        acc[1] += bwd_sum - bwd_whole
        acc[2] += count - 1
    fwd = [(size, max(0.0, f / b)) for size, (f, _, b) in by_size.items() if b > 0]
    bwd = [(size, max(0.0, w / b)) for size, (_, w, b) in by_size.items() if b > 0]
    return Calibration(fwd_overhead_ms=Linear.fit(fwd) if fwd else Linear(),
                       bwd_overhead_ms=Linear.fit(bwd) if bwd else Linear(),
                       workspace_bytes=max((r[6] for r in runs), default=0.0), runs=runs)


def _label(stage) -> str:
    for node in stage.module.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            return list(stack.values())[-1][0]
    return ""


def _split_shares(captured, lin, blocks, windows, values, batch, device, repeats, autocast_dtype) -> dict:
    """BI and BW as shares of the whole backward, timed on the run of blocks from block 1 to the end of the
    run of blocks holding it (a stage's worth of blocks that fits the device, receiving values as a stage
    does); empty where nothing splits."""
    end = next((e for first, e in windows if first <= 1 < e), 2)
    run = build_stage(captured, lin, blocks.bounds[1], blocks.bounds[end])
    split = _split_backward_ms(run, values, batch, device, repeats, autocast_dtype)
    if split is None:
        return {}
    bwd_ms = _profile_one(run, run.module, values, batch, device, repeats, autocast_dtype)[1]
    return {"BI": split[0] / bwd_ms, "BW": split[1] / bwd_ms} if bwd_ms > 0 else {}


@contextlib.contextmanager
def _on_device(stage, device: torch.device):
    """The stage's parameters and buffers on `device` for a measurement, where they were before after it."""
    moved = []
    for t in stage.tensors():
        if t.device != device:
            moved.append((t, t.data))
            t.data = t.data.to(device)
    try:
        yield
    finally:
        for t, data in moved:
            t.data = data


def _stage_args(stage, values: dict[str, torch.Tensor], batch: list) -> tuple[list, list]:
    """The received values as leaves (floating ones requiring grad, as a stage receives them), and the stage's
    arguments: those, then its inputs from the batch."""
    received = [values[name].detach().requires_grad_(values[name].is_floating_point()) for name in stage.received]
    return received, received + [batch[i] for i in stage.inputs]


def _split_backward_ms(stage, values, batch, device, repeats, autocast_dtype) -> tuple[float, float] | None:
    """The backward of a run of blocks split as the zero-bubble schedules run it (rannc.split_backward): the
    inputs' gradients (BI) and the weights' (BW), medians of `repeats` runs after a warm-up, eager. None where
    nothing splits: no received value or no parameter needs a gradient."""
    with _on_device(stage, device):
        received, args = _stage_args(stage, values, batch)
        inputs = [r for r in received if r.requires_grad]
        params = [p for p in stage.parameters() if p.requires_grad]
        if not inputs or not params:
            return None
        bi_times, bw_times = [], []
        for rep in range(repeats + 1):
            with _autocast(device, autocast_dtype):
                outs = stage.module(*args)
            diff = [o for o in outs if isinstance(o, torch.Tensor) and o.requires_grad]
            if not diff:
                return None
            sync_device(device)
            t0 = time.perf_counter()
            _, weights = backward_input(diff, [torch.ones_like(o) for o in diff], inputs, params)
            sync_device(device)
            t1 = time.perf_counter()
            weights.run()
            sync_device(device)
            t2 = time.perf_counter()
            if rep:  # the first run warms up
                bi_times.append((t1 - t0) * 1e3)
                bw_times.append((t2 - t1) * 1e3)
        for t in stage.parameters():
            t.grad = None
        return statistics.median(bi_times), statistics.median(bw_times)


def _profile_one(stage, run, values, batch, device, repeats, autocast_dtype, warmups: int = 1):
    """Forward and backward time of one block (or run of blocks), with its parameters on the device for the
    measurement (the median of `repeats` runs after `warmups` runs; the fastest run, tried for the runs of many
    blocks, predicted the 4.9B model's step 8-9% short on one H200); also the bytes saved for backward, the
    outputs, and on CUDA the peak memory above what was allocated before the first run (gradients not yet
    there) and before the later runs (gradients there)."""
    with _on_device(stage, device):
        received, args = _stage_args(stage, values, batch)
        saved: dict[int, int] = {}

        def pack(t):
            saved[t.data_ptr() if t.device.type != "meta" else id(t)] = _bytes(t)
            return t

        fwd_times, bwd_times, outs = [], [], None
        cuda = device.type == "cuda"
        extra = [0.0, 0.0]    # peak above the start: the first run (no gradients yet), the later ones (with)
        for rep in range(repeats + warmups):
            if cuda:
                sync_device(device)
                baseline = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            for r in received:
                r.grad = None
            saved.clear()
            sync_device(device)
            t0 = time.perf_counter()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _autocast(device, autocast_dtype):
                outs = run(*args)
            sync_device(device)
            t1 = time.perf_counter()
            diff = [o for o in outs if isinstance(o, torch.Tensor) and o.requires_grad]
            if diff:
                torch.autograd.backward(diff, [torch.ones_like(o) for o in diff])
            sync_device(device)
            t2 = time.perf_counter()
            if rep >= warmups:
                fwd_times.append((t1 - t0) * 1e3)
                bwd_times.append((t2 - t1) * 1e3)
            if cuda:
                k = min(rep, 1)
                extra[k] = max(extra[k], float(torch.cuda.max_memory_allocated(device) - baseline))
        for t in stage.parameters():
            t.grad = None
        fwd_ms, bwd_ms = statistics.median(fwd_times), statistics.median(bwd_times)
        outs = [o.detach() if isinstance(o, torch.Tensor) else o for o in outs]
        return fwd_ms, bwd_ms, float(sum(saved.values())), outs, extra


_LINKS: dict[str, dict[str, float]] = {}
logger = logging.getLogger("rannc.profile")


LINK_KEYS = ("p2p_bytes_per_ms", "p2p_latency_ms", "allreduce_bytes_per_ms", "allreduce_latency_ms", "p2p_hop_ms")


def cached_links(device: torch.device, cache_dir: str, log=print) -> dict[str, float]:
    """The link speeds of this set of processes, measured once and kept (in this process, and on disk under
    `cache_dir` keyed by the world size, backend, device and hosts), so that every deployment plans with the
    same numbers instead of a fresh, noisy measurement. Collective."""
    if rdist.get_world_size() < 2:
        return measure_links(device)
    hosts = rdist.all_gather_objects(socket.gethostname())
    digest = hashlib.sha256(repr((len(hosts), dist.get_backend(), device_name(device), hosts,
                                  __version__)).encode()).hexdigest()[:20]
    if digest in _LINKS:
        return dict(_LINKS[digest])
    path = json_cache.cache_file(cache_dir, "links", digest)
    found = None
    if rdist.get_rank() == 0:
        kept = json_cache.read(path, "link cache", log)
        try:
            found = {k: float(v) for k, v in kept.items()} if kept is not None else None
        except (ValueError, AttributeError, TypeError):
            log(f"Ignoring unreadable link cache {path}")
    found = rdist.broadcast_object(found)
    if found is not None and set(found) != set(LINK_KEYS):
        found = None   # kept by an earlier version that measured less: measure again
    if found is None:
        found = measure_links(device)
        if rdist.get_rank() == 0:
            json_cache.write(path, found, "link cache", log)
    else:
        log(f"Loaded link speeds from {path}")
    _LINKS[digest] = found
    return dict(found)


def measure_links(device: torch.device, nbytes: int = 64 * 2**20) -> dict[str, float]:
    """p2p (rank 0 <-> 1) and all-reduce (all ranks) speed, as seen by rank 0; collective."""
    world = rdist.get_world_size()
    result = {"p2p_bytes_per_ms": 1e7, "p2p_latency_ms": 0.02, "allreduce_bytes_per_ms": 1e7,
              "allreduce_latency_ms": 0.05, "p2p_hop_ms": 0.0}
    if world < 2:
        return result
    rank = rdist.get_rank()
    comm = rdist.comm_device()
    big = torch.ones(nbytes // 4, device=comm)
    small = torch.ones(1, device=comm)

    def timed(fn, reps=3):
        fn()
        sync_device(comm)
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync_device(comm)
        return (time.perf_counter() - t0) * 1e3 / reps

    def ping(t):
        def run():
            if rank == 0:
                dist.send(t, 1)
                dist.recv(t, 1)
            elif rank == 1:
                dist.recv(t, 0)
                dist.send(t, 0)
        return run

    lat = timed(ping(small)) / 2
    big_ms = timed(ping(big)) / 2
    hop = _hop_under_load(rank) if comm.type == "cpu" else 0.0
    ar_lat = timed(lambda: dist.all_reduce(small))
    ar_ms = timed(lambda: dist.all_reduce(big))
    if rank == 0:
        # bandwidth from the whole large transfer (latency included): subtracting a small message's
        # time overestimates the bandwidth badly when both are latency-bound
        result = {"p2p_bytes_per_ms": nbytes / max(big_ms, 1e-3), "p2p_latency_ms": lat,
                  "allreduce_bytes_per_ms": 2.0 * (world - 1) / world * nbytes / max(ar_ms, 1e-3),
                  "allreduce_latency_ms": ar_lat, "p2p_hop_ms": hop}
    return rdist.broadcast_object(result)


HOP_BYTES = 128 * 1024   # a small activation's message
HOP_BUSY_MS = 8.0        # the computation both ranks run around each message
HOP_REPEATS = 41         # the first is a warm-up. A delivery waits about 0.2 or about 4 ms, so the mean of few
                         # is noisy: six means of 12 on two ranks of two cores ranged over 1.25-4.08 ms, of 40
                         # over 1.87-2.62, for 0.4 s more once per machine (the links are cached)


def _hop_under_load(rank: int) -> float:
    """Rank 0 -> 1 delivery time of a HOP_BYTES message sent asynchronously while both ranks compute (as a
    pipeline's actions do): the mean over HOP_REPEATS of (arrival - send), both read from the host's one
    monotonic clock (the CPU ranks of one host, the only case measured). The mean, not the median: a delivery
    waits either hardly at all or for the operating system to give the communication thread a core (0.2 or
    about 4 ms on two ranks of two cores), and the step pays the average. Collective; ranks above 1 only join
    the barriers."""
    message = torch.zeros(HOP_BYTES // 4)
    arrival = torch.zeros(1, dtype=torch.float64)
    work = torch.randn(256, 256)
    delays = []

    def compute(ms: float) -> None:
        end = time.perf_counter() + ms / 1e3
        while time.perf_counter() < end:
            work @ work

    for _ in range(HOP_REPEATS):
        dist.barrier()
        if rank == 0:
            sent = time.perf_counter()
            request = dist.isend(message, 1)
            compute(HOP_BUSY_MS)
            request.wait()
            dist.recv(arrival, 1)
            delays.append((arrival.item() - sent) * 1e3)
        elif rank == 1:
            dist.recv(message, 0)
            arrival[0] = time.perf_counter()
            compute(HOP_BUSY_MS)
            dist.send(arrival, 0)
    dist.barrier()
    return max(0.0, statistics.fmean(delays[1:])) if delays else 0.0


def profile_cache_path(captured: CapturedGraph, blocks: Blocks, sizes: list[int], device: torch.device,
                       autocast_dtype, compile_blocks: str, cache_dir: str,
                       compile_settings: CompileSettings = DEFAULT_COMPILE) -> Path | None:
    """Where the profile of this graph, blocks, sizes and device is cached (None: no cache)."""
    if not cache_dir:
        return None
    key = cache_key(captured, blocks, sizes, device, autocast_dtype, compile_blocks, compile_settings)
    return Path(cache_dir).expanduser() / f"profile_{key}.json"


def build_profile_set(captured: CapturedGraph, lin: Linearized, blocks: Blocks, inputs: list[torch.Tensor],
                      sizes: list[int], device: torch.device, links: dict[str, float], repeats: int,
                      cache_dir: str, autocast_dtype=None, log=print, show_progress: bool = True,
                      update: UpdateProfile | None = None, compile_blocks: str = "",
                      compile_settings: CompileSettings = DEFAULT_COMPILE) -> ProfileSet:
    """Profiles of every block, from the on-disk cache when the same graph was profiled before; the links and
    the optimizer's profile (`update`) are measured apart and set on it."""
    path = profile_cache_path(captured, blocks, sizes, device, autocast_dtype, compile_blocks, cache_dir,
                              compile_settings)
    if path is not None and path.is_file():
        try:
            cached = ProfileSet.from_json(path.read_text())
            log(f"Loaded block profiles from {path}")
            for k, v in links.items():
                setattr(cached, k, v)
            if update is not None:
                cached.update = update
            return cached
        except (ValueError, KeyError, TypeError):
            log(f"Ignoring unreadable profile cache {path}")
    t0 = time.perf_counter()
    block_profiles, calibration = profile_blocks(captured, lin, blocks, inputs, sizes, device, repeats,
                                                 autocast_dtype, show_progress, compile_blocks, compile_settings)
    compiled = f" (runs of blocks compiled: {compile_settings})" if compile_blocks else ""
    log(f"Profiled {blocks.count} blocks{compiled} at micro-batch sizes {sizes} in {time.perf_counter() - t0:.1f} s")
    tensor_bytes, trainable = tensor_table(captured)
    profile = ProfileSet(blocks=block_profiles, tensor_bytes=tensor_bytes, trainable=trainable,
                         device_name=device_name(device), device_memory_bytes=device_memory_bytes(device),
                         calibration=calibration, update=update or UpdateProfile(), **links)
    if path is not None:
        try:
            profile.save(path)
            log(f"Saved block profiles to {path}")
        except OSError as exc:
            log(f"Could not save profile cache {path}: {exc}")
    return profile


def tensor_table(captured: CapturedGraph) -> tuple[dict[str, int], dict[str, bool]]:
    """Bytes and trainability of every tensor the graph reads, by state_dict name (plain tensor attributes,
    constants of the graph, by their attribute path)."""
    sizes, trainable = {}, {}
    for name, t in named_graph_tensors(captured.gm):
        key = captured.tensor_names.get(id(t), name)
        sizes[key] = _bytes(t)
        trainable[key] = isinstance(t, torch.nn.Parameter) and t.requires_grad
    return sizes, trainable
