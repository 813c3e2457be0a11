"""Stages replayed as CUDA graphs (compile_mode auto or reduce-overhead): gradients kept across replays and
outputs kept across steps stay what they were. The gradients' bookkeeping runs on the CPU; the training
runs where CUDA devices are (one rank per device, skipped elsewhere)."""

from __future__ import annotations

import copy
import gc

import pytest
import torch

from rannc.config import RannConfig, compile_mode
from rannc.graph.cuda_graphs import GraphGrads, claim_all, own_outputs

import models
from distributed import run_ranks
from side_by_side import relative

BATCH = 16
RTOL = 1e-5


def test_auto_mode_replays_graphs_on_cuda_where_the_stage_does_not_recompute():
    config = RannConfig()
    assert config.compile_mode == "auto"
    assert compile_mode(config, "cuda", recompute=False) == "reduce-overhead"
    assert compile_mode(config, "cuda", recompute=True) == "default"
    assert compile_mode(config, "cpu", recompute=False) == "default"
    # graph trees fail inside activation checkpointing: a recomputing stage takes the mode without graphs
    assert compile_mode(RannConfig(compile_mode="max-autotune"), "cuda", recompute=True) == \
        "max-autotune-no-cudagraphs"
    assert compile_mode(RannConfig(compile_mode="reduce-overhead"), "cuda", recompute=True) == "default"
    assert compile_mode(RannConfig(compile_mode="reduce-overhead"), "cuda", recompute=False) == "reduce-overhead"


def test_claimed_gradients_leave_the_memory_they_came_in():
    """A gradient autograd installed (as it installs a CUDA graph's output) is copied once: writing over the
    memory it came in (as the graph's next replay does) leaves it as it was; later backwards add into the
    copy, which is not copied again; gradients set to None cost nothing."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    grads = GraphGrads(layer.parameters())
    x = torch.randn(2, 4)
    layer(x).sum().backward()
    installed = layer.weight.grad
    first = installed.clone()
    grads.claim()
    assert grads.copies == 2 and layer.weight.grad is not installed
    installed.fill_(1e9)                                  # the next replay
    assert torch.equal(layer.weight.grad, first)
    layer(x).sum().backward()
    grads.claim()
    assert grads.copies == 2                              # accumulated in place: already a copy
    assert torch.equal(layer.weight.grad, 2 * first)
    layer.zero_grad(set_to_none=False)
    grads.claim()
    assert grads.copies == 2
    layer.zero_grad(set_to_none=True)
    grads.claim()
    assert grads.copies == 2
    layer(x).sum().backward()
    grads.claim()
    assert grads.copies == 4                              # a new step's first gradients: copied again


def test_claim_all_claims_for_every_module_alive():
    """The graphs' pool is the device's: one module's call must claim the other modules' gradients too."""
    first, second = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    grads = [GraphGrads(first.parameters()), GraphGrads(second.parameters())]
    for layer in (first, second):
        layer(torch.ones(1, 2)).sum().backward()
    claim_all()
    assert [g.copies for g in grads] == [2, 2]


def test_a_parameter_two_modules_hold_is_copied_once():
    """A weight tied across two graphed pieces of one rank: one copy, and none at the next call."""
    shared = torch.nn.Linear(2, 2)
    grads = [GraphGrads(shared.parameters()), GraphGrads(shared.parameters())]
    shared(torch.ones(1, 2)).sum().backward()
    claim_all()
    claim_all()
    assert sum(g.copies for g in grads) == 2


def test_the_copies_record_forgets_parameters_that_are_gone():
    """The record of copied gradients holds a parameter only while it lives (models made and dropped in one
    process, as in a notebook, leave nothing behind)."""
    import gc

    from rannc.graph import cuda_graphs

    layer = torch.nn.Linear(2, 2)
    grads = GraphGrads(layer.parameters())
    layer(torch.ones(1, 2)).sum().backward()
    grads.claim()
    keys = [id(p) for p in layer.parameters()]
    assert all(k in cuda_graphs._COPIES for k in keys)
    del layer, grads
    gc.collect()
    assert not any(k in cuda_graphs._COPIES for k in keys)


def test_outputs_on_the_cpu_are_not_copied():
    t = torch.ones(2)
    out = own_outputs((t, [t, 3]))
    assert out[0] is t and out[1][0] is t and out[1][1] == 3


def _train_with_graphs(rank, world, schedule, accumulate):
    """4 optimizer steps of the tutorial MLP (fp32, TF32 off) under compile with compile_mode auto, each step
    accumulating over `accumulate` calls (zero_grad(set_to_none=False) every other step), the losses kept
    until the end; beside the plain eager model. Returns the largest relative differences and whether the
    stages replayed graphs."""
    import rannc

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.cuda.set_device(rank)   # as rannc will: one device per rank
    device = torch.device("cuda", rank)
    torch.manual_seed(1234)
    model = models.make("mlp").to(device)
    reference = copy.deepcopy(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, eps=1e-3)
    ref_optimizer = torch.optim.Adam(reference.parameters(), lr=0.01, eps=1e-3)
    pipeline = dict(partition_num=world, min_pipeline=world, max_pipeline=world, max_blocks=world) \
        if world > 1 else {}
    wrapped = rannc.RaNNCModule(model, optimizer, compile=True, schedule=schedule, profile_cache_dir="",
                                recompute="never", **pipeline)
    errors = {"loss": 0.0, "grad": 0.0, "param": 0.0, "eval": 0.0}
    kept, ref_kept = [], []
    for step in range(4):
        for k in range(accumulate):
            batch = [t.to(device) for t in models.global_batch("mlp", BATCH, seed=10 * step + k)]
            loss = wrapped(*models.local_part(batch, rank, world))
            loss.backward()
            ref_loss = reference(*batch)
            ref_loss.backward()
            kept.append(loss.detach())
            ref_kept.append(ref_loss.detach())
        errors["grad"] = max([errors["grad"]] + [relative(wrapped.get_param_grad(n).to(device), p.grad)
                                                 for n, p in reference.named_parameters()])
        optimizer.step()
        ref_optimizer.step()
        optimizer.zero_grad(set_to_none=step % 2 == 0)
        ref_optimizer.zero_grad()
    errors["loss"] = max(abs(a.item() - b.item()) / abs(b.item()) for a, b in zip(kept, ref_kept))
    errors["param"], errors["eval"] = _state_and_eval(wrapped, reference, rank, world, device)
    graphs = [piece.compiled.cuda_graphs for piece in wrapped._engine.runtime.pieces]
    return errors, graphs


def _state_and_eval(wrapped, reference, rank, world, device):
    state = wrapped.state_dict(sync_all_ranks=True)
    param = max(relative(state[key].to(device), value) for key, value in reference.state_dict().items())
    with torch.no_grad():
        batch = [t.to(device) for t in models.global_batch("mlp", BATCH, seed=99)]
        loss, ref_loss = wrapped(*models.local_part(batch, rank, world)), reference(*batch)
    return param, abs(loss.item() - ref_loss.item()) / abs(ref_loss.item())


@pytest.mark.parametrize("world,schedule,accumulate", [(1, "gpipe", 3), (2, "gpipe", 2), (2, "1f1b", 2)])
def test_graphed_stages_accumulate_like_single_process_training(world, schedule, accumulate):
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} CUDA device(s)")
    for rank, (errors, graphs) in enumerate(run_ranks(_train_with_graphs, world, schedule, accumulate,
                                                      timeout=900)):
        assert graphs and all(graphs), f"rank {rank}: its stages did not replay CUDA graphs"
        for what, err in errors.items():
            assert err < RTOL, f"rank {rank}: {what} differs by {err:.2e} (relative)"


def _two_models_and_a_second_backward(rank, world):
    """Two wrapped models trained side by side on one device (each call of one replays graphs in the pool the
    other's gradients came from), the second with keep_graph and two backwards in the last step; beside their
    plain eager copies. Returns the largest relative differences of losses and parameters."""
    import rannc

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    pairs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = models.make("mlp").to(device)
        reference = copy.deepcopy(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        wrapped = rannc.RaNNCModule(model, optimizer, compile=True, profile_cache_dir="", recompute="never")
        pairs.append((wrapped, optimizer, reference, torch.optim.SGD(reference.parameters(), lr=0.05)))
    errors = {"loss": 0.0, "param": 0.0}
    for step in range(3):
        batch = [t.to(device) for t in models.global_batch("mlp", BATCH, seed=step)]
        for index, (wrapped, _, reference, _) in enumerate(pairs):
            twice = index == 1 and step == 2   # before that, the second model's graphs replay after the first's
            rannc.keep_graph(twice)
            loss, ref_loss = wrapped(*batch), reference(*batch)
            for _ in range(2 if twice else 1):
                loss.backward()
                ref_loss.backward(retain_graph=twice)
            errors["loss"] = max(errors["loss"], relative(loss.detach(), ref_loss.detach()))
        rannc.keep_graph(False)
        for _, optimizer, _, ref_optimizer in pairs:
            optimizer.step()
            ref_optimizer.step()
            optimizer.zero_grad()
            ref_optimizer.zero_grad()
    for wrapped, _, reference, _ in pairs:
        state = wrapped.state_dict(sync_all_ranks=True)
        errors["param"] = max([errors["param"]] + [relative(state[k].to(device), v)
                                                   for k, v in reference.state_dict().items()])
    return errors, [p.compiled.cuda_graphs for w, *_ in pairs for p in w._engine.runtime.pieces]


def test_two_graphed_models_and_a_second_backward_train_like_their_plain_copies():
    if torch.cuda.device_count() < 1:
        pytest.skip("needs a CUDA device")
    (errors, graphs), = run_ranks(_two_models_and_a_second_backward, 1, timeout=600)
    assert graphs and all(graphs)
    for what, err in errors.items():
        assert err < RTOL, f"{what} differs by {err:.2e} (relative)"


def test_a_compiled_module_claims_its_cuda_gradients_only_and_reads_the_device_at_each_claim():
    """A compiled module replaying graphs claims the gradients on CUDA, wherever its parameters were when it was
    made: the profiler makes the compiled run of blocks while the parameters are still on the CPU and moves
    them to the device for the runs (they were left out, and the second run's backward added into gradients a
    replay had written over: "accessing tensor output of CUDAGraphs that has been overwritten"). Gradients on
    the CPU stay as autograd made them."""
    from rannc.config import CompileSettings
    from rannc.graph.compiled import CompiledModule

    layer = torch.nn.Linear(2, 2)
    compiled = CompiledModule(layer, "blocks 0-1", CompileSettings("reduce-overhead"))
    assert compiled.cuda_graphs and compiled.grads.params == list(layer.parameters())
    layer(torch.ones(1, 2)).sum().backward()
    installed = layer.weight.grad
    compiled.claim_grads()
    assert compiled.grads.copies == 0 and layer.weight.grad is installed
    if not torch.cuda.is_available():
        return
    layer.zero_grad(set_to_none=True)
    for p in layer.parameters():    # as the profiler's _on_device moves them
        p.data = p.data.cuda()
    layer(torch.ones(1, 2, device="cuda")).sum().backward()
    installed = layer.weight.grad
    compiled.claim_grads()
    assert compiled.grads.copies == 2 and layer.weight.grad is not installed
    assert torch.equal(layer.weight.grad, installed)


def test_a_compiled_module_once_dropped_is_no_longer_claimed_for(monkeypatch):
    """dynamo keeps every backend it was given: a backend holding its compiled module strongly kept every module
    alive, and every later compiled call claimed the gradients of each one the profiler had made and dropped
    (the parameters of the whole model, copied for nothing where a stage of the rank does not replay graphs)."""
    import gc

    import torch._inductor.compile_fx
    from torch._dynamo.backends.debugging import aot_eager

    from rannc.config import CompileSettings
    from rannc.graph import cuda_graphs
    from rannc.graph.compiled import CompiledModule

    monkeypatch.setattr(torch._inductor.compile_fx, "compile_fx",
                        lambda gm, inputs, config_patches=None: aot_eager(gm, inputs))
    torch._dynamo.reset()
    layer = torch.nn.Linear(2, 2)
    compiled = CompiledModule(layer, "blocks 0-1", CompileSettings("reduce-overhead"))
    compiled(torch.ones(1, 2)).sum().backward()
    assert compiled.compiles == 1
    registered = compiled.grads
    assert registered in cuda_graphs._ALIVE
    del compiled, registered
    gc.collect()
    assert not any(p is layer.weight for grads in cuda_graphs._ALIVE for p in grads.params)
    torch._dynamo.reset()


def test_code_compiled_without_the_cuda_graphs_its_mode_asks_for_is_named(monkeypatch, caplog):
    """Inductor leaves a graph out of CUDA graphs (a mutated input, a CPU tensor) saying so only under
    TORCH_LOGS=cudagraphs, and its kernels are then launched one by one: rannc warns once per module, for a
    skip while compiling the forward (in the call) and for one while compiling the backward (counted at the next
    call). Here the compiler stands in for inductor and counts a skip as inductor does."""
    import logging

    import torch._inductor.compile_fx
    from torch._dynamo.backends.debugging import aot_eager
    from torch._dynamo.utils import counters

    from rannc.config import CompileSettings
    from rannc.graph.compiled import CompiledModule

    def skipping(gm, inputs, config_patches=None):
        counters["inductor"]["cudagraph_skips"] += 1
        return aot_eager(gm, inputs)

    monkeypatch.setattr(torch._inductor.compile_fx, "compile_fx", skipping)
    torch._dynamo.reset()
    compiled = CompiledModule(torch.nn.Linear(2, 2), "stage 0", CompileSettings("reduce-overhead"))
    with caplog.at_level(logging.WARNING, logger="rannc.compile"):
        compiled(torch.ones(1, 2)).sum().backward()
        assert compiled.graph_skips == 1
        counters["inductor"]["cudagraph_skips"] += 1    # as the backward's compile would
        compiled(torch.ones(1, 2)).sum().backward()
        assert compiled.graph_skips == 2
        compiled(torch.ones(1, 2))
        assert compiled.graph_skips == 2
    warnings = [r.getMessage() for r in caplog.records if "without CUDA graphs" in r.getMessage()]
    assert len(warnings) == 1 and "stage 0 runs part of its forward" in warnings[0]
    assert "TORCH_LOGS=cudagraphs" in warnings[0]
    torch._dynamo.reset()


@pytest.mark.parametrize("before, after, resets", [(0, 2, True), (2, 4, False), (None, None, False), (0, 0, False)])
def test_the_profilers_graphs_are_freed_unless_other_graphs_live(monkeypatch, before, after, resets):
    """The profiler's graphed functions outlived it (BERT-large at batch 256 on one H200: 94.4 GiB reserved after
    profiling, 2.1 once the trees were reset; the seed's 4.9B model's first step at 131 GiB of 140). The trees
    are reset after profiling where the profiler's were the only graphed functions (still alive after a
    collection); graphed functions alive before (another model's stages, the user's own code) keep theirs, since
    a reset leaves them dead. Cached blocks go back either way, and nothing happens off CUDA."""
    from torch._inductor import cudagraph_trees

    from rannc.profile import profiler

    # the real count, on any machine: a torch that renamed it would turn the release off without a word
    assert isinstance(profiler.graphed_functions(torch.device("cuda", 0)), int)
    assert profiler.graphed_functions(torch.device("cpu")) is None
    done = []
    monkeypatch.setattr(profiler, "graphed_functions", lambda device: after)
    monkeypatch.setattr(cudagraph_trees, "reset_cudagraph_trees", lambda: done.append("reset"))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: done.append("empty"))
    profiler.release_profiler_memory(torch.device("cuda", 0), before)
    assert done == (["reset", "empty"] if resets else ["empty"])
    done.clear()
    profiler.release_profiler_memory(torch.device("cpu"), before)
    assert done == []


def _profile_job_releases(rank, world, fail):
    import rannc
    import rannc.deploy as deploy

    calls, counts = [], iter([3, 9])
    deploy.graphed_functions = lambda device: next(counts)    # in this child process only
    deploy.release_profiler_memory = lambda device, before: calls.append((device.type, before))
    if fail:
        def broken(*args, **kwargs):
            raise RuntimeError("profiling failed")
        deploy.build_profile_set = broken
    torch.manual_seed(0)
    model = models.make("mlp")
    wrapped = rannc.RaNNCModule(model, torch.optim.SGD(model.parameters(), lr=0.1), profile_cache_dir="",
                                profile_repeats=1)
    try:
        wrapped(*models.global_batch("mlp", BATCH, seed=0)).backward()
    except RuntimeError as exc:
        assert "profiling failed" in str(exc), exc
        return calls, True
    return calls, False


@pytest.mark.parametrize("fail", [False, True])
def test_the_first_call_releases_what_profiling_left_with_the_count_from_before_it(fail):
    """Also where profiling fails."""
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    assert run_ranks(_profile_job_releases, 1, fail) == [([(device_type, 3)], fail)]


def _graphed_after_profiling(monkeypatch, windows) -> int:
    from torch._inductor import cudagraph_trees

    from rannc.config import CompileSettings
    from rannc.graph.blocks import linearize, make_blocks
    from rannc.graph.capture import capture
    from rannc.profile import profiler

    cudagraph_trees.reset_cudagraph_trees()
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(4)])
    inputs = (torch.randn(8, 64),)
    captured = capture(model, inputs)
    lin = linearize(captured)
    monkeypatch.setattr(profiler, "_windows", lambda stages, device: windows)
    profiler.profile_blocks(captured, lin, make_blocks(lin, 4), list(inputs), [4, 8], torch.device("cuda", 0),
                            repeats=1, show_progress=False, compile_blocks="inline",
                            compile_settings=CompileSettings("reduce-overhead"))
    gc.collect()
    return profiler.graphed_functions(torch.device("cuda", 0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_profilers_runs_of_blocks_keep_one_runs_graphs_alive(monkeypatch):
    """Each compiled run of blocks that records graphs first releases the runs before it (their graphed functions
    outlive them): after two runs as many graphed functions are alive as after one."""
    one = _graphed_after_profiling(monkeypatch, [(0, 2)])
    two = _graphed_after_profiling(monkeypatch, [(0, 2), (2, 4)])
    torch._dynamo.reset()
    assert one > 0 and two == one, (one, two)
