"""The compile item: stages run under torch.compile (inductor, on the CPU here) train exactly like
single-process eager training, the blocks are profiled compiled, and nothing recompiles in the steady state."""

from __future__ import annotations

import copy
import logging
import shutil

import pytest
import torch

from rannc.config import ConfigError, RannConfig

import models
from distributed import run_ranks
from side_by_side import grad_error, state_and_eval_errors

BATCH = 16
RTOL = 1e-5

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="inductor needs a C++ compiler on the CPU")



def _train_compiled(rank, world, schedule, recompute):
    """3 Adam steps of the tutorial MLP as 2 stages with compiled stages, beside the plain eager model;
    returns the largest relative differences, the compilations per step and the recompilations counted."""
    import rannc

    warnings: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                warnings.append(record.getMessage())

    logging.getLogger("rannc.compile").addHandler(Keep())
    torch.manual_seed(1234)
    model = models.make("mlp")
    reference = copy.deepcopy(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, eps=1e-3)
    ref_optimizer = torch.optim.Adam(reference.parameters(), lr=0.01, eps=1e-3)
    wrapped = rannc.RaNNCModule(model, optimizer, compile=True, partition_num=2, schedule=schedule,
                                recompute=recompute, min_pipeline=2, max_pipeline=2, max_blocks=2,
                                profile_cache_dir="")
    errors = {"loss": 0.0, "grad": 0.0, "param": 0.0, "eval": 0.0}
    compiles = []
    for step in range(4):
        batch = models.global_batch("mlp", BATCH, seed=step)
        loss = wrapped(*models.local_part(batch, rank, world))
        loss.backward()
        ref_loss = reference(*batch)
        ref_loss.backward()
        errors["loss"] = max(errors["loss"], abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()))
        errors["grad"] = max(errors["grad"], grad_error(wrapped, reference))
        optimizer.step()
        ref_optimizer.step()
        optimizer.zero_grad()
        ref_optimizer.zero_grad()
        pieces = wrapped._engine.runtime.pieces
        compiles.append(sum(piece.compiled.compiles for piece in pieces))
    errors["param"], errors["eval"] = state_and_eval_errors(wrapped, reference, "mlp", BATCH, rank, world)
    recompiles = sum(piece.compiled.recompiles for piece in wrapped._engine.runtime.pieces)
    return errors, compiles, recompiles, warnings, wrapped.deployment.pipeline_depth


@pytest.mark.parametrize("schedule,recompute", [("gpipe", "always"), ("1f1b", "never")])
def test_compiled_stages_match_single_process(schedule, recompute):
    """Two ranks, two compiled stages, two micro-batches: losses, gradients, parameters and evaluation equal
    the eager single-process model's to 1e-5; the compilations of the first step (and the first backward
    under recomputation) are all there is: none in steps 2 to 4, and no steady-state warning."""
    for rank, (errors, compiles, recompiles, warnings, depth) in enumerate(
            run_ranks(_train_compiled, 2, schedule, recompute, timeout=600)):
        assert depth == 2
        for what, err in errors.items():
            assert err < RTOL, f"{schedule}: rank {rank}: {what} differs by {err:.2e} (relative)"
        assert compiles[0] > 0, f"rank {rank}: its stage never compiled"
        assert compiles[1:] == [compiles[0]] * 3, f"rank {rank}: compilations after each step {compiles}"
        assert recompiles == 0 and not warnings, f"rank {rank}: {warnings}"


def test_recompilation_in_a_seen_situation_is_logged(caplog):
    """A compilation in a situation that ran before (here: the compiled code thrown away) is counted and
    logged as a warning naming the module."""
    from rannc.graph.compiled import CompiledModule

    module = torch.nn.Linear(4, 2)
    compiled = CompiledModule(module, "stage 0")
    x = torch.randn(3, 4)
    with caplog.at_level(logging.INFO, logger="rannc.compile"):
        compiled(x)
        compiled(x)
        assert (compiled.compiles, compiled.recompiles) == (1, 0)
        torch._dynamo.reset()
        compiled(x)
    assert (compiled.compiles, compiled.recompiles) == (2, 1)
    assert "stage 0 was compiled again" in caplog.text
    torch.testing.assert_close(compiled(x), module(x))


def test_more_situations_than_the_recompile_limit_is_an_error_not_a_silent_eager_fallback():
    """torch.compile runs a module eagerly after `recompile_limit` graphs; a compiled stage says so instead."""
    from rannc.graph.compiled import CompiledModule

    class Stage(torch.nn.Linear):   # a forward of its own: dynamo's limit counts graphs per code object
        def forward(self, x):
            return super().forward(x)

    torch._dynamo.reset()
    compiled = CompiledModule(Stage(4, 2), "stage 0")
    with torch._dynamo.config.patch(recompile_limit=1):
        compiled(torch.randn(3, 4))
        with pytest.raises(RuntimeError, match="stage 0 met more situations than torch.compile compiles"):
            with torch.no_grad():   # a second situation: a second graph
                compiled(torch.randn(3, 4))
    torch._dynamo.reset()


def test_a_failing_compile_names_the_stage_and_the_way_out(monkeypatch):
    """compile is on by default on CUDA devices: where torch.compile fails, the error says which module and that
    compile=false runs it eagerly."""
    import torch._inductor.compile_fx

    from rannc.graph.compiled import CompiledModule

    def broken(*args, **kwargs):
        raise ValueError("no kernel for this")

    monkeypatch.setattr(torch._inductor.compile_fx, "compile_fx", broken)
    torch._dynamo.reset()
    compiled = CompiledModule(torch.nn.Linear(4, 2), "stage 3")
    with pytest.raises(RuntimeError, match=r"torch.compile failed on stage 3 \(.*no kernel for this.*compile=false"):
        compiled(torch.randn(3, 4))
    torch._dynamo.reset()


def test_compile_refuses_the_split_backward():
    with pytest.raises(ConfigError, match="'compile' cannot be used with schedule 'zb_h1'"):
        RannConfig().replace(compile=True, schedule="zb_h1")


def test_compiled_scale_prices_stages_at_the_compiled_ratio():
    """Blocks and calibration scaled by compiled / eager of the runs of blocks: forward and backward apart."""
    from rannc.profile.profiler import compiled_scale
    from rannc.profile.profiles import BlockProfile, Calibration, Linear

    blocks = [BlockProfile(Linear(1.0, 2.0), Linear(3.0, 4.0), Linear(), Linear(), []) for _ in range(2)]
    calibration = Calibration(fwd_overhead_ms=Linear(0.5, 0.1), bwd_overhead_ms=Linear(1.0, 0.0))
    scale = compiled_scale(blocks, calibration, [(10.0, 6.0, 20.0, 15.0), (10.0, 8.0, 20.0, 15.0)])
    assert scale == pytest.approx((0.7, 0.75))
    assert blocks[1].fwd_ms(1.0) == pytest.approx(0.7 * 3.0) and blocks[0].bwd_ms(2.0) == pytest.approx(0.75 * 11.0)
    assert calibration.fwd_overhead_ms(10.0) == pytest.approx(0.7 * 1.5)
    assert compiled_scale(blocks, calibration, []) == (1.0, 1.0)


def test_a_profile_cached_under_other_region_thresholds_is_not_read_back(monkeypatch):
    """The thresholds of rannc.graph.regions decide which layers a timed run compiles as regions: a change of
    either is a new profile cache key under regions, and leaves the other ways' keys alone."""
    from types import SimpleNamespace

    from rannc.graph import regions
    from rannc.profile.profiler import cache_key

    captured, blocks = SimpleNamespace(fingerprint="f"), SimpleNamespace(bounds=[0, 3, 7])

    def keys():
        cpu = torch.device("cpu")
        return [cache_key(captured, blocks, [2, 4], cpu, None, how) for how in ("", "inline", "regions")]

    before = keys()
    assert len(set(before)) == 3
    monkeypatch.setattr(regions, "MIN_LAYERS", regions.MIN_LAYERS + 1)
    after_layers = keys()
    monkeypatch.setattr(regions, "MIN_OPERATIONS", regions.MIN_OPERATIONS + 1)
    after_both = keys()
    assert after_layers[:2] == after_both[:2] == before[:2]
    assert len({before[2], after_layers[2], after_both[2]}) == 3


def test_repeated_layers_compile_once_as_shared_regions(monkeypatch):
    """A stage of four identical transformer layers (after a first one of its own) is traced as one shared region
    called four times: the graph torch.compile hands the compiler holds one layer's code; the loss and every
    gradient equal the eager stage's. The compiler here is aot_eager (autograd's tracing, no kernels generated):
    inductor compiling a region once is torch's part, and a cold inductor compile costs a minute of this
    machine; a tiny BERT of 6 layers trained under rannc with compile and inductor gave the eager losses to 2e-7."""
    import torch._inductor.compile_fx
    from torch._dynamo.backends.debugging import aot_eager

    from rannc.graph.blocks import linearize
    from rannc.graph.capture import capture
    from rannc.graph.compiled import CompiledModule
    from rannc.graph.regions import Regions
    from rannc.graph.stage import build_stage

    monkeypatch.setattr(torch._inductor.compile_fx, "compile_fx",
                        lambda gm, inputs, config_patches=None: aot_eager(gm, inputs))
    torch.manual_seed(0)
    batch = models.global_batch("bert", BATCH, seed=0)
    captured = capture(models.TinyBert(layers=5), tuple(batch))   # the first layer has two more operations
    lin = linearize(captured)
    stage = build_stage(captured, lin, 0, lin.size).module
    torch._dynamo.reset()
    compiled = CompiledModule(stage, "stage 0")
    assert (compiled.regions.calls, compiled.regions.functions) == (4, 1)
    assert CompiledModule(stage, "stage 0", regions=False).regions.calls == 0

    class Wrapped(torch.nn.Module):   # the model inside containers of its own: its layers found at any depth
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Sequential(models.TinyBert(layers=5))

        def forward(self, *args):
            return self.inner[0](*args)

    wrapped = capture(Wrapped(), tuple(batch))
    wrapped_lin = linearize(wrapped)
    wrapped_stage = build_stage(wrapped, wrapped_lin, 0, wrapped_lin.size).module
    assert CompiledModule(wrapped_stage, "stage 0").regions == compiled.regions

    class Sub(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.norm = torch.nn.Linear(8, 8), torch.nn.LayerNorm(8)

        def forward(self, x):
            return self.norm(torch.relu(self.a(x)) + x)

    class Layer(torch.nn.Module):   # six sublayers in a list of its own: the regions are still the 4 layers
        def __init__(self):
            super().__init__()
            self.subs = torch.nn.ModuleList(Sub() for _ in range(6))

        def forward(self, x):
            for sub in self.subs:
                x = sub(x)
            return x

    nested = capture(torch.nn.Sequential(*[Layer() for _ in range(4)]), (torch.randn(4, 8),))
    nested_lin = linearize(nested)
    nested_stage = build_stage(nested, nested_lin, 0, nested_lin.size).module
    assert CompiledModule(nested_stage, "stage 0").regions == Regions(4, 1)

    def check(stage, compiled, batch, calls, codes):
        def loss_and_grads(run):
            stage.zero_grad(set_to_none=True)
            (loss,) = run(*batch)
            loss.backward()
            return loss.detach(), [p.grad.clone() for p in stage.parameters()]

        eager_loss, eager_grads = loss_and_grads(stage)
        loss, grads = loss_and_grads(compiled)
        # dynamo may trace a region's first call inline (it does for one reading the graph's own input)
        assert compiled.compiles == 1 and calls - 1 <= compiled.region_calls <= calls
        assert compiled.region_codes == codes
        torch.testing.assert_close(loss, eager_loss, rtol=RTOL, atol=0)
        for g, e in zip(grads, eager_grads):
            torch.testing.assert_close(g, e, rtol=RTOL, atol=RTOL * e.abs().max().item())

    check(stage, compiled, batch, 4, 1)

    # two codes of layer with inputs of the same shapes, alternating: each keeps its own code
    class Block(torch.nn.Module):
        def __init__(self, act):
            super().__init__()
            self.a, self.b, self.act = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), act
            self.norm = torch.nn.LayerNorm(8)

        def forward(self, x):
            h = self.b(self.act(self.a(x))) * 0.5 + x
            return self.norm(h + h.mean(-1, keepdim=True))

    class Alternating(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(Block(torch.relu if i % 2 else torch.tanh) for i in range(8))

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x.pow(2).mean()

    x = (torch.randn(4, 8),)
    captured = capture(Alternating(), x)
    lin = linearize(captured)
    stage = build_stage(captured, lin, 0, lin.size).module
    torch._dynamo.reset()
    compiled = CompiledModule(stage, "stage 0")
    assert (compiled.regions.calls, compiled.regions.functions) == (8, 2)
    check(stage, compiled, x, 8, 2)
    torch._dynamo.reset()


def _second_backward(rank, world):
    """keep_graph on a compiled stage: two backwards of one forward, against the plain model's."""
    import rannc

    torch.manual_seed(2)
    model = models.make("mlp")
    reference = copy.deepcopy(model)
    wrapped = rannc.RaNNCModule(model, torch.optim.SGD(model.parameters(), lr=0.1), compile=True,
                                profile_cache_dir="")
    batch = models.global_batch("mlp", BATCH, seed=0)
    rannc.keep_graph(True)
    try:
        loss, ref_loss = wrapped(*batch), reference(*batch)
        for _ in range(2):
            loss.backward()
            ref_loss.backward(retain_graph=True)
    finally:
        rannc.keep_graph(False)
    return grad_error(wrapped, reference)


def test_a_second_backward_of_a_compiled_stage_adds_the_gradients_again():
    """torch.compile's own backward refuses a second run (donated buffers), and without those adds next to
    nothing the second time (torch 2.13, this MLP): a call under keep_graph runs the stages eagerly."""
    error, = run_ranks(_second_backward, 1, timeout=600)
    assert error < RTOL, f"gradients after two backwards differ by {error:.2e} (relative)"


class _RecurrentBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = torch.nn.LSTM(8, 8, num_layers=2, dropout=0.1, batch_first=True)
        self.a, self.b, self.norm = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.LayerNorm(8)

    def forward(self, x):
        y, _ = self.lstm(x)
        return self.norm(self.b(torch.relu(self.a(y))) + x)


def test_layers_holding_a_recurrent_op_are_compiled_inline_not_as_shared_regions(monkeypatch):
    """Recurrent ops run eagerly inside compiled code (their decomposition drops out wrongly), and a shared
    region cannot hold such a call (torch.compile raises): repeated layers holding one compile inline, and the
    stage runs forward and backward."""
    import torch._inductor.compile_fx
    from torch._dynamo.backends.debugging import aot_eager

    from rannc.graph.blocks import linearize
    from rannc.graph.capture import capture
    from rannc.graph.compiled import CompiledModule
    from rannc.graph.stage import build_stage

    monkeypatch.setattr(torch._inductor.compile_fx, "compile_fx",
                        lambda gm, inputs, config_patches=None: aot_eager(gm, inputs))
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8)
    captured = capture(torch.nn.Sequential(*[_RecurrentBlock() for _ in range(5)]), (x,))
    lin = linearize(captured)
    stage = build_stage(captured, lin, 0, lin.size).module
    torch._dynamo.reset()
    compiled = CompiledModule(stage, "stage 0")
    assert compiled.regions.calls == 0
    outputs = compiled(x)
    sum(o.float().sum() for o in outputs if isinstance(o, torch.Tensor) and o.is_floating_point()).backward()
    torch._dynamo.reset()


def test_the_profiler_times_compiled_runs_as_the_stages_compile(monkeypatch):
    """Stages on CUDA replay CUDA graphs (compile_mode auto): the profiler's compiled runs of blocks do too, or a
    run of small kernels is timed at the host's launching pace (BERT-large at batch 64 on one H200: forward and
    backward predicted 1.5-1.8x the measured ones). With recompute "always" every stage runs in the default mode,
    and so do the runs. The compile_options item reaches both. Mode and options are part of the profile cache's
    key, where runs are compiled."""
    from types import SimpleNamespace

    from rannc.config import CompileSettings, profiled_compile, stage_compile
    from rannc.graph.blocks import linearize, make_blocks
    from rannc.graph.capture import capture
    from rannc.profile import profiler

    config = RannConfig()
    assert profiled_compile(config, "cuda") == CompileSettings("reduce-overhead")
    assert profiled_compile(config.replace(recompute="always"), "cuda") == CompileSettings("default")
    assert profiled_compile(config, "cpu") == CompileSettings("default")
    assert profiled_compile(config.replace(compile_mode="max-autotune"), "cuda").mode == "max-autotune"
    tuned = config.replace(compile_options="coordinate_descent_tuning=true triton.cudagraph_trees=0")
    settings = CompileSettings("reduce-overhead", (("coordinate_descent_tuning", True),
                                                   ("triton.cudagraph_trees", False)))
    assert profiled_compile(tuned, "cuda") == stage_compile(tuned, "cuda", recompute=False) == settings
    assert stage_compile(tuned, "cuda", recompute=True) == CompileSettings("default", settings.options)

    made, calls = [], []

    class Recording:   # stands in for CompiledModule: runs the module eagerly, keeps the settings it was given
        def __init__(self, module, name, settings, regions=True):
            made.append(settings)
            self.module, self.cuda_graphs = module, settings.mode == "reduce-overhead"

        def __call__(self, *args):
            calls.append(self.cuda_graphs)
            return self.module(*args)

    monkeypatch.setattr(profiler, "CompiledModule", Recording)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    inputs = (torch.randn(4, 8),)
    captured = capture(model, inputs)
    lin = linearize(captured)
    for compiled in (settings, CompileSettings()):
        profiler.profile_blocks(captured, lin, make_blocks(lin, 3), list(inputs), [2, 4], torch.device("cpu"),
                                repeats=1, show_progress=False, compile_blocks="inline", compile_settings=compiled)
    assert made == [settings, CompileSettings()]
    # one timed run each; replaying graphs, two runs before it (the first runs the code, the second records)
    assert calls == [True] * 3 + [False] * 2

    captured, blocks, cpu = SimpleNamespace(fingerprint="f"), SimpleNamespace(bounds=[0, 3, 7]), torch.device("cpu")

    def key(how, compiled=None):
        return profiler.cache_key(captured, blocks, [2], cpu, None, how, compiled or CompileSettings())

    for how in ("inline", "regions"):
        assert len({key(how), key(how, CompileSettings("reduce-overhead")), key(how, settings)}) == 3
    assert key("", settings) == key("")


def test_the_profiler_releases_memory_before_each_run_that_records_graphs(monkeypatch):
    """A compiled run of blocks replaying CUDA graphs records into a pool of its own, which takes neither what the
    allocator cached for the eager runs nor an earlier run's graphs (the seed's 4.9B model on one H200: 131 GiB of
    140 while recording, on top of 76 cached): the profiler's memory goes back before each such run, with the
    count of graphed functions from before profiling (whose reset frees the earlier runs' graphs). Runs without
    graphs release nothing."""
    from rannc.config import CompileSettings
    from rannc.graph.blocks import linearize, make_blocks
    from rannc.graph.capture import capture
    from rannc.profile import profiler

    events = []

    class Recording:   # stands in for CompiledModule: runs the module eagerly
        def __init__(self, module, name, settings, regions=True):
            self.module, self.cuda_graphs = module, settings.mode == "reduce-overhead"

        def __call__(self, *args):
            events.append("compiled run")
            return self.module(*args)

    counts = iter([5, 7, 9])
    monkeypatch.setattr(profiler, "CompiledModule", Recording)
    monkeypatch.setattr(profiler, "graphed_functions", lambda device: next(counts))
    monkeypatch.setattr(profiler, "release_profiler_memory", lambda device, before: events.append(("release", before)))
    monkeypatch.setattr(profiler, "_windows", lambda stages, device: [(0, 2), (2, 4)])
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(4)])
    inputs = (torch.randn(4, 8),)
    captured = capture(model, inputs)
    lin = linearize(captured)
    for settings in (CompileSettings("reduce-overhead"), CompileSettings()):
        profiler.profile_blocks(captured, lin, make_blocks(lin, 4), list(inputs), [2, 4], torch.device("cpu"),
                                repeats=1, show_progress=False, compile_blocks="inline", compile_settings=settings)
    window = [("release", 5)] + ["compiled run"] * 3     # two runs before the timed one: code, then recording
    assert events == window * 2 + ["compiled run"] * 2 * 2


def test_compile_options_are_checked_against_inductors_options():
    """A name inductor does not have (an attribute of its config module that is no option, too), or a value not
    of the option's type, stops at the configuration, naming the item; values are read as the option's type.
    CUDA graphs stay the compile_mode item's: an option turning them on would reach recomputing stages."""
    from rannc.config import inductor_options

    assert inductor_options("") == ()
    assert inductor_options("max_autotune_gemm_backends=ATEN combo_kernels=on") == (
        ("combo_kernels", True), ("max_autotune_gemm_backends", "ATEN"))
    # options whose default is None, read by their declared type (a string 'false' would have turned one on)
    assert inductor_options("triton.autotune_at_compile_time=false triton.max_tiles=3") == (
        ("triton.autotune_at_compile_time", False), ("triton.max_tiles", 3))
    assert RannConfig().replace(compile_options="coordinate_descent_search_radius=2").compile_options
    for text, words in (("coordinate_descent_tunning=true", "not one of inductor's options"),
                        ("combo_kernels=maybe", "takes true or false"),
                        ("coordinate_descent_search_radius=two", "takes an integer"),
                        ("combo_kernels", "is not name=value"),
                        ("triton.nonexistent=1", "not one of inductor's options"),
                        ("os.sep=x", "not one of inductor's options"),
                        ("triton.cudagraphs=true", "compile_mode item")):
        with pytest.raises(ConfigError, match=f"'compile_options'.*{words}"):
            RannConfig().replace(compile_options=text)
