"""A stage (or block) module run under torch.compile, for the `compile` item.

Inductor compiles the module through a backend that counts its compilations. Each call notes the
situation it runs in (shapes, dtypes and requires_grad of the arguments, grad mode, autocast, and the mode
switches of rannc.graph.dropout). A compilation on a situation never seen before is expected: the first
micro-batch size, the other sizes, evaluation, a recomputing stage. A compilation on a situation that has
run before means torch.compile's guards failed in the steady state, which costs seconds on every step:
it is logged as a warning and counted in `recompiles`, which the tests check stays 0. Likewise a module whose
mode replays CUDA graphs but whose code inductor compiled without them (it says why only where asked) is
named in a warning, once.

Whole repeated layers of the module are shared compile regions (rannc.graph.regions), so that a stage of
many layers compiles one of each kind. The profiler times runs of blocks with the same wrapper, so that the
planner prices what runs.
"""

from __future__ import annotations

import contextlib
import logging
import weakref

import torch
from torch._dynamo.utils import counters as _dynamo_counters  # read on every graphed call; rannc loads dynamo anyway

from rannc.config import DEFAULT_COMPILE, CompileSettings
from rannc.graph import dropout
from rannc.graph.cuda_graphs import GraphGrads, claim_all, own_outputs
from rannc.graph.regions import Regions, with_regions

logger = logging.getLogger("rannc.compile")


class CompiledModule:
    """Calls `module` through torch.compile (inductor), counting compilations and steady-state
    recompilations. `name` says which module in the log ("stage 1", "blocks 0-9"). The first shapes compile
    statically, and a change of shapes recompiles once with dynamic ones (torch.compile's default). `settings`:
    torch.compile's mode and inductor options over it (a mode or options replaying CUDA graphs, as
    "reduce-overhead", keep the gradients of the module's parameters and the call's outputs out of the graphs'
    memory: rannc.graph.cuda_graphs). `regions`: whole repeated layers of an fx module compile once
    (rannc.graph.regions)."""

    def __init__(self, module: torch.nn.Module, name: str, settings: CompileSettings = DEFAULT_COMPILE,
                 regions: bool = True):
        self.module = module
        self.name = name
        self.compiles = 0        # graphs compiled so far (more than one per situation with graph breaks)
        self.recompiles = 0      # compilations in a situation that had run before
        self.region_calls = 0    # calls of shared layer code in the graphs compiled, and the distinct codes
        self.region_codes = 0    # they call (summed over the graphs)
        self._seen: set[tuple] = set()
        self.graph_skips = 0     # graphs compiled for it that inductor left out of CUDA graphs (see _skipped)
        self._settings = settings
        self._options = settings.inductor_options()
        self.cuda_graphs = bool(self._options.get("triton.cudagraphs"))
        self.grads = GraphGrads(module.parameters() if self.cuda_graphs else [], cuda_only=True)
        self.regions = Regions(0, 0)
        if regions and isinstance(module, torch.fx.GraphModule):
            module, self.regions = with_regions(module)
            if self.regions.calls:
                logger.info("rannc: %s compiles %d layers as %d shared region(s)", name, self.regions.calls,
                            self.regions.functions)
        if any(p.is_cuda for p in self.grads.params):
            logger.info("rannc: %s replays CUDA graphs (%s)", name, settings)
        self._compiled = torch.compile(module, backend=_WeakBackend(self))
        self._at_limit = _fail_at_recompile_limit()   # made once: a reusable context, off the hot path

    def _backend(self, graph_module: torch.fx.GraphModule, example_inputs):
        from torch._inductor.compile_fx import compile_fx  # inductor loads only when something compiles

        self.compiles += 1
        calls = [n for n in graph_module.graph.nodes if n.target is torch.ops.higher_order.invoke_subgraph]
        self.region_calls += len(calls)
        self.region_codes += len({n.args[0].target for n in calls})
        return compile_fx(graph_module, example_inputs, config_patches=self._options)

    def __call__(self, *args):
        situation = _situation(args)
        before = self.compiles
        if self.cuda_graphs:
            claim_all()
            skips = _graph_skips()
            last, seen = _LAST_GRAPHED
            if seen > skips:    # torch._dynamo.reset() cleared the counts
                seen = 0
            if skips > seen and last() is not None:   # since the last graphed call: its backward compiled
                last()._skipped(skips - seen, "backward")
        try:
            with self._at_limit:
                out = self._compiled(*args)
        except torch._dynamo.exc.FailOnRecompileLimitHit as exc:
            raise RuntimeError(
                f"rannc: {self.name} met more situations than torch.compile compiles for one module "
                f"(torch._dynamo.config.recompile_limit = {torch._dynamo.config.recompile_limit}; this one: "
                f"{_describe(situation)}), and torch.compile would run it eagerly from now on without a word. "
                f"Raise that limit, or run with compile=False") from exc
        except torch._dynamo.exc.BackendCompilerFailed as exc:
            # compile is on by default on CUDA: a model inductor cannot compile must say how to run it anyway
            # (errors of the model itself while dynamo traces it pass through as they are)
            cause = getattr(exc, "inner_exception", None) or exc   # the backend's own error, where it raised
            first_line = (str(cause).strip().splitlines() or [""])[0][:300]
            raise RuntimeError(
                f"rannc: torch.compile failed on {self.name} ({_describe(situation)}): {type(cause).__name__}: "
                f"{first_line} -- run with compile=false (RANNC_COMPILE=false, or compile=False to RaNNCModule) "
                f"to run the stages eagerly") from exc
        if self.compiles > before:
            if situation in self._seen:
                self.recompiles += 1
                logger.warning("rannc: %s was compiled again in a situation it had run before (%s): "
                               "torch.compile's guards failed, and every such step pays the compilation",
                               self.name, _describe(situation))
            else:
                logger.info("rannc: compiled %s for %s", self.name, _describe(situation))
        self._seen.add(situation)
        if not self.cuda_graphs:
            return out
        now = _graph_skips()
        if now > skips:
            self._skipped(now - skips, "forward")
        _LAST_GRAPHED[:] = [weakref.ref(self), now]
        return own_outputs(out)

    def _skipped(self, count: int, part: str) -> None:
        """Inductor compiled code of this module without the CUDA graphs its mode asks for (a mutated input, such
        as BatchNorm's running statistics, a tensor on the CPU, ...): say so once, since it says it only where
        asked (TORCH_LOGS=cudagraphs) and the kernels are then launched from the host one by one."""
        if not self.graph_skips:
            logger.warning("rannc: %s runs part of its %s without CUDA graphs although its mode replays them "
                           "(%s): inductor left %d graph(s) out; TORCH_LOGS=cudagraphs names why", self.name,
                           part, self._settings, count)
        self.graph_skips += count

    def claim_grads(self) -> None:
        """Copy the gradients a CUDA graph's replay may still own out of its memory (before they are set
        aside past the next compiled call)."""
        self.grads.claim()


# The module whose graphed call came last (weakly) and inductor's count of skipped CUDA graphs after it: a skip
# counted by the next graphed call happened in between, in a backward (compiled at its first run), put on that
# module (where a rank holds several graphed pieces, the backward may have been another's)
_LAST_GRAPHED: list = [lambda: None, 0]


def _graph_skips() -> int:
    return _dynamo_counters["inductor"]["cudagraph_skips"]


class _WeakBackend:
    """A CompiledModule's backend, holding it weakly: dynamo keeps every backend it is given for the life of the
    process, and through a bound method it kept each module alive, with its parameters registered for the
    gradients' claims of rannc.graph.cuda_graphs (every run of blocks the profiler compiled stayed registered,
    and every later compiled call walked and claimed their gradients)."""

    def __init__(self, owner: CompiledModule) -> None:
        self._owner = weakref.ref(owner)

    def __call__(self, graph_module: torch.fx.GraphModule, example_inputs):
        owner = self._owner()
        if owner is None:
            raise RuntimeError("rannc: a compiled module was called after it was released")
        return owner._backend(graph_module, example_inputs)


def _fail_at_recompile_limit():
    """torch.compile runs a module eagerly once it has compiled `recompile_limit` graphs for it, logging only
    a warning once; under this context it raises instead (where the installed torch has the switch), so that
    a stage never slows down silently."""
    import torch._dynamo

    if not hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
        return contextlib.nullcontext()
    return torch._dynamo.config.patch(fail_on_recompile_limit_hit=True)


def _situation(args: tuple) -> tuple:
    tensors = tuple((tuple(a.shape), a.dtype, a.requires_grad) if isinstance(a, torch.Tensor) else type(a)
                    for a in args)
    device_type = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
    autocast = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    state = dropout.switches()
    return tensors, torch.is_grad_enabled(), autocast, state


def _describe(situation: tuple) -> str:
    tensors, grad, autocast, (active, training, recomputing) = situation
    shapes = ", ".join("x".join(map(str, t[0])) or "scalar" for t in tensors if isinstance(t, tuple))
    flags = [f"grad {'on' if grad else 'off'}", f"autocast {autocast}" if autocast else "no autocast"]
    flags += [name for name, on in (("dropout", active), ("train mode", training), ("recomputing", recomputing))
              if on]
    return f"inputs {shapes}; {', '.join(flags)}"
